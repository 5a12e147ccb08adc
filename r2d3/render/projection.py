"""EWA projection of 3D Gaussians into pixel space (pure torch, differentiable).

Every renderer backend starts here: a Gaussian ``N(mean, R S S^T R^T)`` seen by a pinhole camera is
approximated by a 2D Gaussian whose covariance is ``J W Sigma W^T J^T`` (EWA splatting, Zwicker et al.
2001), where ``W`` is the world-to-camera rotation and ``J`` the Jacobian of the perspective divide
at the Gaussian's centre. A small isotropic low-pass ``eps2d`` (in pixels^2) is added so that tiny
or edge-on Gaussians still cover about a pixel, as in gsplat and the original 3DGS rasteriser.

Frames and units (see :mod:`r2d3.render.cameras`): camera space is OpenCV (x right, y down, z
forward); pixel coordinates are (x right, y down) with the centre of pixel (u, v) at (u + 0.5, v + 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from r2d3.render.quaternions import quat_to_rotmat  # also imported from here by older code

#: A Gaussian contributes to a pixel only where its alpha is at least this (as in 3DGS and gsplat).
ALPHA_MIN = 1.0 / 255.0
#: Per-Gaussian alpha is clamped to this so transmittance never reaches exactly zero (as in 3DGS).
ALPHA_MAX = 0.99
#: Out-of-view Gaussians use the Jacobian at this fraction beyond the image border (3DGS/gsplat clamp),
#: so that a Gaussian far outside the frustum does not get a huge, unstable footprint.
_FRUSTUM_MARGIN = 0.3


@dataclass
class ProjectedGaussians:
    """Per-view 2D footprints of a Gaussian batch; ``B`` assets, ``V`` views, ``N`` Gaussians.

    - ``means2d``  ``[B, V, N, 2]`` projected centres in pixels;
    - ``conics``   ``[B, V, N, 3]`` upper triangle ``(a, b, c)`` of the inverse 2D covariance, so the
      Gaussian's falloff at offset ``(dx, dy)`` is ``exp(-(a dx^2 / 2 + b dx dy + c dy^2 / 2))``;
    - ``depths``   ``[B, V, N]`` camera-space z of the centres (distance along the optical axis);
    - ``normals``  ``[B, V, N, 3]`` camera-space unit normals (shortest axis, facing the camera);
    - ``opacities`` ``[B, V, N]`` the Gaussians' opacities broadcast over views;
    - ``extents``  ``[B, V, N, 2]`` half-width and half-height (pixels) of the box outside which the
      Gaussian's alpha is below :data:`ALPHA_MIN` (no gradient);
    - ``visible``  ``[B, V, N]`` bool: in front of the near plane, before the far plane, opaque enough
      and overlapping the image (no gradient).

    Entries of invisible Gaussians are finite but meaningless; renderers must skip them.
    """

    means2d: Tensor
    conics: Tensor
    depths: Tensor
    normals: Tensor
    opacities: Tensor
    extents: Tensor
    visible: Tensor


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    raw_quats: Tensor | None = None,
) -> ProjectedGaussians:
    """Project ``[B, N]`` Gaussians into ``[B, V]`` pinhole views (EWA, differentiable).

    Args:
        means: ``[B, N, 3]`` world positions.
        quats: ``[B, N, 4]`` unit quaternions (w, x, y, z).
        scales: ``[B, N, 3]`` linear standard deviations (> 0).
        opacities: ``[B, N]`` probabilities in [0, 1].
        viewmats: ``[B, V, 4, 4]`` world-to-camera (OpenCV) transforms.
        Ks: ``[B, V, 3, 3]`` pixel intrinsics (skew ignored).
        width, height: image size in pixels.
        eps2d: low-pass variance (pixels^2) added to every projected covariance.
        near_plane, far_plane: Gaussians whose centre depth is outside (near, far) are culled.
        raw_quats: ``[B, N, 4]`` the quaternions before normalisation: the covariance then uses the 3DGS
            rotation formula at them (DiffSplat's renderer), the normals still ``quats``' rotation.
    """
    rot_view = viewmats[..., :3, :3]  # [B, V, 3, 3]
    means_c = torch.einsum("bvij,bnj->bvni", rot_view, means) + viewmats[..., None, :3, 3]
    x, y, z = means_c.unbind(-1)  # [B, V, N]
    in_depth = (z > near_plane) & (z < far_plane)
    # Culled Gaussians get a harmless depth so no inf/NaN reaches the (masked) backward pass.
    z_safe = torch.where(in_depth, z, torch.ones_like(z))

    fx, fy = Ks[..., 0, 0, None], Ks[..., 1, 1, None]  # [B, V, 1]
    cx, cy = Ks[..., 0, 2, None], Ks[..., 1, 2, None]
    means2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], dim=-1)

    # Jacobian of (x, y, z) -> (fx x / z + cx, fy y / z + cy), evaluated with x/z and y/z clamped to a
    # little beyond the image so off-screen Gaussians keep a bounded footprint.
    lim_x_pos = (width - cx) / fx + _FRUSTUM_MARGIN * 0.5 * width / fx
    lim_x_neg = cx / fx + _FRUSTUM_MARGIN * 0.5 * width / fx
    lim_y_pos = (height - cy) / fy + _FRUSTUM_MARGIN * 0.5 * height / fy
    lim_y_neg = cy / fy + _FRUSTUM_MARGIN * 0.5 * height / fy
    u = torch.maximum(torch.minimum(x / z_safe, lim_x_pos), -lim_x_neg)
    v = torch.maximum(torch.minimum(y / z_safe, lim_y_pos), -lim_y_neg)
    zero = torch.zeros_like(z_safe)
    jac = torch.stack(
        [fx / z_safe, zero, -fx * u / z_safe, zero, fy / z_safe, -fy * v / z_safe], dim=-1
    ).reshape(*z.shape, 2, 3)

    rot_gauss = quat_to_rotmat(quats)  # [B, N, 3, 3]
    rot_cov = rot_gauss if raw_quats is None else quat_to_rotmat(raw_quats)
    # J W R S: the 2x3 matrix whose Gram matrix is the projected covariance.
    jwrs = jac @ torch.einsum("bvij,bnjk->bvnik", rot_view, rot_cov * scales[..., None, :])
    cov2d = jwrs @ jwrs.transpose(-1, -2)
    cov_xx = cov2d[..., 0, 0] + eps2d
    cov_xy = cov2d[..., 0, 1]
    cov_yy = cov2d[..., 1, 1] + eps2d
    det = (cov_xx * cov_yy - cov_xy * cov_xy).clamp_min(1e-12)
    conics = torch.stack([cov_yy / det, -cov_xy / det, cov_xx / det], dim=-1)

    # Normal: the local axis with the smallest scale, in camera space, oriented towards the camera
    # (a camera at the origin sees the centre along +means_c, so the normal must oppose it).
    shortest = scales.argmin(dim=-1)  # [B, N]
    axis_world = torch.take_along_dim(rot_gauss, shortest[..., None, None].expand(*shortest.shape, 3, 1), -1)
    normals = torch.einsum("bvij,bnj->bvni", rot_view, axis_world[..., 0])
    facing = torch.where((normals * means_c).sum(-1, keepdim=True) > 0, -1.0, 1.0).to(normals.dtype)
    normals = normals * facing

    opac_views = opacities[:, None, :].expand_as(z)
    with torch.no_grad():
        # Opacity-aware box: alpha = o exp(-q/2) >= ALPHA_MIN  <=>  q <= 2 ln(o / ALPHA_MIN); the ellipse
        # q <= k^2 has half-widths k sqrt(cov_xx), k sqrt(cov_yy). (k <= 3.33 sigma for o <= 1.)
        k = torch.sqrt(2.0 * torch.log(opac_views.clamp_min(ALPHA_MIN) / ALPHA_MIN))
        extents = torch.stack([k * cov_xx.sqrt(), k * cov_yy.sqrt()], dim=-1) * (1 + 1e-4) + 1e-3
        mx, my = means2d.detach().unbind(-1)
        rx, ry = extents.unbind(-1)
        on_image = (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        visible = in_depth & (opac_views >= ALPHA_MIN) & on_image
    return ProjectedGaussians(means2d, conics, z, normals, opac_views, extents, visible)

