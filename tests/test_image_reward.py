"""The ``image_reward`` reward (ImageReward on transformers' BLIP modules) and its converter, on a tiny random
checkpoint written in the ORIGINAL ImageReward format (timm-style BLIP ViT, BLIP med.py BERT, MLP head)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from helpers import random_render  # noqa: E402

from r2d3.pretrained import WeightsError  # noqa: E402
from r2d3.rewards import ImageRewardReward, available_rewards, build_reward  # noqa: E402
from r2d3.rewards.convert import imagereward_to_blip, save_image_reward  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "cube", "sphere", "green"]
VOCAB = len(WORDS) + 2  # + BLIP's [DEC], [ENC]
V_WIDTH, V_HEADS, V_LAYERS, PATCH, GRID = 128, 2, 2, 8, 4  # a 32 px ViT, head width 64 as BLIP's
T_WIDTH, T_HEADS, T_LAYERS, T_MLP, T_POS = 16, 2, 2, 32, 40
MAX_LEN = 35
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072
PROMPTS = ["a red cube", "A Blue sphere green"]
HEAD = "head.safetensors"


def _cli():
    spec = importlib.util.spec_from_file_location(
        "convert_weights", Path(__file__).resolve().parents[1] / "pipelines" / "convert_weights.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def _bert_tokenizer_dir(path: Path, words: list[str] = WORDS) -> Path:
    """A tiny BERT-style tokenizer (lowercase, whitespace words, ``[CLS] ... [SEP]``), no [DEC]/[ENC] yet."""
    from tokenizers import normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tok = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                         cls_token="[CLS]", sep_token="[SEP]",
                                         mask_token="[MASK]").save_pretrained(path)
    return path


def _med_config() -> dict:
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": T_WIDTH, "initializer_range": 0.02,
            "intermediate_size": T_MLP, "layer_norm_eps": 1e-12, "max_position_embeddings": T_POS,
            "model_type": "bert", "num_attention_heads": T_HEADS, "num_hidden_layers": T_LAYERS,
            "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": VOCAB, "encoder_width": T_WIDTH,
            "add_cross_attention": True}


def _original_state(seed: int = 0, v_width: int = V_WIDTH, v_layers: int = V_LAYERS, patch: int = PATCH,
                    grid: int = GRID, vocab: int = VOCAB, t_width: int = T_WIDTH, t_layers: int = T_LAYERS,
                    t_mlp: int = T_MLP, t_pos: int = T_POS, meta: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors under ImageReward's own key names (``ImageReward.state_dict()``), tiny sizes by default
    (``meta``: shape-only tensors, for full-size layouts)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.empty(*shape, device="meta") if meta else scale * torch.randn(*shape, generator=g)

    sd: dict[str, torch.Tensor] = {}

    def linear(name, out, inp):
        sd[name + ".weight"], sd[name + ".bias"] = r(out, inp, scale=inp ** -0.5), r(out, scale=0.05)

    def norm(name, n):
        sd[name + ".weight"], sd[name + ".bias"] = 1 + r(n, scale=0.1), r(n, scale=0.1)

    v = "blip.visual_encoder."
    sd[v + "cls_token"] = r(1, 1, v_width)
    sd[v + "pos_embed"] = r(1, grid * grid + 1, v_width)
    sd[v + "patch_embed.proj.weight"] = r(v_width, 3, patch, patch, scale=0.1)
    sd[v + "patch_embed.proj.bias"] = r(v_width, scale=0.05)
    for i in range(v_layers):
        p = f"{v}blocks.{i}."
        norm(p + "norm1", v_width)
        linear(p + "attn.qkv", 3 * v_width, v_width)
        linear(p + "attn.proj", v_width, v_width)
        norm(p + "norm2", v_width)
        linear(p + "mlp.fc1", 4 * v_width, v_width)
        linear(p + "mlp.fc2", v_width, 4 * v_width)
    norm(v + "norm", v_width)
    t = "blip.text_encoder."
    sd[t + "embeddings.word_embeddings.weight"] = r(vocab, t_width, scale=0.5)
    sd[t + "embeddings.position_embeddings.weight"] = r(t_pos, t_width, scale=0.5)
    sd[t + "embeddings.position_ids"] = torch.arange(t_pos).expand(1, -1)  # saved by older transformers
    norm(t + "embeddings.LayerNorm", t_width)
    for i in range(t_layers):
        p = f"{t}encoder.layer.{i}."
        for att, kv_width in (("attention", t_width), ("crossattention", v_width)):
            linear(p + att + ".self.query", t_width, t_width)
            linear(p + att + ".self.key", t_width, kv_width)
            linear(p + att + ".self.value", t_width, kv_width)
            linear(p + att + ".output.dense", t_width, t_width)
            norm(p + att + ".output.LayerNorm", t_width)
        linear(p + "intermediate.dense", t_mlp, t_width)
        linear(p + "output.dense", t_width, t_mlp)
        norm(p + "output.LayerNorm", t_width)
    linear("blip.vision_proj", 8, v_width)  # BLIP_Pretrain's contrastive projections: unused by the score
    linear("blip.text_proj", 8, t_width)
    for i, (out, inp) in zip((0, 2, 4, 6, 7), ((1024, t_width), (128, 1024), (64, 128), (16, 64), (1, 16))):
        linear(f"mlp.layers.{i}", out, inp)
    return sd


# --------------------------------------------------------------------------------------------------------
# an independent reference forward from the original state dict (plain torch ops, float64)


def _ln(x, sd, name, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x, sd, name):
    return x @ sd[name + ".weight"].t() + sd[name + ".bias"]


def _attention(q, k, v, heads, bias=None):
    n, lq, w = q.shape
    d = w // heads
    q, k, v = (x.reshape(n, x.shape[1], heads, d).transpose(1, 2) for x in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        s = s + bias
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(n, lq, w)


def _reference_vit(sd, pixels):
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], 1, V_WIDTH), x], dim=1) + sd[v + "pos_embed"]
    for i in range(V_LAYERS):
        p = f"{v}blocks.{i}."
        h = _ln(x, sd, p + "norm1", 1e-6)
        q, k, val = _lin(h, sd, p + "attn.qkv").chunk(3, dim=-1)
        x = x + _lin(_attention(q, k, val, V_HEADS), sd, p + "attn.proj")
        h = _ln(x, sd, p + "norm2", 1e-6)
        x = x + _lin(F.gelu(_lin(h, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
    return _ln(x, sd, v + "norm", 1e-6)


def _reference_bert(sd, ids, mask, image):
    t = "blip.text_encoder."
    x = sd[t + "embeddings.word_embeddings.weight"][ids]
    x = x + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = _ln(x, sd, t + "embeddings.LayerNorm", 1e-12)
    bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0  # BERT's extended attention mask
    for i in range(T_LAYERS):
        p = f"{t}encoder.layer.{i}."
        for att, b in (("attention", bias), ("crossattention", None)):
            kv = x if att == "attention" else image  # self-attention, then cross-attention to the image
            ctx = _attention(_lin(x, sd, p + att + ".self.query"), _lin(kv, sd, p + att + ".self.key"),
                             _lin(kv, sd, p + att + ".self.value"), T_HEADS, b)
            x = _ln(_lin(ctx, sd, p + att + ".output.dense") + x, sd, p + att + ".output.LayerNorm", 1e-12)
        h = F.gelu(_lin(x, sd, p + "intermediate.dense"))
        x = _ln(_lin(h, sd, p + "output.dense") + x, sd, p + "output.LayerNorm", 1e-12)
    return x[:, 0]


def _reference_ids(prompts):
    """[CLS] words [SEP] [PAD]..., lowercased, as the BERT tokenizer with padding='max_length' gives."""
    ids = torch.zeros(len(prompts), MAX_LEN, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        toks = [2] + [WORDS.index(w) for w in prompt.lower().split()] + [3]
        ids[row, :len(toks)], mask[row, :len(toks)] = torch.tensor(toks), 1
    return ids, mask


def _reference_scores(sd, rgb, prompts):
    """``[B, V]`` ImageReward scores of views ``[B, V, 3, S, S]`` (square), from the original state dict."""
    sd = {k: x.double() for k, x in sd.items()}
    b, v = rgb.shape[:2]
    x = rgb.reshape(b * v, *rgb.shape[2:]).double()
    x = F.interpolate(x, size=(GRID * PATCH,) * 2, mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0, 1)
    x = (x - MEAN.double()) / STD.double()
    ids, mask = _reference_ids(prompts)
    image = _reference_vit(sd, x)
    feats = _reference_bert(sd, ids.repeat_interleave(v, 0), mask.repeat_interleave(v, 0), image)
    for i in (0, 2, 4, 6, 7):
        feats = _lin(feats, sd, f"mlp.layers.{i}")
    return ((feats[:, 0] - SCORE_MEAN) / SCORE_STD).reshape(b, v)


# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The original files: ImageReward.pt, med_config.json, a bert tokenizer directory."""
    path = tmp_path_factory.mktemp("image_reward_original")
    torch.save(_original_state(), path / "ImageReward.pt")
    (path / "med_config.json").write_text(json.dumps(_med_config()))
    _bert_tokenizer_dir(path / "bert-base-uncased")
    return path


