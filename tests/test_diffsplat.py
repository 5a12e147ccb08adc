"""DiffSplat-PixArt-Σ backend on tiny random models built from the same classes: strict loading of the
released checkpoint layouts, the multi-view attention, the camera conventions, and the full
sample -> decode -> render -> reward chain."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from diffusers import AutoencoderKL, AutoencoderTiny, PixArtTransformer2DModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from r2d3.pipeline import Pipeline  # noqa: E402
from r2d3.backends import WeightsError, load_backend  # noqa: E402
from r2d3.backends.diffsplat import DiffSplatBackend, tiny_diffsplat  # noqa: E402
from r2d3.backends.diffsplat_modules import GSVAE, MultiViewAttnProcessor, plucker_rays, unproject_depth  # noqa: E402
from r2d3.backends.diffsplat_weights import assemble_release, load_strict, load_transformer  # noqa: E402
from r2d3.config import RenderConfig, SamplerConfig  # noqa: E402
from r2d3.rewards import build_reward  # noqa: E402

VOCAB = ["a", "red", "chair", "blue", "lamp"]


@pytest.fixture(scope="module")
def backend():
    b = tiny_diffsplat(vocab=VOCAB)
    for p in b.denoiser.parameters():  # PixArt zero-inits nothing we need, but make outputs non-trivial
        p.data.add_(0.02 * torch.randn_like(p))
    return b


@pytest.fixture(scope="module")
def saved(backend, tmp_path_factory):
    path = tmp_path_factory.mktemp("diffsplat")
    backend.save_pretrained(path)
    return path


def test_round_trip_reproduces_every_output(backend, saved):
    loaded = load_backend("diffsplat", weights=str(saved))
    cond = backend.encode_prompts(["a red chair", ""])
    assert torch.equal(loaded.encode_prompts(["a red chair", ""]).tokens, cond.tokens)
    x = torch.randn(2, *backend.latent_shape)
    t = torch.tensor([700, 3])
    assert torch.allclose(loaded.denoise(x, t, cond), backend.denoise(x, t, cond), atol=1e-6)
    assert torch.allclose(loaded.decode(x).means, backend.decode(x).means, atol=1e-6)
    assert loaded.scheduler_config == backend.scheduler_config and loaded.geometry == backend.geometry


def test_text_encoder_loads_lazily(saved):
    loaded = load_backend("diffsplat", weights=str(saved))
    assert loaded._text_encoder is None  # precomputed embeddings never pay for T5
    embeds = loaded.encode_prompts(["blue lamp"])
    assert embeds.tokens.shape == (1, 300, 16) and int(embeds.mask.sum()) == 3  # 2 words + EOS


def test_transformer_keys_are_pixart_keys(backend, tmp_path):
    """A plain diffusers PixArt-Σ state dict of the same config (what DiffSplat's class saves) loads strictly."""
    config = {k: v for k, v in backend.denoiser.config.items() if not k.startswith("_")}
    plain = PixArtTransformer2DModel(**config)
    assert set(plain.state_dict()) == set(backend.denoiser.state_dict())
    plain.save_pretrained(tmp_path / "t", safe_serialization=True, max_shard_size="20KB")  # sharded, as released
    assert list((tmp_path / "t").glob("*.index.json"))
    loaded = load_transformer(tmp_path / "t")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in plain.state_dict().items())


def test_gsvae_keys_match_diffsplats_construction(backend):
    """DiffSplat builds its GSVAE by swapping 12-channel convs into a 3-channel SDXL VAE and a TAESD-XL
    decoder; the resulting state dict must load into ours with no key or shape left over."""
    vae_cfg, tiny_cfg = backend.gsvae.vae_config, backend.gsvae.tiny_config
    vae = AutoencoderKL(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")
                           and k not in ("in_channels", "out_channels")})
    c = vae.config.block_out_channels[0]
    vae.encoder.conv_in = torch.nn.Conv2d(12, c, 3, padding=1)
    vae.decoder.conv_out = torch.nn.Conv2d(c, 12, 3, padding=1)
    tae = AutoencoderTiny(**tiny_cfg).decoder
    tae.layers[-1] = torch.nn.Conv2d(tae.layers[-1].in_channels, 12, 3, padding=1)
    original = torch.nn.Module()
    original.vae, original.tiny_decoder = vae, tae
    ours = GSVAE(vae_cfg, tiny_cfg)
    load_strict(ours, original.state_dict(), "test")
    z = torch.randn(2, 4, 4, 4)
    ref = vae.decode(z / ours.scaling_factor).sample.clamp(-1, 1)  # DiffSplat: vae.decode(z / s + shift)
    assert torch.allclose(ours.decode(z), ref, atol=1e-6)
    tiny = ours.decode(z, tiny=True)
    assert tiny.shape == ref.shape and tiny.abs().max() <= 1


