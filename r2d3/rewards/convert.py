"""Converters from the original reward checkpoints to the safetensors files :mod:`r2d3.rewards.clip_models`
loads (used by ``pipelines/convert_weights.py``).

- :func:`convert_aesthetic_head`: the LAION improved-aesthetic-predictor ``.pth`` (a plain state dict of
  an ``nn.Sequential`` named ``layers``) -> ``aesthetic_mlp.safetensors``.
- :func:`plain_tensors`: a transformers ``pytorch_model.bin`` -> ``model.safetensors``.
- :func:`openclip_to_transformers`: an OpenCLIP CLIP state dict (e.g. HPS v2.1, OpenCLIP ViT-H-14
  layout) -> a ``transformers`` ``CLIPModel`` state dict plus the matching ``CLIPConfig`` (sizes read from
  the tensor shapes, attention heads from the architecture they identify or given explicitly). The OpenCLIP layout: ``visual.{conv1,class_embedding,positional_embedding,ln_pre,
  transformer.resblocks.N,ln_post,proj}`` and ``{token_embedding,positional_embedding,transformer.resblocks.N,
  ln_final,text_projection,logit_scale}``; each residual block has ``ln_1, attn.in_proj_{weight,bias}`` (q, k,
  v stacked), ``attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj``. OpenCLIP's projections are ``x @ proj``, so
  they are transposed into ``nn.Linear`` weights.
- :func:`imagereward_to_blip` + :func:`save_image_reward`: ImageReward's ``ImageReward.pt``
  (THUDM/ImageReward, a plain state dict of its ``ImageReward`` module) + its ``med_config.json`` + a
  ``bert-base-uncased`` tokenizer -> the directory :mod:`r2d3.rewards.image_reward` loads (``vision/`` a
  ``transformers`` ``BlipVisionModel``, ``text/`` a ``BlipTextModel`` with cross-attention, the tokenizer
  with BLIP's ``[DEC]``/``[ENC]`` tokens, ``head.safetensors``, ``image_reward.json``). Source layout:
  ``blip.visual_encoder.{cls_token,pos_embed,patch_embed.proj,blocks.N.{norm1,attn.qkv,attn.proj,norm2,
  mlp.fc1,mlp.fc2},norm}`` (BLIP's timm-style ViT, LayerNorm eps 1e-6), ``blip.text_encoder.*`` (BLIP's
  ``med.py`` BERT, already named like ``BlipTextModel``) and ``mlp.layers.{0,2,4,6,7}`` (the LAION-style
  linear head).

Pickled checkpoints are read with ``torch.load(weights_only=True)`` (tensors and plain containers only).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from r2d3.pretrained import CLIP_MEAN, CLIP_STD
from r2d3.rewards.clip_models import AestheticHead


def load_torch_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a ``.pt``/``.pth`` file, loaded safely; unwraps ``{"state_dict": ...}`` and strips
    a DistributedDataParallel ``module.`` prefix."""
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def plain_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict as separate contiguous tensors (safetensors refuses shared storage), dtypes kept;
    for transformers checkpoints published only as ``pytorch_model.bin``."""
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"not a plain state dict: non-tensor entries {bad[:8]}")
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def convert_aesthetic_head(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Check and return the head's tensors (contiguous fp32), keyed as :class:`AestheticHead` expects."""
    first = state.get("layers.0.weight")
    ref = AestheticHead(int(first.shape[1]) if first is not None and first.ndim == 2 else 768).state_dict()
    if set(state) != set(ref):
        raise ValueError(f"not a LAION aesthetic head: keys {sorted(state)} != expected {sorted(ref)}")
    for k, v in ref.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"aesthetic head {k}: shape {tuple(state[k].shape)} != "
                             f"expected {tuple(v.shape)}")
    return {k: state[k].detach().float().contiguous() for k in ref}


