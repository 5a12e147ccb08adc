"""Procedural geometry: coloured primitives as surface Gaussian splats.

The targets must be clean, since a model is pretrained on them and evaluation renders them:

- Each asset has exactly ``num_gaussians`` Gaussians spread uniformly by area over the analytic
  surface (a scrambled Sobol sequence, randomly shifted per object, so faces and caps are covered
  without clumps), each a flat disc tangent to the surface: its shortest axis (``scales[..., 2]``,
  third column of its rotation) is the outward unit normal, the tangential standard deviation is
  ``tangent_scale * sqrt(area / N)`` (narrowed towards sharp edges so cubes stay crisp) and the
  normal one a tenth of that. Opacities are in [0.9, 1.0). Colours are the palette colours with a
  mild baked shading (:data:`SHADING`) so flat-shaded renders still read as 3D.
- Generation is vectorised over objects of the same shape; ten thousand 512-Gaussian objects take
  a few seconds on a laptop CPU, so nothing is stored on disk.

Geometry conventions follow :mod:`r2d3.render.gaussians`: y up, objects centred at the origin and
inside ``[-HALF_EXTENT, HALF_EXTENT]^3`` for any yaw and tilts up to :data:`MAX_TILT_DEG`. Objects
stand upright (random rotation about y, then a small tilt) so "tall" stays meaningful; the torus
stands on its rim (ring in a vertical plane) because a lying ring seen from the usual 15-20 degree
camera elevation hides its hole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor

from r2d3.data.procedural.grammar import (
    _RATIOS,
    COLORS,
    PATTERNS,
    PRIMARY_COLORS,
    SHAPES,
    ShapeAttributes,
)
from r2d3.render.gaussians import Gaussians
from r2d3.render.quaternions import splat_quats

SIZE_SCALES: dict[str, float] = {"small": 0.55, "medium": 0.78, "large": 1.0}

HALF_EXTENT = 0.6
"""Large objects just fit inside ``[-HALF_EXTENT, HALF_EXTENT]^3``."""
MAX_TILT_DEG = 10.0
"""Default largest tilt away from upright; the fit inside the box is guaranteed up to this tilt."""
TANGENT_SCALE = 0.6
"""Tangential standard deviation of a Gaussian in units of the mean spacing ``sqrt(area / N)``."""
NORMAL_SCALE_RATIO = 0.1
"""Standard deviation along the normal relative to the tangential one (flat discs)."""
SHADING = 0.35
"""Strength of the lighting baked into colours: ``color * (1 - SHADING + SHADING * (0.5 + 0.5 n.l))`` for a
fixed world light :data:`LIGHT_DIRECTION`. Splat colours are view-independent and the renderer does no
lighting, so without it a cube renders as a flat hexagon and a sphere as a disc; the factor only
scales brightness, so the hue (the colour label) is unchanged."""
LIGHT_DIRECTION = (0.36, 0.80, 0.48)
"""Unit vector towards the baked light: above, in front (+z) and to the right (+x)."""
EDGE_SCALE_RATIO = 0.5
"""Near a sharp edge a splat's standard deviation towards it is at most this times the distance, ..."""
EDGE_MIN_SCALE = 0.3
"""... but at least this times the tangential one, so edges stay covered."""
NUM_STRIPE_BANDS = 7  # alternating body/stripe bands along the axis: 3 stripes
NUM_TORUS_STRIPE_SEGMENTS = 8  # alternating segments around a ring: 4 stripes


def _support(eta: float, rho: float, lo: float, hi: float) -> float:
    """max of eta * x + rho * sqrt(1 - x^2) over x in [lo, hi] (support of a cylinder along a direction
    whose cosine with the cylinder axis lies in [lo, hi])."""
    x = min(max(eta / math.hypot(eta, rho), lo), hi)
    return eta * x + rho * math.sqrt(max(0.0, 1.0 - x * x))


def _bounding_cylinder(shape: str, dims: tuple[float, ...]) -> tuple[float, float]:
    """(radius, half-height) of a y-axis cylinder around the origin containing the shape."""
    if shape == "sphere":
        return dims[0], dims[0]
    if shape == "cube":
        return math.hypot(dims[0], dims[2]), dims[1]
    if shape in ("cylinder", "cone"):
        return dims[0], dims[1]
    if shape == "torus":
        return dims[0] + dims[1], dims[0] + dims[1]
    if shape == "capsule":
        return dims[0], dims[1] + dims[0]
    return math.sqrt(2.0) * dims[0], dims[1]  # pyramid