@pytest.fixture(scope="module")
def weights(original, tmp_path_factory):
    out = tmp_path_factory.mktemp("image_reward") / "converted"
    _cli().main(["image_reward", "--input", str(original / "ImageReward.pt"), "--med-config",
                 str(original / "med_config.json"), "--tokenizer", str(original / "bert-base-uncased"),
                 "--output", str(out)])
    return out


def _render(b=2, v=2, size=40, seed=0, dtype=torch.float32):
    return random_render(b, v, size, seed, dtype)


def test_converted_layout_and_tokenizer(weights):
    names = {p.relative_to(weights).as_posix() for p in weights.rglob("*") if p.is_file()}
    assert {"vision/config.json", "vision/model.safetensors", "text/config.json", "text/model.safetensors",
            "head.safetensors", "image_reward.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    settings = json.loads((weights / "image_reward.json").read_text())
    assert settings["score_mean"] == SCORE_MEAN and settings["score_std"] == SCORE_STD
    assert settings["image_size"] == 32 and settings["max_length"] == MAX_LEN
    assert settings["enc_token_id"] == VOCAB - 1
    vision = json.loads((weights / "vision" / "config.json").read_text())
    assert vision["layer_norm_eps"] == 1e-6 and vision["num_attention_heads"] == V_HEADS
    tok = transformers.AutoTokenizer.from_pretrained(str(weights))
    assert len(tok) == VOCAB and tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [VOCAB - 2, VOCAB - 1]
    assert tok.bos_token == "[DEC]"
    ids, mask = _reference_ids(PROMPTS)
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)


