"""Rendering: cameras, the Gaussian-splat asset and differentiable splatting (torch and gsplat backends).

Public API::

    from r2d3.render import Gaussians, orbit_cameras, render_gaussians
    out = render_gaussians(gaussians, orbit_cameras(15.0, [0, 90, 180, 270], width=128, height=128))
    out.rgb  # [B, V, 3, H, W]

Conventions live with the data: :mod:`r2d3.render.gaussians` (world y up, wxyz quaternions, opacity
probabilities, linear scales), :mod:`r2d3.render.cameras` (OpenCV world-to-camera viewmats, pixel
centres at +0.5) and :mod:`r2d3.render.output` (channels-first ``[B, V, C, H, W]`` images).
"""

from r2d3.render.cameras import (
    Cameras,
    intrinsics_from_fov,
    jittered_orbit_cameras,
    look_at,
    opencv_to_opengl,
    orbit_cameras,
)
from r2d3.render.gaussians import Gaussians, InvalidGaussiansError
from r2d3.render.inputs import validate_cameras
from r2d3.render.mesh import MESH_BACKENDS, render_mesh
from r2d3.render.output import RenderOutput
from r2d3.render.projection import ProjectedGaussians, project_gaussians
from r2d3.render.splat import SPLAT_BACKENDS, render_gaussians, select_backend

__all__ = [
    "Cameras",
    "Gaussians",
    "InvalidGaussiansError",
    "MESH_BACKENDS",
    "ProjectedGaussians",
    "RenderOutput",
    "SPLAT_BACKENDS",
    "intrinsics_from_fov",
    "jittered_orbit_cameras",
    "look_at",
    "opencv_to_opengl",
    "orbit_cameras",
    "project_gaussians",
    "render_gaussians",
    "render_mesh",
    "select_backend",
    "validate_cameras",
]
