"""The alignment losses: hand-derived targets on a toy diffusion, zero gradients at the base model,
reward gradients against finite differences, DDPO's ratio, subsampling and bad hyperparameters."""

import math

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from torch import nn

from r2d3.algos import SampleBatch, build_algorithm, stratified_transitions
from r2d3.algos.ddpo import per_prompt_advantages
from r2d3.backends import TinySplatBackend
from r2d3.text import PromptEmbeds
from r2d3.algos.base import algorithm_options
from r2d3.algos.nabla_gfn import NablaGFNConfig
from r2d3.config import RenderConfig
from r2d3.diffusion import StochasticSampler, make_scheduler
from r2d3.rewards import build_reward
from r2d3.backends.lora import add_lora
from r2d3.pipeline import Pipeline
from r2d3.render.cameras import Cameras
from helpers import rows_at

# ---------------------------------------------------------------- a toy 1-D diffusion with an analytic reward


DATA_VAR = 0.25
SCHEDULE = make_scheduler("ddim", beta_schedule="squaredcos_cap_v2")


def eps_gain(timestep) -> torch.Tensor:
    """The exact epsilon-prediction of data ~ N(0, DATA_VAR): eps = gain(t) * x."""
    ab = SCHEDULE.alphas_cumprod.double()[timestep]
    return (1 - ab).sqrt() / (ab * DATA_VAR + 1 - ab)


class ToyDenoiser(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """eps(x, t) = gain(t) * w * x with w = 1: the Bayes-optimal denoiser, one linear map LoRA can adapt."""

    @register_to_config
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(1, 1, bias=False)
        nn.init.constant_(self.to_q.weight, 1.0)

    def forward(self, x, t, cond):
        return self.to_q(x) * eps_gain(t).view(-1, 1).to(x)


class ToyBackend:
    name = "toy"
    lora_target_modules = ["to_q"]
    latent_shape = (1,)

    def __init__(self):
        self.denoiser = ToyDenoiser().double()

    @property
    def device(self):
        return torch.device("cpu")

    def encode_prompts(self, prompts):
        return PromptEmbeds(torch.zeros(len(prompts), 1, 1, dtype=torch.float64), torch.ones(len(prompts), 1, dtype=torch.bool))

    def denoise(self, x, t, cond):
        return self.denoiser(x, t, cond)


class ToyContext(Pipeline):
    """Reward straight on the latent: r(x) = -(x - c)^2, so every gradient has a closed form."""

    target_value = 0.7

    def reward_of_latents(self, x0, prompts, cameras, image_noise=0.0, generator=None):
        return -(x0[:, 0] - self.target_value) ** 2

    def cameras(self, batch_size, generator, jitter=True):
        return None


def toy_setup(algo_overrides=None, num_steps=4):
    backend = ToyBackend()
    sampler = StochasticSampler(SCHEDULE, num_steps, eta=1.0)
    ctx = ToyContext(backend, sampler, RenderConfig(), 1.0, backend.encode_prompts([""]))
    torch.manual_seed(0)
    add_lora(backend.denoiser, 1, None, ["to_q"])
    options = dict(algo_overrides or {})
    name = options.pop("name", "nabla_gfn")
    if name == "nabla_gfn":
        options = {"beta": 2.0, "reg_scale": 0.0, "off_policy_lag": False} | options
    config = algorithm_options(name)(**options)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 1 + num_steps, 1, generator=gen, dtype=torch.float64)
    prompts = ["p", "p", "q"]
    cond = backend.encode_prompts(prompts)
    traj = sampler.sample(ctx.model_fn(cond), x_T=noise[:, 0], noises=noise[:, 1:])
    batch = SampleBatch(traj, prompts, cond, ctx.reward_of_latents(traj.final, prompts, None))
    return ctx, batch, build_algorithm(config, num_steps)