def test_reward_matches_a_reference_forward_of_the_original_checkpoint(weights):
    reward = build_reward({"name": "image_reward", "kwargs": {"weights": str(weights)}})
    assert isinstance(reward, ImageRewardReward) and reward.name == "image_reward"
    render = _render()
    per_view = reward.per_view(render, PROMPTS)
    out = reward(render, PROMPTS)
    assert per_view.shape == (2, 2) and out.shape == (2,) and out.dtype == torch.float32
    assert torch.isfinite(per_view).all()
    expected = _reference_scores(_original_state(), render.rgb, PROMPTS)
    assert expected.std() > 1e-3  # the scores depend on the inputs
    torch.testing.assert_close(per_view.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, per_view.mean(1))
    # frozen, eval mode whatever the caller does
    assert not any(p.requires_grad for p in reward.parameters())
    reward.train()
    assert not (reward.vision.training or reward.text.training or reward.head.training)
    torch.testing.assert_close(reward.per_view(render, PROMPTS), per_view)
    # the prompt matters; [ENC] as first token (not ImageReward's choice) changes the score
    assert not torch.allclose(reward.per_view(render, PROMPTS[::-1]), per_view)
    enc = build_reward({"name": "image_reward", "kwargs": {"weights": str(weights), "enc_first_token": True}})
    assert enc.tokens(PROMPTS)[0][:, 0].tolist() == [VOCAB - 1] * 2
    assert not torch.allclose(enc.per_view(render, PROMPTS), per_view)
    with pytest.raises(ValueError, match="prompts"):
        reward(render, PROMPTS[:1])


