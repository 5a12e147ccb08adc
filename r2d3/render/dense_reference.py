"""Dense all-pairs splatting: every Gaussian evaluated at every pixel. A check, not a renderer.

This is the independent reference the tiled renderer is tested and benchmarked against: projection
comes from gsplat's pure-torch implementation (``gsplat.cuda._torch_impl``, CPU-capable), compositing
is a plain depth sort plus ``cumprod`` over all Gaussians, with no tiles, no culling boxes and no
early termination. It shares only the rendering *rules* with the torch backend (alpha threshold 1/255,
alpha clamp 0.99, pixel centres at +0.5, normals = shortest axis facing the camera), so agreement
checks the tiling, binning, sorting, termination and projection code. Costs ``O(N H W)`` time and,
under autograd, about ten floats of memory per (Gaussian, pixel) pair. Needs the ``gsplat`` package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from r2d3.render.cameras import Cameras
from r2d3.render.gaussians import Gaussians
from r2d3.render.inputs import background_tensor, validate_cameras
from r2d3.render.output import RenderOutput
from r2d3.render.projection import ALPHA_MAX, ALPHA_MIN


def composite_dense(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    depths: Tensor,
    width: int,
    height: int,
) -> tuple[Tensor, Tensor]:
    """Alpha-composite every Gaussian at every pixel, front to back by ``depths``.

    Args:
        means2d ``[..., N, 2]``, conics ``[..., N, 3]`` (gsplat's ``(a, b, c)``: falloff
        ``exp(-(a dx^2 + 2 b dx dy + c dy^2) / 2)``), opacities ``[..., N]`` (0 culls a Gaussian),
        features ``[..., N, D]``, depths ``[..., N]``.

    Returns:
        ``accumulated [..., D, H, W]`` (sum of ``w_i f_i``) and ``alpha [..., 1, H, W]``.
    """
    lead, n, dim = means2d.shape[:-2], means2d.shape[-2], features.shape[-1]
    order = torch.argsort(depths, dim=-1)
    pick = lambda x: torch.take_along_dim(x, order[..., None], dim=-2)  # noqa: E731
    means2d, conics, features = pick(means2d), pick(conics), pick(features)
    opacities = torch.take_along_dim(opacities, order, dim=-1)

    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=means2d.dtype, device=means2d.device) + 0.5,
        torch.arange(width, dtype=means2d.dtype, device=means2d.device) + 0.5,
        indexing="ij",
    )
    dx = xs.reshape(-1) - means2d[..., 0:1]  # [..., N, H*W]
    dy = ys.reshape(-1) - means2d[..., 1:2]
    q = conics[..., 0:1] * dx * dx + 2 * conics[..., 1:2] * dx * dy + conics[..., 2:3] * dy * dy
    # (exponent clamped only to stay out of slow float32 denormals; such alphas are far below ALPHA_MIN)
    alpha = opacities[..., None] * torch.exp((-0.5 * q).clamp(min=-60.0))
    alpha = torch.where(alpha < ALPHA_MIN, torch.zeros_like(alpha), torch.clamp(alpha, max=ALPHA_MAX))
    through = torch.cumprod(1 - alpha, dim=-2)
    trans = torch.cat([torch.ones_like(through[..., :1, :]), through[..., :-1, :]], dim=-2)
    accumulated = torch.einsum("...np,...nc->...cp", alpha * trans, features)
    cover = 1 - through[..., -1:, :] if n else torch.zeros_like(accumulated[..., :1, :])
    return accumulated.reshape(*lead, dim, height, width), cover.reshape(*lead, 1, height, width)


def project_dense(g: Gaussians, cams: Cameras, eps2d: float = 0.3, near_plane: float = 0.01,
                  covars: Tensor | None = None):
    """gsplat's pure-torch EWA projection of validated Gaussians into batched cameras (``covars``
    ``[B, N, 3, 3]`` in place of the quaternions' and scales', as gsplat takes them).

    Returns ``means2d [B, V, N, 2]``, ``conics [B, V, N, 3]``, ``depths [B, V, N]``, ``keep [B, V, N]``
    (gsplat's culling: in front of the near plane, non-degenerate, 3.33-sigma box on the image).
    """
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    if covars is None:
        covars, _ = _quat_scale_to_covar_preci(g.quats, g.scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        g.means, covars, cams.viewmats, cams.Ks, cams.width, cams.height, eps2d=eps2d, near_plane=near_plane
    )
    keep = (radii > 0).all(-1)
    # culled Gaussians get harmless values (behind the camera gsplat's divide is not finite)
    means2d = torch.where(keep[..., None], means2d, torch.zeros_like(means2d))
    conics = torch.where(keep[..., None], conics, torch.zeros_like(conics))
    return means2d, conics, depths, keep


def render_gaussians_dense(
    gaussians: Gaussians,
    cameras: Cameras,
    background: float | Sequence[float] | Tensor = (1.0, 1.0, 1.0),
    eps2d: float = 0.3,
    near_plane: float = 0.01,
) -> RenderOutput:
    """Exhaustive reference render; same inputs, outputs and conventions as ``render_gaussians``."""
    from gsplat.cuda._torch_impl import _quat_to_rotmat

    g = gaussians.validate()
    b, n = g.batch_size, g.num_gaussians
    cams = validate_cameras(cameras, b, dtype=g.means.dtype, device=g.means.device)
    v = cams.num_views
    bg = background_tensor(background, b, v, g.means.dtype, g.means.device)
    means2d, conics, depths, keep = project_dense(g, cams, eps2d, near_plane)

    # Camera-space normal: shortest local axis, rotated into the view, pointing back at the camera.
    rot = _quat_to_rotmat(g.quats)  # [B, N, 3, 3]
    axis = torch.gather(rot, 3, g.scales.argmin(-1)[..., None, None].expand(b, n, 3, 1))[..., 0]
    rot_view, t_view = cams.viewmats[..., :3, :3], cams.viewmats[..., :3, 3]
    normal = torch.einsum("bvij,bnj->bvni", rot_view, axis)
    centre_c = torch.einsum("bvij,bnj->bvni", rot_view, g.means) + t_view[..., None, :]
    normal = torch.where((normal * centre_c).sum(-1, keepdim=True) > 0, -normal, normal)
    feats = torch.cat([g.colors[:, None].expand(b, v, n, 3), normal, depths[..., None]], dim=-1)

    opac = g.opacities[:, None, :].expand(b, v, n) * keep
    acc, cover = composite_dense(means2d, conics, opac, feats, depths, cams.width, cams.height)
    rgb = acc[:, :, :3] + (1 - cover) * bg[..., None, None]
    denom = torch.where(cover > 0, cover, torch.ones_like(cover))
    depth = torch.where(cover > 0, acc[:, :, 6:7] / denom, torch.zeros_like(cover))
    normal_img = torch.where(cover > 0, acc[:, :, 3:6] / denom, torch.zeros_like(acc[:, :, 3:6]))
    return RenderOutput(rgb=rgb, alpha=cover, depth=depth, normal=normal_img, cameras=cams)