def _block_count(state: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if not ids or ids != set(range(len(ids))):
        raise ValueError(f"no consecutive residual blocks under {prefix!r}")
    return len(ids)


def _blocks(state: Mapping[str, Tensor], src: str, dst: str, n: int, out: dict[str, Tensor]) -> None:
    for i in range(n):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                     ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
            out[d + b + ".weight"] = state[s + a + ".weight"]
            out[d + b + ".bias"] = state[s + a + ".bias"]
        for part, w, bias in zip(("q", "k", "v"), state[s + "attn.in_proj_weight"].chunk(3, dim=0),
                                 state[s + "attn.in_proj_bias"].chunk(3, dim=0)):
            out[f"{d}self_attn.{part}_proj.weight"] = w
            out[f"{d}self_attn.{part}_proj.bias"] = bias


#: OpenCLIP ViT architectures by (vision width, patch size, text width): name, vision heads, text heads,
#: from OpenCLIP's model configs. The shapes of a state dict cannot tell the head count (ViT-H-14's
#: vision tower has head_width 80, not OpenCLIP's default 64), so it comes from the architecture.
OPENCLIP_ARCHITECTURES: dict[tuple[int, int, int], tuple[str, int, int]] = {
    (768, 32, 512): ("ViT-B-32", 12, 8),
    (768, 16, 512): ("ViT-B-16", 12, 8),
    (1024, 14, 768): ("ViT-L-14", 16, 12),
    (1280, 14, 1024): ("ViT-H-14", 16, 16),  # vision head_width 80
    (1664, 14, 1280): ("ViT-G-14", 16, 20),  # vision head_width 104
}


def openclip_to_transformers(state: Mapping[str, Tensor], vision_heads: int | None = None,
                             text_heads: int | None = None,
                             hidden_act: str = "gelu") -> tuple[dict[str, Tensor], Any]:
    """``(transformers CLIPModel state dict, CLIPConfig)`` from an OpenCLIP state dict.

    ``vision_heads`` / ``text_heads``: attention heads per tower; by default read from the architecture
    the tensor shapes identify (:data:`OPENCLIP_ARCHITECTURES`, e.g. HPSv2's ViT-H-14: 16 and 16). An
    unknown architecture without both is an error rather than a guess: a wrong head count still loads
    (the weights have the same shapes) and silently changes every score. ``hidden_act``: ``"gelu"``
    for OpenCLIP models (ViT-H-14, HPSv2), ``"quick_gelu"`` for OpenAI-trained ones."""
    from transformers import CLIPConfig

    v_width, _, patch, _ = state["visual.conv1.weight"].shape
    v_mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    n_pos = state["visual.positional_embedding"].shape[0]
    grid = int(round((n_pos - 1) ** 0.5))
    if grid * grid != n_pos - 1:
        raise ValueError(f"visual.positional_embedding has {n_pos} rows, not 1 + a square grid")
    vocab, t_width = state["token_embedding.weight"].shape
    ctx = state["positional_embedding"].shape[0]
    embed_dim = state["visual.proj"].shape[1]
    if state["text_projection"].shape[1] != embed_dim:
        raise ValueError("image and text projections have different output sizes")
    v_layers = _block_count(state, "visual.transformer.resblocks.")
    t_layers = _block_count(state, "transformer.resblocks.")
    if vision_heads is None or text_heads is None:
        known = OPENCLIP_ARCHITECTURES.get((int(v_width), int(patch), int(t_width)))
        if known is None:
            raise ValueError(f"unknown OpenCLIP architecture (vision width {int(v_width)}, patch {int(patch)}, "
                             f"{v_layers} layers; text width {int(t_width)}): pass vision_heads and text_heads "
                             "(vision width / head_width and text heads of its OpenCLIP model config)")
        vision_heads = known[1] if vision_heads is None else vision_heads
        text_heads = known[2] if text_heads is None else text_heads
    for tower, width, heads in (("vision", int(v_width), vision_heads), ("text", int(t_width), text_heads)):
        if heads < 1 or width % heads:
            raise ValueError(f"{tower} width {width} is not divisible by {heads} heads")
    config = CLIPConfig(
        text_config=dict(vocab_size=int(vocab), hidden_size=int(t_width), num_hidden_layers=t_layers,
                         num_attention_heads=int(text_heads),
                         intermediate_size=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                         max_position_embeddings=int(ctx), hidden_act=hidden_act, layer_norm_eps=1e-5),
        vision_config=dict(hidden_size=int(v_width), num_hidden_layers=v_layers,
                           num_attention_heads=int(vision_heads),
                           intermediate_size=int(v_mlp),
                           image_size=int(grid * patch), patch_size=int(patch), hidden_act=hidden_act,
                           layer_norm_eps=1e-5),
        projection_dim=int(embed_dim))
    out: dict[str, Tensor] = {
        "logit_scale": state["logit_scale"].reshape(()),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
    }
    _blocks(state, "transformer.resblocks.", "text_model.encoder.layers.", t_layers, out)
    _blocks(state, "visual.transformer.resblocks.", "vision_model.encoder.layers.", v_layers, out)
    unused = sorted(set(state) - _used_openclip_keys(t_layers, v_layers))
    if unused:
        raise ValueError(f"unexpected OpenCLIP keys (not a plain CLIP ViT?): {unused[:8]}")
    return {k: v.detach().float().contiguous() for k, v in out.items()}, config


def _used_openclip_keys(t_layers: int, v_layers: int) -> set[str]:
    keys = {"logit_scale", "token_embedding.weight", "positional_embedding", "ln_final.weight",
            "ln_final.bias", "text_projection", "visual.class_embedding", "visual.conv1.weight",
            "visual.positional_embedding",
            "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
            "visual.proj", "attn_mask"}  # attn_mask: the causal-mask buffer some versions save
    modules = ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
    parts = [f"{m}.{p}" for m in modules for p in ("weight", "bias")]
    parts += ["attn.in_proj_weight", "attn.in_proj_bias"]
    for prefix, n in (("transformer.resblocks.", t_layers), ("visual.transformer.resblocks.", v_layers)):
        keys |= {f"{prefix}{i}.{p}" for i in range(n) for p in parts}
    return keys


def save_transformers_clip(state: Mapping[str, Tensor], config: Any, output: str | Path) -> None:
    """Load ``state`` strictly into ``CLIPModel(config)`` and ``save_pretrained`` it (safetensors) to
    ``output``, with a ``preprocessor_config.json`` holding OpenAI CLIP's mean/std (OpenCLIP's ViT-H-14
    uses the same)."""
    import json

    from transformers import CLIPModel

    model = CLIPModel(config)
    model.load_state_dict(dict(state), strict=True)
    output = Path(output)
    model.save_pretrained(str(output), safe_serialization=True)
    size = config.vision_config.image_size
    (output / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "size": {"shortest_edge": size},
         "crop_size": {"height": size, "width": size}}, indent=2))


