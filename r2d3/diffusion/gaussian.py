"""Log-density and score of the isotropic Gaussian step kernel p(x_{t-1} | x_t) = N(mean, std² I).

These are the two quantities the alignment losses read from a transition: DDPO's importance ratio uses
the log-density, Nabla-GFlowNet regresses the score ∇_{x_{t-1}} log p (the gradient w.r.t. the *next*
latent, see method-notes §6(a)). Both are differentiable in ``mean`` (and so in the model output).

A deterministic step (std = 0: DDIM with eta = 0, or a last step into ᾱ = 1) has no density; both
functions then raise instead of returning inf/nan, which would silently poison a loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_std(std: Tensor | float) -> None:
    positive = bool((std > 0).all()) if isinstance(std, Tensor) else bool(std > 0)
    if not positive:
        raise ValueError(
            "std must be > 0: this step is deterministic (DDIM with eta=0, or a final step into alpha_bar=1), "
            "so its log-density and score are undefined; sample with eta > 0 and set_alpha_to_one=False / "
            "final_sigmas_type='sigma_min'"
        )


def _check_pair(x_prev: Tensor, mean: Tensor) -> None:
    if x_prev.shape != mean.shape:
        raise ValueError(f"x_prev shape {tuple(x_prev.shape)} does not match mean shape {tuple(mean.shape)}")
    if x_prev.ndim < 1:
        raise ValueError("x_prev must have a leading batch dimension [B, ...]")


def _as_std(std: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(std, dtype=like.dtype, device=like.device)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def gaussian_log_prob(x_prev: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """Per-sample log N(x_prev; mean, std² I), summed over all non-batch dimensions.

    Args:
        x_prev: ``[B, *S]`` the sampled next latent x_{t-1}.
        mean: ``[B, *S]`` the step mean μ(x_t, model output).
        std: a float, a 0-dim tensor, or a tensor broadcastable to ``[B, *S]`` (e.g. ``[B, 1, ...]``).

    Returns:
        ``[B]`` log-densities, computed in at least float32.
    """
    _check_pair(x_prev, mean)
    _check_std(std)
    dtype = _compute_dtype(x_prev, mean)
    x_prev, mean = x_prev.to(dtype), mean.to(dtype)
    std_t = _as_std(std, x_prev)
    z = (x_prev - mean) / std_t
    per_element = -0.5 * z.square() - torch.log(std_t) - 0.5 * math.log(2.0 * math.pi)
    per_element = per_element.expand_as(x_prev)
    return per_element.reshape(x_prev.shape[0], -1).sum(dim=1)


def gaussian_score(x_prev: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """∇_{x_prev} log N(x_prev; mean, std² I) = -(x_prev - mean) / std².

    Args/shapes as :func:`gaussian_log_prob`; returns ``[B, *S]`` in at least float32.
    """
    _check_pair(x_prev, mean)
    _check_std(std)
    dtype = _compute_dtype(x_prev, mean)
    x_prev, mean = x_prev.to(dtype), mean.to(dtype)
    std_t = _as_std(std, x_prev)
    return -(x_prev - mean) / std_t.square()