def test_strict_loading_names_the_problem(saved, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    state = load_file(bad / "gsvae" / "model.safetensors")
    key = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != key}, bad / "gsvae" / "model.safetensors")
    with pytest.raises(WeightsError, match="1 missing keys.*" + key.replace(".", r"\.")):
        load_backend("diffsplat", weights=str(bad))
    state[key] = torch.zeros(3)
    save_file(state, bad / "gsvae" / "model.safetensors")
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_backend("diffsplat", weights=str(bad))


@pytest.mark.parametrize("missing", ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                                     "gsvae/model.safetensors", "gsvae/vae_config.json"])
def test_missing_weights_name_the_file(saved, tmp_path, missing):
    import shutil

    bad = tmp_path / "w"
    shutil.copytree(saved, bad)
    (bad / missing).unlink()
    with pytest.raises(WeightsError, match=missing.split("/")[-1].replace(".", r"\.")) as err:
        load_backend("diffsplat", weights=str(bad))
    assert "gsdiff_gobj83k_pas_fp16__render" in str(err.value)  # says what to download


def test_missing_text_encoder_and_weights_dir(saved, tmp_path):
    import shutil

    bad = tmp_path / "w"
    shutil.copytree(saved, bad)
    shutil.rmtree(bad / "text_encoder")
    backend = load_backend("diffsplat", weights=str(bad))  # loads: T5 is only needed to encode prompts
    with pytest.raises(WeightsError, match="text_encoder"):
        backend.encode_prompts(["a chair"])
    with pytest.raises(WeightsError, match="model.weights"):
        load_backend("diffsplat")