# --------------------------------------------------------------------------------------------------------
# ImageReward (BLIP ViT + BERT with cross-attention + linear MLP head)

#: ImageReward's score normalisation, ``(mlp(x) - mean) / std`` (constants of its ``ImageReward`` class)
IMAGE_REWARD_SCORE_MEAN = 0.16717362830052426
IMAGE_REWARD_SCORE_STD = 1.0333394966054072

#: source keys that the score never uses and the conversion drops: BLIP_Pretrain's contrastive projections
#: (``vision_proj``/``text_proj``, used by BLIPScore, not by ImageReward) and the ``position_ids`` buffer
#: older ``transformers`` versions saved (it is ``arange(max_position_embeddings)``, rebuilt on load)
IMAGE_REWARD_IGNORED = ("blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
                        "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids")

_VIT_BLOCK = (("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"),
              ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))


def _in_vocab(token_id: int, vocab: int) -> int | None:
    return token_id if 0 <= token_id < vocab else None


def imagereward_to_blip(state: Mapping[str, Tensor], med_config: Mapping[str, Any],
                        head_width: int = 64) -> tuple[dict[str, Tensor], Any, dict[str, Tensor], Any,
                                                       dict[str, Tensor]]:
    """``(vision state, BlipVisionConfig, text state, BlipTextConfig, head state)`` from ImageReward's state
    dict and its ``med_config.json`` (as a dict).

    The ViT sizes are read from the tensor shapes; ``head_width`` is its attention head size (64 for BLIP's
    ViT-B/16 and ViT-L/16: 12 and 16 heads), which shapes cannot tell. ViT LayerNorms use eps 1e-6 and exact
    GELU, as BLIP's ``vit.py``. The text tower follows ``med_config`` (its ``encoder_width`` is replaced by
    the ViT width, as BLIP does). Strict: a missing source key or one left unconsumed (beyond
    :data:`IMAGE_REWARD_IGNORED`) raises ``ValueError`` listing them."""
    from transformers import BlipTextConfig, BlipVisionConfig

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    required = (v + "cls_token", v + "pos_embed", v + "patch_embed.proj.weight",
                t + "embeddings.word_embeddings.weight", "mlp.layers.0.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"not an ImageReward checkpoint: missing keys {missing} "
                         f"(found e.g. {sorted(state)[:8]})")
    if med_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("med_config.json: only absolute position embeddings are supported, got "
                         f"{med_config['position_embedding_type']!r}")
    if not med_config.get("add_cross_attention", False):
        raise ValueError("med_config.json: ImageReward's text encoder needs add_cross_attention=true")

    width, _, patch, _ = state[v + "patch_embed.proj.weight"].shape
    n_pos = state[v + "pos_embed"].shape[1]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid != n_pos - 1:
        raise ValueError(f"{v}pos_embed has {n_pos} rows, not 1 + a square grid")
    if int(width) % head_width:
        raise ValueError(f"ViT width {int(width)} is not a multiple of head_width={head_width}")
    v_layers = _block_count(state, v + "blocks.")
    vision_config = BlipVisionConfig(
        hidden_size=int(width), intermediate_size=int(state[v + "blocks.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=v_layers, num_attention_heads=int(width) // head_width,
        image_size=int(grid * patch), patch_size=int(patch), hidden_act="gelu", layer_norm_eps=1e-6,
        attention_dropout=0.0)

    vocab, t_width = state[t + "embeddings.word_embeddings.weight"].shape
    t_layers = _block_count(state, t + "encoder.layer.")
    sizes = (int(med_config.get("vocab_size", vocab)), int(med_config.get("hidden_size", t_width)))
    if sizes != (vocab, t_width):
        raise ValueError(f"med_config.json (vocab_size {med_config.get('vocab_size')}, hidden_size "
                         f"{med_config.get('hidden_size')}) does not match the checkpoint's word embeddings "
                         f"{tuple(state[t + 'embeddings.word_embeddings.weight'].shape)}")
    if int(med_config.get("num_hidden_layers", t_layers)) != t_layers:
        raise ValueError(f"med_config.json has num_hidden_layers={med_config['num_hidden_layers']} but the "
                         f"checkpoint has {t_layers} text layers")
    text_config = BlipTextConfig(
        vocab_size=int(vocab), hidden_size=int(t_width), encoder_hidden_size=int(width),
        intermediate_size=int(med_config["intermediate_size"]), num_hidden_layers=t_layers,
        num_attention_heads=int(med_config["num_attention_heads"]),
        max_position_embeddings=int(med_config["max_position_embeddings"]),
        hidden_act=str(med_config.get("hidden_act", "gelu")),
        layer_norm_eps=float(med_config.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=float(med_config.get("hidden_dropout_prob", 0.0)),
        attention_probs_dropout_prob=float(med_config.get("attention_probs_dropout_prob", 0.0)),
        pad_token_id=int(med_config.get("pad_token_id", 0)),
        # BLIP's [DEC] (bos), [SEP] and BERT's [unused1]; kept only where they fit the vocabulary
        bos_token_id=_in_vocab(30522, int(vocab)), sep_token_id=_in_vocab(102, int(vocab)),
        eos_token_id=_in_vocab(2, int(vocab)),
        is_decoder=True)  # BlipTextLayer builds its cross-attention only for is_decoder configs

    used: set[str] = set()
    absent: list[str] = []

    def take(key: str) -> Tensor:
        if key not in state:
            absent.append(key)
            return torch.empty(0)
        used.add(key)
        return state[key]

    vision: dict[str, Tensor] = {
        "embeddings.class_embedding": take(v + "cls_token"),
        "embeddings.position_embedding": take(v + "pos_embed"),
        "embeddings.patch_embedding.weight": take(v + "patch_embed.proj.weight"),
        "embeddings.patch_embedding.bias": take(v + "patch_embed.proj.bias"),
        "post_layernorm.weight": take(v + "norm.weight"),
        "post_layernorm.bias": take(v + "norm.bias"),
    }
    for i in range(v_layers):
        for src, dst in _VIT_BLOCK:
            for p in ("weight", "bias"):
                vision[f"encoder.layers.{i}.{dst}.{p}"] = take(f"{v}blocks.{i}.{src}.{p}")

    # BLIP's med.py BERT already uses the names of transformers' BlipTextModel: check against the real module
    from transformers import BlipTextModel

    with torch.device("meta"):
        text_keys = list(BlipTextModel(text_config, add_pooling_layer=False).state_dict())
    text = {k: take(t + k) for k in text_keys}

    head_keys = list(AestheticHead(int(state["mlp.layers.0.weight"].shape[1])).state_dict())
    head = {k: take("mlp." + k) for k in head_keys}
    if absent:
        raise ValueError(f"not a complete ImageReward checkpoint: missing keys {absent[:16]}"
                         + (f" and {len(absent) - 16} more" if len(absent) > 16 else ""))
    if head["layers.0.weight"].shape[1] != t_width:
        raise ValueError(f"the MLP head takes {head['layers.0.weight'].shape[1]} features, the text encoder "
                         f"gives {int(t_width)}")

    unused = sorted(set(state) - used - set(IMAGE_REWARD_IGNORED))
    if unused:
        raise ValueError(f"unexpected ImageReward keys (not consumed by the conversion): {unused[:16]}"
                         + (f" and {len(unused) - 16} more" if len(unused) > 16 else ""))

    def plain(d: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: x.detach().float().contiguous() for k, x in d.items()}

    return plain(vision), vision_config, plain(text), text_config, plain(head)


def save_image_reward(vision: Mapping[str, Tensor], vision_config: Any, text: Mapping[str, Tensor],
                      text_config: Any, head: Mapping[str, Tensor], tokenizer_dir: str | Path,
                      output: str | Path, max_length: int = 35) -> None:
    """Write the ``image_reward`` directory: ``vision/`` and ``text/`` (``save_pretrained``, safetensors, each
    model loaded strictly first), ``head.safetensors``, the BERT tokenizer from ``tokenizer_dir`` with BLIP's
    special tokens added (``[DEC]`` as bos, ``[ENC]`` as an additional special token; its vocabulary must then
    match the text encoder's) and ``image_reward.json`` (score mean/std, image size and mean/std,
    max_length)."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory {tokenizer_dir} not found: pass the files of the "
                                "Hugging Face repo `bert-base-uncased` (vocab.txt, tokenizer.json, "
                                "tokenizer_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != text_config.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens with [DEC]/[ENC] "
                         f"added, the text encoder {text_config.vocab_size}: not the bert-base-uncased "
                         "tokenizer?")
    output = Path(output)
    for sub, cls, state, config, kwargs in (("vision", BlipVisionModel, vision, vision_config, {}),
                                            ("text", BlipTextModel, text, text_config,
                                             {"add_pooling_layer": False})):
        model = cls(config, **kwargs)
        model.load_state_dict(dict(state), strict=True)
        model.save_pretrained(str(output / sub), safe_serialization=True)
    save_file(dict(head), str(output / "head.safetensors"))
    tokenizer.save_pretrained(str(output))
    (output / "image_reward.json").write_text(json.dumps({
        "score_mean": IMAGE_REWARD_SCORE_MEAN, "score_std": IMAGE_REWARD_SCORE_STD,
        "image_size": int(vision_config.image_size), "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "max_length": int(max_length),
        "enc_token_id": int(tokenizer.convert_tokens_to_ids("[ENC]")),
    }, indent=2))


__all__ = [
    "IMAGE_REWARD_IGNORED",
    "IMAGE_REWARD_SCORE_MEAN",
    "IMAGE_REWARD_SCORE_STD",
    "convert_aesthetic_head",
    "imagereward_to_blip",
    "load_torch_checkpoint",
    "openclip_to_transformers",
    "plain_tensors",
    "save_image_reward",
    "save_transformers_clip",
]