def _half_extents_xy(shape: str, dims: tuple[float, ...]) -> tuple[float, float]:
    """Half-extents of the upright shape along x and y (for placing two-tone halves and stripes)."""
    if shape == "cube":
        return dims[0], dims[1]
    rho, eta = _bounding_cylinder(shape, dims)
    return (dims[0] if shape == "pyramid" else rho), eta


def shape_dimensions(shape: str, aspect: str = "regular", size: str = "medium") -> tuple[float, ...]:
    """The shape's parameters (meaning per shape in :data:`_RATIOS`'s comment) in world units.

    Scaled so a ``large`` object at any yaw and tilt up to :data:`MAX_TILT_DEG` just fits inside
    ``[-HALF_EXTENT, HALF_EXTENT]^3``; ``medium`` and ``small`` are :data:`SIZE_SCALES` of that.
    """
    ShapeAttributes(shape, PRIMARY_COLORS[0], size=size, aspect=aspect)  # validates the names
    ratios = _RATIOS[shape][aspect]
    if shape == "sphere":
        extent = ratios[0]
    else:
        rho, eta = _bounding_cylinder(shape, ratios)
        tilt = math.radians(MAX_TILT_DEG)
        horizontal = _support(eta, rho, 0.0, math.sin(tilt))
        vertical = _support(eta, rho, math.cos(tilt), 1.0)
        extent = max(horizontal, vertical)
    scale = HALF_EXTENT * SIZE_SCALES[size] / extent
    return tuple(r * scale for r in ratios)


class SurfaceSample(NamedTuple):
    """Points on an upright shape (object frame) and what is needed to shape a splat around each.

    ``edge_dir`` is the unit in-surface direction towards the nearest sharp edge (a face border, a
    cap rim, a cone apex) and ``edge_dist`` the distance to it; smooth surfaces have no edges
    (``edge_dist = inf``, ``edge_dir = 0``). Splats are narrowed along ``edge_dir`` near edges so
    they do not stick out past them (otherwise cubes and cylinders render with furry borders).
    """

    points: Tensor  # [G, N, 3]
    normals: Tensor  # [G, N, 3] outward, unit
    areas: Tensor  # [G] total surface area
    edge_dir: Tensor  # [G, N, 3]
    edge_dist: Tensor  # [G, N]


def _gather(per_face: Tensor, idx: Tensor) -> Tensor:
    """``per_face`` ``[G, F, C]`` indexed by ``idx`` ``[G, N]`` -> ``[G, N, C]``."""
    return torch.gather(per_face, 1, idx[..., None].expand(*idx.shape, per_face.shape[-1]))


def _pick_face(areas: Tensor, u: Tensor) -> Tensor:
    """Face index per point ``[G, N]``, chosen with probability proportional to ``areas`` ``[G, F]``."""
    cdf = areas.cumsum(-1) / areas.sum(-1, keepdim=True)
    return torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=areas.shape[-1] - 1)


