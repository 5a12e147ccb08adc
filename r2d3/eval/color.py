"""Dominant-colour classifier: an analytic check of colour prompt-following, independent of any reward.

Why analytic: ``clip_tiny`` is a reward that alignment optimises, so it cannot also be the judge of
whether colours still follow the prompt; a fixed, weight-free rule cannot be hacked by the aligned
model in the same way.

Rule, per view:
1. foreground pixels are those with ``alpha > alpha_threshold`` (0.9 by default: silhouette pixels
   blended with the background are left out);
2. each foreground pixel votes for its nearest palette colour in CIE L*a*b* (D65; the rendered RGB
   values are treated as sRGB-encoded display values, as they are viewed) — nearest-neighbour voting
   is a robust statistic: shading and a few outliers move pixels, not the majority. Pixels that are a
   blend of two palette colours (thin stripes and colour boundaries, composited linearly in RGB by the
   renderer) are recognised by unmixing and split their vote between the two colours;
3. votes are pooled over all views of an asset; the dominant colour is the one with most votes
   (``top-k`` gives the ranking). An asset with no foreground pixel gets no prediction (index −1).

Two-tone and striped objects: a prediction counts as correct if it is the object's primary colour
or, when the prompt names a second colour ("... with white stripes"), that second colour
(``accept_secondary=True``, the default in :mod:`r2d3.eval.prompt_following`); the primary-only
("strict") accuracy is reported too.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

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
    if palette is None:
        from r2d3.data.procedural import COLORS as palette
    names = list(palette)
    if not names:
        raise ValueError("colour palette is empty")
    return names, torch.tensor([list(map(float, palette[n])) for n in names])


def _unmix(pixels: Tensor, table: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Best two-colour blend ``t · c_i + (1 − t) · c_j`` (t in [0, 1]) of each pixel ``[P, 3]``: returns
    the residual ``[P]``, the pair's indices ``i``, ``j`` ``[P]`` and the weight ``t`` ``[P]`` of ``c_i``."""
    first, second = torch.triu_indices(len(table), len(table), offset=1)
    a, b = table[first], table[second]  # [Q, 3]
    diff = a - b
    t = (((pixels[:, None] - b[None]) * diff[None]).sum(-1) / (diff * diff).sum(-1).clamp(min=1e-12)).clamp(0, 1)
    residual = (pixels[:, None] - (b[None] + t[..., None] * diff[None])).norm(dim=-1)  # [P, Q]
    best, pair = residual.min(dim=1)
    return best, first[pair], second[pair], t.gather(1, pair[:, None])[:, 0]


def colour_votes(
    rgb: Tensor,
    alpha: Tensor,
    palette: Mapping[str, Sequence[float]] | None = None,
    alpha_threshold: float = 0.9,
    blend_margin: float = 0.03,
) -> tuple[list[str], Tensor]:
    """Palette names (default palette: :data:`r2d3.data.procedural.COLORS`) and per-asset vote counts
    ``[B, len(palette)]`` from views ``rgb`` ``[B, V, 3, H, W]`` and ``alpha`` ``[B, V, 1, H, W]``.

    A pixel whose RGB is explained by a blend of two palette colours better (by ``blend_margin``) than by
    any single colour — a stripe edge or a thin stripe at low resolution, where the renderer composites
    two colours linearly — splits its vote between the two by the blend weight, so blends of, say,
    blue and orange are not counted as brown.
    """
    if rgb.ndim != 5 or alpha.shape[:2] != rgb.shape[:2]:
        raise ValueError(f"expected rgb [B, V, 3, H, W] and alpha [B, V, 1, H, W], got {tuple(rgb.shape)} "
                         f"and {tuple(alpha.shape)}")
    names, table = _palette_table(palette)
    lab_palette = srgb_to_lab(table)
    votes = torch.zeros(rgb.shape[0], len(names))
    for k in range(rgb.shape[0]):
        pixels = rgb[k].detach().float().movedim(1, -1).reshape(-1, 3)
        pixels = pixels[alpha[k].detach().float().reshape(-1) > alpha_threshold]
        if len(pixels) == 0:
            continue
        nearest = torch.cdist(srgb_to_lab(pixels), lab_palette).argmin(dim=-1)
        pure_residual = (pixels - table[nearest]).norm(dim=-1)
        if len(names) > 1:
            blend_residual, first, second, weight = _unmix(pixels, table)
            blended = blend_residual < pure_residual - blend_margin
        else:
            blended = torch.zeros(len(pixels), dtype=torch.bool)
        votes[k].scatter_add_(0, nearest[~blended], torch.ones(int((~blended).sum())))
        votes[k].scatter_add_(0, first[blended], weight[blended])
        votes[k].scatter_add_(0, second[blended], 1 - weight[blended])
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