def test_non_square_views_are_centre_cropped(weights):
    reward = ImageRewardReward(weights=str(weights))
    x = torch.rand(1, 3, 40, 60, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(reward.preprocess(x), reward.preprocess(x[..., 10:50]))
    torch.testing.assert_close(reward.preprocess(x.transpose(-1, -2)),
                               reward.preprocess(x.transpose(-1, -2)[..., 10:50, :]))


def test_gradients_reach_rgb_and_match_finite_differences(weights, rgb_fd_check):
    reward = build_reward({"name": "image_reward", "kwargs": {"weights": str(weights), "dtype": "float64"}})
    render = _render(b=1, v=2, size=12, seed=3, dtype=torch.float64)
    rgb_fd_check(reward, render, PROMPTS[:1], [(0, 0, 0, 3, 4), (0, 1, 2, 7, 9), (0, 1, 1, 0, 11)])
    assert not any(p.grad is not None for p in reward.parameters())


def test_registered_and_scores_a_render_batch(weights):
    assert "image_reward" in available_rewards()
    reward = build_reward({"name": "image_reward", "kwargs": {"weights": str(weights)}})
    out = reward(_render(b=3, v=1, size=32), ["a cube", "red", "green sphere"])
    assert out.shape == (3,) and torch.isfinite(out).all()


def test_missing_weights_name_the_files_and_what_to_download(weights, tmp_path):
    with pytest.raises(WeightsError, match="needs `weights`") as err:
        build_reward("image_reward")
    assert "THUDM/ImageReward" in str(err.value) and "convert_weights.py image_reward" in str(err.value)
    with pytest.raises(WeightsError, match="not a directory") as err:
        build_reward({"name": "image_reward", "kwargs": {"weights": str(tmp_path / "absent")}})
    assert "ImageReward.pt" in str(err.value) and "med_config.json" in str(err.value)
    broken = tmp_path / "broken"
    shutil.copytree(weights, broken)
    (broken / "vision" / "model.safetensors").unlink()
    (broken / HEAD).unlink()
    (broken / "ImageReward.pt").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="incomplete") as err:
        build_reward({"name": "image_reward", "kwargs": {"weights": str(broken)}})
    msg = str(err.value)
    assert str(broken / "vision" / "model.safetensors") in msg and str(broken / HEAD) in msg
    assert str(broken / "text" / "model.safetensors") not in msg
    assert "ImageReward.pt" in msg and "bert-base-uncased" in msg and "convert_weights.py image_reward" in msg
    # missing tokenizer
    notok = tmp_path / "notok"
    shutil.copytree(weights, notok)
    (notok / "tokenizer.json").unlink()
    with pytest.raises(WeightsError, match="tokenizer.json") as err:
        build_reward({"name": "image_reward", "kwargs": {"weights": str(notok)}})
    assert "bert-base-uncased" in str(err.value)
    # corrupt head
    bad = tmp_path / "bad"
    shutil.copytree(weights, bad)
    from safetensors.torch import save_file

    save_file({"layers.0.weight": torch.zeros(3, 3)}, str(bad / HEAD))
    with pytest.raises(WeightsError, match="could not load the image_reward head"):
        build_reward({"name": "image_reward", "kwargs": {"weights": str(bad)}})


