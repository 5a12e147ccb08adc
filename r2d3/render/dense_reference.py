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


def render_gaussians_dense(
    gaussians: Gaussians,
    cameras: Cameras,
    background: float | Sequence[float] | Tensor = (1.0, 1.0, 1.0),
    eps2d: float = 0.3,
    near_plane: float = 0.01,
) -> RenderOutput:
    """Exhaustive reference render; same inputs, outputs and conventions as ``render_gaussians``."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _quat_to_rotmat

    g = gaussians.validate()
    b, n = g.batch_size, g.num_gaussians
    cams = validate_cameras(cameras, b, dtype=g.means.dtype, device=g.means.device)
    v, width, height = cams.num_views, cams.width, cams.height
    bg = background_tensor(background, b, v, g.means.dtype, g.means.device)

    covars, _ = _quat_scale_to_covar_preci(g.quats, g.scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        g.means, covars, cams.viewmats, cams.Ks, width, height, eps2d=eps2d, near_plane=near_plane
    )  # [B, V, N, 2], [B, V, N, 2], [B, V, N], [B, V, N, 3]
    # gsplat zeroes the radius of Gaussians behind the near plane, degenerate or entirely off-image
    # (its 3.33-sigma box misses the image, so every on-image alpha would be below 1/255 anyway).
    keep = (radii > 0).all(-1)
    means2d = torch.where(keep[..., None], means2d, torch.zeros_like(means2d))
    conics = torch.where(keep[..., None], conics, torch.zeros_like(conics))

    # Camera-space normal: shortest local axis, rotated into the view, pointing back at the camera.
    rot = _quat_to_rotmat(g.quats)  # [B, N, 3, 3]
    axis = torch.gather(rot, 3, g.scales.argmin(-1)[..., None, None].expand(b, n, 3, 1))[..., 0]
    rot_view, t_view = cams.viewmats[..., :3, :3], cams.viewmats[..., :3, 3]
    normal = torch.einsum("bvij,bnj->bvni", rot_view, axis)
    centre_c = torch.einsum("bvij,bnj->bvni", rot_view, g.means) + t_view[..., None, :]
    normal = torch.where((normal * centre_c).sum(-1, keepdim=True) > 0, -normal, normal)
    feats = torch.cat([g.colors[:, None].expand(b, v, n, 3), normal, depths[..., None]], dim=-1)

    order = torch.argsort(torch.where(keep, depths, torch.full_like(depths, float("inf"))), dim=-1)
    pick = lambda x: torch.take_along_dim(x, order.reshape(*order.shape, *([1] * (x.ndim - 3))), dim=2)  # noqa: E731
    means2d, conics, feats = pick(means2d), pick(conics), pick(feats)
    opac = torch.take_along_dim(g.opacities[:, None, :].expand(b, v, n) * keep, order, dim=2)

    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=g.means.dtype, device=g.means.device) + 0.5,
        torch.arange(width, dtype=g.means.dtype, device=g.means.device) + 0.5,
        indexing="ij",
    )
    dx = xs.reshape(1, 1, 1, -1) - means2d[..., 0:1]  # [B, V, N, H*W]
    dy = ys.reshape(1, 1, 1, -1) - means2d[..., 1:2]
    q = conics[..., 0:1] * dx * dx + 2 * conics[..., 1:2] * dx * dy + conics[..., 2:3] * dy * dy
    # (exponent clamped only to stay out of slow float32 denormals; the result is far below ALPHA_MIN)
    alpha = opac[..., None] * torch.exp((-0.5 * q).clamp(min=-60.0))
    alpha = torch.where(alpha < ALPHA_MIN, torch.zeros_like(alpha), torch.clamp(alpha, max=ALPHA_MAX))
    keep_ray = torch.cumprod(1 - alpha, dim=2)
    trans_in = torch.cat([torch.ones_like(keep_ray[:, :, :1]), keep_ray[:, :, :-1]], dim=2)
    weights = alpha * trans_in  # [B, V, N, H*W]
    acc = torch.einsum("bvnp,bvnc->bvcp", weights, feats).reshape(b, v, 7, height, width)
    cover = (1 - keep_ray[:, :, -1]).reshape(b, v, 1, height, width) if n else acc.new_zeros(b, v, 1, height, width)

    rgb = acc[:, :, :3] + (1 - cover) * bg[..., None, None]
    denom = torch.where(cover > 0, cover, torch.ones_like(cover))
    depth = torch.where(cover > 0, acc[:, :, 6:7] / denom, torch.zeros_like(cover))
    normal_img = torch.where(cover > 0, acc[:, :, 3:6] / denom, torch.zeros_like(acc[:, :, 3:6]))
    return RenderOutput(rgb=rgb, alpha=cover, depth=depth, normal=normal_img, cameras=cams)
