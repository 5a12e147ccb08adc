"""Converters from the original reward checkpoints to the safetensors files :mod:`r2d3.rewards.clip_models`
loads (used by ``pipelines/convert_weights.py``).

- :func:`convert_aesthetic_head`: the LAION improved-aesthetic-predictor ``.pth`` (a plain state dict of
  an ``nn.Sequential`` named ``layers``) -> ``aesthetic_mlp.safetensors``.
- :func:`plain_tensors`: a transformers ``pytorch_model.bin`` -> ``model.safetensors``.
- :func:`openclip_to_transformers`: an OpenCLIP CLIP state dict (e.g. HPS v2.1, OpenCLIP ViT-H-14
  layout) -> a ``transformers`` ``CLIPModel`` state dict plus the matching ``CLIPConfig`` (sizes read from
  the tensor shapes). The OpenCLIP layout: ``visual.{conv1,class_embedding,positional_embedding,ln_pre,
  transformer.resblocks.N,ln_post,proj}`` and ``{token_embedding,positional_embedding,transformer.resblocks.N,
  ln_final,text_projection,logit_scale}``; each residual block has ``ln_1, attn.in_proj_{weight,bias}`` (q, k,
  v stacked), ``attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj``. OpenCLIP's projections are ``x @ proj``, so
  they are transposed into ``nn.Linear`` weights.

Pickled checkpoints are read with ``torch.load(weights_only=True)`` (tensors and plain containers only).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor


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
    from r2d3.rewards.clip_models import AestheticHead

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


def openclip_to_transformers(state: Mapping[str, Tensor], head_width: int = 64,
                             hidden_act: str = "gelu") -> tuple[dict[str, Tensor], Any]:
    """``(transformers CLIPModel state dict, CLIPConfig)`` from an OpenCLIP state dict.

    ``head_width``: attention head size (OpenCLIP's default, 64, for every ViT config); ``hidden_act``:
    ``"gelu"`` for OpenCLIP models (ViT-H-14, HPSv2), ``"quick_gelu"`` for OpenAI-trained ones."""
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
    config = CLIPConfig(
        text_config=dict(vocab_size=int(vocab), hidden_size=int(t_width), num_hidden_layers=t_layers,
                         num_attention_heads=int(t_width) // head_width,
                         intermediate_size=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                         max_position_embeddings=int(ctx), hidden_act=hidden_act, layer_norm_eps=1e-5),
        vision_config=dict(hidden_size=int(v_width), num_hidden_layers=v_layers,
                           num_attention_heads=int(v_width) // head_width,
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

    from r2d3.eval.extractors import CLIP_MEAN, CLIP_STD

    model = CLIPModel(config)
    model.load_state_dict(dict(state), strict=True)
    output = Path(output)
    model.save_pretrained(str(output), safe_serialization=True)
    size = config.vision_config.image_size
    (output / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "size": {"shortest_edge": size},
         "crop_size": {"height": size, "width": size}}, indent=2))


__all__ = [
    "convert_aesthetic_head",
    "load_torch_checkpoint",
    "openclip_to_transformers",
    "plain_tensors",
    "save_transformers_clip",
]
