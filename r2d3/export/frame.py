"""The coordinate frame exported files are written in.

r2d3 renders and exports in a **y-up** frame (x right, y up, z towards the default camera; glTF's own
convention and that of three.js, Blender's glTF importer, PlayCanvas, mkkellogg GaussianSplats3D).
Viewers built around INRIA's 3DGS code and COLMAP scenes (SuperSplat Viewer, gsplat.js, Spark's
documented set-up) assume OpenCV's **y-down** frame (y down, z forward) and show a y-up asset upside
down. ``y-down`` is the same asset turned 180° about x: points map by (x, y, z) -> (x, -y, -z) and
every splat's orientation is composed with that rotation, so the asset is rotated, never mirrored.
"""

from __future__ import annotations

import numpy as np

from r2d3.render.gaussians import Gaussians
from r2d3.render.quaternions import quat_multiply

#: export frames (see the module docstring)
FRAMES = ("y-up", "y-down")
#: the unit quaternion (w, x, y, z) of the half turn about x taking y-up to y-down (and back)
_HALF_TURN_X = (0.0, 1.0, 0.0, 0.0)


def check_frame(frame: str) -> str:
    if frame not in FRAMES:
        raise ValueError(f"export frame must be one of {', '.join(FRAMES)}, got {frame!r}")
    return frame


def gaussians_in_frame(gaussians: Gaussians, frame: str) -> Gaussians:
    """``gaussians`` (r2d3's y-up frame) expressed in ``frame``. The turn about x is its own inverse, so
    the same call maps a y-down asset back to y-up."""
    if check_frame(frame) == "y-up":
        return gaussians
    sign = gaussians.means.new_tensor([1.0, -1.0, -1.0])
    quats = quat_multiply(gaussians.quats.new_tensor(_HALF_TURN_X), gaussians.quats)
    return Gaussians(gaussians.means * sign, gaussians.scales, quats, gaussians.opacities, gaussians.colors)


def points_in_frame(points: np.ndarray, frame: str) -> np.ndarray:
    """Points or normals ``[N, 3]`` (y-up) in ``frame``."""
    if check_frame(frame) == "y-up":
        return points
    return points * np.array([1.0, -1.0, -1.0], dtype=points.dtype)