def test_converter_is_strict_about_keys(original, tmp_path):
    sd, med = _original_state(), _med_config()
    vision, vision_config, text, text_config, head = imagereward_to_blip(sd, med)
    assert vision_config.image_size == 32 and vision_config.num_attention_heads == V_HEADS
    assert text_config.encoder_hidden_size == V_WIDTH and text_config.is_decoder
    # the fused qkv is kept, the BERT keys keep their names
    torch.testing.assert_close(vision["encoder.layers.1.self_attn.qkv.weight"],
                               sd["blip.visual_encoder.blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(text["encoder.layer.0.crossattention.self.key.weight"],
                               sd["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"])
    assert set(head) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    # an unexpected extra key, via the CLI on a .pt file
    extra = dict(sd, **{"blip.visual_encoder.head.weight": torch.zeros(2, 2),
                        "blip.text_encoder.pooler.dense.bias": torch.zeros(2)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unexpected ImageReward keys") as err:
        _cli().main(["image_reward", "--input", str(tmp_path / "extra.pt"), "--med-config",
                     str(original / "med_config.json"), "--tokenizer", str(original / "bert-base-uncased"),
                     "--output", str(tmp_path / "out")])
    assert "blip.visual_encoder.head.weight" in str(err.value)
    assert "blip.text_encoder.pooler.dense.bias" in str(err.value)
    assert not (tmp_path / "out").exists()
    # missing keys are all named
    gone = ["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
            "blip.visual_encoder.norm.bias", "mlp.layers.7.bias"]
    with pytest.raises(ValueError, match="missing keys") as err:
        imagereward_to_blip({k: x for k, x in sd.items() if k not in gone}, med)
    assert all(k in str(err.value) for k in gone)
    # med_config must match the checkpoint; the tokenizer must have the text encoder's vocabulary
    with pytest.raises(ValueError, match="num_hidden_layers"):
        imagereward_to_blip(sd, dict(med, num_hidden_layers=3))
    small = _bert_tokenizer_dir(tmp_path / "tok", WORDS[:-1])
    with pytest.raises(ValueError, match="tokens with \\[DEC\\]/\\[ENC\\] added"):
        save_image_reward(vision, vision_config, text, text_config, head, small, tmp_path / "out2")
    with pytest.raises(SystemExit):
        _cli().main(["image_reward", "--input", str(original / "ImageReward.pt"),
                     "--output", str(tmp_path / "x")])


def test_full_size_layout_converts_to_vit_large_and_bert_base():
    """Shape-only check on ImageReward's real sizes: BLIP ViT-L/16 at 224 px (24 blocks, 16 heads),
    BERT-base with cross-attention to 1024-wide image tokens (vocabulary 30522 + [DEC], [ENC]),
    med_config.json as released."""
    sd = _original_state(v_width=1024, v_layers=24, patch=16, grid=14, vocab=30524, t_width=768, t_layers=12,
                         t_mlp=3072, t_pos=512, meta=True)
    med = dict(_med_config(), hidden_size=768, intermediate_size=3072, max_position_embeddings=512,
               num_attention_heads=12, num_hidden_layers=12, vocab_size=30524, encoder_width=768)
    vision, vc, text, tc, head = imagereward_to_blip(sd, med)
    assert (vc.image_size, vc.patch_size, vc.num_hidden_layers, vc.num_attention_heads) == (224, 16, 24, 16)
    assert (vc.intermediate_size, vc.layer_norm_eps, vc.hidden_act) == (4096, 1e-6, "gelu")
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads) == (768, 12, 12)
    assert tc.encoder_hidden_size == 1024
    assert (tc.vocab_size, tc.layer_norm_eps, tc.bos_token_id) == (30524, 1e-12, 30522)
    with torch.device("meta"):
        ref = transformers.BlipVisionModel(vc).state_dict()
    assert {k: tuple(x.shape) for k, x in ref.items()} == {k: tuple(x.shape) for k, x in vision.items()}
    assert len(vision) + len(text) + len(head) == len(sd) - 5  # all but vision_proj, text_proj, position_ids
