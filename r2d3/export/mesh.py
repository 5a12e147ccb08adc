"""Gaussian splats -> coloured triangle meshes (``.glb``) for tools that do not read splats.

The mesh is an isosurface of the splats' *opacity density*

    D(x) = sum_i  o_i * exp(-0.5 * (x - mu_i)^T Sigma_i^-1 (x - mu_i)),   Sigma_i = R_i S_i S_i^T R_i^T

(``o_i`` the opacity probability, ``S_i`` the linear scales, ``R_i`` the rotation of the wxyz quaternion),
sampled on a regular cubic grid over the splats' bounding box and meshed with marching cubes.

Default level, :data:`DEFAULT_LEVEL` = 0.5: ``D`` is measured in "opacity units" (one fully opaque Gaussian
peaks at 1), so 0.5 is where a single opaque splat has fallen to half its peak, i.e. the Mahalanobis radius
``sqrt(2 ln 2) ~= 1.18`` standard deviations, and where two half-transparent splats overlapping would sum to
it. It is an absolute level, so the same asset meshes the same way at any resolution, and a level that
a field never reaches is reported instead of silently meshing noise.

Thin splats: surface splats (e.g. the ``tiny`` backend's discs, 0.006 thick on a ~0.015 grid) are thinner
than a voxel and would fall between grid samples. Every Gaussian's variance is therefore *dilated* by
``(min_sigma_voxels * spacing)^2`` on all axes before sampling (the density peak stays ``o_i``). The
dilation makes discs a few voxels thick, so they are always seen and overlapping discs merge into a
closed shell; 2 voxels (the default) also closes the gaps between neighbouring discs that 1 voxel left
as tunnels through the shell (measured on the shipped model by ``pipelines/benchmark.py mesh``, in ``docs/benchmarks.md``). Set
``min_sigma_voxels=0`` for the exact (undilated) density.

Topology: empty space enclosed by the shell is filled before meshing (one outer surface, not a hidden
inner one as well), and pieces smaller than ``min_component_fraction`` of the largest are dropped. The
sampled volume gets one layer of zeros around it before marching cubes, so every surface is closed.
Vertex colours are the density-weighted average colour of the Gaussians at each vertex (sRGB display
values, as rendered; :func:`encode_glb` writes them as glTF's linear ``COLOR_0``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from r2d3.storage import atomic_path
from r2d3.export.frame import points_in_frame
from r2d3.export.ply import single_asset
from r2d3.render.gaussians import Gaussians
from r2d3.render.quaternions import quat_to_rotmat

DEFAULT_LEVEL = 0.5
"""Default isosurface level in opacity units (half the peak of one fully opaque Gaussian)."""

#: Gaussians are evaluated out to this many (dilated) standard deviations along their longest axis;
#: beyond it a Gaussian contributes < exp(-4.5) ~= 1.1% of its peak and is skipped.
CUTOFF_SIGMAS = 3.0

#: Bound on the number of (point, Gaussian) pairs held in memory at once.
_PAIRS_PER_CHUNK = 1 << 22


class NoSurfaceError(ValueError):
    """The density never crosses the requested level, so there is no isosurface to mesh."""


def _precisions(gaussians: Gaussians, extra_var: float) -> tuple[Tensor, Tensor]:
    """Inverse covariances ``[N, 3, 3]`` (float64) and per-Gaussian cutoff radii ``[N]``."""
    rot = quat_to_rotmat(torch.nn.functional.normalize(gaussians.quats[0].double(), dim=-1))  # [N, 3, 3]
    var = gaussians.scales[0].double() ** 2 + extra_var  # [N, 3]
    prec = rot @ torch.diag_embed(1.0 / var) @ rot.transpose(-1, -2)
    radius = CUTOFF_SIGMAS * var.max(dim=-1).values.sqrt()
    return prec, radius


def _splat_sums(
    points: Tensor, means: Tensor, prec: Tensor, radius: Tensor, opac: Tensor, colors: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Density ``[M]`` (and density-weighted colour sums ``[M, 3]``) at ``points`` ``[M, 3]``.

    Points are processed in chunks; per chunk only the Gaussians whose cutoff box touches the chunk's
    bounding box are evaluated, so memory stays bounded and large assets stay fast.
    """
    m = points.shape[0]
    density = points.new_zeros(m)
    color_sum = points.new_zeros(m, 3) if colors is not None else None
    n = max(means.shape[0], 1)
    step = max(1, _PAIRS_PER_CHUNK // n)
    for start in range(0, m, step):
        p = points[start : start + step]
        lo, hi = p.min(dim=0).values, p.max(dim=0).values
        near = ((means + radius[:, None] >= lo) & (means - radius[:, None] <= hi)).all(dim=-1)
        idx = near.nonzero().squeeze(-1)
        if idx.numel() == 0:
            continue
        d = p[:, None, :] - means[idx][None]  # [m, k, 3]
        maha = torch.einsum("mki,kij,mkj->mk", d, prec[idx], d)
        w = opac[idx] * torch.exp(-0.5 * maha)
        w = torch.where(maha <= CUTOFF_SIGMAS**2, w, torch.zeros_like(w))
        density[start : start + step] = w.sum(dim=1)
        if color_sum is not None:
            color_sum[start : start + step] = w @ colors[idx]
    return density, color_sum


def gaussians_to_mesh(
    gaussians: Gaussians,
    resolution: int = 64,
    level: float | None = None,
    padding: float = 0.1,
    *,
    min_sigma_voxels: float = 2.0,
    fill_cavities: bool = True,
    min_component_fraction: float = 0.05,
):
    """Mesh one asset's opacity-density isosurface; returns a ``trimesh.Trimesh`` with RGBA vertex colours.

    Args:
        gaussians: one asset (batch size 1), activated values (see :mod:`r2d3.render.gaussians`).
        resolution: grid samples along the longest side of the padded bounding box (voxels are cubes; the
            grid grows by ``3 * min_sigma_voxels`` samples per side to hold the dilated splats).
        level: isosurface level in opacity units; ``None`` means :data:`DEFAULT_LEVEL` (0.5).
        padding: margin added on every side of the bounding box, as a fraction of its longest side.
        min_sigma_voxels: variance dilation, in grid spacings (see the module docstring; 0 disables it).
        fill_cavities: fill empty space enclosed by the surface before meshing, so a thick shell of
            splats gives one outer surface instead of an outer and an inner one (a hidden second shell).
        min_component_fraction: drop connected pieces with fewer faces than this fraction of the
            largest piece (floaters made of a few stray splats).

    Raises:
        TypeError / ValueError: not a :class:`Gaussians`, batch size != 1, no Gaussians, bad parameters.
        NoSurfaceError: the density never crosses ``level`` (the message names both).
    """
    import trimesh
    from skimage.measure import marching_cubes

    gaussians = single_asset(gaussians, "gaussians_to_mesh meshes")
    if gaussians.num_gaussians == 0:
        raise ValueError("cannot mesh an asset with no Gaussians")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an int >= 8, got {resolution!r}")
    level = DEFAULT_LEVEL if level is None else float(level)
    if not (math.isfinite(level) and level > 0):
        raise ValueError(f"level must be a finite number > 0, got {level}")
    if not (math.isfinite(padding) and padding >= 0):
        raise ValueError(f"padding must be >= 0, got {padding}")
    if not (math.isfinite(min_sigma_voxels) and min_sigma_voxels >= 0):
        raise ValueError(f"min_sigma_voxels must be >= 0, got {min_sigma_voxels}")

    g = gaussians.to(device="cpu", dtype=torch.float64)
    means, opac, colors = g.means[0], g.opacities[0], g.colors[0]

    # grid: bounding box of the undilated cutoff boxes, padded, then sampled with cubic voxels
    _, radius0 = _precisions(g, 0.0)
    lo = (means - radius0[:, None]).min(dim=0).values
    hi = (means + radius0[:, None]).max(dim=0).values
    extent = float((hi - lo).max().clamp_min(1e-6))
    lo, hi = lo - padding * extent, hi + padding * extent
    spacing = (extent * (1 + 2 * padding)) / (resolution - 1)
    sigma_min = min_sigma_voxels * spacing
    lo, hi = lo - CUTOFF_SIGMAS * sigma_min, hi + CUTOFF_SIGMAS * sigma_min  # room for the dilation
    counts = [int(math.ceil(float(hi[a] - lo[a]) / spacing)) + 1 for a in range(3)]
    axes = [lo[a] + spacing * torch.arange(counts[a], dtype=torch.float64) for a in range(3)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)

    prec, radius = _precisions(g, sigma_min**2)
    density, _ = _splat_sums(grid, means, prec, radius, opac, None)
    volume = density.reshape(counts).numpy()
    dmin, dmax = float(volume.min()), float(volume.max())
    if not dmin < level < dmax:
        raise NoSurfaceError(
            f"no isosurface at level {level:g}: the opacity density on the "
            f"{counts[0]}x{counts[1]}x{counts[2]} grid ranges over [{dmin:.4g}, {dmax:.4g}]; "
            "pass a level inside that range"
        )
    if fill_cavities:  # empty voxels not connected to the outside are inside the object
        from scipy.ndimage import binary_fill_holes

        inside = volume > level
        cavity = binary_fill_holes(inside) & ~inside
        volume = np.where(cavity, 2.0 * level, volume)
    # a layer of zeros all round closes every surface that touches the grid border
    volume = np.pad(volume, 1, mode="constant", constant_values=0.0)
    verts, faces, _, _ = marching_cubes(volume, level=level, spacing=(spacing,) * 3)
    verts = verts + (lo.numpy() - spacing)  # undo the pad, to world coordinates

    v = torch.from_numpy(np.ascontiguousarray(verts))
    wsum, csum = _splat_sums(v, means, prec, radius, opac, colors)
    rgb = csum / wsum.clamp_min(1e-12)[:, None]
    empty = wsum <= 1e-12
    if empty.any():  # only possible right at the cutoff: take the nearest Gaussian's colour
        rgb[empty] = colors[torch.cdist(v[empty], means).argmin(dim=1)]
    rgba = np.concatenate(
        [np.round(rgb.clamp(0, 1).numpy() * 255), np.full((len(verts), 1), 255.0)], axis=1
    ).astype(np.uint8)
    mesh = trimesh.Trimesh(
        vertices=verts.astype(np.float32), faces=faces.astype(np.int64), vertex_colors=rgba, process=False
    )
    if min_component_fraction > 0:
        pieces = mesh.split(only_watertight=False)
        if len(pieces) > 1:
            largest = max(len(p.faces) for p in pieces)
            keep = [p for p in pieces if len(p.faces) >= min_component_fraction * largest]
            mesh = trimesh.util.concatenate(keep) if len(keep) > 1 else keep[0]
    if mesh.is_watertight and mesh.volume < 0:  # outward normals whatever marching cubes' winding is
        # a new mesh rather than invert(): trimesh keeps stale cached normals across invert()
        mesh = trimesh.Trimesh(vertices=mesh.vertices, faces=np.ascontiguousarray(mesh.faces[:, ::-1]),
                               vertex_colors=mesh.visual.vertex_colors, process=False)
    return mesh


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """The sRGB transfer function inverted (IEC 61966-2-1): display values in [0, 1] to linear light."""
    c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


#: glTF bufferView targets
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
#: roughness of the default material: splat colours carry their shading already, so the surface should
#: scatter light broadly rather than mirror it
DEFAULT_ROUGHNESS = 0.8


def encode_glb(mesh, *, unlit: bool = False, roughness: float = DEFAULT_ROUGHNESS,
               frame: str = "y-up") -> bytes:
    """Binary glTF 2.0 of a vertex-coloured ``trimesh.Trimesh`` as every client reads it right:

    - ``COLOR_0`` in *linear* light (float), converted from the sRGB vertex colours r2d3 renders with;
      glTF defines vertex colours as linear, so display values written as-is look washed out;
    - a non-metallic PBR material (metallic 0, ``roughness``), or ``KHR_materials_unlit`` with
      ``unlit=True``; without one, clients fall back to metallic 1 / roughness 1;
    - smooth unit ``NORMAL``s (area-weighted vertex normals), so the isosurface is not faceted;
    - ``POSITION`` min/max and bufferView targets, as the Khronos validator expects;
    - positions and normals in ``frame`` (:mod:`r2d3.export.frame`; glTF itself is y-up).
    """
    import pygltflib as gl
    import trimesh

    if not isinstance(mesh, trimesh.Trimesh):
        raise TypeError(f"expected a trimesh.Trimesh, got {type(mesh).__name__}")
    if len(mesh.faces) == 0:
        raise ValueError("refusing to write a mesh with no faces")
    positions = points_in_frame(np.asarray(mesh.vertices, np.float64), frame)
    positions = np.ascontiguousarray(positions, dtype=np.float32)
    # from the faces as they are now (a caller's mesh may hold normals cached before it was edited)
    normals = np.asarray(trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, process=False).vertex_normals,
                         dtype=np.float64)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.where(length > 1e-12, normals / np.maximum(length, 1e-12), np.array([0.0, 1.0, 0.0]))
    normals = np.ascontiguousarray(points_in_frame(normals, frame), dtype=np.float32)
    colors = np.ascontiguousarray(srgb_to_linear(mesh.visual.vertex_colors[:, :3] / 255.0), dtype=np.float32)
    indices = np.ascontiguousarray(mesh.faces, dtype=np.uint32).reshape(-1)

    blob, views, accessors = b"", [], []

    def add(data: np.ndarray, target: int, component: int, kind: str, count: int, bounds: bool = False) -> int:
        nonlocal blob
        blob += b"\0" * (-len(blob) % 4)
        views.append(gl.BufferView(buffer=0, byteOffset=len(blob), byteLength=data.nbytes, target=target))
        blob += data.tobytes()
        acc = gl.Accessor(bufferView=len(views) - 1, componentType=component, count=count, type=kind)
        if bounds:
            acc.min, acc.max = data.min(axis=0).tolist(), data.max(axis=0).tolist()
        accessors.append(acc)
        return len(accessors) - 1

    pos = add(positions, _ARRAY_BUFFER, gl.FLOAT, gl.VEC3, len(positions), bounds=True)
    nrm = add(normals, _ARRAY_BUFFER, gl.FLOAT, gl.VEC3, len(normals))
    col = add(colors, _ARRAY_BUFFER, gl.FLOAT, gl.VEC3, len(colors))
    idx = add(indices, _ELEMENT_ARRAY_BUFFER, gl.UNSIGNED_INT, gl.SCALAR, len(indices))
    material = gl.Material(name="r2d3_vertex_colour", doubleSided=True, pbrMetallicRoughness=gl.PbrMetallicRoughness(
        baseColorFactor=[1.0, 1.0, 1.0, 1.0], metallicFactor=0.0, roughnessFactor=float(roughness)))
    extensions = []
    if unlit:
        material.extensions = {"KHR_materials_unlit": {}}
        extensions = ["KHR_materials_unlit"]
    gltf = gl.GLTF2(
        asset=gl.Asset(version="2.0", generator="r2d3"), scene=0, scenes=[gl.Scene(nodes=[0])],
        nodes=[gl.Node(mesh=0, name="asset")], materials=[material], extensionsUsed=extensions,
        meshes=[gl.Mesh(name="asset", primitives=[gl.Primitive(
            attributes=gl.Attributes(POSITION=pos, NORMAL=nrm, COLOR_0=col), indices=idx, material=0)])],
        accessors=accessors, bufferViews=views, buffers=[gl.Buffer(byteLength=len(blob))])
    gltf.set_binary_blob(blob)
    return b"".join(gltf.save_to_bytes())


