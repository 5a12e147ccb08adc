"""Input checks shared by every renderer: cameras and background colours.

Renderers fail early with an error naming the offending input instead of deep inside a kernel with
a shape mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from r2d3.render.cameras import Cameras


def validate_cameras(
    cameras: Cameras,
    batch_size: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Cameras:
    """Check ``cameras`` and return them batched ``[batch_size, V, ...]`` in ``dtype`` on ``device``.

    Unbatched cameras (``viewmats [V, 4, 4]``, ``Ks [V, 3, 3]``) are shared by all assets. Raises
    :class:`ValueError` naming the problem: wrong shapes, a view count or batch size that does not
    match, a non-positive image size, non-finite values or non-positive focal lengths.
    """
    if not isinstance(cameras, Cameras):
        raise TypeError(f"cameras must be r2d3.render.Cameras, got {type(cameras).__name__}")
    viewmats, Ks = cameras.viewmats, cameras.Ks
    for name, value in (("viewmats", viewmats), ("Ks", Ks)):
        if not isinstance(value, Tensor):
            raise ValueError(f"Cameras.{name} must be a torch.Tensor, got {type(value).__name__}")
    if viewmats.ndim not in (3, 4) or tuple(viewmats.shape[-2:]) != (4, 4):
        raise ValueError(
            f"Cameras.viewmats must have shape [B, V, 4, 4] or [V, 4, 4], got {list(viewmats.shape)}"
        )
    if Ks.ndim not in (3, 4) or tuple(Ks.shape[-2:]) != (3, 3):
        raise ValueError(f"Cameras.Ks must have shape [B, V, 3, 3] or [V, 3, 3], got {list(Ks.shape)}")
    if viewmats.ndim != Ks.ndim or viewmats.shape[:-2] != Ks.shape[:-2]:
        raise ValueError(
            f"Cameras.viewmats {list(viewmats.shape)} and Cameras.Ks {list(Ks.shape)} "
            "disagree on the batch/view axes"
        )
    if viewmats.shape[-3] == 0:
        raise ValueError("Cameras has no views (V = 0)")
    if viewmats.ndim == 4 and viewmats.shape[0] != batch_size:
        raise ValueError(
            f"batch size mismatch: cameras have batch size {viewmats.shape[0]} but the Gaussians have "
            f"{batch_size}; pass unbatched cameras [V, 4, 4] to share them across assets"
        )
    for name, size in (("width", cameras.width), ("height", cameras.height)):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"Cameras.{name} must be a positive int, got {size!r}")
    if not (torch.isfinite(viewmats).all() and torch.isfinite(Ks).all()):
        raise ValueError("Cameras.viewmats / Cameras.Ks contain NaN or inf")
    if (Ks[..., 0, 0] <= 0).any() or (Ks[..., 1, 1] <= 0).any():
        raise ValueError("Cameras.Ks must have positive focal lengths fx, fy")
    cameras = cameras.expand(batch_size)
    return cameras.to(dtype=dtype or viewmats.dtype, device=device or viewmats.device)


def background_tensor(
    background: float | Sequence[float] | Tensor, batch_size: int, num_views: int, dtype: torch.dtype, device
) -> Tensor:
    """A background colour ``[B, V, 3]`` from a scalar grey level, an RGB triple ``[3]``, or ``[B, V, 3]``."""
    bg = torch.as_tensor(background, dtype=dtype, device=device)
    if bg.ndim == 0:
        bg = bg.expand(3)
    if bg.shape[-1:] != (3,) or bg.ndim > 3:
        raise ValueError(
            f"background must be a grey level, an RGB triple or [B, V, 3], got shape {list(bg.shape)}"
        )
    try:
        bg = bg.expand(batch_size, num_views, 3)
    except RuntimeError:
        raise ValueError(
            f"background of shape {list(bg.shape)} does not broadcast to [B={batch_size}, V={num_views}, 3]"
        ) from None
    if not torch.isfinite(bg).all():
        raise ValueError("background contains NaN or inf")
    return bg
