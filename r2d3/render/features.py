"""The per-Gaussian channels every splatting backend composites, and how they become a RenderOutput.

Colour, normal and depth are all alpha-composited with the same weights ``w_i = alpha_i T_i``, so a
backend composites one stacked feature vector per Gaussian and view (one pass yields everything):

    channels 0:3  linear RGB
    channels 3:6  camera-space (OpenCV) normal facing the camera
    channel  6    camera-space depth z

and :func:`resolve_features` turns the accumulated sums into the documented outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from r2d3.render.cameras import Cameras
from r2d3.render.output import RenderOutput

RGB = slice(0, 3)
NORMAL = slice(3, 6)
DEPTH = slice(6, 7)
NUM_FEATURES = 7


def stack_features(colors: Tensor, normals: Tensor, depths: Tensor) -> Tensor:
    """``[B, V, N, 7]`` features from ``colors [B, N, 3]``, ``normals [B, V, N, 3]``, ``depths [B, V, N]``."""
    return torch.cat([colors[:, None].expand_as(normals), normals, depths[..., None]], dim=-1)


def resolve_features(
    accumulated: Tensor, alpha: Tensor, background: Tensor, cameras: Cameras
) -> RenderOutput:
    """Composite over the background and normalise depth and normal by coverage.

    Args:
        accumulated: ``[B, V, 7, H, W]`` sums ``sum_i w_i f_i`` (no background).
        alpha: ``[B, V, 1, H, W]`` accumulated opacity ``1 - prod_i (1 - alpha_i)``.
        background: ``[B, V, 3]`` background colour per view.
        cameras: the batched cameras the images were rendered with.
    """
    rgb = accumulated[:, :, RGB] + (1.0 - alpha) * background[..., None, None]
    # Where nothing was hit both numerator and alpha are exactly 0; elsewhere alpha >= ALPHA_MIN.
    covered = alpha > 0
    safe_alpha = torch.where(covered, alpha, torch.ones_like(alpha))
    zero = torch.zeros((), dtype=alpha.dtype, device=alpha.device)
    depth = torch.where(covered, accumulated[:, :, DEPTH] / safe_alpha, zero)
    normal = torch.where(covered, accumulated[:, :, NORMAL] / safe_alpha, zero)
    return RenderOutput(rgb=rgb, alpha=alpha, depth=depth, normal=normal, cameras=cameras)
