"""Cameras for rendering: orbit placement, intrinsics and the frame conventions.

Conventions:
- ``viewmats`` ``[..., V, 4, 4]`` are world-to-camera transforms in the **OpenCV** camera frame
  (x right, y down, z forward into the scene). ``opencv_to_opengl`` converts to the OpenGL frame
  (x right, y up, z backward) used by many viewers.
- ``Ks`` ``[..., V, 3, 3]`` are pixel intrinsics; pixel (u, v) covers [u, u+1) x [v, v+1), so its centre
  is at (u + 0.5, v + 0.5) and the principal point of a centred camera is (W / 2, H / 2).
- Orbit cameras look at the origin from ``distance`` at ``elevation`` above the xz plane and ``azimuth``
  measured from +z towards +x (world y up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

OPENCV_TO_OPENGL = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


@dataclass
class Cameras:
    viewmats: Tensor  # [B, V, 4, 4] world -> camera (OpenCV)
    Ks: Tensor  # [B, V, 3, 3]
    width: int
    height: int

    @property
    def num_views(self) -> int:
        return self.viewmats.shape[-3]

    def to(self, *args, **kwargs) -> "Cameras":
        return Cameras(self.viewmats.to(*args, **kwargs), self.Ks.to(*args, **kwargs), self.width, self.height)

    def expand(self, batch_size: int) -> "Cameras":
        """Give unbatched cameras ``[V, 4, 4]`` a batch axis shared by ``batch_size`` assets."""
        if self.viewmats.ndim == 4:
            return self
        return Cameras(
            self.viewmats.expand(batch_size, *self.viewmats.shape),
            self.Ks.expand(batch_size, *self.Ks.shape),
            self.width,
            self.height,
        )

    def __getitem__(self, index) -> "Cameras":
        """The cameras of assets ``index`` (batched cameras ``[B, V, ...]``; a tensor may repeat rows)."""
        return Cameras(self.viewmats[index], self.Ks[index], self.width, self.height)

    @staticmethod
    def cat(items: "list[Cameras]") -> "Cameras":
        """Batched cameras of the same image size, joined along the asset axis."""
        return Cameras(torch.cat([c.viewmats for c in items]), torch.cat([c.Ks for c in items]),
                       items[0].width, items[0].height)

    def camera_centers(self) -> Tensor:
        """World positions of the camera centres, ``[..., V, 3]``."""
        rot = self.viewmats[..., :3, :3]
        trans = self.viewmats[..., :3, 3:]
        return -(rot.transpose(-1, -2) @ trans)[..., 0]


def intrinsics_from_fov(fov_deg: float, width: int, height: int) -> Tensor:
    """Pixel intrinsics for a vertical field of view (square pixels, centred principal point)."""
    if not 0 < fov_deg < 180:
        raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    focal = height / (2.0 * math.tan(math.radians(fov_deg) / 2.0))
    return torch.tensor([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])


def look_at(eye: Tensor, target: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """World-to-camera (OpenCV) matrices for cameras at ``eye`` ``[..., 3]`` looking at ``target``."""
    target = torch.zeros_like(eye) if target is None else target.expand_as(eye)
    up = eye.new_tensor([0.0, 1.0, 0.0]).expand_as(eye) if up is None else up.expand_as(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)  # camera +z
    right = torch.linalg.cross(forward, up)
    # looking straight up or down: pick any horizontal right axis
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    right = torch.where(degenerate, eye.new_tensor([1.0, 0.0, 0.0]).expand_as(eye), right)
    right = torch.nn.functional.normalize(right, dim=-1)  # camera +x
    down = torch.linalg.cross(forward, right)  # camera +y (image down)
    rot = torch.stack([right, down, forward], dim=-2)  # rows: camera axes in world coordinates
    viewmat = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype, device=eye.device)
    viewmat[..., :3, :3] = rot
    viewmat[..., :3, 3] = -(rot @ eye[..., None])[..., 0]
    viewmat[..., 3, 3] = 1.0
    return viewmat


def orbit_cameras(
    elevation_deg: Tensor | list[float] | float,
    azimuth_deg: Tensor | list[float],
    distance: float = 2.5,
    fov_deg: float = 40.0,
    width: int = 64,
    height: int = 64,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Cameras:
    """``V`` cameras on a sphere around the origin; elevation and azimuth broadcast to ``[V]``."""
    if distance <= 0:
        raise ValueError(f"camera distance must be > 0, got {distance}")
    azi = torch.as_tensor(azimuth_deg, dtype=dtype, device=device).reshape(-1)
    ele = torch.as_tensor(elevation_deg, dtype=dtype, device=device).reshape(-1).expand_as(azi)
    ele, azi = torch.deg2rad(ele), torch.deg2rad(azi)
    eye = distance * torch.stack([ele.cos() * azi.sin(), ele.sin(), ele.cos() * azi.cos()], dim=-1)
    viewmats = look_at(eye)
    Ks = intrinsics_from_fov(fov_deg, width, height).to(dtype=dtype, device=device).expand(len(azi), 3, 3)
    return Cameras(viewmats, Ks.clone(), width, height)


def jittered_orbit_cameras(
    num_views: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    elevation_deg: float = 15.0,
    elevation_jitter_deg: float = 5.0,
    azimuth_jitter_deg: float = 10.0,
    **kwargs,
) -> Cameras:
    """``num_views`` evenly spaced azimuths per asset with one random offset shared by an asset's views
    (the paper's reward cameras: azimuth U(-a, a), elevation U(e - j, e + j))."""
    u = torch.rand(batch_size, 2, generator=generator)
    azi_off = (2 * u[:, 0] - 1) * azimuth_jitter_deg
    ele = elevation_deg + (2 * u[:, 1] - 1) * elevation_jitter_deg
    base = torch.arange(num_views) * (360.0 / num_views)
    cams = [orbit_cameras(ele[b].item(), base + azi_off[b], **kwargs) for b in range(batch_size)]
    return Cameras(
        torch.stack([c.viewmats for c in cams]), torch.stack([c.Ks for c in cams]), cams[0].width, cams[0].height
    )


def opencv_to_opengl(viewmats: Tensor) -> Tensor:
    """Convert world-to-camera matrices from the OpenCV to the OpenGL camera frame (and back)."""
    return OPENCV_TO_OPENGL.to(viewmats) @ viewmats
