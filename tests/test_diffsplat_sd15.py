"""DiffSplat-SD1.5 backend on tiny random models built from the same classes: the released UNet layout
(DiffSplat's multi-view class and block names) loading strictly, the cross-view attention, CLIP prompts,
the schedule DiffSplat samples SD1.5 with, the release assembly and the sample -> render -> reward chain."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from r2d3.backends import WeightsError, load_backend  # noqa: E402
from r2d3.backends.base import sampler_defaults  # noqa: E402
from r2d3.backends.diffsplat_sd15 import DiffSplatSD15Backend, tiny_diffsplat_sd15  # noqa: E402
from r2d3.backends.diffsplat_weights import assemble_release, load_unet  # noqa: E402
from r2d3.config import RenderConfig, SamplerConfig  # noqa: E402
from r2d3.diffusion import StochasticSampler, scheduler_from_config  # noqa: E402
from r2d3.pipeline import Pipeline  # noqa: E402
from r2d3.rewards import build_reward  # noqa: E402

VOCAB = ["a", "red", "chair", "blue", "lamp"]
#: DiffSplat's UNetMV2DConditionModel names in a released unet_ema/config.json
MV_NAMES = {"_class_name": "UNetMV2DConditionModel",
            "down_block_types": ["CrossAttnDownBlockMV2D", "DownBlock2D"],
            "mid_block_type": "UNetMidBlockMV2DCrossAttn", "up_block_types": ["UpBlock2D", "CrossAttnUpBlockMV2D"],
            "view_concat_condition": False, "input_concat_plucker": True, "input_concat_binary_mask": False}


@pytest.fixture(scope="module")
def backend():
    b = tiny_diffsplat_sd15(vocab=VOCAB)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # diffusers zero-inits the UNet's output conv: make every output non-trivial
        for p in b.denoiser.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return b


@pytest.fixture(scope="module")
def saved(backend, tmp_path_factory):
    path = tmp_path_factory.mktemp("diffsplat_sd15")
    backend.save_pretrained(path)
    return path


def _plain_unet(backend) -> UNet2DConditionModel:
    """The same weights in diffusers' own 2D UNet (per-view self-attention)."""
    config = {k: v for k, v in backend.denoiser.config.items() if not k.startswith("_")}
    plain = UNet2DConditionModel(**config)
    plain.load_state_dict(backend.denoiser.state_dict())
    return plain.eval()


def _release_unet(backend, directory: Path, **config) -> None:
    """Write the UNet as DiffSplat's EMA model saves it: MV class/block names, its flags, sharded weights."""
    _plain_unet(backend).save_pretrained(directory, safe_serialization=True, max_shard_size="20KB")
    file = directory / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **MV_NAMES, **config}))


def test_round_trip_and_lazy_clip(backend, saved):
    loaded = load_backend("diffsplat_sd15", weights=str(saved))
    assert isinstance(loaded, DiffSplatSD15Backend) and loaded._text_encoder is None
    cond = backend.encode_prompts(["a red chair", ""])
    got = loaded.encode_prompts(["a red chair", ""])
    assert torch.equal(got.tokens, cond.tokens) and loaded.text_encoder.dtype == torch.float32
    assert cond.tokens.shape == (2, 12, 16) and bool(cond.mask.all())  # padded to the tokenizer's length, unmasked
    x, t = torch.randn(2, *backend.latent_shape), torch.tensor([700, 3])
    assert torch.allclose(loaded.denoise(x, t, cond), backend.denoise(x, t, cond), atol=1e-6)
    assert torch.allclose(loaded.decode(x).means, backend.decode(x).means, atol=1e-6)
    assert loaded.scheduler_config == backend.scheduler_config
    assert (saved / "unet" / "config.json").is_file() and not (saved / "transformer").exists()


def test_clip_embeddings_are_the_last_hidden_state_of_the_padded_prompt(backend):
    encoder, tokenizer = backend._text()
    ids = tokenizer(["Blue lamp"], padding="max_length", max_length=12, return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, 3] == tokenizer.eos_token_id
    ref = encoder(ids).last_hidden_state  # every position, padding included, is attended to
    assert torch.allclose(backend.encode_prompts(["Blue lamp"]).tokens, ref, atol=1e-6)
    masked = backend.encode_prompts(["lamp"])
    masked.mask[:, -1] = False
    with pytest.raises(ValueError, match="unmasked CLIP"):
        backend.denoise(torch.randn(1, *backend.latent_shape), torch.tensor([10]), masked)


