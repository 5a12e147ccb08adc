"""Geometry rewards: depth–normal consistency (``dnc``), the weight-free reward of Nabla-R2D3.

DNC asks the rendered normal map to agree with the normals implied by the rendered depth map, which
rewards assets whose Gaussians are flat and aligned with the surface they form (no "fuzzy" splats).

Definition (method notes §6(g)), per view, with expected depth ``D``, rendered normal ``N_r`` and
mask ``M``:

1. back-project pixel centres with the view's own intrinsics ``K`` (read from ``render.cameras.Ks``,
   so any field of view, aspect or principal point is handled):
   ``P(u, v) = D(u, v) · K⁻¹ [u + ½, v + ½, 1]ᵀ`` — camera-space points in the OpenCV frame;
2. central differences ``d_row = P[v+1, u] − P[v−1, u]``, ``d_col = P[v, u+1] − P[v, u−1]``;
3. ``N_d = normalize(d_row × d_col)``. In the OpenCV frame (x right, y down, z forward) ``d_row`` points
   down the image and ``d_col`` to the right, so for a surface facing the camera ``d_row × d_col`` has
   **negative z** — the renderer's convention (normals oriented toward the camera); no sign flip needed;
4. ``r = Σ_p M(p) ⟨N̂_r(p), N_d(p)⟩ / Σ_p M(p)`` over interior pixels (the one-pixel border has no
   central difference and is excluded), in [−1, 1]; a view with an empty mask scores 0.

Choices stated here:
- ``M = [alpha > 0.5]`` is a **hard** mask (as in the paper): no gradient reaches alpha through it.
- ``N_r`` is **normalised** before the dot product (``N̂_r``): the renderer composites unit normals by
  alpha, so a blend of differently oriented splats has norm < 1; normalising makes a perfectly
  consistent render score exactly 1 and keeps the score a cosine.
- ``detach_depth=True`` (default, the paper's DNC script with ``reward_context=inference``): ``N_d`` is
  a fixed target and the gradient flows only through the rendered normal. ``detach_depth=False`` also
  differentiates through the depth map: the exact gradient of r. On the embedded ``tiny`` model, whose
  Gaussians move freely, the stop-gradient version is not an ascent direction of r (a step along it
  lowers the DNC of the same batch: rotating or moving a splat also changes the depth it renders), so
  the embedded default aligns with ``detach_depth=False``.
- ``erode_mask=False`` (default, as in the paper). ``True`` additionally requires the four neighbours
  used by the central differences to be inside the mask, which drops silhouette pixels whose depth
  difference straddles foreground and background.
- Views are averaged with equal weight; a view with an empty mask contributes 0 to that average.

``definition="official"``: the reference code's DNC (its ``normal_d2n_cons`` with ``depth_ratio=0``), for the
paper setups: the *alpha-weighted* depth and normal maps (RaDe-GS's ``raw_depth`` / ``raw_normal``: not
divided by alpha, normals not normalised), back-projection with a square-pixel pinhole of field of view
``fov_deg`` centred on the image (the reference hard-codes 40 deg while rendering at 39.6 deg; ``None``: the
cameras' intrinsics), and the score ``Σ M ⟨N_raw, N_d⟩ / Σ M`` with the mask counted over every pixel,
border included. Not reproduced: RaDe-GS rasterises a per-pixel *planar* depth (each splat's depth varies
across its footprint); r2d3 composites each splat's centre depth.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from r2d3.render.cameras import Cameras
from r2d3.render.output import RenderOutput
from r2d3.rewards.base import Reward, register_reward


def _batched_Ks(cameras: Cameras, batch_size: int, num_views: int) -> Tensor:
    Ks = cameras.Ks
    if Ks.ndim == 3:  # unbatched cameras shared by every asset
        Ks = Ks.expand(batch_size, *Ks.shape)
    if tuple(Ks.shape) != (batch_size, num_views, 3, 3):
        raise ValueError(f"render.cameras.Ks must be [B, V, 3, 3] = [{batch_size}, {num_views}, 3, 3], "
                         f"got {tuple(cameras.Ks.shape)}")
    return Ks


def backproject_depth(depth: Tensor, Ks: Tensor) -> Tensor:
    """Camera-space points ``[B, V, 3, H, W]`` of the pixel centres at depth ``depth`` ``[B, V, 1, H, W]``
    (camera z, OpenCV frame) under intrinsics ``Ks`` ``[B, V, 3, 3]``."""
    h, w = depth.shape[-2:]
    v, u = torch.meshgrid(
        torch.arange(h, dtype=depth.dtype, device=depth.device) + 0.5,
        torch.arange(w, dtype=depth.dtype, device=depth.device) + 0.5,
        indexing="ij",
    )
    pix = torch.stack([u, v, torch.ones_like(u)], dim=0).reshape(3, h * w)  # homogeneous pixel centres
    rays = torch.linalg.inv(Ks.to(depth.dtype)) @ pix  # [B, V, 3, H*W], z = 1
    return rays.reshape(*Ks.shape[:-2], 3, h, w) * depth


def depth_to_normal(depth: Tensor, Ks: Tensor) -> Tensor:
    """Normals from depth by central differences, ``[B, V, 3, H, W]`` unit vectors facing the camera
    (negative z for a surface seen from the front); the one-pixel border is 0."""
    points = backproject_depth(depth, Ks)
    d_row = points[..., 2:, 1:-1] - points[..., :-2, 1:-1]  # P[v+1, u] - P[v-1, u]
    d_col = points[..., 1:-1, 2:] - points[..., 1:-1, :-2]  # P[v, u+1] - P[v, u-1]
    normal = _unit(torch.linalg.cross(d_row, d_col, dim=-3), dim=-3, eps=1e-12)
    return F.pad(normal, (1, 1, 1, 1))


def _interior(mask: Tensor) -> Tensor:
    border = torch.zeros_like(mask)
    border[..., 1:-1, 1:-1] = True
    return mask & border


def _unit(x: Tensor, dim: int, eps: float) -> Tensor:
    """``F.normalize(x, dim=dim, eps=eps)`` (``x / max(|x|, eps)``) written with elementwise ops: on the CPU,
    ``F.normalize``'s norm over the channel axis of ``[B, V, 3, H, W]`` maps is about 15x slower."""
    return x * x.square().sum(dim, keepdim=True).clamp(min=eps * eps).rsqrt()