def _xyz(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    return torch.stack(torch.broadcast_tensors(x, y, z), dim=-1)


def _smooth(points: Tensor, normals: Tensor, areas: Tensor) -> SurfaceSample:
    inf = torch.full(points.shape[:-1], math.inf, dtype=points.dtype)
    return SurfaceSample(points, normals, areas, torch.zeros_like(points), inf)


def _sample_sphere(d: Tensor, u: Tensor) -> SurfaceSample:
    r = d[:, 0:1]
    y = 1 - 2 * u[..., 1]  # uniform height is area-uniform on a sphere (Archimedes)
    theta = 2 * math.pi * u[..., 2]
    rho = (1 - y * y).clamp(min=0).sqrt()
    normals = _xyz(rho * theta.cos(), y, rho * theta.sin())
    return _smooth(r[..., None] * normals, normals, 4 * math.pi * r[:, 0] ** 2)


def _sample_cube(d: Tensor, u: Tensor) -> SurfaceSample:
    face_area = 4 * torch.stack([d[:, 1] * d[:, 2], d[:, 0] * d[:, 2], d[:, 0] * d[:, 1]], -1)  # per axis
    idx = _pick_face(face_area.repeat_interleave(2, dim=-1), u[..., 0])  # faces +x -x +y -y +z -z
    axis, sign = idx // 2, 1.0 - 2.0 * (idx % 2).to(u.dtype)
    axis1, axis2 = (axis + 1) % 3, (axis + 2) % 3
    a1, a2 = 2 * u[..., 1] - 1, 2 * u[..., 2] - 1  # in-face coordinates in [-1, 1]
    unit = torch.zeros_like(u)
    unit.scatter_(-1, axis[..., None], sign[..., None])
    unit.scatter_(-1, axis1[..., None], a1[..., None])
    unit.scatter_(-1, axis2[..., None], a2[..., None])
    extents = d[:, None, :].expand_as(u)
    e1, e2 = extents.gather(-1, axis1[..., None])[..., 0], extents.gather(-1, axis2[..., None])[..., 0]
    dist1, dist2 = e1 * (1 - a1.abs()), e2 * (1 - a2.abs())
    first = dist1 <= dist2
    edge_axis = torch.where(first, axis1, axis2)
    edge_sign = torch.where(first, a1, a2).sign()
    edge_dir = torch.zeros_like(u).scatter_(-1, edge_axis[..., None], edge_sign[..., None])
    normals = torch.zeros_like(u).scatter_(-1, axis[..., None], sign[..., None])
    edge_dist = torch.minimum(dist1, dist2)
    return SurfaceSample(unit * extents, normals, 2 * face_area.sum(-1), edge_dir, edge_dist)


def _sample_cylinder(d: Tensor, u: Tensor) -> SurfaceSample:
    r, h = d[:, 0:1], d[:, 1:2]
    areas = torch.cat([2 * math.pi * r * 2 * h, math.pi * r * r, math.pi * r * r], -1)  # side, top, bottom
    idx = _pick_face(areas, u[..., 0])
    side = idx == 0
    theta = 2 * math.pi * u[..., 1]
    c, s, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    # side: (theta, height); caps: (theta, area-uniform radius)
    y_side = (2 * u[..., 2] - 1) * h
    rho = r * u[..., 2].sqrt()
    cap_sign = torch.where(idx == 1, 1.0, -1.0).to(u.dtype)
    radius = torch.where(side, r.expand_as(rho), rho)
    y = torch.where(side, y_side, cap_sign * h)
    points = _xyz(radius * c, y, radius * s)
    normals = torch.where(side[..., None], _xyz(c, zero, s), _xyz(zero, cap_sign, zero))
    edge_dir = torch.where(side[..., None], _xyz(zero, y_side.sign(), zero), _xyz(c, zero, s))
    edge_dist = torch.where(side, h - y_side.abs(), r - rho)
    return SurfaceSample(points, normals, areas.sum(-1), edge_dir, edge_dist)


def _sample_cone(d: Tensor, u: Tensor) -> SurfaceSample:
    r, h = d[:, 0:1], d[:, 1:2]  # apex at +h, base at -h
    slant = (r * r + 4 * h * h).sqrt()
    areas = torch.cat([math.pi * r * slant, math.pi * r * r], -1)  # lateral, base
    idx = _pick_face(areas, u[..., 0])
    lateral = idx == 0
    theta = 2 * math.pi * u[..., 1]
    c, s, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    # lateral: fraction t of the way from apex to rim (sqrt: circumference grows linearly); base: radius
    t = u[..., 2].sqrt()
    rho = r * t  # the same map is area-uniform on the lateral surface (as a radius) and on the base
    y = torch.where(lateral, h - 2 * h * t, -h.expand_as(t))
    points = _xyz(rho * c, y, rho * s)
    lateral_n = _xyz(2 * h * c, r.expand_as(c), 2 * h * s) / slant[..., None]
    normals = torch.where(lateral[..., None], lateral_n, _xyz(zero, -torch.ones_like(c), zero))
    down_slant = _xyz(r * c, -2 * h.expand_as(c), r * s) / slant[..., None]  # apex -> rim, unit
    near_apex = t < 0.5
    lateral_dir = torch.where(near_apex[..., None], -down_slant, down_slant)
    lateral_dist = torch.where(near_apex, t, 1 - t) * slant
    edge_dir = torch.where(lateral[..., None], lateral_dir, _xyz(c, zero, s))
    edge_dist = torch.where(lateral, lateral_dist, r - rho)
    return SurfaceSample(points, normals, areas.sum(-1), edge_dir, edge_dist)


def _sample_torus(d: Tensor, u: Tensor) -> SurfaceSample:
    big, small = d[:, 0:1], d[:, 1:2]  # ring radius, tube radius; the ring stands upright in the xy plane
    # Area density along the tube angle phi is proportional to (R + r cos phi): invert its CDF
    # R phi + r sin phi = 2 pi R u by Newton's method (monotone, derivative >= R - r > 0).
    # Starting from the first-order inverse, four steps reach float64 round-off for r / R <= 0.5.
    uniform = 2 * math.pi * u[..., 2]
    target = big * uniform
    phi = uniform - (small / big) * uniform.sin()
    for _ in range(4):
        phi = phi - (big * phi + small * phi.sin() - target) / (big + small * phi.cos())
    theta = 2 * math.pi * u[..., 1]
    c, s = theta.cos(), theta.sin()
    cp, sp = phi.cos(), phi.sin()
    ring = big + small * cp
    points = _xyz(ring * c, ring * s, small * sp)
    normals = _xyz(cp * c, cp * s, sp)
    return _smooth(points, normals, 4 * math.pi**2 * big[:, 0] * small[:, 0])


def _sample_capsule(d: Tensor, u: Tensor) -> SurfaceSample:
    r, h = d[:, 0:1], d[:, 1:2]  # a cylinder of half-height h with hemispherical caps of radius r
    areas = torch.cat([2 * math.pi * r * 2 * h, 2 * math.pi * r * r, 2 * math.pi * r * r], -1)
    idx = _pick_face(areas, u[..., 0])
    side = idx == 0
    theta = 2 * math.pi * u[..., 1]
    c, s = theta.cos(), theta.sin()
    sign = torch.where(idx == 1, 1.0, -1.0).to(u.dtype)
    height = u[..., 2]  # uniform in height: area-uniform on the hemisphere too
    rho = torch.where(side, torch.ones_like(height), (1 - height * height).clamp(min=0).sqrt())
    ny = torch.where(side, torch.zeros_like(height), sign * height)
    normals = _xyz(rho * c, ny, rho * s)
    centre_y = torch.where(side, (2 * height - 1) * h, sign * h)
    points = r[..., None] * normals + _xyz(torch.zeros_like(c), centre_y, torch.zeros_like(c))
    return _smooth(points, normals, areas.sum(-1))


def _sample_pyramid(d: Tensor, u: Tensor) -> SurfaceSample:
    a, h = d[:, 0], d[:, 1]  # square base of half-side a at y = -h, apex at y = +h
    zero = torch.zeros_like(a)
    apex = torch.stack([zero, h, zero], -1)
    corners = [torch.stack([sx * a, -h, sz * a], -1) for sx, sz in ((1, 1), (1, -1), (-1, -1), (-1, 1))]
    triangles = [(apex, corners[i], corners[(i + 1) % 4]) for i in range(4)]
    triangles += [(corners[0], corners[1], corners[2]), (corners[0], corners[2], corners[3])]  # the base
    verts = torch.stack([torch.stack(t, 1) for t in triangles], 1)  # [G, 6 faces, 3 vertices, 3]
    cross = torch.linalg.cross(verts[:, :, 1] - verts[:, :, 0], verts[:, :, 2] - verts[:, :, 0])
    areas = cross.norm(dim=-1) / 2
    face_normals = torch.nn.functional.normalize(cross, dim=-1)
    # The origin is inside this convex solid: flip normals that point towards it.
    face_normals = face_normals * torch.sign((face_normals * verts.mean(2)).sum(-1, keepdim=True))
    # In-plane outward normals of each triangle's edges (v_i -> v_{i+1}); the base's diagonal is no
    # edge of the solid, so its distance is infinite.
    starts, ends = verts, verts.roll(-1, dims=2)
    edge_out = torch.linalg.cross(ends - starts, face_normals[:, :, None].expand_as(starts))
    edge_out = torch.nn.functional.normalize(edge_out, dim=-1)
    inward = ((verts.mean(2, keepdim=True) - starts) * edge_out).sum(-1, keepdim=True) > 0
    edge_out = torch.where(inward, -edge_out, edge_out)
    idx = _pick_face(areas, u[..., 0])
    v = _gather(verts.flatten(2), idx).unflatten(-1, (3, 3))  # [G, N, 3 vertices, 3]
    s = u[..., 1:2].sqrt()  # area-uniform barycentric coordinates
    w = u[..., 2:3]
    points = (1 - s) * v[..., 0, :] + s * (1 - w) * v[..., 1, :] + s * w * v[..., 2, :]
    out = _gather(edge_out.flatten(2), idx).unflatten(-1, (3, 3))  # [G, N, 3 edges, 3]
    dist = ((v - points[..., None, :]) * out).sum(-1)  # distance to each edge line, >= 0 inside
    diagonal = torch.tensor([[False, False, False]] * 4 + [[False, False, True], [True, False, False]])
    dist = torch.where(diagonal[idx], math.inf, dist)
    nearest = dist.argmin(-1, keepdim=True)
    edge_dir = out.gather(-2, nearest[..., None].expand(*nearest.shape, 3))[..., 0, :]
    edge_dist = dist.gather(-1, nearest)[..., 0]
    return SurfaceSample(points, _gather(face_normals, idx), areas.sum(-1), edge_dir, edge_dist)


_SAMPLERS = {
    "sphere": _sample_sphere,
    "cube": _sample_cube,
    "cylinder": _sample_cylinder,
    "cone": _sample_cone,
    "torus": _sample_torus,
    "capsule": _sample_capsule,
    "pyramid": _sample_pyramid,
}


def sample_surface(
    shape: str,
    dims: Tensor,
    num_points: int,
    generator: torch.Generator | None = None,
    shift: Tensor | None = None,
) -> SurfaceSample:
    """Area-uniform points on upright shapes (object frame, centred at the origin).

    Args:
        shape: one of :data:`SHAPES`.
        dims: ``[G, D]`` shape parameters (see :func:`shape_dimensions`); their dtype is the output's.
        num_points: N points per shape.
        generator: draws the per-shape random shift when ``shift`` is not given.
        shift: ``[G, 3]`` in [0, 1): the Cranley-Patterson rotation of the shared Sobol points.
    """
    if shape not in _SAMPLERS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if shift is None:
        shift = torch.rand(dims.shape[0], 3, generator=generator, dtype=dims.dtype)
    u = (_sobol_points(num_points)[None].to(dims.dtype) + shift[:, None, :].to(dims.dtype)) % 1.0
    return _SAMPLERS[shape](dims, u)


@lru_cache(maxsize=8)
def _sobol_points(n: int) -> Tensor:
    """The first n points of a fixed scrambled 3D Sobol sequence (shared by all objects)."""
    return torch.quasirandom.SobolEngine(3, scramble=True, seed=20250618).draw(n, dtype=torch.float64)


def _rotation_matrices(yaw: Tensor, tilt: Tensor, tilt_axis: Tensor) -> Tensor:
    """``[G, 3, 3]``: yaw about +y, then tilt by ``tilt`` about the horizontal axis at angle ``tilt_axis``
    (all radians)."""
    cy, sy = yaw.cos(), yaw.sin()
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)
    r_yaw = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).view(-1, 3, 3)
    k = torch.stack([tilt_axis.cos(), zero, tilt_axis.sin()], -1)  # unit horizontal axis
    kx = torch.zeros(len(yaw), 3, 3, dtype=yaw.dtype)
    kx[:, 0, 1], kx[:, 0, 2], kx[:, 1, 0] = -k[:, 2], k[:, 1], k[:, 2]
    kx[:, 1, 2], kx[:, 2, 0], kx[:, 2, 1] = -k[:, 0], -k[:, 1], k[:, 0]
    st, ct = tilt.sin()[:, None, None], tilt.cos()[:, None, None]
    r_tilt = torch.eye(3, dtype=yaw.dtype) + st * kx + (1 - ct) * (kx @ kx)  # Rodrigues
    return r_tilt @ r_yaw