def write_glb(mesh, path: str | os.PathLike[str], *, unlit: bool = False, frame: str = "y-up") -> Path:
    """Write :func:`encode_glb` of ``mesh`` to ``path`` atomically; return the final path."""
    data = encode_glb(mesh, unlit=unlit, frame=frame)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def load_glb(path: str | os.PathLike[str]):
    """Read a ``.glb`` written by :func:`write_glb` back as one ``trimesh.Trimesh`` (vertex order kept;
    vertex colours back in sRGB, as :func:`gaussians_to_mesh` makes them)."""
    import pygltflib as gl
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such .glb file: {str(path)!r}")
    try:
        gltf = gl.GLTF2().load_binary(str(path))
        blob = gltf.binary_blob()
        prim = gltf.meshes[0].primitives[0]

        def read(index: int, dtype, width: int) -> np.ndarray:
            acc = gltf.accessors[index]
            view = gltf.bufferViews[acc.bufferView]
            start = (view.byteOffset or 0) + (acc.byteOffset or 0)
            return np.frombuffer(blob, dtype=dtype, count=acc.count * width, offset=start).reshape(acc.count, width)

        verts = read(prim.attributes.POSITION, np.float32, 3)
        faces = read(prim.indices, np.uint32, 1).reshape(-1, 3)
        colors = np.full((len(verts), 4), 255, dtype=np.uint8)
        if prim.attributes.COLOR_0 is not None:
            width = 4 if gltf.accessors[prim.attributes.COLOR_0].type == gl.VEC4 else 3
            linear = read(prim.attributes.COLOR_0, np.float32, width)[:, :3]
            colors[:, :3] = np.round(linear_to_srgb(linear) * 255)
    except Exception as e:  # pygltflib and numpy raise a zoo of types for corrupt files
        raise ValueError(f"{str(path)!r} is not a readable .glb mesh: {e}") from e
    if len(faces) == 0:
        raise ValueError(f"{str(path)!r} holds no triangle mesh")
    return trimesh.Trimesh(vertices=verts.copy(), faces=faces.astype(np.int64), vertex_colors=colors, process=False)