def test_released_unet_layout_loads_strictly(backend, tmp_path):
    _release_unet(backend, tmp_path / "unet")
    assert list((tmp_path / "unet").glob("*.index.json"))  # sharded, as released
    loaded = load_unet(tmp_path / "unet")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in backend.denoiser.state_dict().items())
    assert loaded.config.down_block_types[0] == "CrossAttnDownBlock2D"
    for flag, value in (("view_concat_condition", True), ("input_concat_binary_mask", True)):
        _release_unet(backend, tmp_path / flag, **{flag: value})
        with pytest.raises(WeightsError, match="image-conditioned"):
            load_unet(tmp_path / flag)
    _release_unet(backend, tmp_path / "noplucker", input_concat_plucker=False)
    with pytest.raises(WeightsError, match="Plücker"):
        load_unet(tmp_path / "noplucker")


def test_self_attention_spans_views_and_is_the_2d_unet_per_view(backend):
    """With one view per object the multi-view UNet is diffusers' 2D UNet exactly; with four, a change to
    one view reaches the others' predictions (it cannot through per-view attention and convolutions)."""
    plain = _plain_unet(backend)
    cond = backend.encode_prompts(["a red chair"])
    inputs, t = torch.randn(4, 10, 4, 4), torch.full((4,), 500)
    tokens = cond.tokens.repeat(4, 1, 1)
    with torch.no_grad():
        per_view = plain(inputs, t, encoder_hidden_states=tokens).sample
        backend.denoiser.set_num_views(1)
        try:
            single = backend.denoiser(inputs, t, encoder_hidden_states=tokens).sample
        finally:
            backend.denoiser.set_num_views(4)
        joint = backend.denoiser(inputs, t, encoder_hidden_states=tokens).sample
        shifted = inputs.clone()
        shifted[1] += 1.0
        moved = backend.denoiser(shifted, t, encoder_hidden_states=tokens).sample
        moved_plain = plain(shifted, t, encoder_hidden_states=tokens).sample
    assert torch.allclose(single, per_view, atol=1e-5)
    assert (joint - per_view).abs().max() > 1e-4
    assert (moved[0] - joint[0]).abs().max() > 1e-5 and torch.equal(moved_plain[0], per_view[0])


def test_schedule_is_diffsplats_common_tricks(backend):
    """Trailing spacing from t = 999 at zero terminal SNR (diffusers' DPM keeps alpha_bar = 2^-24 there, so
    epsilon's x_0 stays finite); DDIM, which keeps alpha_bar = 0, is refused with a named error."""
    config = backend.scheduler_config
    assert config["timestep_spacing"] == "trailing" and config["rescale_betas_zero_snr"] is True
    defaults = sampler_defaults("diffsplat_sd15")
    assert defaults == {"kind": "sde-dpmsolver++", "num_steps": 20, "eta": 1.0, "guidance_scale": 7.5}
    sampler = StochasticSampler(scheduler_from_config(config, kind="sde-dpmsolver++"), 20, eta=1.0)
    assert int(sampler.timesteps[0]) == 999 and int(sampler.timesteps[-1]) == 49
    reference = DPMSolverMultistepScheduler.from_config(config)
    reference.set_timesteps(20)
    assert sampler.timesteps.tolist() == reference.timesteps.tolist()
    assert float(sampler.alpha_bar[0]) == pytest.approx(2.0 ** -24, rel=1e-3)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        StochasticSampler(scheduler_from_config(config, kind="ddim"), 20, eta=1.0)


