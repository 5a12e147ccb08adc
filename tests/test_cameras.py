"""Cameras: frames, orbit placement, intrinsics, OpenCV/OpenGL conversion and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from r2d3.render import (
    Cameras,
    intrinsics_from_fov,
    jittered_orbit_cameras,
    look_at,
    opencv_to_opengl,
    orbit_cameras,
    project_gaussians,
    validate_cameras,
)


def to_camera(viewmats: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return (viewmats[..., :3, :3] @ points[..., None])[..., 0] + viewmats[..., :3, 3]


def test_look_at_is_a_rigid_transform_looking_at_the_target():
    eye = torch.tensor([[1.0, 2.0, 3.0], [-2.0, 0.5, 0.1], [0.0, 0.0, -4.0]], dtype=torch.float64)
    target = torch.tensor([0.2, -0.1, 0.3], dtype=torch.float64)
    view = look_at(eye, target)
    rot = view[:, :3, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(3, 3, 3))
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(view[:, 3], torch.tensor([0.0, 0, 0, 1], dtype=torch.float64).expand(3, 4))
    # the eye maps to the camera origin and the target onto the +z optical axis at its distance
    torch.testing.assert_close(to_camera(view, eye), torch.zeros(3, 3, dtype=torch.float64))
    dist = (target - eye).norm(dim=-1)
    expected = torch.stack([torch.zeros(3), torch.zeros(3), dist], -1).to(torch.float64)
    torch.testing.assert_close(to_camera(view, target.expand(3, 3)), expected)


def test_look_at_keeps_world_up_pointing_up_in_the_image():
    view = look_at(torch.tensor([0.0, 0.0, 3.0]))
    up_in_camera = view[:3, :3] @ torch.tensor([0.0, 1.0, 0.0])
    assert up_in_camera[1] < -0.99  # OpenCV y points down the image, so world up is -y


def test_look_at_straight_down_stays_finite_and_orthonormal():
    view = look_at(torch.tensor([0.0, 2.0, 0.0]))
    rot = view[:3, :3]
    assert torch.isfinite(view).all()
    torch.testing.assert_close(rot @ rot.T, torch.eye(3))
    torch.testing.assert_close(to_camera(view, torch.zeros(3)), torch.tensor([0.0, 0.0, 2.0]))


@pytest.mark.parametrize(
    ("elevation", "azimuth", "expected"),
    [
        (0.0, 0.0, (0.0, 0.0, 2.5)),
        (0.0, 90.0, (2.5, 0.0, 0.0)),
        (0.0, 180.0, (0.0, 0.0, -2.5)),
        (30.0, 0.0, (0.0, 1.25, 2.5 * math.cos(math.radians(30)))),
        (-45.0, 270.0, (-2.5 * math.cos(math.radians(45)), -2.5 * math.sin(math.radians(45)), 0.0)),
    ],
)
def test_orbit_camera_centres(elevation, azimuth, expected):
    cams = orbit_cameras(elevation, [azimuth], distance=2.5, dtype=torch.float64)
    torch.testing.assert_close(cams.camera_centers()[0], torch.tensor(expected, dtype=torch.float64))
    # and each looks at the origin
    origin_cam = to_camera(cams.viewmats[0], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(origin_cam, torch.tensor([0.0, 0.0, 2.5], dtype=torch.float64))


def test_orbit_cameras_shapes_and_intrinsics():
    cams = orbit_cameras(15.0, [0, 90, 180, 270], fov_deg=40.0, width=96, height=64)
    assert cams.viewmats.shape == (4, 4, 4) and cams.Ks.shape == (4, 3, 3) and cams.num_views == 4
    focal = 64 / (2 * math.tan(math.radians(20)))
    torch.testing.assert_close(cams.Ks[2], torch.tensor([[focal, 0, 48.0], [0, focal, 32.0], [0, 0, 1.0]]))
    with pytest.raises(ValueError, match="distance"):
        orbit_cameras(0.0, [0.0], distance=0.0)


def test_intrinsics_reject_bad_fov_and_size():
    with pytest.raises(ValueError, match="fov_deg"):
        intrinsics_from_fov(180.0, 8, 8)
    with pytest.raises(ValueError, match="image size"):
        intrinsics_from_fov(40.0, 0, 8)


def test_jittered_orbit_cameras_share_one_offset_per_asset():
    gen = torch.Generator().manual_seed(0)
    cams = jittered_orbit_cameras(4, 3, generator=gen, elevation_deg=10.0, distance=2.0, width=32, height=32)
    assert cams.viewmats.shape == (3, 4, 4, 4) and cams.Ks.shape == (3, 4, 3, 3)
    centres = cams.camera_centers()
    torch.testing.assert_close(centres.norm(dim=-1), torch.full((3, 4), 2.0))
    elevation = torch.rad2deg(torch.asin(centres[..., 1] / 2.0))
    assert ((elevation >= 5 - 1e-4) & (elevation <= 15 + 1e-4)).all()
    assert torch.allclose(elevation, elevation[:, :1].expand(3, 4), atol=1e-4)  # shared per asset
    azimuth = torch.rad2deg(torch.atan2(centres[..., 0], centres[..., 2]))
    steps = torch.remainder(azimuth[:, 1:] - azimuth[:, :-1], 360.0)
    torch.testing.assert_close(steps, torch.full((3, 3), 90.0), atol=1e-3, rtol=0)


def test_opencv_to_opengl_flips_y_and_z_and_is_an_involution():
    cams = orbit_cameras(20.0, [30.0, 200.0], dtype=torch.float64)
    gl = opencv_to_opengl(cams.viewmats)
    torch.testing.assert_close(opencv_to_opengl(gl), cams.viewmats)
    point = torch.tensor([0.1, 0.3, -0.2], dtype=torch.float64)
    cv, glp = to_camera(cams.viewmats, point), to_camera(gl, point)
    torch.testing.assert_close(glp, cv * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    assert (glp[:, 2] < 0).all()  # OpenGL cameras look down -z


def test_point_on_the_optical_axis_projects_to_the_principal_point():
    cams = orbit_cameras(25.0, [40.0, 130.0], width=80, height=60, dtype=torch.float64)
    # points on each camera's optical axis: between its centre and the origin it looks at
    centres = cams.camera_centers()
    points = 0.3 * centres  # [V, 3]
    for v in range(2):
        proj = project_gaussians(
            points[v][None, None],
            torch.tensor([[[1.0, 0, 0, 0]]], dtype=torch.float64),
            torch.full((1, 1, 3), 0.05, dtype=torch.float64),
            torch.ones(1, 1, dtype=torch.float64),
            cams.viewmats[v : v + 1][None],
            cams.Ks[v : v + 1][None],
            80,
            60,
        )
        torch.testing.assert_close(proj.means2d[0, 0, 0], torch.tensor([40.0, 30.0], dtype=torch.float64))
        torch.testing.assert_close(proj.depths[0, 0, 0], 0.7 * centres[v].norm())


def test_cameras_to_and_expand():
    cams = orbit_cameras(0.0, [0.0, 90.0])
    batched = cams.expand(3)
    assert batched.viewmats.shape == (3, 2, 4, 4) and batched.Ks.shape == (3, 2, 3, 3)
    assert batched.expand(3) is batched
    assert cams.to(torch.float64).viewmats.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# validate_cameras: what every renderer calls first


def test_validate_expands_unbatched_cameras_and_casts():
    cams = validate_cameras(orbit_cameras(0.0, [0.0, 90.0]), batch_size=2, dtype=torch.float64)
    assert cams.viewmats.shape == (2, 2, 4, 4) and cams.viewmats.dtype == torch.float64
    assert cams.Ks.shape == (2, 2, 3, 3) and cams.Ks.dtype == torch.float64


def test_validate_keeps_matching_batched_cameras():
    cams = jittered_orbit_cameras(2, 3)
    assert validate_cameras(cams, batch_size=3).viewmats.shape == (3, 2, 4, 4)


def test_validate_names_a_batch_mismatch():
    message = "batch size mismatch: cameras have batch size 3 but the Gaussians have 2"
    with pytest.raises(ValueError, match=message):
        validate_cameras(jittered_orbit_cameras(2, 3), batch_size=2)


def _cams(viewmats, Ks, width=8, height=8):
    return Cameras(viewmats, Ks, width, height)


@pytest.mark.parametrize(
    ("cams", "message"),
    [
        (_cams(torch.zeros(2, 2, 3, 4), torch.eye(3).expand(2, 2, 3, 3)), r"viewmats must have shape"),
        (_cams(torch.eye(4).expand(2, 4, 4), torch.zeros(2, 2, 3)), r"Ks must have shape"),
        (_cams(torch.eye(4).expand(2, 4, 4), torch.eye(3).expand(3, 3, 3)), r"disagree on the batch/view"),
        (_cams(torch.eye(4).expand(0, 4, 4), torch.eye(3).expand(0, 3, 3)), r"no views"),
        (_cams(torch.eye(4).expand(2, 4, 4), torch.eye(3).expand(2, 3, 3), width=0), r"width must be"),
        (_cams(torch.eye(4).expand(2, 4, 4), torch.eye(3).expand(2, 3, 3), height=8.0), r"height must be"),
        (_cams(torch.full((2, 4, 4), float("nan")), torch.eye(3).expand(2, 3, 3)), r"NaN or inf"),
        (_cams(torch.eye(4).expand(2, 4, 4), torch.zeros(2, 3, 3)), r"positive focal lengths"),
        (_cams([[1.0]], torch.eye(3).expand(2, 3, 3)), r"viewmats must be a torch.Tensor"),
    ],
)
def test_validate_rejects_bad_cameras(cams, message):
    with pytest.raises(ValueError, match=message):
        validate_cameras(cams, batch_size=1)


def test_validate_rejects_non_cameras():
    with pytest.raises(TypeError, match="cameras must be r2d3.render.Cameras"):
        validate_cameras((torch.eye(4), torch.eye(3)), batch_size=1)
