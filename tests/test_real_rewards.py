"""Real-model rewards (clip_score, laion_aesthetic, hpsv2, pickscore) and the weight converters, on tiny
random CLIP checkpoints built offline."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from helpers import random_render  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from r2d3.pretrained import WeightsError  # noqa: E402
from r2d3.rewards import available_rewards, build_reward  # noqa: E402
from r2d3.rewards.clip_models import AESTHETIC_HEAD_FILE, AestheticHead  # noqa: E402
from r2d3.rewards.convert import openclip_to_transformers, save_transformers_clip  # noqa: E402
from r2d3.text import hf_word_tokenizer  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "a", "red", "blue", "cube", "sphere", "green"]
REAL = ["clip_score", "laion_aesthetic", "hpsv2", "pickscore"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def _tokenizer():
    return hf_word_tokenizer(WORDS[2:], lowercase=False)


def _config():
    # eos_token_id=2: transformers' legacy pooling at the largest token id, as OpenCLIP does
    return transformers.CLIPConfig(
        text_config={"vocab_size": len(WORDS), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 12, "eos_token_id": 2, "bos_token_id": 1,
                     "pad_token_id": 0},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One directory usable by all four rewards: tiny CLIP + tokenizer + aesthetic head."""
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    transformers.CLIPModel(_config()).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    torch.manual_seed(1)
    save_file(AestheticHead(8).state_dict(), str(path / AESTHETIC_HEAD_FILE))
    return path


def _render(b=2, v=2, size=20, seed=0, dtype=torch.float32):
    return random_render(b, v, size, seed, dtype)


PROMPTS = ["a red cube", "a blue sphere"]