def test_multiview_attention_spans_views(backend):
    """Self-attention over all views' tokens equals attention over their concatenation, and changing one
    view's latent changes the prediction for the others (it would not with per-view attention)."""
    attn = backend.denoiser.transformer_blocks[0].attn1
    x = torch.randn(2 * 4, 5, attn.to_q.in_features)
    out = MultiViewAttnProcessor(4)(attn, x)
    joint = x.reshape(2, 20, -1)
    heads = attn.heads
    q, k, v = (f(joint).view(2, 20, heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    ref = attn.to_out[0]((w @ v).transpose(1, 2).reshape(2, 20, -1)).reshape(8, 5, -1)
    assert torch.allclose(out, ref, atol=1e-5)

    cond = backend.encode_prompts(["a chair"])
    x = torch.randn(1, *backend.latent_shape)
    y = x.clone()
    y[:, 4:8] += 1.0  # view 1 only
    t = torch.tensor([500])
    a, b = backend.denoise(x, t, cond), backend.denoise(y, t, cond)
    assert (a[:, 0:4] - b[:, 0:4]).abs().max() > 1e-5  # view 0 saw view 1


def test_cameras_and_plucker_conventions(backend):
    c2w = backend.c2w
    # input cameras: radius 1.4, elevation 10 deg above the xz plane, azimuth 0 on +z
    centers = c2w[:, :3, 3]
    assert torch.allclose(centers.norm(dim=-1), torch.full((4,), 1.4), atol=1e-6)
    assert torch.allclose(centers[:, 1], torch.full((4,), 1.4 * math.sin(math.radians(10))), atol=1e-6)
    assert centers[0, 2] > 0 and abs(float(centers[0, 0])) < 1e-6
    # each camera's +z (OpenCV forward) points at the origin
    assert torch.allclose(F.normalize(-centers, dim=-1), c2w[:, :3, 2], atol=1e-6)
    rays = plucker_rays(c2w, 1.389, 9)
    d, m = rays[:, 3:], rays[:, :3]
    assert torch.allclose(d.norm(dim=1), torch.ones(4, 9, 9), atol=1e-6)
    assert torch.allclose((m * d).sum(1), torch.zeros(4, 9, 9), atol=1e-6)  # moment is orthogonal to direction
    # DiffSplat's "bug = True" pixel convention: pixel (0, 0) is the optical axis, whose ray hits the origin
    assert torch.allclose(m[:, :, 0, 0], torch.zeros(4, 3), atol=1e-6)
    assert torch.allclose(d[:, :, 0, 0], c2w[:, :3, 2], atol=1e-6)


def test_depth_unprojection():
    """The centre pixel at depth = camera distance is the origin; depth scales points along the ray."""
    b = tiny_diffsplat(vocab=VOCAB)
    depth = torch.full((1, 4, 9, 9), 1.4)
    xyz = unproject_depth(depth, b.c2w, 1.389)
    assert torch.allclose(xyz[0, :, 4, 4], torch.zeros(4, 3), atol=1e-6)
    centers = b.c2w[:, :3, 3]
    far = unproject_depth(2 * depth, b.c2w, 1.389)
    assert torch.allclose(far[0] - centers[:, None, None], 2 * (xyz[0] - centers[:, None, None]), atol=1e-5)


def test_decode_activations(backend):
    """Splatter-image channels map to Gaussians as DiffSplat's renderer does (checked on raw channels)."""
    x = torch.randn(1, *backend.latent_shape)
    g = backend.splatter_images(x)
    gs = backend.decode(x)
    flat = g[0].permute(0, 2, 3, 1).reshape(-1, 12)
    u = (flat[:, 3:6] + 1) / 2
    assert torch.allclose(gs.colors[0], (flat[:, :3] + 1) / 2)
    assert torch.allclose(gs.scales[0], 0.0005 * u + 0.02 * (1 - u))
    assert torch.allclose(gs.opacities[0], (flat[:, 10] + 1) / 2)
    assert torch.equal(gs.quats[0], flat[:, 6:10])  # raw, as DiffSplat's renderer takes them
    assert torch.allclose(gs.validate().quats[0], F.normalize(flat[:, 6:10], dim=-1))
    assert gs.means.shape == (1, 4 * g.shape[-1] * g.shape[-2], 3)


def test_sample_render_reward_and_lora(backend):
    """The aligner's chain on DiffSplat: SDE-DPM-Solver++ sampling with CFG, decode, render and a reward
    with a finite gradient w.r.t. the latents; LoRA attaches to the paper's target modules."""
    from r2d3.backends.lora import add_lora

    sampler = SamplerConfig(kind="sde-dpmsolver++", num_steps=3, guidance_scale=5.0)
    render = RenderConfig(num_views=2, resolution=16, distance=1.4, fov_deg=39.6, elevation_deg=0.0)
    ctx = Pipeline.build(backend, sampler, render, build_reward("colorfulness"))
    gen = torch.Generator().manual_seed(0)
    cond = backend.encode_prompts(["a red chair", "blue lamp"])
    traj = ctx.sampler.sample(ctx.model_fn(cond), shape=(2, *backend.latent_shape), generator=gen)
    x0 = traj.final.detach().requires_grad_(True)
    reward = ctx.reward_of_latents(x0, ["a red chair", "blue lamp"], ctx.cameras(2, gen))
    reward.sum().backward()
    assert reward.shape == (2,) and torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0

    den = tiny_diffsplat(vocab=VOCAB).denoiser
    params = add_lora(den, 4, None, backend.lora_target_modules)
    names = {n for n, _ in den.named_parameters() if "lora_A" in n}
    assert any("pos_embed.proj" in n for n in names) and any("ff.net.2" in n for n in names)
    assert any("adaln_single" in n for n in names) and any("caption_projection" in n for n in names)
    assert params


def test_padding_is_zeroed_and_changes_nothing(backend):
    """Zeroed padded T5 features give the same prediction as the raw ones (they are masked out), and the
    embedding cache then stores only the real tokens."""
    from r2d3.text import PromptEmbeds
    from r2d3.data.embeddings import encoder_fingerprint

    cond = backend.encode_prompts(["a red chair"])
    assert (cond.tokens[0, 4:] == 0).all() and cond.tokens[0, :4].abs().sum() > 0
    encoder, tokenizer = backend._text()
    batch = tokenizer(["a red chair"], padding="max_length", max_length=300, return_tensors="pt")
    raw = PromptEmbeds(encoder(batch.input_ids, attention_mask=batch.attention_mask)[0], cond.mask)
    assert raw.tokens[0, 4:].abs().sum() > 0
    x, t = torch.randn(1, *backend.latent_shape), torch.tensor([300])
    assert torch.allclose(backend.denoise(x, t, cond), backend.denoise(x, t, raw), atol=1e-6)
    assert encoder_fingerprint(backend).startswith("diffsplat:")


def test_assemble_release_layout(backend, tmp_path):
    """DiffSplat's and PixArt-Σ's folders as released -> the backend's layout (newest iteration), loading
    to the same model; a missing piece is named."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
    import convert_weights

    dl, pixart = tmp_path / "DiffSplat", tmp_path / "pixart"
    runs = dl / "gsdiff_gobj83k_pas_fp16__render" / "checkpoints"
    backend.denoiser.save_pretrained(runs / "000010" / "transformer_ema")
    older = PixArtTransformer2DModel(**{k: v for k, v in backend.denoiser.config.items() if not k.startswith("_")})
    older.save_pretrained(runs / "000005" / "transformer_ema")  # an older, different checkpoint
    (dl / "gsvae_gobj265k_sdxl_fp16" / "checkpoints" / "000020").mkdir(parents=True)
    save_file(backend.gsvae.state_dict(), dl / "gsvae_gobj265k_sdxl_fp16" / "checkpoints" / "000020" / "model.safetensors")
    (pixart / "vae").mkdir(parents=True)
    (pixart / "vae" / "config.json").write_text(json.dumps({**backend.gsvae.vae_config, "in_channels": 3,
                                                            "out_channels": 3}, default=list))
    encoder, tokenizer = backend._text()
    encoder.save_pretrained(pixart / "text_encoder")
    tokenizer.save_pretrained(pixart / "tokenizer")
    tiny_cfg = tmp_path / "taesd.json"
    tiny_cfg.write_text(json.dumps(backend.gsvae.tiny_config))
    with pytest.raises(SystemExit):
        convert_weights.main(["diffsplat", "--input", str(dl), "--output", str(tmp_path / "x")])  # no --pixart
    out = assemble_release(dl, pixart, tmp_path / "w", tiny_decoder_config=tiny_cfg)
    loaded = load_backend("diffsplat", weights=str(out))
    expected = DiffSplatBackend(backend.denoiser, backend.gsvae, encoder, tokenizer)  # the released geometry
    x, t = torch.randn(1, *backend.latent_shape), torch.tensor([400])
    cond = backend.encode_prompts(["a red chair"])
    assert torch.allclose(loaded.denoise(x, t, cond), expected.denoise(x, t, cond), atol=1e-6)  # newest picked
    assert torch.allclose(loaded.decode(x).means, expected.decode(x).means, atol=1e-6)
    # T5 from a release loads in bfloat16 unless backend.json says otherwise
    assert loaded.text_encoder.dtype == torch.bfloat16
    released = loaded.encode_prompts(["a red chair"])
    assert released.tokens.dtype == torch.float32 and torch.equal(released.mask, cond.mask)
    torch.testing.assert_close(released.tokens, cond.tokens, atol=0.05, rtol=0.02)
    meta = json.loads((out / "backend.json").read_text())
    (out / "backend.json").write_text(json.dumps({**meta, "text_encoder_dtype": "float32"}))
    assert torch.equal(load_backend("diffsplat", weights=str(out)).encode_prompts(["a red chair"]).tokens, cond.tokens)
    (out / "backend.json").write_text(json.dumps({**meta, "text_encoder_dtype": "int8"}))
    with pytest.raises(WeightsError, match="text_encoder_dtype"):
        load_backend("diffsplat", weights=str(out))
    with pytest.raises(WeightsError, match="000007"):
        assemble_release(dl, pixart, tmp_path / "w2", iteration=7)
    import shutil

    shutil.rmtree(pixart / "tokenizer")
    with pytest.raises(WeightsError, match="tokenizer"):
        assemble_release(dl, pixart, tmp_path / "w3")


def test_prompts_are_lowercased_as_diffsplat_trained():
    """DiffSplat encoded its training captions as ``t.lower()`` and T5 is case-sensitive: with a
    case-sensitive tokenizer, "A Red Chair" must embed exactly like "a red chair"; cached embeddings carry
    the casing in their fingerprint."""
    from r2d3.data.embeddings import encoder_fingerprint
    from r2d3.text import hf_word_tokenizer

    b = tiny_diffsplat(vocab=VOCAB)
    b._text()
    b._tokenizer = hf_word_tokenizer(["a", "red", "chair", "Red"], eos="</s>", lowercase=False)
    assert b._tokenizer("Red")["input_ids"] != b._tokenizer("red")["input_ids"]  # the tokenizer keeps case
    upper, lower = b.encode_prompts(["A Red Chair"]), b.encode_prompts(["a red chair"])
    assert torch.equal(upper.tokens, lower.tokens) and torch.equal(upper.mask, lower.mask)
    assert encoder_fingerprint(b).startswith("diffsplat:") and encoder_fingerprint(b).endswith("-lowercased")


#: the official training's LoraConfig target list (rank 8, peft's default alpha 8, adapter "pf")
OFFICIAL_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                         "proj", "linear", "linear_1", "linear_2"]


def test_official_lora_files_convert_and_load(saved, tmp_path):
    """A LoRA saved as the official training saves it (peft adapter "pf" on its own target list, written by
    diffusers' save_lora_weights with the unet. prefix) converts to an r2d3 checkpoint directory and loads
    through the checkpoint loader every job uses, reproducing the adapted model's output exactly."""
    import sys
    from pathlib import Path

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import load_file

    from r2d3.jobs.evaluate import ModelBank, resolve_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
    import convert_weights

    official = load_backend("diffsplat", weights=str(saved))
    official.denoiser.add_adapter(LoraConfig(r=8, init_lora_weights="gaussian", target_modules=OFFICIAL_LORA_TARGETS),
                                  adapter_name="pf")
    torch.manual_seed(0)
    for name, p in official.denoiser.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # a trained adapter (B starts at zero)
    state = get_peft_model_state_dict(official.denoiser, adapter_name="pf")
    StableDiffusionPipeline.save_lora_weights(tmp_path / "ckpt", unet_lora_layers=state, safe_serialization=True)
    file = tmp_path / "ckpt" / "pytorch_lora_weights.safetensors"
    assert all(k.startswith("unet.") for k in load_file(str(file)))  # the official layout
    convert_weights.main(["lora", "--input", str(file), "--output", str(tmp_path / "converted")])

    spec = resolve_checkpoint(str(tmp_path / "converted"))
    assert spec.lora_alpha == 8.0 and len(spec.lora_targets) == len({k.rsplit(".lora_", 1)[0] for k in state})
    backend, base = ModelBank("diffsplat", str(saved), "cpu", [spec]).backend_for(spec)
    x, t = torch.randn(1, *official.latent_shape, generator=torch.Generator().manual_seed(1)), torch.tensor([400])
    cond = official.encode_prompts(["a red chair"])
    with torch.no_grad():
        expected, got = official.denoise(x, t, cond), backend.denoise(x, t, cond)
        official.denoiser.disable_adapters()
        plain = official.denoise(x, t, cond)
    assert not base and (expected - plain).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)

    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit, match="bad.safetensors is not a convertible LoRA file"):
        convert_weights.main(["lora", "--input", str(tmp_path / "bad.safetensors"), "--output", str(tmp_path / "x")])


@pytest.mark.parametrize("keys,message", [
    (["blocks.0.to_q.lora_A.weight", "blocks.0.to_q.lora_B.weight"], "not all under one of"),
    (["unet.blocks.0.to_q.lora_A.weight"], "without both lora_A and lora_B"),
    (["unet.blocks.0.to_q.lora_down.weight"], "peft lora_A/lora_B weights only"),
])
def test_malformed_diffusers_lora_files_are_named(keys, message):
    from r2d3.backends.lora import from_diffusers_lora

    with pytest.raises(ValueError, match=message):
        from_diffusers_lora({k: torch.zeros(2, 4) for k in keys})
