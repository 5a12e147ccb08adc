"""Gaussian splatting: gradients, analytic footprints, depth/normal, symmetry, culling, dense parity,
input errors, backend selection, and (on CUDA) gsplat parity. Float64 where exactness is asserted."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import r2d3.render.splat as splat
import r2d3.render.splat_torch as splat_torch
from r2d3.render import (
    Cameras,
    Gaussians,
    InvalidGaussiansError,
    RenderOutput,
    look_at,
    orbit_cameras,
    render_gaussians,
    select_backend,
)
from r2d3.render.dense_reference import render_gaussians_dense
from r2d3.render.projection import ALPHA_MIN

F64 = torch.float64
CHANNELS = ("rgb", "alpha", "depth", "normal")
PARAMS = ("means", "scales", "quats", "opacities", "colors")


def random_scene(
    batch=1, n=8, seed=0, dtype=F64, spread=0.6, min_scale=0.05, max_scale=0.15, opacity=(0.4, 0.9)
) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=((torch.rand(batch, n, 3, generator=g) - 0.5) * spread).to(dtype),
        scales=(min_scale + (max_scale - min_scale) * torch.rand(batch, n, 3, generator=g)).to(dtype),
        quats=torch.randn(batch, n, 4, generator=g).to(dtype),
        opacities=(opacity[0] + (opacity[1] - opacity[0]) * torch.rand(batch, n, generator=g)).to(dtype),
        colors=torch.rand(batch, n, 3, generator=g).to(dtype),
    )


def concat_gaussians(*parts: Gaussians) -> Gaussians:
    """Join Gaussian sets of the same assets (along N)."""
    return Gaussians(*(torch.cat([getattr(p, f) for p in parts], dim=1) for f in PARAMS))


def stacked(out: RenderOutput) -> torch.Tensor:
    return torch.cat([getattr(out, c) for c in CHANNELS], dim=2)


def assert_outputs_close(a: RenderOutput, b: RenderOutput, atol: float) -> None:
    for c in CHANNELS:
        torch.testing.assert_close(
            getattr(a, c), getattr(b, c), atol=atol, rtol=0, msg=lambda m, c=c: f"{c}: {m}"
        )


def axis_camera(distance: float, size: int, fov: float = 40.0, dtype=F64) -> Cameras:
    """One camera on the +z axis looking at the origin (camera x = world x, camera y = world -y)."""
    return orbit_cameras(0.0, [0.0], distance=distance, fov_deg=fov, width=size, height=size, dtype=dtype)


def pixel_centres(size: int, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.arange(size, dtype=dtype) + 0.5
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return xs, ys


# ---------------------------------------------------------------------------------------------
# gradients: finite differences in float64 through projection, binning and chunked compositing


@pytest.mark.parametrize("param", PARAMS)
def test_gradcheck_each_parameter(param):
    scene = random_scene(batch=2, n=5, seed=3)
    cams = orbit_cameras(20.0, [10.0, 100.0], width=10, height=9, dtype=F64)
    fixed = {p: getattr(scene, p) for p in PARAMS}

    def render(x):
        g = Gaussians(**{**fixed, param: x})
        # small tiles and chunks so several tiles, chunks and row groups are crossed
        return stacked(render_gaussians(g, cams, background=(0.2, 0.5, 0.9), tile_size=4, chunk_size=2))

    x = fixed[param].clone().requires_grad_()
    # fast mode: checks u^T J v for random u, v (the full Jacobian of every pixel is checked below)
    assert torch.autograd.gradcheck(render, (x,), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_gradcheck_full_jacobian_of_a_tiny_scene():
    scene = random_scene(n=4, seed=8, spread=0.4)
    cams = orbit_cameras(-10.0, [30.0], width=7, height=6, fov_deg=30.0, dtype=F64)
    leaves = tuple(getattr(scene, p).clone().requires_grad_() for p in PARAMS)

    def render(*xs):
        return stacked(render_gaussians(Gaussians(*xs), cams, background=0.4, tile_size=4, chunk_size=2))

    assert render(*leaves)[:, :, 3].amax() > 0.5  # the Gaussians are in view
    assert torch.autograd.gradcheck(render, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_all_parameters_through_early_termination():
    # an opaque front layer terminates tiles early; the rendered function stays differentiable
    front = random_scene(n=12, seed=5, spread=0.15, min_scale=0.2, max_scale=0.3, opacity=(0.97, 0.98))
    back = random_scene(n=4, seed=6, spread=0.4)
    back.means = back.means - torch.tensor([0.0, 0.0, 0.8], dtype=F64)
    scene = concat_gaussians(front, back)
    cams = axis_camera(2.5, 8, fov=8.0)  # the front layer covers the whole view
    leaves = [getattr(scene, p).clone().requires_grad_() for p in PARAMS]

    def render(*xs):
        out = render_gaussians(Gaussians(*xs), cams, tile_size=4, chunk_size=2, min_transmittance=1e-3)
        return stacked(out)

    assert (1 - render(*leaves)[:, :, 3]).amax() < 1e-3  # so every tile stops before the back layer
    assert torch.autograd.gradcheck(render, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_gradients_reach_every_parameter_and_match_dense_autograd():
    scene = random_scene(batch=2, n=12, seed=11)
    cams = orbit_cameras(10.0, [0.0, 120.0, 240.0], width=20, height=16, dtype=F64)
    weights = torch.rand(2, 3, 8, 16, 20, generator=torch.Generator().manual_seed(0), dtype=F64)
    grads = []
    for render in (render_gaussians, render_gaussians_dense):
        leaves = Gaussians(*(getattr(scene, p).clone().requires_grad_() for p in PARAMS))
        (stacked(render(leaves, cams)) * weights).sum().backward()
        grads.append([getattr(leaves, p).grad for p in PARAMS])
    for p, tiled, dense in zip(PARAMS, *grads):
        assert tiled.abs().sum() > 0, f"no gradient reached {p}"
        torch.testing.assert_close(tiled, dense, atol=1e-7, rtol=1e-6, msg=lambda m, p=p: f"{p}: {m}")


# ---------------------------------------------------------------------------------------------
# closed forms


@pytest.mark.parametrize("offset", [0.0, 0.25])
def test_isotropic_gaussian_matches_its_analytic_footprint(offset):
    """EWA of N(m, s^2 I) seen from distance d: J = [[f/z, 0, -f x/z^2], [0, f/z, -f y/z^2]],
    Sigma2d = s^2 J J^T + eps I; alpha(p) = o exp(-(p - mu)^T Sigma2d^-1 (p - mu) / 2)."""
    d, size, s, o, eps = 3.0, 32, 0.08, 0.8, 0.3
    cams = axis_camera(d, size)
    f = cams.Ks[0, 0, 0].item()
    colour = torch.tensor([0.9, 0.2, 0.1], dtype=F64)
    scene = Gaussians(
        means=torch.tensor([[[offset, 0.0, 0.0]]], dtype=F64),
        scales=torch.full((1, 1, 3), s, dtype=F64),
        quats=torch.tensor([[[1.0, 0.0, 0.0, 0.0]]], dtype=F64),
        opacities=torch.full((1, 1), o, dtype=F64),
        colors=colour[None, None],
    )
    out = render_gaussians(scene, cams, background=(0.0, 0.0, 0.0))

    x, z = offset, d
    jac = torch.tensor([[f / z, 0.0, -f * x / z**2], [0.0, f / z, 0.0]], dtype=F64)
    cov = s**2 * jac @ jac.T + eps * torch.eye(2, dtype=F64)
    mu = torch.tensor([f * x / z + size / 2, size / 2], dtype=F64)
    xs, ys = pixel_centres(size)
    delta = torch.stack([xs - mu[0], ys - mu[1]], -1)
    q = torch.einsum("hwi,ij,hwj->hw", delta, torch.linalg.inv(cov), delta)
    alpha = o * torch.exp(-0.5 * q)
    alpha = torch.where(alpha >= ALPHA_MIN, alpha, torch.zeros_like(alpha))

    torch.testing.assert_close(out.alpha[0, 0, 0], alpha, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.rgb[0, 0], colour[:, None, None] * alpha, atol=1e-10, rtol=0)
    covered = alpha > 0
    torch.testing.assert_close(out.depth[0, 0, 0][covered], torch.full_like(alpha[covered], d))
    assert (out.depth[0, 0, 0][~covered] == 0).all()
    # a few pixels spelled out: the centre pixel and one three pixels to the right of it
    u, v = int(mu[0]), int(mu[1])
    assert out.alpha[0, 0, 0, v, u].item() == pytest.approx(alpha[v, u].item(), abs=1e-12)
    assert out.alpha[0, 0, 0, v, u + 3].item() == pytest.approx(alpha[v, u + 3].item(), abs=1e-12)
    # elongated along x off-axis (perspective stretch), round on the axis
    assert (cov[0, 0] > cov[1, 1]) == (offset > 0)


def fronto_parallel_sheet(
    z: float, flip: bool, n_side: int = 9, opacity: float = 0.95, dtype=F64
) -> Gaussians:
    """Flat Gaussians tiling the world plane z = const (normal +-z), densely enough to be opaque."""
    xs = torch.linspace(-0.6, 0.6, n_side, dtype=dtype)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    n = len(grid)
    means = torch.cat([grid, torch.full((n, 1), z, dtype=dtype)], -1)
    # flip: rotate 180 degrees about x so the local shortest axis points the other way
    quat = torch.tensor([0.0, 1.0, 0.0, 0.0] if flip else [1.0, 0.0, 0.0, 0.0], dtype=dtype)
    return Gaussians(
        means=means[None],
        scales=torch.tensor([0.12, 0.12, 0.002], dtype=dtype).expand(1, n, 3).clone(),
        quats=quat.expand(1, n, 4).clone(),
        opacities=torch.full((1, n), opacity, dtype=dtype),
        colors=torch.full((1, n, 3), 0.5, dtype=dtype),
    )


@pytest.mark.parametrize("flip", [False, True])
def test_fronto_parallel_sheet_has_exact_depth_and_camera_facing_normal(flip):
    d = 2.5
    out = render_gaussians(fronto_parallel_sheet(0.1, flip), axis_camera(d, 32))
    centre = (slice(None), slice(None), slice(None), slice(8, 24), slice(8, 24))
    assert (out.alpha[centre] > 0.99).all()
    torch.testing.assert_close(out.depth[centre], torch.full_like(out.depth[centre], d - 0.1))
    expected = torch.tensor([0.0, 0.0, -1.0], dtype=F64)[:, None, None].expand(3, 16, 16)
    torch.testing.assert_close(out.normal[0, 0, :, 8:24, 8:24], expected)


def test_sheet_seen_at_an_angle_has_its_rotated_normal():
    eye = torch.tensor([0.0, 1.5, 2.0], dtype=F64)  # looks down at the z = 0 sheet from 36.9 deg above
    cams = Cameras(look_at(eye)[None], orbit_cameras(0.0, [0.0], width=32, height=32, dtype=F64).Ks, 32, 32)
    out = render_gaussians(fronto_parallel_sheet(0.0, False), cams)
    world_normal = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    expected = cams.viewmats[0, :3, :3] @ world_normal
    torch.testing.assert_close(out.normal[0, 0, :, 14:18, 14:18], expected[:, None, None].expand(3, 4, 4))
    assert expected[2] < 0  # faces the camera


# ---------------------------------------------------------------------------------------------
# symmetry, culling, empty scenes


def symmetric_object(dtype=F64) -> Gaussians:
    """8-fold rotationally symmetric about y (rings at azimuths 10 + 45 k degrees, no mirror pairs)."""
    means, quats, scales, colours = [], [], [], []
    for height, radius, colour in ((0.25, 0.35, (0.9, 0.3, 0.1)), (-0.2, 0.5, (0.1, 0.6, 0.9))):
        for k in range(8):
            phi = math.radians(10 + 45 * k)
            means.append((radius * math.sin(phi), height, radius * math.cos(phi)))
            half = phi / 2  # rotation about y by phi, so each Gaussian's frame turns with the ring
            quats.append((math.cos(half), 0.0, math.sin(half), 0.0))
            scales.append((0.12, 0.06, 0.02))
            colours.append(colour)
    means.append((0.0, 0.0, 0.0))
    quats.append((1.0, 0.0, 0.0, 0.0))
    scales.append((0.15, 0.03, 0.15))
    colours.append((0.2, 0.9, 0.2))
    n = len(means)
    t = lambda x: torch.tensor(x, dtype=dtype)[None]  # noqa: E731
    return Gaussians(t(means), t(scales), t(quats), torch.full((1, n), 0.8, dtype=dtype), t(colours))


def test_rotating_the_camera_around_a_symmetric_object_leaves_renders_invariant():
    cams = orbit_cameras(20.0, [0.0, 45.0, 90.0, 135.0, 270.0], width=32, height=32, dtype=F64)
    out = render_gaussians(symmetric_object(), cams)
    assert out.alpha.amax() > 0.5
    for v in range(1, 5):
        for c in CHANNELS:
            torch.testing.assert_close(getattr(out, c)[:, v], getattr(out, c)[:, 0], atol=1e-9, rtol=0)
    # and the object is not trivially invariant: an off-symmetry azimuth renders differently
    other = render_gaussians(symmetric_object(), orbit_cameras(20.0, [20.0], width=32, height=32, dtype=F64))
    assert (other.rgb[:, 0] - out.rgb[:, 0]).abs().max() > 1e-2


def assert_empty(out: RenderOutput, background) -> None:
    bg = torch.as_tensor(background, dtype=out.rgb.dtype)[:, None, None]
    assert (out.alpha == 0).all() and (out.depth == 0).all() and (out.normal == 0).all()
    assert (out.rgb == bg.expand_as(out.rgb[0, 0])).all()


def test_gaussians_behind_the_camera_render_the_background_and_still_backpropagate():
    scene = random_scene(n=6)
    scene.means = scene.means + torch.tensor([0.0, 0.0, 5.0], dtype=F64)  # camera sits at z = 2.5
    leaves = Gaussians(*(getattr(scene, p).clone().requires_grad_() for p in PARAMS))
    out = render_gaussians(leaves, axis_camera(2.5, 16), background=(0.1, 0.2, 0.3))
    assert_empty(out, (0.1, 0.2, 0.3))
    stacked(out).sum().backward()
    assert all(torch.isfinite(getattr(leaves, p).grad).all() for p in PARAMS)
    assert leaves.colors.grad.abs().sum() == 0


def test_empty_scene_and_off_screen_and_transparent_gaussians_render_the_background():
    empty = Gaussians(*(torch.zeros(2, 0, k, dtype=F64) for k in (3, 3, 4)), torch.zeros(2, 0, dtype=F64),
                      torch.zeros(2, 0, 3, dtype=F64))  # fmt: skip
    assert_empty(render_gaussians(empty, axis_camera(2.5, 8), background=0.5), (0.5, 0.5, 0.5))
    off = random_scene(n=4)
    off.means = off.means + torch.tensor([40.0, 0.0, 0.0], dtype=F64)
    assert_empty(render_gaussians(off, axis_camera(2.5, 8)), (1.0, 1.0, 1.0))
    faint = random_scene(n=4, opacity=(0.0, 0.003))
    assert_empty(render_gaussians(faint, axis_camera(2.5, 8)), (1.0, 1.0, 1.0))


def test_near_plane_culls_gaussians_whose_centre_is_too_close():
    scene = random_scene(n=1, spread=0.0)
    near = render_gaussians(scene, axis_camera(2.5, 8), near_plane=2.6)
    assert (near.alpha == 0).all()
    far = render_gaussians(scene, axis_camera(2.5, 8), far_plane=2.4)
    assert (far.alpha == 0).all()
    assert render_gaussians(scene, axis_camera(2.5, 8)).alpha.amax() > 0.1


# ---------------------------------------------------------------------------------------------
# tiled renderer vs. dense all-pairs reference (gsplat's pure-torch projection + cumprod)


@pytest.mark.parametrize(
    ("tile_size", "chunk_size", "max_chunk_elements"), [(None, 16, 1 << 21), (16, 32, 1 << 21), (5, 3, 2000)]
)
def test_tiled_renderer_equals_dense_evaluation(tile_size, chunk_size, max_chunk_elements):
    scene = random_scene(batch=2, n=60, seed=2, spread=1.2, max_scale=0.2, opacity=(0.3, 1.0))
    scene.means[0, :5, 2] += 4.0  # a few behind the cameras of asset 0
    cams = orbit_cameras(15.0, [0.0, 90.0, 200.0], width=37, height=29, dtype=F64)
    kwargs = dict(background=(0.3, 0.6, 0.9), chunk_size=chunk_size, max_chunk_elements=max_chunk_elements)
    tiled = render_gaussians(scene, cams, tile_size=tile_size, **kwargs)
    dense = render_gaussians_dense(scene, cams, background=(0.3, 0.6, 0.9))
    assert tiled.rgb.shape == (2, 3, 3, 29, 37) and tiled.normal.shape == (2, 3, 3, 29, 37)
    assert tiled.alpha.shape == tiled.depth.shape == (2, 3, 1, 29, 37)
    assert_outputs_close(tiled, dense, atol=1e-5)


def test_tiled_renderer_equals_dense_in_float32_on_an_opaque_object():
    g = torch.Generator().manual_seed(4)
    dirs = torch.nn.functional.normalize(torch.randn(1, 400, 3, generator=g), dim=-1)
    scene = Gaussians(
        means=0.5 * dirs,
        scales=0.03 + 0.05 * torch.rand(1, 400, 3, generator=g),
        quats=torch.randn(1, 400, 4, generator=g),
        opacities=0.8 + 0.2 * torch.rand(1, 400, generator=g),
        colors=torch.rand(1, 400, 3, generator=g),
    )
    cams = orbit_cameras(15.0, [0.0, 90.0], distance=2.5, fov_deg=40.0, width=48, height=48)
    tiled, dense = render_gaussians(scene, cams), render_gaussians_dense(scene, cams)
    for c in ("rgb", "alpha"):
        torch.testing.assert_close(getattr(tiled, c), getattr(dense, c), atol=1e-5, rtol=0)
    # depth and normal are divided by alpha, which amplifies float32 rounding at faint edges
    torch.testing.assert_close(tiled.normal, dense.normal, atol=5e-5, rtol=0)
    torch.testing.assert_close(tiled.depth, dense.depth, atol=5e-5, rtol=1e-5)


def test_early_termination_skips_hidden_chunks_within_its_bound(monkeypatch):
    front = fronto_parallel_sheet(0.3, False, n_side=17, opacity=0.99)
    back = fronto_parallel_sheet(-0.3, False, n_side=13)
    back.colors = torch.zeros_like(back.colors)
    scene = concat_gaussians(front, back)
    cams = axis_camera(2.5, 16, fov=20.0)  # fully covered by the front sheet
    evaluated = []
    original = splat_torch._evaluate_chunk

    def counting(*args):
        chunk = original(*args)
        evaluated.append(chunk.ids.numel())
        return chunk

    monkeypatch.setattr(splat_torch, "_evaluate_chunk", counting)
    results = {}
    for min_t in (1e-6, 0.0):
        evaluated.clear()
        out = render_gaussians(scene, cams, chunk_size=8, min_transmittance=min_t)
        results[min_t] = (out, sum(evaluated))
    (early, work_early), (full, work_full) = results[1e-6], results[0.0]
    assert work_early < 0.7 * work_full
    assert (1 - early.alpha).amax() < 1e-6
    assert_outputs_close(early, full, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# inputs: validation and errors that name the problem


def test_non_unit_quaternions_are_normalised():
    scene = random_scene(n=6)
    unit = Gaussians(scene.means, scene.scales, scene.quats / scene.quats.norm(dim=-1, keepdim=True),
                     scene.opacities, scene.colors)  # fmt: skip
    cams = axis_camera(2.5, 12)
    scaled = Gaussians(scene.means, scene.scales, 3.7 * unit.quats, scene.opacities, scene.colors)
    assert_outputs_close(render_gaussians(scaled, cams), render_gaussians(unit, cams), atol=1e-12)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("means", torch.full((1, 4, 3), float("nan"), dtype=F64), "Gaussians.means contains NaN"),
        ("scales", torch.zeros(1, 4, 3, dtype=F64), "Gaussians.scales must be > 0"),
        ("quats", torch.zeros(1, 4, 4, dtype=F64), "zero quaternion"),
        ("opacities", torch.full((1, 4), 2.0, dtype=F64), "opacities must be probabilities"),
        ("colors", torch.zeros(1, 4, 4, dtype=F64), r"Gaussians.colors must have shape \[1, 4, 3\]"),
        ("colors", torch.zeros(1, 4, 3, dtype=torch.float32), "Gaussians.colors has dtype"),
    ],
)
def test_bad_gaussians_raise_an_error_naming_the_field(field, value, message):
    scene = random_scene(n=4)
    setattr(scene, field, value)
    with pytest.raises(InvalidGaussiansError, match=message):
        render_gaussians(scene, axis_camera(2.5, 8))


def test_bad_render_arguments_are_named():
    scene, cams = random_scene(n=3), axis_camera(2.5, 8)
    with pytest.raises(TypeError, match="gaussians must be r2d3.render.Gaussians"):
        render_gaussians(scene.means, cams)
    with pytest.raises(ValueError, match="batch size mismatch"):
        render_gaussians(scene, Cameras(cams.viewmats.expand(2, 1, 4, 4), cams.Ks.expand(2, 1, 3, 3), 8, 8))
    with pytest.raises(ValueError, match="background"):
        render_gaussians(scene, cams, background=(1.0, 1.0))
    with pytest.raises(ValueError, match="does not broadcast"):
        render_gaussians(scene, cams, background=torch.ones(3, 5, 3))
    with pytest.raises(ValueError, match="background contains NaN"):
        render_gaussians(scene, cams, background=float("nan"))
    with pytest.raises(ValueError, match="unknown render backend 'optix'"):
        render_gaussians(scene, cams, backend="optix")
    with pytest.raises(ValueError, match="tile_size and chunk_size must be positive"):
        render_gaussians(scene, cams, tile_size=0)
    with pytest.raises(ValueError, match="min_transmittance"):
        render_gaussians(scene, cams, min_transmittance=1.0)
    with pytest.raises(ValueError, match="near_plane"):
        render_gaussians(scene, cams, near_plane=0.0)
    with pytest.raises(ValueError, match="gsplat backend needs float32 CUDA tensors"):
        render_gaussians(scene, cams, backend="gsplat")


def test_per_view_background_and_unbatched_cameras():
    scene = random_scene(batch=2, n=3)
    scene.means = scene.means + torch.tensor([0.0, 0.0, 9.0], dtype=F64)  # all behind: pure background
    bg = torch.rand(2, 3, 3, dtype=F64)
    cams = orbit_cameras(0.0, [0.0, 1.0, 2.0], width=6, height=5, dtype=F64)
    out = render_gaussians(scene, cams, background=bg)
    torch.testing.assert_close(out.rgb, bg[..., None, None].expand(2, 3, 3, 5, 6))
    assert out.cameras.viewmats.shape == (2, 3, 4, 4) and out.cameras.viewmats.dtype == F64


# ---------------------------------------------------------------------------------------------
# backends


def test_auto_backend_is_torch_on_cpu_and_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(splat, "_logged_choices", set())
    with caplog.at_level(logging.INFO, logger="r2d3.render.splat"):
        assert select_backend("auto", torch.device("cpu"), torch.float32) == "torch"
        assert select_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["render_gaussians: backend 'auto' -> 'torch' (tensors are on cpu)"]


def test_auto_backend_rules_for_cuda_tensors(monkeypatch):
    from r2d3.render.splat_gsplat import gsplat_available

    assert isinstance(gsplat_available(), bool)
    cuda = torch.device("cuda")
    monkeypatch.setattr(splat, "gsplat_available", lambda: True)
    assert select_backend("auto", cuda, torch.float32) == "gsplat"
    assert select_backend("auto", cuda, torch.float64) == "torch"
    monkeypatch.setattr(splat, "gsplat_available", lambda: False)
    assert select_backend("auto", cuda, torch.float32) == "torch"
    assert select_backend("torch", cuda, torch.float32) == "torch"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gsplat_matches_the_torch_reference_forward_and_backward():
    pytest.importorskip("gsplat")
    # opacities <= 0.9 keep alpha under both clamps (0.99 here, 0.999 in gsplat) and transmittance
    # above gsplat's 1e-4 per-pixel cut-off, so the two differ only by float rounding.
    scene = random_scene(batch=2, n=200, seed=7, dtype=torch.float32, spread=0.8, opacity=(0.2, 0.6))
    scene = scene.to("cuda")
    cams = orbit_cameras(15.0, [0.0, 90.0, 180.0], width=64, height=48, device="cuda")
    weights = torch.rand(2, 3, 8, 48, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    outs, grads = [], []
    for backend in ("gsplat", "torch"):
        leaves = Gaussians(*(getattr(scene, p).clone().requires_grad_() for p in PARAMS))
        out = render_gaussians(leaves, cams, backend=backend, tile_size=16)
        (stacked(out) * weights).sum().backward()
        outs.append(out)
        grads.append([getattr(leaves, p).grad for p in PARAMS])
    assert_outputs_close(outs[0], outs[1], atol=2e-3)
    for p, fast, ref in zip(PARAMS, *grads):
        scale = ref.abs().max().clamp_min(1e-6)
        assert (fast - ref).abs().max() / scale < 2e-2, f"gsplat gradient of {p} differs"


def fake_gsplat_rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kwargs):
    """gsplat.rasterization's contract on CPU: gsplat's own pure-torch projection + dense compositing."""
    from r2d3.render.dense_reference import composite_dense, project_dense

    assert colors.shape[:-1] == viewmats.shape[:2] + means.shape[1:2]  # per-view features [B, V, N, D]
    assert kwargs["packed"] is False and kwargs["render_mode"] == "RGB"
    g = Gaussians(means, scales, quats / quats.norm(dim=-1, keepdim=True), opacities, colors[:, 0, :, :3])
    means2d, conics, depths, keep = project_dense(g, Cameras(viewmats, Ks, width, height), kwargs["eps2d"],
                                                  covars=kwargs.get("covars"))  # gsplat: covars replace quats
    acc, alpha = composite_dense(means2d, conics, opacities[:, None] * keep, colors, depths, width, height)
    return acc.permute(0, 1, 3, 4, 2), alpha.permute(0, 1, 3, 4, 2), {}


def test_gsplat_glue_matches_the_torch_backend_with_a_cpu_stand_in(monkeypatch):
    from r2d3.render.inputs import background_tensor, validate_cameras
    from r2d3.render.splat_gsplat import render_gsplat

    scene = random_scene(batch=2, n=30, seed=9, spread=0.9).validate()
    cams = validate_cameras(orbit_cameras(15.0, [0.0, 90.0, 180.0], width=24, height=20, dtype=F64), 2)
    bg = background_tensor((0.1, 0.2, 0.3), 2, 3, F64, "cpu")
    out = render_gsplat(scene, cams, bg, rasterize=fake_gsplat_rasterization)
    assert_outputs_close(out, render_gaussians(scene, cams, background=(0.1, 0.2, 0.3)), atol=1e-6)


def test_gaussians_container_helpers():
    scene = random_scene(batch=3, n=4)
    assert scene.to(torch.float32).means.dtype == torch.float32
    assert scene[1].batch_size == 1 and scene[0:2].batch_size == 2 and scene.num_gaussians == 4
    assert Gaussians.cat([scene[0], scene[2]]).batch_size == 2
    assert not scene.detach().means.requires_grad
    with pytest.raises(InvalidGaussiansError, match=r"means must have shape \[B, N, 3\]"):
        Gaussians(scene.means[0], scene.scales, scene.quats, scene.opacities, scene.colors).validate()
    with pytest.raises(InvalidGaussiansError, match="must be a torch.Tensor"):
        Gaussians(scene.means, scene.scales.tolist(), scene.quats, scene.opacities, scene.colors).validate()
    with pytest.raises(InvalidGaussiansError, match="must be floating point"):
        Gaussians(scene.means, scene.scales, scene.quats, scene.opacities.long(), scene.colors).validate()
    raw = scene.validate(normalize_quats=False)
    assert torch.equal(raw.quats, scene.quats)


# ------------------------------------------------------------------------------------ raw quaternions


def official_cov3d(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Transcribed from the 3DGS / RaDe-GS CUDA ``computeCov3D`` DiffSplat renders with: ``r, x, y, z = rot``
    as given (no normalisation), ``glm::mat3 R(...)`` filled column by column, ``M = S * R``,
    ``Sigma = transpose(M) * M``."""
    r, x, y, z = quats.unbind(-1)
    columns = [torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - r * z), 2 * (x * z + r * y)], -1),
               torch.stack([2 * (x * y + r * z), 1 - 2 * (x * x + z * z), 2 * (y * z - r * x)], -1),
               torch.stack([2 * (x * z - r * y), 2 * (y * z + r * x), 1 - 2 * (x * x + y * y)], -1)]
    glm_r = torch.stack(columns, dim=-1)  # [..., row, column]
    m = torch.diag_embed(scales) @ glm_r
    return m.transpose(-1, -2) @ m


