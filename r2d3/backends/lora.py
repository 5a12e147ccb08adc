"""LoRA on the backend's denoiser through peft, with peft/diffusers-format state dicts.

The reference model p_ref is the same network with the adapter disabled, so the policy and the
reference share every frozen weight (one copy in memory).
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Mapping

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

ADAPTER = "policy"
#: the prefixes diffusers' ``save_lora_weights`` puts before a denoiser's peft keys
DIFFUSERS_LORA_PREFIXES = ("unet.", "transformer.")
_PEFT_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")


def from_diffusers_lora(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """A LoRA saved by diffusers' ``save_lora_weights`` (the official Nabla-R2D3 training writes
    ``pytorch_lora_weights.safetensors``: peft keys behind a ``unet.`` prefix) -> ``(state dict with r2d3's
    keys, rank, names of the adapted modules)``. The module names are exact paths, usable as peft
    ``target_modules``, so the adapter is rebuilt on exactly the modules the file adapts."""
    keys = list(state)
    prefix = next((p for p in DIFFUSERS_LORA_PREFIXES if keys and all(k.startswith(p) for k in keys)), None)
    if prefix is None:
        raise ValueError(f"not a diffusers LoRA file: keys are not all under one of {DIFFUSERS_LORA_PREFIXES} "
                         f"(first: {keys[:1]})")
    out = {k[len(prefix):]: v for k, v in state.items()}
    parts: dict[str, set[str]] = {}
    for key in out:
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"not a plain LoRA (peft lora_A/lora_B weights only): {prefix}{key}")
        parts.setdefault(match.group(1), set()).add(match.group(2))
    half = sorted(m for m, ab in parts.items() if ab != {"A", "B"})
    if half:
        raise ValueError(f"LoRA modules without both lora_A and lora_B: {half[:3]}")
    ranks = {int(v.shape[0]) for k, v in out.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ValueError(f"LoRA modules of different ranks {sorted(ranks)}: one adapter rank is supported")
    return out, ranks.pop(), sorted(parts)


def add_lora(module: nn.Module, rank: int, alpha: float | None, targets: list[str]) -> list[nn.Parameter]:
    """Freeze ``module`` and add a zero-initialised LoRA adapter (output unchanged); return its parameters."""
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights="gaussian")
    module.add_adapter(config, adapter_name=ADAPTER)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"LoRA targets {targets} matched no module of {type(module).__name__}")
    for p in params:  # adapters train in fp32 even on a half-precision base
        p.data = p.data.float()
    return params


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights with peft/diffusers keys (``blocks.0.attn1.to_q.lora_A.weight``), detached copies."""
    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER).items()}


def load_lora_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = set(get_peft_model_state_dict(module, adapter_name=ADAPTER))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"LoRA weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA weights have unexpected keys: {result.unexpected_keys[:3]}")


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Evaluate the frozen base model (p_ref) inside the block."""
    module.disable_adapters()
    try:
        yield
    finally:
        module.enable_adapters()
