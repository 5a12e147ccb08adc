"""What every renderer returns: per-view images as channels-first tensors.

Shapes (B assets, V views, H x W pixels):
- ``rgb``    ``[B, V, 3, H, W]`` composited over the background colour, in [0, 1] for colours in [0, 1];
- ``alpha``  ``[B, V, 1, H, W]`` accumulated opacity in [0, 1];
- ``depth``  ``[B, V, 1, H, W]`` expected camera-space z (OpenCV, distance along the optical axis),
  normalised by alpha where alpha > 0 and 0 where nothing was hit;
- ``normal`` ``[B, V, 3, H, W]`` camera-space (OpenCV) unit-ish normals composited like colours
  (each Gaussian's shortest axis, oriented toward the camera), normalised by alpha, 0 where empty;
- ``cameras`` the :class:`~r2d3.render.cameras.Cameras` used (batched ``[B, V, ...]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from r2d3.render.cameras import Cameras


@dataclass
class RenderOutput:
    rgb: Tensor
    alpha: Tensor
    depth: Tensor
    normal: Tensor
    cameras: Cameras