def _square_pinhole(fov_deg: float, b: int, v: int, h: int, w: int, like: Tensor) -> Tensor:
    """The reference's fixed intrinsics: ``f = H / (2 tan(fov / 2))`` for both axes, centre ``(W/2, H/2)``."""
    f = h / (2 * math.tan(math.radians(fov_deg) / 2))
    K = like.new_tensor([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]])
    return K.expand(b, v, 3, 3)


def depth_normal_consistency(
    render: RenderOutput,
    detach_depth: bool = True,
    alpha_threshold: float = 0.5,
    erode_mask: bool = False,
    definition: str = "r2d3",
    fov_deg: float | None = None,
) -> Tensor:
    """Per-view DNC scores ``[B, V]`` in [−1, 1] (see the module docstring for the exact definition)."""
    depth, normal, alpha = render.depth, render.normal, render.alpha
    if depth.ndim != 5 or normal.shape[:2] != depth.shape[:2] or normal.shape[2] != 3:
        raise ValueError(f"dnc needs depth [B, V, 1, H, W] and normal [B, V, 3, H, W], got "
                         f"{tuple(depth.shape)} and {tuple(normal.shape)}")
    b, v, _, h, w = depth.shape
    if h < 3 or w < 3:
        raise ValueError(f"dnc needs images of at least 3x3 pixels (central differences), got {h}x{w}")
    Ks = _batched_Ks(render.cameras, b, v) if fov_deg is None else _square_pinhole(fov_deg, b, v, h, w, depth)
    if definition == "official":
        return _official_dnc(depth * alpha, normal * alpha, alpha, Ks, detach_depth, alpha_threshold)
    target = depth_to_normal(depth.detach() if detach_depth else depth, Ks)
    mask = alpha.detach() > alpha_threshold  # hard mask, [B, V, 1, H, W]
    if erode_mask:
        m = mask[..., 0, :, :]
        core = torch.zeros_like(m)
        core[..., 1:-1, 1:-1] = (m[..., 2:, 1:-1] & m[..., :-2, 1:-1] & m[..., 1:-1, 2:] & m[..., 1:-1, :-2]
                                 & m[..., 1:-1, 1:-1])
        mask = core[..., None, :, :]
    mask = _interior(mask)
    cosine = (_unit(normal, dim=2, eps=1e-6) * target).sum(dim=2, keepdim=True)
    # torch.where (not a product) keeps NaN-free gradients even where unmasked values are degenerate
    masked = torch.where(mask, cosine, torch.zeros_like(cosine))
    count = mask.sum(dim=(2, 3, 4)).to(cosine.dtype)
    return masked.sum(dim=(2, 3, 4)) / count.clamp(min=1.0)


def _official_dnc(raw_depth: Tensor, raw_normal: Tensor, alpha: Tensor, Ks: Tensor, detach_depth: bool,
                  alpha_threshold: float) -> Tensor:
    """The reference DNC on alpha-weighted maps (module docstring); an empty view scores 0, not NaN."""
    target = depth_to_normal(raw_depth.detach() if detach_depth else raw_depth, Ks)
    mask = alpha.detach() > alpha_threshold
    dot = torch.where(mask, (raw_normal * target).sum(dim=2, keepdim=True), torch.zeros_like(alpha))
    return dot.sum(dim=(2, 3, 4)) / mask.sum(dim=(2, 3, 4)).to(dot.dtype).clamp(min=1.0)


@register_reward("dnc")
class DepthNormalConsistency(Reward):
    """Depth–normal consistency reward (no weights, prompt-independent); per-view scores in [−1, 1]."""

    def __init__(self, detach_depth: bool = True, alpha_threshold: float = 0.5, erode_mask: bool = False,
                 definition: str = "r2d3", fov_deg: float | None = None):
        super().__init__()
        if not 0.0 <= alpha_threshold < 1.0:
            raise ValueError(f"dnc alpha_threshold must be in [0, 1), got {alpha_threshold}")
        if definition not in ("r2d3", "official"):
            raise ValueError(f"dnc definition must be 'r2d3' or 'official', got {definition!r}")
        if fov_deg is not None and not 0.0 < fov_deg < 180.0:
            raise ValueError(f"dnc fov_deg must be in (0, 180) or null (the cameras' intrinsics), got {fov_deg}")
        if definition == "official" and erode_mask:
            raise ValueError("dnc erode_mask is an option of the r2d3 definition; the official one has no erosion")
        self.detach_depth = detach_depth
        self.alpha_threshold = alpha_threshold
        self.erode_mask = erode_mask
        self.definition = definition
        self.fov_deg = fov_deg

    def per_view(self, render: RenderOutput, prompts: Sequence[str] | None = None) -> Tensor:
        return depth_normal_consistency(render, self.detach_depth, self.alpha_threshold, self.erode_mask,
                                        self.definition, self.fov_deg)