def test_nabla_gfn_target_matches_hand_derivation():
    ctx, batch, algo = toy_setup()
    traj = batch.trajectory
    for j in range(traj.num_steps):
        terms = algo.transition(ctx, ctx.model_fn(batch.cond), rows_at(traj, j, batch.prompts, batch.cond))
        x_t, x_next = traj.latents[:, j, 0], traj.latents[:, j + 1, 0]
        # the base model: mu = a x_t + b x0(x_t), x0 = (x - sqrt(1 - abar) w x) / sqrt(abar)
        abar = float(ctx.sampler.alpha_bar[j])
        a, b = float(ctx.sampler.mean_coef_sample[j]), float(ctx.sampler.mean_coef_x0[j])
        std = float(ctx.sampler.stds[j])
        w = float(eps_gain(traj.timesteps[j]))
        mu = a * x_t + b * (x_t - math.sqrt(1 - abar) * w * x_t) / math.sqrt(abar)
        score_ref = -(x_next - mu) / std**2
        # forward-looking reward gradient at x_{t-1}: d/dx' of -(x0_hat(x') - c)^2
        abar_n = float(ctx.sampler.alpha_bar_next[j])
        w_n = float(eps_gain(ctx.sampler.next_timesteps[j]))
        k = (1 - math.sqrt(1 - abar_n) * w_n) / math.sqrt(abar_n)
        g = -2 * (k * x_next - ToyContext.target_value) * k
        target = score_ref + 2.0 * abar_n * g
        torch.testing.assert_close(terms["score_ref"][:, 0], score_ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(terms["target"][:, 0], target, rtol=1e-9, atol=1e-9)
        # at theta = base the policy score equals the reference score: the loss is the drive squared
        torch.testing.assert_close(terms["loss_score"], ((target - score_ref) ** 2).mean(), rtol=1e-9, atol=1e-12)


def test_sqrt_weighting_and_gradient_clip():
    ctx, batch, algo = toy_setup({"reward_weighting": "sqrt", "reward_grad_clip": 1e-3})
    terms = algo.transition(ctx, ctx.model_fn(batch.cond), rows_at(batch.trajectory, 1, batch.prompts, batch.cond))
    assert terms["drive"].abs().max() <= 1e-3 + 1e-12
    with pytest.raises(ValueError, match="reward_weighting"):
        build_algorithm(NablaGFNConfig(reward_weighting="cubed"), 4)


def test_zero_beta_and_lambda_give_zero_gradient_at_base():
    ctx, batch, algo = toy_setup({"beta": 0.0, "reg_scale": 0.0})
    algo.accumulate(ctx, batch, 1.0, torch.Generator().manual_seed(1))
    grads = [p.grad for p in ctx.backend.denoiser.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().max() == 0 for g in grads)
    # and a positive beta does move the LoRA weights
    ctx, batch, algo = toy_setup({"beta": 2.0})
    algo.accumulate(ctx, batch, 1.0, torch.Generator().manual_seed(1))
    assert any(p.grad.abs().max() > 0 for p in ctx.backend.denoiser.parameters() if p.requires_grad)


def test_ddpo_ratio_is_one_at_the_sampling_policy():
    ctx, batch, algo = toy_setup({"name": "ddpo"})
    metrics = algo.accumulate(ctx, algo.prepare(batch), 1.0, torch.Generator().manual_seed(0))
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["clip_frac"] == 0.0


def test_per_prompt_advantages_normalise_within_prompts():
    adv = per_prompt_advantages(torch.tensor([1.0, 3.0, 10.0, 30.0, 5.0]), ["a", "a", "b", "b", "c"])
    torch.testing.assert_close(adv[:4], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["nabla_gfn", "refl", "draft", "ddpo"])
def test_one_small_step_along_the_gradient_lowers_the_loss(name):
    own = {"nabla_gfn": {"reg_scale": 1.0}, "refl": {"refl_min_step": -2}, "draft": {"draft_k": 2}, "ddpo": {}}
    ctx, batch, algo = toy_setup({"name": name, **own[name]})
    batch = algo.prepare(batch)
    params = [p for p in ctx.backend.denoiser.parameters() if p.requires_grad]
    if name == "ddpo":  # the clipped objective is flat at ratio 1 beyond the clip range: widen it
        algo.config.clip_range = 10.0
    loss = lambda: algo.accumulate(ctx, batch, 1.0, torch.Generator().manual_seed(0))["loss"]  # noqa: E731
    before = loss()
    grads = [p.grad.clone() for p in params]
    assert any(g.abs().max() > 0 for g in grads)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(1e-4 * g / max(float(torch.cat([x.flatten() for x in grads]).norm()), 1e-12))
            p.grad = None
    assert loss() < before


def test_stratified_transitions_always_include_the_last_step():
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        picks = stratified_transitions(20, 0.4, gen)
        assert len(picks) == 8 and picks[-1] == 19 and picks == sorted(set(picks))
        assert picks[0] <= 3 and 15 <= picks[-2] <= 18  # spread over the schedule, not clumped
        seen.update(picks)
    assert seen == set(range(20))
    assert stratified_transitions(5, 1.0, gen) == [0, 1, 2, 3, 4]
    assert stratified_transitions(5, 0.01, gen) == [4]


@pytest.mark.parametrize("overrides, message", [
    ({"name": "nope"}, "valid algorithms: ddpo, draft, nabla_gfn, refl"),
    ({"beta": -1.0}, "beta must be >= 0"),
    ({"reg_scale": -1.0}, "reg_scale"),
    ({"timestep_fraction": 0.0}, r"timestep_fraction must be in \(0, 1\]"),
    ({"timestep_fraction": 1.5}, r"timestep_fraction must be in \(0, 1\]"),
    ({"name": "draft", "draft_k": 21}, r"draft_k must be in \[1, 20\]"),
    ({"name": "refl", "refl_min_step": -30}, "refl_min_step"),
    ({"name": "ddpo", "clip_range": 0.0}, "clip_range"),
])
def test_bad_hyperparameters_are_named(overrides, message):
    options = dict(overrides)
    with pytest.raises(ValueError, match=message):
        build_algorithm(algorithm_options(options.pop("name", "nabla_gfn"))(**options), 20)


# ---------------------------------------------------------------- the real chain: decode -> render -> reward


def test_reward_gradient_matches_finite_differences_through_render():
    torch.manual_seed(0)
    backend = TinySplatBackend.random_init(num_gaussians=12, dim=16, vocab=("a",))
    nn.init.normal_(backend.denoiser.proj_out.weight, std=0.05)
    backend.denoiser.double()
    backend.text_encoder.double()
    sampler = StochasticSampler(make_scheduler("ddim", beta_schedule="squaredcos_cap_v2"), 4)
    render = RenderConfig(num_views=2, resolution=16, elevation_jitter_deg=0.0, azimuth_jitter_deg=0.0)
    ctx = Pipeline(backend, sampler, render, 2.0, backend.encode_prompts([""]), build_reward("colorfulness"))
    algo = build_algorithm(NablaGFNConfig(), 4)
    cond = backend.encode_prompts(["a"])
    model_fn = ctx.model_fn(cond)
    cams = ctx.cameras(1, None, jitter=False)
    cams.viewmats, cams.Ks = cams.viewmats.double(), cams.Ks.double()
    x = torch.randn(1, 12, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.5
    step = 2
    grad, _ = algo.reward_grad(ctx, model_fn, x, step, ["a"], cams)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0

    def reward(z):
        with torch.no_grad():
            return float(ctx.reward_of_latents(algo.x0_next(ctx, model_fn, z, step), ["a"], cams))

    direction = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    eps = 1e-6
    fd = (reward(x + eps * direction) - reward(x - eps * direction)) / (2 * eps)
    assert fd == pytest.approx(float((grad * direction).sum()), rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("per_transition", [False, True])
def test_reward_cameras_drawn_per_batch_or_per_transition(per_transition, monkeypatch):
    """r2d3 draws the reward cameras once per train batch; algo.cameras_per_transition redraws them for
    every trained transition, as the reference code does. Every row of the stacked transitions carries
    its own trajectory's camera of its draw."""
    ctx, batch, algo = toy_setup({"cameras_per_transition": per_transition, "timestep_fraction": 1.0})
    draws, seen = [], []
    real_transition = algo.transition

    def cameras(batch_size, generator, jitter=True):  # camera b of draw d is marked 100 * d + b
        marks = 100.0 * len(draws) + torch.arange(batch_size, dtype=torch.float32)
        draws.append(marks)
        return Cameras(marks.view(-1, 1, 1, 1).expand(-1, 1, 4, 4), torch.zeros(batch_size, 1, 3, 3), 8, 8)

    def transition(ctx_, model_fn, rows, generator=None, **kw):
        seen.append(rows.cameras.viewmats[:, 0, 0, 0])
        rows.cameras = None  # the toy reward does not render
        return real_transition(ctx_, model_fn, rows, generator, **kw)

    monkeypatch.setattr(ctx, "cameras", cameras)
    monkeypatch.setattr(algo, "transition", transition)
    algo.accumulate(ctx, batch, 1.0, torch.Generator().manual_seed(0))
    steps, size = batch.trajectory.num_steps, len(batch)
    assert len(draws) == (steps if per_transition else 1)
    draw = torch.arange(steps).repeat_interleave(size) if per_transition else torch.zeros(steps * size)
    expected = 100.0 * draw + torch.arange(size).repeat(steps)  # rows step by step, trajectories within
    torch.testing.assert_close(torch.cat(seen), expected.float())
