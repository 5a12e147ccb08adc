"""gsplat backend: the same render on CUDA with gsplat's fused kernels.

Normals and depths are computed per view in torch (:func:`r2d3.render.projection.project_gaussians`
is cheap next to rasterisation) and passed to ``gsplat.rasterization`` as extra colour channels, so one
rasterisation pass yields RGB, normal and depth with the same compositing weights as the torch
reference. Differences to the torch reference, all below typical tolerances: gsplat clamps alpha at
0.999 instead of 0.99 and stops a pixel once its transmittance would drop below 1e-4.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

from r2d3.render.cameras import Cameras
from r2d3.render.features import resolve_features, stack_features
from r2d3.render.gaussians import Gaussians
from r2d3.render.output import RenderOutput
from r2d3.render.projection import project_gaussians
from r2d3.render.quaternions import quat_to_rotmat


def gsplat_available() -> bool:
    """Whether the gsplat package is installed (its CUDA kernels compile on first use)."""
    return importlib.util.find_spec("gsplat") is not None


def render_gsplat(
    gaussians: Gaussians,
    cameras: Cameras,
    background: Tensor,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    tile_size: int = 16,
    rasterize: Callable[..., tuple[Tensor, Tensor, dict]] | None = None,
    raw_quats: Tensor | None = None,
) -> RenderOutput:
    """gsplat backend of :func:`r2d3.render.render_gaussians` (validated, batched, float32 CUDA inputs).

    ``rasterize`` stands in for ``gsplat.rasterization`` (same signature and return value); it exists so
    the glue around it can be tested on machines without CUDA. gsplat normalises quaternions, so
    ``raw_quats`` (see :func:`r2d3.render.render_gaussians`) reach it as the covariances they give.
    """
    if rasterize is None:
        if gaussians.means.device.type != "cuda" or gaussians.means.dtype != torch.float32:
            raise ValueError(
                "the gsplat backend needs float32 CUDA tensors, "
                f"got {gaussians.means.dtype} on {gaussians.means.device}"
            )
        import gsplat

        rasterize = gsplat.rasterization
    width, height = cameras.width, cameras.height
    proj = project_gaussians(
        gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities,
        cameras.viewmats, cameras.Ks, width, height, eps2d, near_plane, far_plane, raw_quats,
    )  # fmt: skip
    features = stack_features(gaussians.colors, proj.normals, proj.depths)  # [B, V, N, 7]
    covariance = {}
    if raw_quats is not None:
        m = quat_to_rotmat(raw_quats) * gaussians.scales[..., None, :]
        covariance["covars"] = m @ m.transpose(-1, -2)
    accumulated, alpha, _ = rasterize(
        gaussians.means,
        gaussians.quats,
        gaussians.scales,
        gaussians.opacities,
        features,
        cameras.viewmats,
        cameras.Ks,
        width,
        height,
        near_plane=near_plane,
        far_plane=far_plane,
        eps2d=eps2d,
        tile_size=tile_size,
        packed=False,
        render_mode="RGB",
        rasterize_mode="classic",
        **covariance,
    )  # [B, V, H, W, 7], [B, V, H, W, 1]
    return resolve_features(
        accumulated.permute(0, 1, 4, 2, 3), alpha.permute(0, 1, 4, 2, 3), background, cameras
    )
