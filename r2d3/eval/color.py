"""Dominant-colour classifier: an analytic check of colour prompt-following, independent of any reward.

Why analytic: ``clip_tiny`` is a reward that alignment optimises, so it cannot also be the judge of
whether colours still follow the prompt; a fixed, weight-free rule cannot be hacked by the aligned
model in the same way.

Rule, per asset (all its views pooled):
1. foreground pixels are those with ``alpha > alpha_threshold`` (0.9 by default: silhouette pixels
   blended with the background are left out);
2. the foreground pixels are explained by the best one- or two-colour
   palette model (:func:`colour_votes`): each pixel is fitted by a blend of the model's colours (the
   renderer blends linearly in RGB, so thin stripes and colour boundaries at 64 px are mixtures) under
   a brightness factor (the procedural dataset bakes mild shading into its colours); the fit error is
   the CIE L*a*b* distance ΔE (D65; rendered values are treated as sRGB display values,
   as they are viewed), and the model with the smallest *robust* mean error (each pixel's error capped,
   so a few outliers cannot choose the model) wins — one colour unless two fit clearly better;
3. the dominant colour is the model colour covering the larger (blend-weighted) area; ``top_k=2``
   gives both. An asset with no foreground pixel gets no prediction.

Two-tone and striped objects: :mod:`r2d3.eval.prompt_following` counts the dominant colour as correct
if it is the object's body colour or, when the prompt names a second colour ("... with white
stripes", "a red and yellow cube"), that second colour (``color_acc``); the body-colour-only
accuracy is reported too (``color_strict_acc``). Two-tone objects are about half and half, so which
of their colours dominates depends on the view.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from r2d3.data.procedural import COLORS, SHADING

# sRGB (D65) -> XYZ matrix and the D65 white point
_RGB_TO_XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb: Tensor) -> Tensor:
    """CIE L*a*b* of sRGB colours ``[..., 3]`` in [0, 1] (clamped) -> ``[..., 3]``."""
    c = rgb.clamp(0, 1)
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.to(rgb).T / _WHITE.to(rgb)
    eps = (6 / 29) ** 3
    f = torch.where(xyz > eps, xyz.clamp(min=eps) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-1)


def _palette_table(palette: Mapping[str, Sequence[float]] | None) -> tuple[list[str], Tensor]:
    palette = COLORS if palette is None else palette
    names = list(palette)
    if not names:
        raise ValueError("colour palette is empty")
    return names, torch.tensor([list(map(float, palette[n])) for n in names])


def _blend_models(
    pixels: Tensor, table: Tensor, shade_range: tuple[float, float], steps: int = 11
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit every one- and two-colour model to ``pixels`` ``[P, 3]``: for the pair (i, j) (i == j for one
    colour) each pixel is approximated by ``s · (t · c_i + (1 − t) · c_j)`` — a blend (t in [0, 1], on
    a grid of ``steps`` values, fitted in RGB where the renderer blends) under a brightness factor ``s`` in
    ``shade_range`` (baked shading; least squares, clamped). Returns ``first``, ``second`` ``[Q]``, the
    blend weight ``t`` ``[Q, P]`` and the CIE ΔE (Lab distance) of the best fit ``[Q, P]``."""
    k = len(table)
    first, second = torch.triu_indices(k, k, offset=0)  # includes i == j: single colours
    grid = torch.linspace(0, 1, steps, dtype=table.dtype)
    blends = grid[None, :, None] * table[first][:, None] + (1 - grid[None, :, None]) * table[second][:, None]
    norm2 = (blends * blends).sum(-1).clamp(min=1e-12)[..., None]  # [Q, T, 1]
    dot = torch.einsum("qtc,pc->qtp", blends, pixels)  # [Q, T, P]
    shade = (dot / norm2).clamp(*shade_range)
    # |p - s b|^2 up to the constant |p|^2, without materialising every fit
    best = (shade * shade * norm2 - 2 * shade * dot).argmin(dim=1)  # [Q, P]
    best_shade = shade.gather(1, best[:, None])[:, 0]
    fit = best_shade[..., None] * blends.gather(1, best[..., None].expand(-1, -1, 3))  # [Q, P, 3]
    delta_e = (srgb_to_lab(fit) - srgb_to_lab(pixels)[None]).norm(dim=-1)
    return first, second, grid[best], delta_e


