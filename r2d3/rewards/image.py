"""Analytic image rewards: ``colorfulness`` (Hasler & Süsstrunk, 2003).

Why an analytic image reward: it needs no weights, is cheap, is trivially differentiable, and is easy
to hack (saturate everything), so it is the reference case for measuring reward hacking and prior
drift on the embedded default.

Colourfulness of an image with opponent channels ``rg = R − G`` and ``yb = (R + G)/2 − B``::

    M = sqrt(σ_rg² + σ_yb²) + 0.3 · sqrt(μ_rg² + μ_yb²)

computed on the rendered RGB values in [0, 1] as they are (the renderer's linear RGB; the original
metric was defined on 8-bit sRGB, i.e. 255x our scale). With ``foreground=True`` (default) the means
and variances are **alpha-weighted**, so the white background neither dilutes the score nor can be
recoloured to raise it; with ``foreground=False`` every pixel counts equally. A view with zero total
alpha scores 0.

Scale: the reward is ``M / (109 / 255)``; Hasler & Süsstrunk rate ``M ≥ 109`` (8-bit) "extremely
colourful", so 1 corresponds to that and typical renders fall in [0, 1] (a uniformly saturated red
object scores about 0.78; extreme two-colour images can exceed 1). Square roots are taken as
``sqrt(x + ε) − sqrt(ε)`` so a grey image scores exactly 0 with a finite gradient.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from r2d3.render.output import RenderOutput
from r2d3.rewards.base import Reward, register_reward

#: Hasler & Süsstrunk's "extremely colourful" threshold, rescaled from 8-bit to [0, 1] values
EXTREMELY_COLOURFUL = 109.0 / 255.0
_EPS = 1e-8


def _safe_sqrt(x: Tensor) -> Tensor:
    return (x + _EPS).sqrt() - x.new_tensor(_EPS).sqrt()


def colorfulness(rgb: Tensor, weight: Tensor | None = None) -> Tensor:
    """Hasler–Süsstrunk colourfulness / (109/255) of images ``[..., 3, H, W]`` -> ``[...]``.

    ``weight`` ``[..., 1, H, W]`` (e.g. alpha) weights each pixel's contribution to the opponent-channel
    means and variances; ``None`` weighs pixels equally.
    """
    r, g, b = rgb.unbind(dim=-3)
    rg = r - g
    yb = 0.5 * (r + g) - b
    if weight is None:
        weight = torch.ones_like(r)
    else:
        weight = weight.squeeze(-3).to(rgb.dtype)
    total = weight.sum(dim=(-2, -1))
    norm = total.clamp(min=1e-8)

    def moments(x: Tensor) -> tuple[Tensor, Tensor]:
        mean = (weight * x).sum(dim=(-2, -1)) / norm
        var = (weight * (x - mean[..., None, None]) ** 2).sum(dim=(-2, -1)) / norm
        return mean, var

    mu_rg, var_rg = moments(rg)
    mu_yb, var_yb = moments(yb)
    score = _safe_sqrt(var_rg + var_yb) + 0.3 * _safe_sqrt(mu_rg**2 + mu_yb**2)
    score = torch.where(total > 1e-8, score, torch.zeros_like(score))
    return score / EXTREMELY_COLOURFUL


@register_reward("colorfulness")
class Colorfulness(Reward):
    """Colourfulness of each rendered view (alpha-weighted foreground by default); prompt-independent."""

    def __init__(self, foreground: bool = True):
        super().__init__()
        self.foreground = foreground

    def per_view(self, render: RenderOutput, prompts: Sequence[str] | None = None) -> Tensor:
        return colorfulness(render.rgb, render.alpha if self.foreground else None)
