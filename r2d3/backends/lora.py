"""LoRA on the backend's denoiser through peft, with peft/diffusers-format state dicts.

The reference model p_ref is the same network with the adapter disabled, so the policy and the
reference share every frozen weight (one copy in memory).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

ADAPTER = "policy"


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