def test_raw_quaternions_render_the_official_covariance():
    """render(raw_quaternions=True) composites the footprints of the reference kernel's covariance built from
    the quaternion as given (compared with gsplat's pure-torch projection of that covariance and dense
    compositing); unit quaternions render as before, scaled ones differently; gradients reach the raw
    quaternion (finite differences); the gsplat glue hands gsplat the same covariances."""
    from gsplat.cuda._torch_impl import _fully_fused_projection

    from r2d3.render.dense_reference import composite_dense
    from r2d3.render.inputs import background_tensor, validate_cameras
    from r2d3.render.splat_gsplat import render_gsplat

    scene = random_scene(batch=1, n=12, seed=4, spread=0.8)
    unit = scene.validate()
    g = torch.Generator().manual_seed(5)
    raw = Gaussians(unit.means, unit.scales, unit.quats * (0.4 + torch.rand(1, 12, 1, generator=g, dtype=F64)),
                    unit.opacities, unit.colors)
    cams = validate_cameras(orbit_cameras(15.0, [0.0, 120.0], width=24, height=24, dtype=F64), 1)
    out = render_gaussians(raw, cams, background=(0.0, 0.0, 0.0), raw_quaternions=True)

    covars = official_cov3d(raw.quats, raw.scales)
    radii, means2d, depths, conics, _ = _fully_fused_projection(raw.means, covars, cams.viewmats, cams.Ks, 24, 24,
                                                                eps2d=0.3, near_plane=0.01)
    keep = (radii > 0).all(-1)
    acc, cover = composite_dense(means2d, conics, raw.opacities[:, None] * keep,
                                 raw.colors[:, None].expand(1, 2, 12, 3), depths, 24, 24)
    torch.testing.assert_close(out.rgb, acc, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.alpha, cover, atol=1e-6, rtol=0)

    plain = render_gaussians(unit, cams, background=(0.0, 0.0, 0.0))
    assert_outputs_close(render_gaussians(unit, cams, background=(0.0, 0.0, 0.0), raw_quaternions=True), plain, 1e-12)
    assert_outputs_close(render_gaussians(raw, cams, background=(0.0, 0.0, 0.0)), plain, 1e-12)  # normalised
    assert (out.alpha - plain.alpha).abs().max() > 1e-2

    q = raw.quats.clone().requires_grad_(True)
    loss = lambda q: render_gaussians(Gaussians(raw.means, raw.scales, q, raw.opacities, raw.colors), cams,  # noqa: E731
                                      raw_quaternions=True).alpha.sum()
    (grad,) = torch.autograd.grad(loss(q), q)
    h, i = 1e-6, (0, 3, 2)
    bump = torch.zeros_like(q)
    bump[i] = h
    fd = (loss(raw.quats + bump) - loss(raw.quats - bump)) / (2 * h)
    assert float(grad[i]) == pytest.approx(float(fd), rel=1e-4, abs=1e-8) and grad.abs().sum() > 0

    bg = background_tensor((0.0, 0.0, 0.0), 1, 2, F64, "cpu")
    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        return fake_gsplat_rasterization(*args, **kwargs)

    glued = render_gsplat(raw.validate(), cams, bg, rasterize=capture, raw_quats=raw.quats)
    torch.testing.assert_close(seen["covars"], covars, atol=1e-12, rtol=0)
    torch.testing.assert_close(glued.rgb, out.rgb, atol=1e-6, rtol=0)
