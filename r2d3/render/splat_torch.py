"""Tiled Gaussian splatting in pure torch: the reference backend (CPU and CUDA).

Pipeline: EWA projection (:mod:`r2d3.render.projection`, autograd) -> binning into square tiles
(:mod:`r2d3.render.tiles`, no gradient) -> front-to-back compositing per tile (this module).
Tiles default to 8x8 pixels: on CPU every (Gaussian, tile) pair costs a full tile of evaluations, and
8x8 wastes fewer of them on pixels outside a footprint than gsplat's 16x16 (about 1.5-2x faster here).

Compositing is a custom :class:`torch.autograd.Function` because plain autograd would keep every
``[tiles, chunk, pixels]`` intermediate of every chunk alive until backward. Here the forward pass
walks each tile's depth-sorted list in chunks of ``chunk_size`` Gaussians for all active tiles at
once, keeps only the transmittance at the start of each chunk, and stops a tile as soon as every one
of its pixels has transmittance below ``min_transmittance`` (early termination). The backward pass
recomputes each chunk's alphas (last chunk first) and applies the closed-form compositing gradient

    dF/dalpha_i = T_i f_i - (sum_{j>i} w_j f_j) / (1 - alpha_i),   dT_end/dalpha_i = -T_end / (1 - alpha_i)

with ``w_i = alpha_i T_i``, accumulating the suffix sums as it goes. Memory therefore stays bounded
by ``max_chunk_elements`` per step plus one transmittance row per processed chunk. The gradient is
first order only (no double backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from r2d3.render.cameras import Cameras
from r2d3.render.features import NUM_FEATURES, resolve_features, stack_features
from r2d3.render.gaussians import Gaussians
from r2d3.render.output import RenderOutput
from r2d3.render.projection import ALPHA_MAX, ALPHA_MIN, project_gaussians
from r2d3.render.tiles import TileBins, bin_gaussians


_MIN_EXPONENT = -60.0


@dataclass
class _Plan:
    """Everything the compositing pass needs besides the differentiable per-Gaussian tensors."""

    bins: TileBins
    origin_x: Tensor  # [A] pixel x of each active tile's left edge
    origin_y: Tensor  # [A]
    pixel_u: Tensor  # [P] pixel-centre x offsets inside a tile (0.5 .. tile_size - 0.5)
    pixel_v: Tensor  # [P]
    chunk_size: int
    min_transmittance: float
    rows_per_step: int


def _make_plan(
    bins: TileBins, dtype: torch.dtype, chunk_size: int, min_transmittance: float, max_chunk_elements: int
) -> _Plan:
    ts = bins.tile_size
    device = bins.tile_ids.device
    local_tile = bins.tile_ids % (bins.tiles_x * bins.tiles_y)
    origin_x = ((local_tile % bins.tiles_x) * ts).to(dtype)
    origin_y = (torch.div(local_tile, bins.tiles_x, rounding_mode="floor") * ts).to(dtype)
    pix = torch.arange(ts * ts, device=device)
    pixel_u = (pix % ts).to(dtype) + 0.5
    pixel_v = torch.div(pix, ts, rounding_mode="floor").to(dtype) + 0.5
    rows = max(1, max_chunk_elements // (chunk_size * ts * ts))
    return _Plan(bins, origin_x, origin_y, pixel_u, pixel_v, chunk_size, min_transmittance, rows)


@dataclass
class _Chunk:
    """One chunk of up to K Gaussians for R tiles, evaluated at the tiles' P pixels."""

    ids: Tensor  # [R, K] flat Gaussian index (0 where padded)
    valid: Tensor  # [R, K] 1.0 for real entries, 0.0 for padding
    conic: Tensor  # [R, K, 3] conic (a, b, c) of each Gaussian
    dx: Tensor  # [R, K, P] pixel centre minus Gaussian centre
    dy: Tensor
    falloff: Tensor  # [R, K, P] exp(-sigma)
    raw: Tensor  # [R, K, P] opacity * falloff (0 for padding)
    alpha: Tensor  # [R, K, P] raw, zeroed below ALPHA_MIN and clamped to ALPHA_MAX
    keep: Tensor  # [R, K, P] 1 - alpha
    trans: Tensor  # [R, K, P] transmittance in front of each Gaussian
    weights: Tensor  # [R, K, P] alpha * trans
    trans_end: Tensor  # [R, P] transmittance behind the whole chunk