def test_sample_render_reward_and_lora(backend):
    """The aligner's chain on DiffSplat-SD1.5 (20 steps, CFG 7.5 from the backend's defaults, shortened):
    decode, render and a reward with a finite gradient w.r.t. the latents; LoRA adapts the UNet's
    attention, feed-forward, projections and timestep embedding and not its convolutions."""
    from r2d3.backends.lora import add_lora

    sampler = SamplerConfig(**{**sampler_defaults("diffsplat_sd15"), "num_steps": 3})
    render = RenderConfig(num_views=2, resolution=16, distance=1.4, fov_deg=39.6, elevation_deg=0.0)
    ctx = Pipeline.build(backend, sampler, render, build_reward("colorfulness"))
    gen = torch.Generator().manual_seed(0)
    prompts = ["a red chair", "blue lamp"]
    traj = ctx.sampler.sample(ctx.model_fn(backend.encode_prompts(prompts)), shape=(2, *backend.latent_shape),
                              generator=gen)
    assert torch.isfinite(traj.final).all()
    x0 = traj.final.detach().requires_grad_(True)
    reward = ctx.reward_of_latents(x0, prompts, ctx.cameras(2, gen))
    reward.sum().backward()
    assert reward.shape == (2,) and torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0

    den = tiny_diffsplat_sd15(vocab=VOCAB).denoiser
    assert add_lora(den, 4, None, backend.lora_target_modules)
    names = {n.split(".lora_A")[0] for n, _ in den.named_parameters() if "lora_A" in n}
    assert any(n.endswith("attn2.to_k") for n in names) and any(n.endswith("proj_in") for n in names)
    assert any(n.startswith("time_embedding.linear_1") for n in names)
    assert not any("conv" in n or "resnets" in n for n in names)


def test_assemble_release_with_sd15(backend, tmp_path):
    """DiffSplat's SD1.5 runs and stable-diffusion-v1-5's folders -> the diffsplat_sd15 layout, loading to
    the same model with SD1.5's scheduler plus DiffSplat's tricks; a missing base directory is named."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
    import convert_weights

    dl, sd15 = tmp_path / "DiffSplat", tmp_path / "sd15"
    _release_unet(backend, dl / "gsdiff_gobj83k_sd15__render" / "checkpoints" / "004000" / "unet_ema")
    (dl / "gsvae_gobj265k_sd" / "checkpoints" / "000100").mkdir(parents=True)
    save_file(backend.gsvae.state_dict(), dl / "gsvae_gobj265k_sd" / "checkpoints" / "000100" / "model.safetensors")
    (sd15 / "vae").mkdir(parents=True)
    (sd15 / "vae" / "config.json").write_text(json.dumps({**backend.gsvae.vae_config, "in_channels": 3,
                                                          "out_channels": 3}, default=list))
    (sd15 / "scheduler").mkdir()
    released = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                "set_alpha_to_one": False, "skip_prk_steps": True}  # SD1.5's scheduler_config.json
    (sd15 / "scheduler" / "scheduler_config.json").write_text(json.dumps(released))
    encoder, tokenizer = backend._text()
    encoder.save_pretrained(sd15 / "text_encoder")
    tokenizer.save_pretrained(sd15 / "tokenizer")
    with pytest.raises(SystemExit):
        convert_weights.main(["diffsplat_sd15", "--input", str(dl), "--output", str(tmp_path / "x")])  # no --sd15
    tiny_cfg = tmp_path / "taesd.json"
    tiny_cfg.write_text(json.dumps(backend.gsvae.tiny_config))
    convert_weights.main(["diffsplat_sd15", "--input", str(dl), "--sd15", str(sd15), "--output", str(tmp_path / "w"),
                          "--tiny-decoder-config", str(tiny_cfg)])
    loaded = load_backend("diffsplat_sd15", weights=str(tmp_path / "w"))
    assert loaded.scheduler_config == {**released, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
    cond = backend.encode_prompts(["a red chair"])
    assert torch.equal(loaded.encode_prompts(["a red chair"]).tokens, cond.tokens)
    expected = DiffSplatSD15Backend(backend.denoiser, backend.gsvae, encoder, tokenizer)  # the released geometry
    x, t = torch.randn(1, *backend.latent_shape), torch.tensor([400])
    assert torch.allclose(loaded.denoise(x, t, cond), expected.denoise(x, t, cond), atol=1e-6)
    assert torch.allclose(loaded.decode(x).means, expected.decode(x).means, atol=1e-6)
    shutil.rmtree(sd15 / "text_encoder")
    with pytest.raises(WeightsError, match="stable-diffusion-v1-5"):
        assemble_release(dl, sd15, tmp_path / "w2", variant="sd15")
