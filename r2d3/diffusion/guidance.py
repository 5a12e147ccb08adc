"""Classifier-free guidance (CFG) as a wrapper that turns a conditional denoiser into a ``ModelFn``.

The sampler, and every alignment loss, only ever sees the *guided* network output: Nabla-R2D3 applies
CFG (w = 5) both while sampling and when re-evaluating the model during training, and the proximal
anchor ε_old is the guided output recorded at sampling time. Keeping CFG in one wrapper means sampling
and training combine the two branches the same way.

Conventions:
- a ``ModelFn`` is ``model_fn(x, t) -> output`` with ``x`` ``[B, *S]``, ``t`` a long tensor ``[B]`` of
  model-conditioning timesteps, and ``output`` ``[B, *S]`` (ε, v or x_0 by the scheduler's prediction type);
- a ``ConditionalDenoiser`` is ``denoiser(x, t, cond) -> output``; ``cond`` is a tensor ``[B, ...]`` or a
  mapping of such tensors (e.g. text embeddings and their attention mask), batched along dim 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]
Conditioning = Union[Tensor, Mapping[str, Tensor]]
ConditionalDenoiser = Callable[[Tensor, Tensor, Any], Tensor]


def cfg_combine(uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
    """uncond + s·(cond − uncond): the classifier-free-guidance combination of two network outputs."""
    if uncond.shape != cond.shape:
        raise ValueError(f"cfg_combine: uncond shape {tuple(uncond.shape)} != cond shape {tuple(cond.shape)}")
    return uncond + guidance_scale * (cond - uncond)


def _batch_size(cond: Conditioning) -> int:
    if isinstance(cond, Tensor):
        return cond.shape[0]
    sizes = {value.shape[0] for value in cond.values()}
    if len(sizes) != 1:
        raise ValueError(f"conditioning tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def _expand(cond: Conditioning, batch: int, name: str) -> Conditioning:
    """Broadcast a batch-1 conditioning (e.g. the empty-prompt embedding) to ``batch`` rows."""
    size = _batch_size(cond)
    if size == batch:
        return cond
    if size != 1:
        raise ValueError(f"{name} has batch size {size}, expected 1 or {batch} (the latent batch size)")
    if isinstance(cond, Tensor):
        return cond.expand(batch, *cond.shape[1:])
    return {key: value.expand(batch, *value.shape[1:]) for key, value in cond.items()}


def _concat(first: Conditioning, second: Conditioning) -> Conditioning:
    if isinstance(first, Tensor) and isinstance(second, Tensor):
        return torch.cat([first, second], dim=0)
    if isinstance(first, Mapping) and isinstance(second, Mapping) and first.keys() == second.keys():
        return {key: torch.cat([first[key], second[key]], dim=0) for key in first}
    raise ValueError("cond and uncond must both be tensors or mappings with the same keys")


def guided_model_fn(
    denoiser: ConditionalDenoiser,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
) -> ModelFn:
    """Wrap ``denoiser(x, t, cond)`` into a ``ModelFn`` that applies classifier-free guidance.

    With ``guidance_scale == 1`` (or no ``uncond``) the denoiser runs once on ``cond``. Otherwise the batch
    is doubled — ``[uncond rows; cond rows]`` in one call, cheaper than two calls on accelerators — and
    the halves are combined with :func:`cfg_combine`. ``cond``/``uncond`` rows are ``[B, ...]`` or ``[1, ...]``
    (broadcast). The wrapper is differentiable: use it for training-time re-evaluations too.
    """
    if uncond is None and guidance_scale != 1.0:
        raise ValueError(f"guidance_scale={guidance_scale} needs an unconditional embedding (uncond)")

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        t = t.expand(batch) if t.ndim == 0 else t
        cond_b = _expand(cond, batch, "cond")
        if uncond is None or guidance_scale == 1.0:
            return denoiser(x, t, cond_b)
        uncond_b = _expand(uncond, batch, "uncond")
        out = denoiser(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), _concat(uncond_b, cond_b))
        return cfg_combine(out[:batch], out[batch:], guidance_scale)

    return model_fn