def _evaluate_chunk(
    means2d: Tensor, conics: Tensor, opacities: Tensor, plan: _Plan, rows: Tensor, step: int, t_start: Tensor
) -> _Chunk:
    # Written as in-place passes over [R, K, P] with float (not bool) masks: on CPU these tensors are the
    # whole cost, and bool-mask kernels are several times slower than float arithmetic.
    bins, k = plan.bins, plan.chunk_size
    offset = step * k + torch.arange(k, device=rows.device)
    valid = offset < bins.counts[rows, None]  # [R, K]
    position = (bins.starts[rows, None] + offset).clamp_max(bins.num_intersections - 1)
    ids = torch.where(valid, bins.gaussian_ids[position], torch.zeros_like(position))

    centre = means2d[ids]  # [R, K, 2]
    dx = (plan.origin_x[rows, None] - centre[..., 0])[..., None] + plan.pixel_u
    dy = (plan.origin_y[rows, None] - centre[..., 1])[..., None] + plan.pixel_v
    conic = conics[ids]
    a, b, c = (conic * -0.5).unbind(-1)
    # -sigma = -(a dx^2 / 2 + b dx dy + c dy^2 / 2), accumulated in place.
    falloff = torch.mul(dx, a[..., None]).addcmul_(dy, 2.0 * b[..., None]).mul_(dx)
    # Clamping the exponent changes no output (such pixels are far below ALPHA_MIN) but keeps exp() out of
    # float32 denormals, which are an order of magnitude slower on x86.
    falloff.addcmul_(torch.mul(dy, c[..., None]), dy).clamp_(min=_MIN_EXPONENT).exp_()
    valid = valid.to(falloff.dtype)
    raw = falloff * (opacities[ids] * valid)[..., None]
    alpha = torch.ge(raw, ALPHA_MIN, out=torch.empty_like(raw)).mul_(raw.clamp(max=ALPHA_MAX))
    keep = 1.0 - alpha
    through = torch.cumprod(keep, dim=1)
    trans = torch.empty_like(alpha)
    trans[:, 0] = t_start
    torch.mul(through[:, :-1], t_start[:, None, :], out=trans[:, 1:])
    weights, trans_end = alpha * trans, t_start * through[:, -1]
    return _Chunk(ids, valid, conic, dx, dy, falloff, raw, alpha, keep, trans, weights, trans_end)


class _CompositeTiles(torch.autograd.Function):
    """Front-to-back compositing of binned Gaussians; see the module docstring for the gradient."""

    @staticmethod
    def forward(ctx, means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor, plan: _Plan):
        bins = plan.bins
        num_tiles, num_pixels = len(bins.tile_ids), plan.pixel_u.numel()
        accumulated = features.new_zeros(num_tiles, features.shape[-1], num_pixels)
        trans = features.new_ones(num_tiles, num_pixels)
        alive = torch.ones(num_tiles, dtype=torch.bool, device=features.device)
        schedule: list[tuple[Tensor, int, Tensor]] = []
        step = 0
        while True:
            rows = ((bins.counts > step * plan.chunk_size) & alive).nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            for group in rows.split(plan.rows_per_step):
                t_start = trans[group]
                chunk = _evaluate_chunk(means2d, conics, opacities, plan, group, step, t_start)
                accumulated[group] += torch.bmm(features[chunk.ids].transpose(1, 2), chunk.weights)
                trans[group] = chunk.trans_end
                schedule.append((group, step, t_start))
            alive[rows] = trans[rows].amax(dim=1) > plan.min_transmittance
            step += 1
        ctx.plan, ctx.schedule = plan, schedule
        ctx.save_for_backward(means2d, conics, opacities, features, trans)
        return accumulated, trans

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_accumulated: Tensor, grad_trans: Tensor):
        means2d, conics, opacities, features, trans_end = ctx.saved_tensors
        plan: _Plan = ctx.plan
        grad_means2d = torch.zeros_like(means2d)
        grad_conics = torch.zeros_like(conics)
        grad_opacities = torch.zeros_like(opacities)
        grad_features = torch.zeros_like(features)
        # d loss / d T_end times T_end: every alpha_i scales T_end by (1 - alpha_i).
        end_term = grad_trans * trans_end
        # per pixel: sum over Gaussians behind the current chunk of w_j <grad, f_j>, filled back to front.
        behind = torch.zeros_like(trans_end)
        for rows, step, t_start in reversed(ctx.schedule):
            c = _evaluate_chunk(means2d, conics, opacities, plan, rows, step, t_start)
            grad_pix = grad_accumulated[rows]  # [R, F, P]
            ids = c.ids.flatten()
            grad_features.index_add_(0, ids, torch.bmm(c.weights, grad_pix.transpose(1, 2)).flatten(0, 1))

            dot = torch.bmm(features[c.ids], grad_pix)  # <grad, f_i> per pixel, [R, K, P]
            prefix = torch.cumsum(c.weights * dot, dim=1)  # inclusive, front to back
            total = prefix[:, -1] + behind[rows]
            behind[rows] = total
            # dL/dalpha_i = T_i <g, f_i> - (sum_{j > i} w_j <g, f_j> + g_T T_end) / (1 - alpha_i)
            later = prefix.neg_().add_((total + end_term[rows])[:, None, :]).div_(c.keep)
            grad_raw = later.neg_().addcmul_(c.trans, dot)
            # alpha = raw exactly where raw was neither thresholded nor clamped; elsewhere dalpha/draw = 0.
            grad_raw.mul_(torch.eq(c.alpha, c.raw, out=torch.empty_like(c.raw)))
            grad_opacities.index_add_(0, ids, ((grad_raw * c.falloff).sum(-1) * c.valid).flatten())
            # g = dL/dsigma * -1 (d raw / d sigma = -raw)
            g = grad_raw.mul_(c.raw)
            gx, gy = g * c.dx, g * c.dy
            sum_gx, sum_gy = gx.sum(-1), gy.sum(-1)
            a, b, cc = c.conic.unbind(-1)
            # sigma depends on the centre through dx = px - mx: d sigma / d mx = -(a dx + b dy).
            grad_mean = torch.stack([a * sum_gx + b * sum_gy, b * sum_gx + cc * sum_gy], dim=-1)
            grad_means2d.index_add_(0, ids, grad_mean.flatten(0, 1))
            grad_conic = torch.stack(
                [-0.5 * (gx * c.dx).sum(-1), -(gx * c.dy).sum(-1), -0.5 * (gy * c.dy).sum(-1)], dim=-1
            )
            grad_conics.index_add_(0, ids, grad_conic.flatten(0, 1))
        return grad_means2d, grad_conics, grad_opacities, grad_features, None