def colour_votes(
    rgb: Tensor,
    alpha: Tensor,
    palette: Mapping[str, Sequence[float]] | None = None,
    alpha_threshold: float = 0.9,
    shade_range: tuple[float, float] | None = None,
    outlier_delta_e: float = 25.0,
    single_colour_margin: float = 2.0,
    max_pixels: int = 1000,
) -> tuple[list[str], Tensor]:
    """Palette names (default palette: :data:`r2d3.data.procedural.COLORS`) and per-asset colour areas
    ``[B, len(palette)]`` from views ``rgb`` ``[B, V, 3, H, W]`` and ``alpha`` ``[B, V, 1, H, W]``.

    Each asset is explained by the one- or two-colour palette model that fits its foreground pixels
    best (robustly: mean CIE ΔE with each pixel's error capped at ``outlier_delta_e``; a single colour
    wins unless a pair is better by ``single_colour_margin`` ΔE). The fit allows for what rendering
    does to a palette colour: baked shading scales brightness by a factor in ``shade_range`` (default
    ``(1 − SHADING, 1)`` of the procedural dataset), and the renderer composites neighbouring colours
    linearly, so thin stripes at 64 px yield colours *between* two (blue and orange blend to something
    brownish). Each pixel within ``outlier_delta_e`` of its fit adds its blend weight to the model's two
    colours' areas; colours outside the chosen model get 0. At most ``max_pixels`` evenly strided
    foreground pixels per asset are used.
    """
    if rgb.ndim != 5 or alpha.shape[:2] != rgb.shape[:2]:
        raise ValueError(f"expected rgb [B, V, 3, H, W] and alpha [B, V, 1, H, W], got {tuple(rgb.shape)} "
                         f"and {tuple(alpha.shape)}")
    if shade_range is None:
        shade_range = (1.0 - SHADING, 1.0)
    names, table = _palette_table(palette)
    votes = torch.zeros(rgb.shape[0], len(names))
    for k in range(rgb.shape[0]):
        pixels = rgb[k].detach().float().movedim(1, -1).reshape(-1, 3)
        pixels = pixels[alpha[k].detach().float().reshape(-1) > alpha_threshold]
        if len(pixels) == 0:
            continue
        pixels = pixels[:: max(1, -(-len(pixels) // max_pixels))]
        first, second, t, delta_e = _blend_models(pixels, table, shade_range)
        cost = delta_e.clamp(max=outlier_delta_e).mean(dim=1)  # [Q]
        single = first == second
        best_single = torch.where(single, cost, torch.full_like(cost, float("inf"))).argmin()
        best_pair = torch.where(~single, cost, torch.full_like(cost, float("inf"))).argmin()
        use_pair = cost[best_pair] < cost[best_single] - single_colour_margin
        model = best_pair if use_pair else best_single
        inlier = (delta_e[model] <= outlier_delta_e).float()
        votes[k, first[model]] += (inlier * t[model]).sum()
        votes[k, second[model]] += (inlier * (1 - t[model])).sum()
    return names, votes


def dominant_colours(
    rgb: Tensor,
    alpha: Tensor,
    palette: Mapping[str, Sequence[float]] | None = None,
    alpha_threshold: float = 0.9,
    top_k: int = 1,
) -> list[list[str]]:
    """The ``top_k`` palette colours by foreground area for each asset (``[]`` if no foreground)."""
    names, votes = colour_votes(rgb, alpha, palette, alpha_threshold)
    out = []
    for row in votes:
        order = row.argsort(descending=True)[:top_k]
        out.append([names[i] for i in order.tolist() if row[i] > 0])
    return out