def _secondary_mask(shape: str, pattern: Tensor, dims: tuple[Tensor, ...], points: Tensor) -> Tensor:
    """Which points take the second colour ``[G, N]`` (object frame, before the pose)."""
    ex, ey = dims
    use_y = ey >= 0.75 * ex  # split / stripe along y unless the object is clearly wider than tall
    coord = torch.where(use_y[:, None], points[..., 1], points[..., 0])
    mask = torch.zeros(coord.shape, dtype=torch.bool)
    two_tone, striped = pattern == PATTERNS.index("two-tone"), pattern == PATTERNS.index("striped")
    if two_tone.any():
        mask[two_tone] = coord[two_tone] < 0  # the first colour on top (or on +x)
    if striped.any():
        if shape == "torus":  # stripes go around the ring
            angle = torch.atan2(points[striped][..., 1], points[striped][..., 0]) + math.pi
            segment = (angle / (2 * math.pi) * NUM_TORUS_STRIPE_SEGMENTS).long() % NUM_TORUS_STRIPE_SEGMENTS
        else:
            extent = torch.where(use_y, ey, ex)[striped, None]
            band = ((coord[striped] / extent + 1) / 2 * NUM_STRIPE_BANDS).long()
            segment = band.clamp(0, NUM_STRIPE_BANDS - 1)
        mask[striped] = segment % 2 == 1
    return mask