def composite_tiles(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    bins: TileBins,
    width: int,
    height: int,
    chunk_size: int = 16,
    min_transmittance: float = 1e-6,
    max_chunk_elements: int = 1 << 21,
) -> tuple[Tensor, Tensor]:
    """Composite binned Gaussians front to back into ``I`` images (differentiable).

    Args:
        means2d: ``[I * N, 2]``, conics ``[I * N, 3]``, opacities ``[I * N]``, features ``[I * N, F]``:
            per image-and-Gaussian values, flattened in the order ``bins.gaussian_ids`` indexes.
        bins: the tile lists from :func:`r2d3.render.tiles.bin_gaussians`.
        chunk_size: Gaussians composited per tile per step; early termination is checked between steps.
        min_transmittance: a tile stops once all its pixels have less transmittance than this; the
            image then differs from the exhaustive result by at most this much.
        max_chunk_elements: bound on tiles x chunk x pixels evaluated at once (memory).

    Returns:
        ``accumulated [I, F, H, W]`` (sum of ``w_i f_i``) and ``transmittance [I, 1, H, W]``.
    """
    plan = _make_plan(bins, features.dtype, chunk_size, min_transmittance, max_chunk_elements)
    accumulated, trans = _CompositeTiles.apply(means2d, conics, opacities, features, plan)
    ts, tx, ty, n_img = bins.tile_size, bins.tiles_x, bins.tiles_y, bins.num_images
    num_features = features.shape[-1]
    all_tiles = n_img * ty * tx
    full_acc = features.new_zeros(all_tiles, num_features, ts * ts).index_copy(0, bins.tile_ids, accumulated)
    full_trans = features.new_ones(all_tiles, ts * ts).index_copy(0, bins.tile_ids, trans)

    def untile(x: Tensor, channels: int) -> Tensor:
        x = x.reshape(n_img, ty, tx, channels, ts, ts).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n_img, channels, ty * ts, tx * ts)[..., :height, :width]

    return untile(full_acc, num_features), untile(full_trans, 1)


def render_torch(
    gaussians: Gaussians,
    cameras: Cameras,
    background: Tensor,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    tile_size: int = 8,
    chunk_size: int = 16,
    min_transmittance: float = 1e-6,
    max_chunk_elements: int = 1 << 21,
    raw_quats: Tensor | None = None,
) -> RenderOutput:
    """Torch backend of :func:`r2d3.render.render_gaussians` (inputs already validated and batched;
    ``raw_quats``: the quaternions as given, for the covariance of ``raw_quaternions``)."""
    b, v, n = gaussians.batch_size, cameras.num_views, gaussians.num_gaussians
    width, height = cameras.width, cameras.height
    proj = project_gaussians(
        gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities,
        cameras.viewmats, cameras.Ks, width, height, eps2d, near_plane, far_plane, raw_quats,
    )  # fmt: skip
    features = stack_features(gaussians.colors, proj.normals, proj.depths)
    bins = bin_gaussians(
        proj.means2d.detach().reshape(b * v, n, 2), proj.extents.reshape(b * v, n, 2),
        proj.depths.detach().reshape(b * v, n), proj.visible.reshape(b * v, n), width, height, tile_size,
    )  # fmt: skip
    accumulated, trans = composite_tiles(
        proj.means2d.reshape(-1, 2), proj.conics.reshape(-1, 3), proj.opacities.reshape(-1),
        features.reshape(-1, NUM_FEATURES), bins, width, height,
        chunk_size, min_transmittance, max_chunk_elements,
    )  # fmt: skip
    accumulated = accumulated.reshape(b, v, NUM_FEATURES, height, width)
    alpha = 1.0 - trans.reshape(b, v, 1, height, width)
    return resolve_features(accumulated, alpha, background, cameras)