def _manual(weights, render, prompts, name):
    """An independent computation of each reward from the saved files."""
    model = transformers.CLIPModel.from_pretrained(str(weights)).eval().double()
    b, v = render.rgb.shape[:2]
    x = render.rgb.reshape(b * v, 3, *render.rgb.shape[-2:]).double()
    x = F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    x = (x - MEAN.double()) / STD.double()
    with torch.no_grad():
        img = model.get_image_features(pixel_values=x)
        img = F.normalize(getattr(img, "pooler_output", img), dim=-1)
        if name == "laion_aesthetic":
            head = AestheticHead(8).double().eval()
            from safetensors.torch import load_file

            head.load_state_dict(load_file(str(weights / AESTHETIC_HEAD_FILE)))
            return head(img)[:, 0].reshape(b, v)
        tok = _tokenizer()(prompts, padding=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        txt = F.normalize(getattr(txt, "pooler_output", txt), dim=-1)
        cos = (img.reshape(b, v, -1) * txt[:, None]).sum(-1)
        return model.logit_scale.exp() * cos if name == "pickscore" else cos


def test_real_rewards_are_registered():
    assert set(REAL) <= set(available_rewards())


@pytest.mark.parametrize("name", REAL)
def test_reward_loads_scores_and_matches_a_manual_computation(weights, name):
    reward = build_reward({"name": name, "kwargs": {"weights": str(weights)}})
    render = _render()
    out = reward(render, PROMPTS)
    per_view = reward.per_view(render, PROMPTS)
    assert out.shape == (2,) and per_view.shape == (2, 2) and torch.isfinite(out).all()
    assert out.dtype == torch.float32 and not any(p.requires_grad for p in reward.parameters())
    torch.testing.assert_close(per_view.double(), _manual(weights, render, PROMPTS, name), atol=1e-5, rtol=1e-4)
    reward.train()
    assert not reward.model.training  # frozen reward model stays in eval mode (dropout off)
    torch.testing.assert_close(reward.per_view(render, PROMPTS), per_view)


@pytest.mark.parametrize("name", REAL)
def test_gradients_reach_rgb_and_match_finite_differences(weights, name, rgb_fd_check):
    reward = build_reward({"name": name, "kwargs": {"weights": str(weights), "dtype": "float64"}})
    render = _render(b=1, v=2, size=12, seed=3, dtype=torch.float64)
    rgb_fd_check(reward, render, PROMPTS[:1], [(0, 0, 0, 3, 4), (0, 1, 2, 7, 9), (0, 1, 1, 0, 11)])


def test_clip_score_modes_preprocessor_config_and_noise(weights, tmp_path):
    render = _render()
    cosine = build_reward({"name": "clip_score", "kwargs": {"weights": str(weights)}})
    cos = cosine.per_view(render, PROMPTS)
    clipscore = build_reward({"name": "clip_score", "kwargs": {"weights": str(weights), "mode": "clipscore"}})
    captioned = cosine.per_view(render, ["A photo depicts " + p for p in PROMPTS])  # Hessel et al.'s template
    torch.testing.assert_close(clipscore.per_view(render, PROMPTS), 2.5 * captioned.clamp(min=0))
    assert not torch.allclose(captioned, cos)
    with pytest.raises(ValueError, match="mode"):
        build_reward({"name": "clip_score", "kwargs": {"weights": str(weights), "mode": "nope"}})
    # a preprocessor_config.json overrides the normalisation
    import shutil

    other = tmp_path / "clip"
    shutil.copytree(weights, other)
    (other / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    reward = build_reward({"name": "clip_score", "kwargs": {"weights": str(other)}})
    assert torch.equal(reward.mean.flatten(), torch.full((3,), 0.5))
    assert not torch.allclose(reward.per_view(render, PROMPTS), cos)
    noisy = build_reward({"name": "clip_score", "kwargs": {"weights": str(weights), "noise_std": 2e-3}})
    assert not torch.equal(noisy.per_view(render, PROMPTS), cos)
    with pytest.raises(ValueError, match="dtype"):
        build_reward({"name": "clip_score", "kwargs": {"weights": str(weights), "dtype": "int64"}})
    with pytest.raises(ValueError, match="prompts"):
        clipscore(render, PROMPTS[:1])


@pytest.mark.parametrize("name, names", [
    ("clip_score", "openai/clip-vit-large-patch14"),
    ("laion_aesthetic", "sac+logos+ava1-l14-linearMSE.pth"),
    ("hpsv2", "HPS_v2.1_compressed.pt"),
    ("pickscore", "yuvalkirstain/PickScore_v1"),
])
def test_missing_weights_name_what_to_download(weights, tmp_path, name, names):
    with pytest.raises(WeightsError, match="needs `weights`") as err:
        build_reward(name)
    assert names in str(err.value)
    with pytest.raises(WeightsError, match="not a directory") as err:
        build_reward({"name": name, "kwargs": {"weights": str(tmp_path / "absent")}})
    assert names in str(err.value)
    # a directory with only pickled weights: refused, naming the missing safetensors file
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", AESTHETIC_HEAD_FILE):
        (broken / f).write_bytes((weights / f).read_bytes())
    (broken / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="model.safetensors") as err:
        build_reward({"name": name, "kwargs": {"weights": str(broken)}})
    assert names in str(err.value)


@pytest.mark.parametrize("change", ["drop", "extra", "reshape"])
def test_a_reward_checkpoint_that_does_not_match_is_refused_naming_the_tensors(weights, tmp_path, change):
    import shutil

    from safetensors.torch import load_file

    broken = tmp_path / "clip"
    shutil.copytree(weights, broken)
    state = load_file(broken / "model.safetensors")
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    if change == "drop":
        del state[key]
    elif change == "extra":
        state["vision_model.extra.weight"] = torch.zeros(2)
    else:
        state[key] = torch.zeros(3, 3)
    save_file(state, str(broken / "model.safetensors"))
    word = {"drop": "missing", "extra": "unexpected", "reshape": "mis-shaped|mismatch"}[change]
    for name in ("clip_score", "hpsv2", "pickscore", "laion_aesthetic"):
        with pytest.raises(WeightsError) as err:
            build_reward({"name": name, "kwargs": {"weights": str(broken)}})
        assert str(broken) in str(err.value) and re.search(word, str(err.value)), str(err.value)
        assert change != "drop" or key in str(err.value)


def test_non_square_views_are_centre_cropped_not_stretched():
    from r2d3.pretrained import model_input

    g = torch.Generator().manual_seed(0)
    wide = torch.rand(1, 3, 20, 40, generator=g)
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    crop = {"centre_crop": True}
    torch.testing.assert_close(model_input(wide, 16, mean, std, **crop), model_input(wide[..., 10:30], 16, mean, std))
    tall = wide.transpose(-1, -2)
    torch.testing.assert_close(model_input(tall, 16, mean, std, **crop), model_input(tall[..., 10:30, :], 16, mean,
                                                                                         std))
    assert not torch.allclose(model_input(wide, 16, mean, std), model_input(wide[..., 10:30], 16, mean, std))


def test_missing_tokenizer_and_aesthetic_head(weights, tmp_path):
    import shutil

    other = tmp_path / "w"
    shutil.copytree(weights, other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).unlink(missing_ok=True)
    with pytest.raises(WeightsError, match="tokenizer"):
        build_reward({"name": "hpsv2", "kwargs": {"weights": str(other)}})
    build_reward({"name": "laion_aesthetic", "kwargs": {"weights": str(other)}})  # needs no tokenizer
    (other / AESTHETIC_HEAD_FILE).unlink()
    with pytest.raises(WeightsError, match="convert_weights.py aesthetic"):
        build_reward({"name": "laion_aesthetic", "kwargs": {"weights": str(other)}})
    save_file({"layers.0.weight": torch.zeros(1024, 8)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match="could not load the laion_aesthetic head"):
        build_reward({"name": "laion_aesthetic", "kwargs": {"weights": str(weights),
                                                            "head": str(tmp_path / "bad.safetensors")}})


# --------------------------------------------------------------------------------------------------------
# converters


def _openclip_state(width=16, layers=2, patch=8, grid=4, vocab=len(WORDS), ctx=12, embed=8, seed=0, text_width=None,
                    scale=0.2):
    """A random state dict with OpenCLIP's key names and shapes (visual + text towers; ``text_width``
    defaults to the vision ``width``)."""
    g = torch.Generator().manual_seed(seed)
    tw = text_width or width

    def r(*shape):
        return scale * torch.randn(*shape, generator=g)

    sd = {"visual.conv1.weight": r(width, 3, patch, patch), "visual.class_embedding": r(width),
          "visual.positional_embedding": r(grid * grid + 1, width), "visual.proj": r(width, embed),
          "token_embedding.weight": r(vocab, tw), "positional_embedding": r(ctx, tw),
          "text_projection": r(tw, embed), "logit_scale": torch.tensor(2.0)}
    for ln, w in (("visual.ln_pre", width), ("visual.ln_post", width), ("ln_final", tw)):
        sd[ln + ".weight"], sd[ln + ".bias"] = 1 + r(w), r(w)
    for prefix, w in (("visual.transformer.resblocks.", width), ("transformer.resblocks.", tw)):
        for i in range(layers):
            p = f"{prefix}{i}."
            for ln in ("ln_1", "ln_2"):
                sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + r(w), r(w)
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * w, w), r(3 * w)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(w, w), r(w)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * w, w), r(4 * w)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(w, 4 * w), r(w)
    return sd


def _reference_tower(sd, prefix, x, heads, causal):
    """An independent OpenCLIP-style pre-LN transformer (torch's MultiheadAttention, exact GELU)."""
    n = len({k.split(".")[len(prefix.split(".")) - 1] for k in sd if k.startswith(prefix)})
    width = x.shape[-1]
    mask = torch.full((x.shape[1],) * 2, float("-inf")).triu(1) if causal else None
    for i in range(n):
        p = f"{prefix}{i}."
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({k: sd[p + "attn." + k] for k in
                              ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x


def _reference_openclip(sd, pixels, ids, heads=2, text_heads=None):
    width = sd["visual.class_embedding"].shape[0]
    tw = sd["token_embedding.weight"].shape[1]
    conv = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, width), x], dim=1)
    x = x + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (width,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _reference_tower(sd, "visual.transformer.resblocks.", x, heads, causal=False)
    img = F.layer_norm(x[:, 0], (width,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    img = img @ sd["visual.proj"]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    t = _reference_tower(sd, "transformer.resblocks.", t, text_heads or heads, causal=True)
    t = F.layer_norm(t, (tw,), sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]
    return img, txt


def test_openclip_conversion_loads_strictly_and_matches_a_reference_forward(tmp_path):
    sd = _openclip_state()
    converted, config = openclip_to_transformers(sd, vision_heads=2, text_heads=2)  # head width 8
    assert config.vision_config.image_size == 32 and config.vision_config.patch_size == 8
    assert config.text_config.num_hidden_layers == 2 and config.projection_dim == 8
    assert config.text_config.num_attention_heads == 2 and config.vision_config.hidden_act == "gelu"
    model = transformers.CLIPModel(config).eval()
    model.load_state_dict(converted, strict=True)
    torch.testing.assert_close(model.vision_model.encoder.layers[1].self_attn.k_proj.weight,
                               sd["visual.transformer.resblocks.1.attn.in_proj_weight"][16:32])
    torch.testing.assert_close(model.text_projection.weight, sd["text_projection"].t())
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([[2, 3, 7, 0, 0], [2, 4, 6, 5, 7]])  # largest id = end of text, padding after it
    with torch.no_grad():
        ref_img, ref_txt = _reference_openclip(sd, pixels, ids)
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=ids)
    torch.testing.assert_close(getattr(img, "pooler_output", img), ref_img, atol=1e-5, rtol=1e-4)
    # transformers pools at eos_token_id; with the real vocabulary that is OpenCLIP's argmax token
    model.config.text_config.eos_token_id = 2
    model.text_model.eos_token_id = 2
    with torch.no_grad():
        txt = model.get_text_features(input_ids=ids)
    torch.testing.assert_close(getattr(txt, "pooler_output", txt), ref_txt, atol=1e-5, rtol=1e-4)
    bad = dict(sd, **{"visual.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected OpenCLIP keys"):
        openclip_to_transformers(bad, vision_heads=2, text_heads=2)


def test_vit_h_14_head_counts_come_from_its_architecture_not_a_default_head_width():
    """HPSv2's ViT-H-14: vision width 1280 with head_width 80 (16 heads), text width 1024 with 16 heads.
    A ViT-H-14-shaped model (real widths and patch, one block per tower) converted without head counts
    matches an independent forward with 16 heads per tower, and not one with the 20 heads a head width
    of 64 would give."""
    sd = _openclip_state(width=1280, text_width=1024, layers=1, patch=14, grid=2, ctx=5, embed=16, scale=0.02)
    converted, config = openclip_to_transformers(sd)
    assert config.vision_config.num_attention_heads == 16 and config.text_config.num_attention_heads == 16
    model = transformers.CLIPModel(config).eval()
    model.load_state_dict(converted, strict=True)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[2, 3, 7, 0, 0]])
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        img = getattr(img, "pooler_output", img)
        right, _ = _reference_openclip(sd, pixels, ids, heads=16, text_heads=16)
        wrong, _ = _reference_openclip(sd, pixels, ids, heads=20, text_heads=16)
    torch.testing.assert_close(img, right, atol=1e-5, rtol=1e-4)
    assert (img - wrong).abs().max() > 100 * (img - right).abs().max()
    with pytest.raises(ValueError, match="not divisible by 24 heads"):
        openclip_to_transformers(sd, vision_heads=24, text_heads=16)


def test_converter_cli_round_trips_hpsv2_and_aesthetic(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "convert_weights", Path(__file__).resolve().parents[1] / "pipelines" / "convert_weights.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    # HPS v2.1 layout: {"state_dict": ...} saved from a DDP model ("module." prefix)
    sd = _openclip_state(width=64, layers=1, embed=8)  # head width 64, as OpenCLIP's ViT-H-14
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "hps.pt")
    out = tmp_path / "hpsv2"
    with pytest.raises(SystemExit, match="not a convertible OpenCLIP checkpoint: unknown OpenCLIP architecture"):
        cli.main(["hpsv2", "--input", str(tmp_path / "hps.pt"), "--output", str(out)])  # no guessed heads
    cli.main(["hpsv2", "--input", str(tmp_path / "hps.pt"), "--output", str(out), "--vision-heads", "1",
              "--text-heads", "1"])
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    _tokenizer().save_pretrained(out)
    reward = build_reward({"name": "hpsv2", "kwargs": {"weights": str(out)}})
    loaded = transformers.CLIPModel.from_pretrained(str(out))
    converted, _ = openclip_to_transformers(sd, vision_heads=1, text_heads=1)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, converted[k])
    assert reward(_render(), PROMPTS).shape == (2,)
    # aesthetic head: .pth state dict -> safetensors -> the reward
    torch.manual_seed(2)
    head = AestheticHead(8)
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    clip_dir = tmp_path / "aesthetic"
    transformers.CLIPModel(_config()).save_pretrained(clip_dir)
    cli.main(["aesthetic", "--input", str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"),
              "--output", str(clip_dir / AESTHETIC_HEAD_FILE)])
    reward = build_reward({"name": "laion_aesthetic", "kwargs": {"weights": str(clip_dir)}})
    for k, v in head.state_dict().items():
        torch.testing.assert_close(reward.head.state_dict()[k], v)
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a LAION aesthetic head"):
        cli.main(["aesthetic", "--input", str(tmp_path / "bad.pth"),
                  "--output", str(tmp_path / "x.safetensors")])


def test_converter_cli_turns_a_pytorch_bin_into_safetensors(weights, tmp_path):
    import importlib.util
    import shutil
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "convert_weights", Path(__file__).resolve().parents[1] / "pipelines" / "convert_weights.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "pickscore"
    shutil.copytree(weights, out)
    model = transformers.CLIPModel.from_pretrained(str(out))
    (out / "model.safetensors").unlink()
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    cli.main(["bin", "--input", str(out / "pytorch_model.bin"), "--output", str(out / "model.safetensors")])
    reward = build_reward({"name": "pickscore", "kwargs": {"weights": str(out)}})
    for k, v in model.state_dict().items():
        torch.testing.assert_close(reward.model.state_dict()[k], v)


def test_save_transformers_clip_rejects_missing_keys(tmp_path):
    converted, config = openclip_to_transformers(_openclip_state(), vision_heads=2, text_heads=2)
    converted.pop("logit_scale")
    with pytest.raises(RuntimeError, match="logit_scale"):
        save_transformers_clip(converted, config, tmp_path / "x")