# per-object random numbers: yaw, tilt, tilt axis, Sobol shift (3), then one opacity per Gaussian
_POSE_U, _SHIFT_U, _OPACITY_U = slice(0, 3), slice(3, 6), 6


def _build(
    attributes: Sequence[ShapeAttributes],
    u: Tensor,
    max_tilt_deg: float,
    tangent_scale: float,
    shading: float,
    yaw_deg: float | None = None,
    tilt_deg: float | None = None,
) -> Gaussians:
    """Vectorised core: Gaussians ``[B, N]`` for ``attributes`` from uniforms ``u`` ``[B, 6 + N]``."""
    num = u.shape[1] - _OPACITY_U
    dtype = torch.float32  # float32 keeps points on the surface to ~1e-7 and is twice as fast as float64
    batch = len(attributes)
    means = torch.empty(batch, num, 3, dtype=dtype)
    normals, edge_dir = torch.empty_like(means), torch.empty_like(means)
    edge_dist = torch.empty(batch, num, dtype=dtype)
    spacing = torch.empty(batch, dtype=dtype)
    colors = torch.empty(batch, num, 3, dtype=dtype)
    palette = torch.tensor(list(COLORS.values()), dtype=dtype)
    color_index = {name: i for i, name in enumerate(COLORS)}
    for shape in SHAPES:
        rows = [i for i, a in enumerate(attributes) if a.shape == shape]
        if not rows:
            continue
        group = [attributes[i] for i in rows]
        dims_list = [shape_dimensions(shape, a.aspect, a.size) for a in group]
        dims = torch.tensor(dims_list, dtype=dtype)
        surface = sample_surface(shape, dims, num, shift=u[rows, _SHIFT_U].to(dtype))
        points = surface.points
        half = torch.tensor([_half_extents_xy(shape, d) for d in dims_list], dtype=dtype)
        pattern = torch.tensor([PATTERNS.index(a.pattern) for a in group])
        second = _secondary_mask(shape, pattern, (half[:, 0], half[:, 1]), points)
        c1 = palette[[color_index[a.color] for a in group]]
        c2 = palette[[color_index[a.color2 or a.color] for a in group]]
        colors[rows] = torch.where(second[..., None], c2[:, None], c1[:, None])
        means[rows], normals[rows], spacing[rows] = points, surface.normals, (surface.areas / num).sqrt()
        edge_dir[rows], edge_dist[rows] = surface.edge_dir, surface.edge_dist

    pose = u[:, _POSE_U]
    yaw = torch.full((batch,), math.radians(yaw_deg), dtype=dtype) if yaw_deg is not None \
        else 2 * math.pi * pose[:, 0].to(dtype)
    tilt = torch.full((batch,), math.radians(tilt_deg), dtype=dtype) if tilt_deg is not None \
        else math.radians(max_tilt_deg) * pose[:, 1].to(dtype)
    rotation = _rotation_matrices(yaw, tilt, 2 * math.pi * pose[:, 2].to(dtype))  # [B, 3, 3]
    means = means @ rotation.transpose(1, 2)
    normals = torch.nn.functional.normalize(normals @ rotation.transpose(1, 2), dim=-1)
    edge_dir = edge_dir @ rotation.transpose(1, 2)

    # Discs of the tangential size, narrowed towards a nearby edge so they end near it (axis 0).
    tangential = (tangent_scale * spacing[:, None]).expand(batch, num)
    towards_edge = torch.minimum(EDGE_SCALE_RATIO * edge_dist, tangential)
    towards_edge = towards_edge.clamp(min=EDGE_MIN_SCALE * tangential)
    scales = torch.stack([towards_edge, tangential, NORMAL_SCALE_RATIO * tangential], -1)
    quats = splat_quats(normals, edge_dir)
    light = torch.tensor(LIGHT_DIRECTION, dtype=dtype)
    colors = colors * (1 - shading + shading * (0.5 + 0.5 * (normals @ light)))[..., None]
    opacities = 0.9 + 0.1 * u[:, _OPACITY_U:].to(dtype)
    return Gaussians(means=means, scales=scales, quats=quats, opacities=opacities, colors=colors)
