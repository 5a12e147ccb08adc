"""Binning projected Gaussians into screen tiles, depth-sorted within each tile.

Compositing every Gaussian at every pixel costs ``O(N H W)``; after binning, a tile only evaluates
the Gaussians whose footprint box touches it, in front-to-back order, so the cost follows the
number of (Gaussian, tile) overlaps instead. Binning is integer bookkeeping and carries no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TileBins:
    """Which Gaussians touch which tile, for ``I`` images of ``tiles_y x tiles_x`` tiles.

    - ``tile_ids``   ``[A]`` flat index ``image * tiles_y * tiles_x + ty * tiles_x + tx`` of every tile
      touched by at least one Gaussian (ascending);
    - ``starts``     ``[A]`` offset of each such tile's list in ``gaussian_ids``;
    - ``counts``     ``[A]`` length of each tile's list (>= 1);
    - ``gaussian_ids`` ``[M]`` flat index ``image * N + n`` of the Gaussian, grouped by tile and sorted
      front to back (by camera depth) within a tile.
    """

    tile_size: int
    tiles_x: int
    tiles_y: int
    num_images: int
    tile_ids: Tensor
    starts: Tensor
    counts: Tensor
    gaussian_ids: Tensor

    @property
    def num_intersections(self) -> int:
        return int(self.gaussian_ids.numel())


@torch.no_grad()
def bin_gaussians(
    means2d: Tensor,
    extents: Tensor,
    depths: Tensor,
    visible: Tensor,
    width: int,
    height: int,
    tile_size: int = 16,
) -> TileBins:
    """Assign visible Gaussians to the tiles their footprint boxes overlap, front to back per tile.

    Args:
        means2d: ``[I, N, 2]`` pixel-space centres.
        extents: ``[I, N, 2]`` footprint box half-sizes in pixels.
        depths: ``[I, N]`` sort key (camera z); smaller is in front.
        visible: ``[I, N]`` which Gaussians to bin at all.
        width, height: image size; tile_size: tile edge in pixels.
    """
    num_images, n = depths.shape
    tiles_x = -(-width // tile_size)
    tiles_y = -(-height // tile_size)
    device = depths.device

    pair = visible.reshape(-1).nonzero().squeeze(1)  # flat image * N + n
    # Depth order first; the stable sort by tile below keeps it within each tile.
    pair = pair[torch.argsort(depths.reshape(-1)[pair], stable=True)]
    image = torch.div(pair, n, rounding_mode="floor")
    centre = means2d.reshape(-1, 2)[pair]
    half = extents.reshape(-1, 2)[pair]
    lo = torch.floor((centre - half) / tile_size)
    hi = torch.floor((centre + half) / tile_size)
    x0 = lo[:, 0].clamp(0, tiles_x - 1).long()
    x1 = hi[:, 0].clamp(0, tiles_x - 1).long()
    y0 = lo[:, 1].clamp(0, tiles_y - 1).long()
    y1 = hi[:, 1].clamp(0, tiles_y - 1).long()
    span_x = x1 - x0 + 1
    per_pair = span_x * (y1 - y0 + 1)

    owner = torch.repeat_interleave(torch.arange(len(pair), device=device), per_pair)
    first = torch.cumsum(per_pair, 0) - per_pair
    local = torch.arange(len(owner), device=device) - first[owner]
    tx = x0[owner] + local % span_x[owner]
    ty = y0[owner] + torch.div(local, span_x[owner], rounding_mode="floor")
    tile = (image[owner] * tiles_y + ty) * tiles_x + tx

    tile, order = torch.sort(tile, stable=True)
    gaussian_ids = pair[owner[order]]
    tile_ids, counts = torch.unique_consecutive(tile, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return TileBins(tile_size, tiles_x, tiles_y, num_images, tile_ids, starts, counts, gaussian_ids)
