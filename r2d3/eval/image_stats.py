"""Simple image statistics of renders that expose reward hacking without any learned model.

A hacked reward typically shows up as over-saturated colours, blown-up or flattened contrast, an
object that shrinks or fills the frame, or high-frequency texture. Each statistic is computed per view
on the rendered RGB in [0, 1] (composited on the background) and alpha, then averaged over the ``V``
views of an asset, giving ``[B]``:

- ``saturation``: alpha-weighted mean HSV saturation ``(max − min) / max`` of the RGB channels (0 for
  black pixels) — the object's colour purity; 0 when the view has no alpha;
- ``contrast``: RMS contrast, the standard deviation of the luma ``Y = 0.2126 R + 0.7152 G + 0.0722 B``
  over all pixels of the view (background included);
- ``background_coverage``: ``mean(1 − alpha)``, the fraction of the image the object leaves
  uncovered (1: empty render, 0: the object fills the frame);
- ``edge_density``: the fraction of pixels whose Sobel gradient magnitude of the luma exceeds
  ``EDGE_THRESHOLD`` (kernels scaled by 1/4, so a sharp step of height 1 has magnitude 1; replicate
  padding, so the image border is no edge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from r2d3.render.output import RenderOutput

EDGE_THRESHOLD = 0.1
LUMA = (0.2126, 0.7152, 0.0722)
STAT_NAMES = ("saturation", "contrast", "background_coverage", "edge_density")


def luma(rgb: Tensor) -> Tensor:
    """``[..., 3, H, W]`` -> ``[..., H, W]``."""
    w = rgb.new_tensor(LUMA).view(3, 1, 1)
    return (rgb * w).sum(dim=-3)


def saturation(rgb: Tensor, alpha: Tensor) -> Tensor:
    """Alpha-weighted mean HSV saturation per image, ``[..., 3, H, W], [..., 1, H, W] -> [...]``."""
    mx, mn = rgb.amax(dim=-3), rgb.amin(dim=-3)
    s = torch.where(mx > 1e-6, (mx - mn) / mx.clamp(min=1e-6), torch.zeros_like(mx))
    w = alpha.squeeze(-3)
    total = w.sum(dim=(-2, -1))
    return torch.where(total > 1e-8, (s * w).sum(dim=(-2, -1)) / total.clamp(min=1e-8), torch.zeros_like(total))


def rms_contrast(rgb: Tensor) -> Tensor:
    """Standard deviation of the luma per image, ``[..., 3, H, W] -> [...]``."""
    y = luma(rgb)
    return y.flatten(-2).std(dim=-1, unbiased=False)


def edge_density(rgb: Tensor, threshold: float = EDGE_THRESHOLD) -> Tensor:
    """Fraction of pixels with Sobel magnitude (of the luma, /4) above ``threshold``, ``[..., 3, H, W] -> [...]``."""
    y = luma(rgb)
    lead = y.shape[:-2]
    y = y.reshape(-1, 1, *y.shape[-2:])
    kx = y.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4
    kernels = torch.stack([kx, kx.T])[:, None]
    g = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kernels)
    mag = g.pow(2).sum(dim=1).sqrt()
    return (mag > threshold).float().flatten(1).mean(dim=1).reshape(lead)


def image_stats(render: RenderOutput | tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """The four statistics per asset ``[B]`` (means over views) of renders ``rgb [B, V, 3, H, W]`` and
    ``alpha [B, V, 1, H, W]`` (a :class:`RenderOutput` or the pair)."""
    rgb, alpha = (render.rgb, render.alpha) if isinstance(render, RenderOutput) else render
    rgb, alpha = rgb.detach().float().cpu(), alpha.detach().float().cpu()
    if rgb.ndim != 5 or alpha.shape != (*rgb.shape[:2], 1, *rgb.shape[3:]):
        raise ValueError(f"expected rgb [B, V, 3, H, W] and alpha [B, V, 1, H, W], got {tuple(rgb.shape)} and "
                         f"{tuple(alpha.shape)}")
    per_view = {
        "saturation": saturation(rgb, alpha),
        "contrast": rms_contrast(rgb),
        "background_coverage": (1 - alpha).flatten(2).mean(dim=2),
        "edge_density": edge_density(rgb),
    }
    return {k: v.mean(dim=1) for k, v in per_view.items()}


__all__ = ["EDGE_THRESHOLD", "STAT_NAMES", "edge_density", "image_stats", "luma", "rms_contrast", "saturation"]
