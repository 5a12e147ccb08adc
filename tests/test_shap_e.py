"""The ``shap_e`` backend on a tiny random Shap-E built offline from the diffusers / transformers classes:
weights round trip, schedule parity with Shap-E's Heun scheduler, CFG shapes, sample -> decode -> render ->
reward gradients, decode against the renderer's own MLP, LoRA on the prior, missing weights."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from diffusers import HeunDiscreteScheduler  # noqa: E402

from r2d3.pipeline import Pipeline  # noqa: E402
from r2d3.backends import Backend, WeightsError, available_backends, load_backend  # noqa: E402
from r2d3.backends.shap_e import SHAP_E_SCHEDULER_CONFIG, SHAP_E_TO_WORLD, ShapEBackend  # noqa: E402
from r2d3.text import PromptEmbeds  # noqa: E402
from r2d3.config import RenderConfig, SamplerConfig  # noqa: E402
from r2d3.diffusion import guided_model_fn, scheduler_from_config  # noqa: E402
from r2d3.rewards import build_reward  # noqa: E402
from r2d3.backends.lora import add_lora  # noqa: E402

RES = 12


@pytest.fixture(scope="module")
def backend():
    return ShapEBackend.random_init(seed=0, resolution=RES)


@pytest.fixture(scope="module")
def weights(backend, tmp_path_factory):
    path = tmp_path_factory.mktemp("shap_e")
    backend.save_pretrained(path)
    return path


def _latents(backend, batch, seed=0):
    return torch.randn(batch, *backend.latent_shape, generator=torch.Generator().manual_seed(seed))


def test_registered_and_shapes(backend):
    assert "shap_e" in available_backends()
    assert isinstance(backend, Backend)
    assert backend.latent_shape == (32, 16)  # 4 x hidden rows of embedding_dim, like the real (1024, 1024)
    matched = {t for t in backend.lora_target_modules for n, _ in backend.denoiser.named_modules()
               if n == t or n.endswith("." + t)}
    assert matched == set(backend.lora_target_modules)


def test_round_trip_strict_keys_and_outputs(backend, weights):
    assert (weights / "model_index.json").is_file()
    loaded = load_backend("shap_e", weights=str(weights), device="cpu")
    for a, b in [(backend.denoiser, loaded.denoiser), (backend.text_encoder, loaded.text_encoder),
                 (backend.renderer, loaded.renderer)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert loaded.decoder_config() == backend.decoder_config()
    assert loaded.scheduler_config == backend.scheduler_config
    prompts = ["a red cube", "blue sphere", ""]
    c0, c1 = backend.encode_prompts(prompts), loaded.encode_prompts(prompts)
    assert torch.equal(c0.tokens, c1.tokens)
    x, t = _latents(backend, 3), torch.tensor([5, 300, 1023])
    assert torch.equal(backend.denoise(x, t, c0), loaded.denoise(x, t, c1))
    g0, g1 = backend.decode(x), loaded.decode(x)
    for name in ("means", "scales", "quats", "opacities", "colors"):
        assert torch.equal(getattr(g0, name), getattr(g1, name)), name


def test_alphas_cumprod_match_shap_e_heun(backend, weights):
    heun = HeunDiscreteScheduler.from_pretrained(weights / "scheduler")
    assert heun.config.beta_schedule == "exp" and heun.config.num_train_timesteps == 1024
    reference = HeunDiscreteScheduler(num_train_timesteps=1024, beta_schedule="exp", prediction_type="sample")
    assert torch.equal(heun.alphas_cumprod, reference.alphas_cumprod)
    for kind in ("ddim", "sde-dpmsolver++"):
        sched = scheduler_from_config(backend.scheduler_config, kind=kind)
        assert sched.config.prediction_type == "sample"
        assert torch.equal(sched.alphas_cumprod, heun.alphas_cumprod), kind
    # the "exp" schedule: alpha_bar(t) = exp(-12 (t + 1) / 1024)
    expected = torch.exp(-12.0 * torch.arange(1, 1025, dtype=torch.float64) / 1024)
    torch.testing.assert_close(heun.alphas_cumprod.double(), expected, rtol=1e-4, atol=0)
    assert SHAP_E_SCHEDULER_CONFIG["beta_schedule"] == "exp"


def test_encode_prompts_matches_shap_e_pipeline(backend):
    from diffusers import ShapEPipeline

    pipe = ShapEPipeline(prior=backend.denoiser, text_encoder=backend.text_encoder,
                         tokenizer=copy.deepcopy(backend.tokenizer),
                         scheduler=HeunDiscreteScheduler(**{k: v for k, v in SHAP_E_SCHEDULER_CONFIG.items()
                                                             if not k.startswith("_")}),
                         shap_e_renderer=backend.renderer)
    prompts = ["a red cube", "a green chair"]
    with torch.no_grad():
        reference = pipe._encode_prompt(prompts, "cpu", 1, True)  # [uncond (zeros); cond] * sqrt(D)
    ours = PromptEmbeds.cat([backend.encode_prompts([""]).to(device="cpu"), backend.encode_prompts(prompts)])
    torch.testing.assert_close(ours.tokens[:, 0], torch.cat([reference[:1], reference[2:]]))
    torch.testing.assert_close(backend.encode_prompts(prompts).tokens[:, 0], reference[2:])
    assert torch.equal(reference[:2], torch.zeros_like(reference[:2]))


def test_encode_and_denoise_with_cfg_batch(backend):
    cond = backend.encode_prompts(["a red cube", "a green chair"])
    uncond = backend.encode_prompts([""])
    assert cond.tokens.shape == (2, 1, 8) and cond.mask.all()
    assert torch.equal(uncond.tokens, torch.zeros(1, 1, 8))  # Shap-E's unconditional embedding
    torch.testing.assert_close(cond.tokens.norm(dim=-1), torch.full((2, 1), 8 ** 0.5))
    both = PromptEmbeds.cat([cond, uncond])
    x = _latents(backend, 2)
    t = torch.tensor([100, 700])
    model_fn = guided_model_fn(lambda x, t, c: backend.denoise(x, t, PromptEmbeds(c["tokens"], c["mask"])),
                               {"tokens": both.tokens[:2], "mask": both.mask[:2]},
                               {"tokens": both.tokens[2:], "mask": both.mask[2:]}, 3.0)
    out = model_fn(x, t)
    assert out.shape == (2, *backend.latent_shape) and torch.isfinite(out).all()
    c_out = backend.denoise(x, t, cond)
    u_out = backend.denoise(x, t, PromptEmbeds(uncond.tokens.expand(2, -1, -1), uncond.mask.expand(2, -1)))
    torch.testing.assert_close(out, u_out + 3.0 * (c_out - u_out), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="latents"):
        backend.denoise(torch.randn(1, 16, 32), torch.tensor([1]), cond[:1])


def test_sample_decode_render_reward_gradient(backend):
    render = RenderConfig(num_views=2, resolution=24, elevation_jitter_deg=0.0, azimuth_jitter_deg=0.0)
    reward = build_reward("colorfulness")
    sampler = SamplerConfig(kind="ddim", num_steps=4, eta=1.0, guidance_scale=3.0)
    ctx = Pipeline.build(backend, sampler, render, reward)
    prompts = ["a red cube", "a blue sphere"]
    cond = backend.encode_prompts(prompts)
    gen = torch.Generator().manual_seed(0)
    traj = ctx.sampler.sample(ctx.model_fn(cond), shape=(2, *backend.latent_shape), generator=gen)
    x0 = traj.final.detach().requires_grad_(True)
    assert x0.shape == (2, *backend.latent_shape) and torch.isfinite(x0).all()
    gaussians = backend.decode(x0)
    gaussians.validate()
    assert gaussians.means.shape == (2, RES ** 3, 3)
    assert (gaussians.opacities > 0).any()
    cams = ctx.cameras(2, torch.Generator().manual_seed(1))
    r = ctx.reward_of_latents(x0, prompts, cams)
    assert r.shape == (2,) and torch.isfinite(r).all()
    r.sum().backward()
    assert torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0
    # geometry reward: the normal (density gradient) path is differentiable too
    x1 = traj.final.detach().requires_grad_(True)
    dnc_reward = build_reward({"name": "dnc", "kwargs": {"detach_depth": False}})
    dnc = dnc_reward(ctx.render_views(backend.decode(x1), cams), prompts)
    dnc.sum().backward()
    assert torch.isfinite(x1.grad).all() and x1.grad.abs().sum() > 0


def test_decode_matches_renderer_mlp_at_a_grid_point(backend):
    x = _latents(backend, 2, seed=3)
    g = backend.decode(x)
    step = 2.0 / RES  # the renderer's box is [-1, 1]^3
    ijk = torch.tensor([7, 2, 9])
    p_shap = backend.grid_points()[(7 * RES + 2) * RES + 9]  # x slowest, z fastest
    # exact float coordinates matter: the NeRF encoding has frequencies up to 2^14
    torch.testing.assert_close(p_shap, -1.0 + (ijk + 0.5) * step)
    for b in range(2):
        # independent reference: the renderer's own weight update (as decode_to_image does) and MLP call
        renderer = copy.deepcopy(backend.renderer)
        with torch.no_grad():
            projected = renderer.params_proj(x[b: b + 1])
            for name, param in renderer.mlp.state_dict().items():
                if f"nerstf.{name}" in projected:
                    param.copy_(projected[f"nerstf.{name}"].squeeze(0))
            out = renderer.mlp(position=p_shap.view(1, 1, 3), direction=None, ts=None, nerf_level="fine")
        sigma, rgb = out.density.view(()), out.channels.view(3)
        # Shap-E z-up -> our y-up: (x, y, z) -> 0.625 * (x, z, -y)
        p_world = 0.625 * torch.stack([p_shap[0], p_shap[2], -p_shap[1]])
        torch.testing.assert_close(p_world, 0.625 * SHAP_E_TO_WORLD @ p_shap)
        index = int((g.means[b] - p_world).norm(dim=-1).argmin())
        torch.testing.assert_close(g.means[b, index], p_world)
        torch.testing.assert_close(g.colors[b, index], rgb, atol=1e-5, rtol=1e-5)
        alpha = 1 - torch.exp(-sigma * step)
        alpha = alpha if alpha >= backend.min_opacity else torch.zeros(())
        torch.testing.assert_close(g.opacities[b, index], alpha, atol=1e-6, rtol=1e-5)
    # scales: tangential 0.6 voxel, flattened along the normal (the Gaussian's local z)
    voxel = 0.625 * step
    torch.testing.assert_close(g.scales[0, 0], torch.tensor([0.6 * voxel, 0.6 * voxel, 0.3 * voxel]))


def test_decode_pruning_and_top_k(backend):
    x = _latents(backend, 2, seed=4)
    full = backend.decode(x)
    assert ((full.opacities == 0) | (full.opacities >= backend.min_opacity)).all()
    small = ShapEBackend(backend.denoiser, backend.text_encoder, backend.tokenizer, backend.renderer,
                         resolution=RES, max_gaussians=100)
    xg = x.clone().requires_grad_(True)
    top = small.decode(xg)
    assert top.means.shape == (2, 100, 3)
    expected = full.opacities.topk(100, dim=1).values.sort(dim=1).values
    torch.testing.assert_close(top.opacities.sort(dim=1).values, expected)
    top.opacities.sum().backward()
    assert xg.grad.abs().sum() > 0


def test_lora_on_prior_changes_output():
    backend = ShapEBackend.random_init(seed=1, resolution=RES)
    cond = backend.encode_prompts(["a red cube"])
    x, t = _latents(backend, 1), torch.tensor([500])
    before = backend.denoise(x, t, cond)
    params = add_lora(backend.denoiser, 2, None, backend.lora_target_modules)
    assert params and all(p.requires_grad for p in params)
    torch.testing.assert_close(backend.denoise(x, t, cond), before)  # zero-initialised adapter
    with torch.no_grad():
        for name, p in backend.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    after = backend.denoise(x, t, cond)
    assert (after - before).abs().max() > 1e-4
    after.square().sum().backward()
    assert all(p.grad is not None for p in params)


def test_missing_or_corrupt_weights_raise(weights, tmp_path):
    with pytest.raises(WeightsError, match="openai/shap-e"):
        load_backend("shap_e", weights=None)
    broken = tmp_path / "missing"
    shutil.copytree(weights, broken)
    (broken / "prior" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"prior/diffusion_pytorch_model\.safetensors.*openai/shap-e"):
        ShapEBackend.from_pretrained(broken)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(weights, corrupt)
    (corrupt / "shap_e_renderer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="renderer"):
        ShapEBackend.from_pretrained(corrupt)
    corrupt_text = tmp_path / "corrupt_text"
    shutil.copytree(weights, corrupt_text)
    (corrupt_text / "text_encoder" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(WeightsError, match="openai/shap-e"):
        ShapEBackend.from_pretrained(corrupt_text)


def test_shap_e_samples_end_with_the_priors_clean_prediction():
    """Shap-E's cleanest training level is still noisy (alpha_bar 0.988), so its samples end, as its own
    Heun sampler does, with the prior's x_0 prediction at the last state; the training loop samples so."""
    from r2d3.train.loop import sample_batch

    backend = ShapEBackend.random_init()
    assert backend.final_x0
    ctx = Pipeline.build(backend, SamplerConfig(num_steps=3, guidance_scale=1.0), RenderConfig(num_views=1, resolution=8),
                         build_reward("colorfulness"))
    batch = sample_batch(ctx, ["a chair"], torch.Generator().manual_seed(0))
    traj = batch.trajectory
    assert traj.clean_final is not None and not torch.equal(traj.final, traj.latents[:, -1])
    assert float(ctx.sampler.alpha_bar_next[-1]) < 0.99
