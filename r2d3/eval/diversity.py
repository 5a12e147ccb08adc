"""Sample diversity and model drift: measures of the prior that are not rewards.

Why: reward alignment is expected to raise the reward, and it should not do so by collapsing every
seed to the same asset (``diversity``) or by moving far from what the pretrained model produced from
the same noise (``drift``). Both are reported next to the reward in benchmarks.

Distances used (stated once here):

- ``"rms"`` (default for features, renders, embeddings): root-mean-square difference of the
  flattened tensors, ``sqrt(mean((a − b)²))`` — scale of the data, independent of its size.
- ``"chamfer"`` for point sets ``[N, D]`` (e.g. Gaussian means, or a set model's latent tokens, whose
  order carries no meaning): symmetric mean nearest-neighbour Euclidean distance,
  ``½ (mean_i min_j |a_i − b_j| + mean_j min_i |a_i − b_j|)``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from r2d3.render.gaussians import Gaussians
from r2d3.render.output import RenderOutput

Metric = Literal["auto", "rms", "chamfer"]


def rms_distance(a: Tensor, b: Tensor) -> Tensor:
    """Root-mean-square difference over all but the first axis: ``[B, ...] x [B, ...] -> [B]``."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return (a - b).flatten(1).pow(2).mean(dim=1).sqrt()


def chamfer_distance(a: Tensor, b: Tensor) -> Tensor:
    """Symmetric mean nearest-neighbour distance of point sets ``[B, N, D]`` and ``[B, M, D]`` -> ``[B]``."""
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"chamfer distance needs point sets [B, N, D] and [B, M, D], got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    dist = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    return 0.5 * (dist.amin(dim=2).mean(dim=1) + dist.amin(dim=1).mean(dim=1))


def _pairwise_mean(samples: Tensor, metric: Metric) -> Tensor:
    """Mean distance over the S(S-1)/2 unordered pairs of ``samples`` ``[S, ...]``."""
    s = samples.shape[0]
    if s < 2:
        raise ValueError(f"diversity needs at least 2 seeds per prompt, got {s}")
    if metric == "auto":
        metric = "chamfer" if samples.ndim == 3 else "rms"
    i, j = torch.triu_indices(s, s, offset=1)
    if metric == "rms":
        d = rms_distance(samples[i], samples[j])
    elif metric == "chamfer":
        if samples.ndim != 3:
            raise ValueError(
                f"chamfer diversity needs point sets [S, N, D] per prompt, got {tuple(samples.shape)}"
            )
        d = chamfer_distance(samples[i], samples[j])
    else:
        raise ValueError(f"unknown diversity metric {metric!r}; valid: 'auto', 'rms', 'chamfer'")
    return d.mean()


def diversity(samples: Tensor | Sequence[Tensor], metric: Metric = "auto", reduce: bool = True) -> Tensor:
    """Mean pairwise distance between samples of the **same prompt** across seeds.

    ``samples``: one prompt's ``S`` samples ``[S, ...]`` (returns a scalar), or a sequence with one such
    tensor per prompt (seed counts may differ; returns the mean over prompts, or the ``[P]`` per-prompt
    values with ``reduce=False``). ``metric="auto"`` uses the Chamfer distance for point/token sets
    ``[S, N, D]`` (e.g. Gaussian means or a set model's latents, whose token order across seeds carries
    no meaning) and the RMS distance for anything else (renders ``[S, V, 3, H, W]``, embeddings
    ``[S, D]``). Identical samples give exactly 0.
    """
    if isinstance(samples, Tensor):
        return _pairwise_mean(samples.detach().float(), metric)
    groups = list(samples)
    if not groups:
        raise ValueError("diversity needs samples for at least one prompt")
    per_prompt = torch.stack([_pairwise_mean(g.detach().float(), metric) for g in groups])
    return per_prompt.mean() if reduce else per_prompt


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: Tensor, b: Tensor, window: int = 7, sigma: float = 1.5) -> Tensor:
    """Mean structural similarity of images ``[N, C, H, W]`` in [0, 1] -> ``[N]`` (Gaussian window,
    C1 = 0.01², C2 = 0.03², channels averaged; reflect padding keeps the image size)."""
    c = a.shape[1]
    kernel = _gaussian_window(window, sigma, a.dtype, a.device).expand(c, 1, window, window)
    pad = window // 2

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1)


def drift(a: RenderOutput | Gaussians, b: RenderOutput | Gaussians) -> dict[str, Tensor]:
    """How far model B's samples moved from model A's samples **from the same initial noise** (and the
    same cameras); every value is per asset ``[B]``, 0 for identical inputs.

    For two :class:`RenderOutput`:
    - ``rgb_l2``: mean over views and pixels of the per-pixel Euclidean RGB distance (in [0, √3]);
    - ``dssim``: ``(1 − SSIM) / 2`` of the RGB views, averaged over views (in [0, 1]);
    - ``alpha_l1``: mean absolute silhouette (alpha) difference.

    For two :class:`Gaussians`:
    - ``chamfer``: Chamfer distance between the Gaussian means (world units);
    - ``color``: mean RGB distance between each Gaussian and its nearest neighbour (by mean) in the
      other set, symmetrised — the colour change of the matched geometry.
    """
    if isinstance(a, RenderOutput) and isinstance(b, RenderOutput):
        if a.rgb.shape != b.rgb.shape:
            raise ValueError(f"drift needs renders of the same shape, got {tuple(a.rgb.shape)} and "
                             f"{tuple(b.rgb.shape)}")
        n, v = a.rgb.shape[:2]
        ra, rb = a.rgb.detach().float(), b.rgb.detach().float()
        rgb_l2 = (ra - rb).pow(2).sum(dim=2).sqrt().flatten(1).mean(dim=1)
        flat = lambda x: x.reshape(n * v, *x.shape[2:])  # noqa: E731
        dssim = ((1 - ssim(flat(ra), flat(rb))) / 2).reshape(n, v).mean(dim=1)
        alpha_l1 = (a.alpha.detach().float() - b.alpha.detach().float()).abs().flatten(1).mean(dim=1)
        return {"rgb_l2": rgb_l2, "dssim": dssim, "alpha_l1": alpha_l1}
    if isinstance(a, Gaussians) and isinstance(b, Gaussians):
        ma, mb = a.means.detach().float(), b.means.detach().float()
        ca, cb = a.colors.detach().float(), b.colors.detach().float()
        dist = torch.cdist(ma, mb, compute_mode="donot_use_mm_for_euclid_dist")  # exact: 0 for identical sets
        chamfer = 0.5 * (dist.amin(dim=2).mean(dim=1) + dist.amin(dim=1).mean(dim=1))
        nn_ab, nn_ba = dist.argmin(dim=2), dist.argmin(dim=1)
        col_ab = (ca - torch.gather(cb, 1, nn_ab[..., None].expand_as(ca))).norm(dim=-1).mean(dim=1)
        col_ba = (cb - torch.gather(ca, 1, nn_ba[..., None].expand_as(cb))).norm(dim=-1).mean(dim=1)
        return {"chamfer": chamfer, "color": 0.5 * (col_ab + col_ba)}
    raise TypeError(f"drift compares two RenderOutput or two Gaussians, got {type(a).__name__} and "
                    f"{type(b).__name__}")
