"""Render + reward behind the scorer seam: the chain rule through RemoteScorer matches in-process
autograd, and a Ray pool of named render/reward actors gives the same rewards and gradients."""

from dataclasses import replace

import pytest
import torch

from r2d3.pipeline import Pipeline
from r2d3.backends import TinySplatBackend
from r2d3.config import RenderConfig, ScaleConfig, build_config
from r2d3.train.config import AlignConfig
from r2d3.data.procedural import VOCABULARY
from r2d3.render.gaussians import Gaussians
from r2d3.rewards import build_reward
from r2d3.rewards.remote import RemoteScorer, in_process_scorer, score_with_grad

PROMPTS = ["a red cube", "a blue sphere", "a green cone"]
REWARDS = ["colorfulness", {"name": "dnc", "kwargs": {"detach_depth": False}}]


@pytest.fixture(scope="module")
def backend():
    return TinySplatBackend.random_init(num_gaussians=24, dim=16, vocab=VOCABULARY)


def latents(batch: int, num: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Surface-Gaussian latents inside the cube, colours away from the decoder's clamp."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num, 9, generator=g, dtype=dtype)
    x[..., 0:3] *= 0.4
    x[..., 3:6] = x[..., 3:6].tanh() * 0.8
    return x


def contexts(backend, reward_spec, render: RenderConfig):
    reward = build_reward(reward_spec).requires_grad_(False)
    plain = Pipeline(backend, None, render, 1.0, None, reward)
    return plain, replace(plain, scorer=in_process_scorer(reward, render))


RENDER = RenderConfig(num_views=2, resolution=16, backend="torch")


@pytest.mark.parametrize("spec", REWARDS, ids=["colorfulness", "dnc"])
def test_scorer_matches_in_process_rewards_and_latent_gradients(backend, spec):
    plain, remote = contexts(backend, spec, RENDER)
    cams = plain.cameras(len(PROMPTS), torch.Generator().manual_seed(1))
    weights = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)  # a non-uniform upstream gradient dL/dr
    out = {}
    for name, ctx in (("plain", plain), ("remote", remote)):
        x = latents(len(PROMPTS), 24).requires_grad_(True)
        r = ctx.reward_of_latents(x, PROMPTS, cams)
        (g_sum,) = torch.autograd.grad(r.sum(), x, retain_graph=True)  # what Nabla-GFN takes
        (r * weights).sum().backward()  # what ReFL/DRaFT do
        out[name] = (r.detach(), g_sum, x.grad)
    assert out["plain"][0].dtype == out["remote"][0].dtype == torch.float64
    assert out["plain"][1].abs().sum() > 0
    for a, b in zip(out["plain"], out["remote"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # sampling / DDPO path
        x = latents(len(PROMPTS), 24)
        torch.testing.assert_close(remote.reward_of_latents(x, PROMPTS, cams),
                                   plain.reward_of_latents(x, PROMPTS, cams), rtol=1e-10, atol=1e-12)


def test_scorer_passes_gradcheck_and_is_first_order_only(backend):
    render = RenderConfig(num_views=1, resolution=8, backend="torch")
    plain, remote = contexts(backend, "colorfulness", render)
    cams = plain.cameras(2, torch.Generator().manual_seed(2))
    x = latents(2, 4, seed=3).requires_grad_(True)
    fn = lambda z: remote.reward_of_latents(z, PROMPTS[:2], cams)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    with pytest.raises(RuntimeError, match="first order only"):
        torch.autograd.grad(fn(x).sum(), x, create_graph=True)


def test_score_with_grad_is_the_gradient_of_the_summed_reward(backend):
    reward = build_reward("colorfulness")
    cams = Pipeline(backend, None, RENDER, 1.0, None, reward).cameras(2, None, jitter=False)
    gaussians = backend.decode(latents(2, 24))
    rewards, grads = score_with_grad(gaussians, cams, PROMPTS[:2], reward, RENDER, need_grad=True)
    none_rewards, none_grads = score_with_grad(gaussians, cams, PROMPTS[:2], reward, RENDER, need_grad=False)
    assert none_grads is None and torch.equal(rewards, none_rewards) and not rewards.requires_grad
    colors = gaussians.colors.clone().requires_grad_(True)
    again = score_with_grad(replace(gaussians, colors=colors), cams, PROMPTS[:2], reward, RENDER, True)[0]
    assert torch.equal(again, rewards)
    for name in ("means", "scales", "quats", "opacities", "colors"):
        assert getattr(grads, name).shape == getattr(gaussians, name).shape, name
    assert grads.colors.abs().sum() > 0 and grads.means.abs().sum() > 0


class FakeEvaluate:
    """rewards = sum of colours (one NaN asset); gradients in float32 on the CPU, whatever came in."""

    def __init__(self):
        self.calls: list[bool] = []

    def __call__(self, gaussians, cameras, prompts, need_grad):
        self.calls.append(need_grad)
        rewards = gaussians.colors.detach().float().sum(dim=(1, 2)).cpu()
        rewards[-1] = float("nan")
        if not need_grad:
            return rewards, None
        ones = lambda t: torch.ones(t.shape, dtype=torch.float32)  # noqa: E731
        return rewards, Gaussians(*(ones(getattr(gaussians, f)) for f in ("means", "scales", "quats",
                                                                           "opacities", "colors")))


def test_remote_scorer_asks_for_gradients_only_when_needed_and_casts_them():
    evaluate = FakeEvaluate()
    scorer = RemoteScorer(evaluate)
    b, n = 3, 5
    colors = torch.rand(b, n, 3, dtype=torch.float64, requires_grad=True)
    means = torch.rand(b, n, 3, dtype=torch.float64)
    g = Gaussians(means, torch.ones(b, n, 3, dtype=torch.float64), torch.ones(b, n, 4, dtype=torch.float64),
                  torch.ones(b, n, dtype=torch.float64), colors)
    with torch.no_grad():
        scorer(g, None, PROMPTS)
    scorer(replace(g, colors=colors.detach()), None, PROMPTS)  # nothing requires grad
    r = scorer(g, None, PROMPTS)
    assert evaluate.calls == [False, False, True]
    assert torch.isnan(r[-1]) and torch.isfinite(r[:-1]).all()  # non-finite rewards pass through
    w = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64)
    (r[:-1] * w[:-1]).sum().backward()
    assert colors.grad.dtype == torch.float64
    torch.testing.assert_close(colors.grad, w[:, None, None].expand(b, n, 3), rtol=0, atol=0)


def tiny_loop_config(tmp_path) -> AlignConfig:
    backend = TinySplatBackend.random_init(num_gaussians=24, dim=16, vocab=("a", "red", "blue", "cube"))
    torch.nn.init.normal_(backend.denoiser.proj_out.weight, std=0.05)
    backend.save_pretrained(tmp_path / "w")
    (tmp_path / "prompts.txt").write_text("a red cube\na blue cube\n")
    return build_config(AlignConfig, overrides=[
        f"model.weights={tmp_path / 'w'}", f"data.prompts={tmp_path / 'prompts.txt'}", "reward=colorfulness",
        "train.epochs=1", "train.sample_batch_size=4", "train.train_batch_size=4", "sampler.num_steps=4",
        "render.num_views=2", "render.resolution=16", "model.lora_rank=2", "run.progress=false",
        "algo.beta=1e3", "algo.off_policy_lag=false", "run.device=cpu"])


def test_loop_with_the_scorer_makes_the_same_first_update_without_a_reward_on_the_trainer(tmp_path, monkeypatch):
    from r2d3.train.loop import run
    from r2d3.train.session import LocalSession

    config = tiny_loop_config(tmp_path)
    plain = run(config, LocalSession(tmp_path / "plain"))
    session = LocalSession(tmp_path / "remote")
    scorer = in_process_scorer(build_reward(config.reward).requires_grad_(False), config.render)
    session.scorer = scorer
    evaluate, calls = scorer.evaluate, []
    scorer.evaluate = lambda *args: calls.append(args[-1]) or evaluate(*args)
    # the scorer owns the reward: the trainer neither loads nor builds one (regression: it loaded it anyway)
    monkeypatch.setattr("r2d3.train.loop.load_reward", lambda *a, **k: pytest.fail("the trainer loaded the reward"))
    monkeypatch.setattr("r2d3.rewards.base._make", lambda *a, **k: pytest.fail("the trainer built a reward"))
    remote = run(config, session)
    assert False in calls and True in calls  # sampling without gradients, training with them
    assert plain["history"][0]["optimizer_steps"] == remote["history"][0]["optimizer_steps"] == 1
    assert plain["history"][0]["reward_mean"] == pytest.approx(remote["history"][0]["reward_mean"], rel=1e-6)
    for p, q in zip(plain["worker"].params, remote["worker"].params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ray_pool_matches_in_process_and_is_shared(ray_local, backend):
    from ray.util import list_named_actors

    from r2d3.ray.reward_actors import make_remote_scorer, pool_key

    spec = {"colorfulness": 1.0, "dnc": 0.5}
    config = replace(AlignConfig(), reward=spec, render=RENDER,
                     scale=ScaleConfig(reward_actors=2, reward_actor_cpus=0.5, reward_actor_gpus=0.0))
    scorer = make_remote_scorer(config)
    plain, local = contexts(backend, spec, RENDER)
    ray_ctx = replace(plain, scorer=scorer)
    cams = plain.cameras(3, torch.Generator().manual_seed(4))
    for batch in (slice(0, 3), slice(0, 1), slice(1, 2)):  # 2 chunks, then one asset per call (rotating)
        results = []
        for ctx in (plain, ray_ctx):
            x = latents(3, 24, dtype=torch.float32, seed=5)[batch].requires_grad_(True)
            sub = replace(cams, viewmats=cams.viewmats[batch], Ks=cams.Ks[batch])
            r = ctx.reward_of_latents(x, PROMPTS[batch], sub)
            (g,) = torch.autograd.grad(r.sum(), x)
            results.append((r.detach(), g))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a second trainer gets the same two actors instead of loading the model again
    first, second = scorer.evaluate.info(), make_remote_scorer(config).evaluate.info()
    assert [i["actor_id"] for i in first] == [i["actor_id"] for i in second]
    assert len({i["actor_id"] for i in first}) == 2
    names = [a["name"] for a in list_named_actors(all_namespaces=True)]
    assert sum(pool_key(config) in n for n in names) == 2
    # an actor process killed from outside (the OOM killer, say) is restarted and the call retried
    import os
    import signal

    pool = scorer.evaluate
    os.kill(first[0]["pid"], signal.SIGKILL)
    x = latents(3, 24, dtype=torch.float32, seed=5).requires_grad_(True)
    again = ray_ctx.reward_of_latents(x, PROMPTS[:3], cams)
    torch.testing.assert_close(again.detach(), plain.reward_of_latents(x, PROMPTS[:3], cams).detach(),
                               rtol=1e-5, atol=1e-6)
    after = pool.info()
    assert after[0]["pid"] != first[0]["pid"] and after[0]["actor_id"] == first[0]["actor_id"]
    # an actor killed for good is named in the error
    ray_local.kill(pool.actors[0], no_restart=True)
    with pytest.raises(RuntimeError, match=f"{pool.names[0]}.*colorfulness"):
        with torch.no_grad():
            ray_ctx.reward_of_latents(latents(2, 24, dtype=torch.float32), PROMPTS[:2], cams)
