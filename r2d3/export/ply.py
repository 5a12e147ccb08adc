"""Gaussian splats as ``.ply`` files in the standard 3D Gaussian Splatting layout.

The layout is the one written by the original 3DGS code and read by common splat viewers
(SuperSplat, antimatter15/splat, gsplat's viewer, ...): one ``vertex`` element, binary little endian,
all properties ``float32``, in this order::

    x y z                  position
    nx ny nz               unused normals, written as zeros
    f_dc_0 f_dc_1 f_dc_2   SH degree-0 colour coefficients: (color - 0.5) / SH_C0
    opacity                logit of the opacity probability
    scale_0 scale_1 scale_2  log of the linear standard deviations
    rot_0 rot_1 rot_2 rot_3  unit quaternion (w, x, y, z)
    f_rest_0 ... f_rest_44   only with ``sh_degree=3``: higher SH coefficients, all zero (view-independent
                             colour), for loaders that require them (INRIA's own, at its default degree 3)
    red green blue         only with ``rgb_columns``: ``uint8`` colour, ``floor(255 * color)`` as DiffSplat's own
                             files store it; point-cloud tools (MeshLab, CloudCompare, Open3D) colour points by it

Options: ``frame`` (:mod:`r2d3.export.frame`: ``y-up``, r2d3's and glTF's, or ``y-down`` for
INRIA/COLMAP-style viewers), ``sh_degree`` (0 or 3), ``min_opacity`` (drop splats below it: nearly
transparent ones cost file size and sorting time in viewers without changing the image) and
``rgb_columns``.

DiffSplat's own ``save_ply`` writes the same encoding (logit opacity, log scales, SH-DC colour) without the
normals, with the ``red green blue`` columns and with the decoder's raw quaternions; r2d3 writes unit
quaternions (the same rotation: viewers normalise them, and a unit quaternion is what the format means).

:class:`~r2d3.render.gaussians.Gaussians` stores the *activated* values (probabilities, linear
scales, colours in [0, 1]); the conversions live here and nowhere else. One asset per file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement, PlyElementParseError, PlyHeaderParseError

from r2d3.storage import atomic_write_bytes
from r2d3.export.frame import gaussians_in_frame
from r2d3.render.gaussians import Gaussians, InvalidGaussiansError

SH_C0 = 0.28209479177387814
"""Degree-0 real spherical harmonic, 1 / (2 sqrt(pi)): colour = 0.5 + SH_C0 * f_dc."""

PLY_PROPERTIES: tuple[str, ...] = (
    "x", "y", "z",
    "nx", "ny", "nz",
    "f_dc_0", "f_dc_1", "f_dc_2",
    "opacity",
    "scale_0", "scale_1", "scale_2",
    "rot_0", "rot_1", "rot_2", "rot_3",
)  # fmt: skip

# Opacities 0 and 1 have infinite logits; clamping by this much keeps the file finite and still
# round-trips every probability to well within 1e-6.
_OPACITY_EPS = 1e-7


class PlyFormatError(ValueError):
    """A ``.ply`` file that is not a readable 3DGS splat file (names the file and what is missing)."""


def single_asset(gaussians: Gaussians, what: str = "a .ply file holds") -> Gaussians:
    """``gaussians`` validated and detached, with a batch of exactly one asset (``what`` words the error:
    files and meshes hold one asset each)."""
    if not isinstance(gaussians, Gaussians):
        raise TypeError(f"expected a Gaussians instance, got {type(gaussians).__name__}")
    gaussians = gaussians.detach().validate()
    if gaussians.batch_size != 1:
        raise ValueError(f"{what} one asset, got a batch of {gaussians.batch_size}; pass gaussians[i] for each asset")
    return gaussians


#: SH coefficients beyond degree 0 for a degree-3 file (3 colours x 15)
F_REST_DEGREE3 = tuple(f"f_rest_{i}" for i in range(45))
#: the uint8 colour columns of ``rgb_columns``
RGB_COLUMNS = ("red", "green", "blue")


def gaussians_to_ply_array(gaussians: Gaussians, *, frame: str = "y-up", sh_degree: int = 0,
                           min_opacity: float = 0.0, rgb_columns: bool = False) -> np.ndarray:
    """The structured vertex array (``float32`` fields :data:`PLY_PROPERTIES`, then ``f_rest_*`` for
    ``sh_degree=3``, then ``uint8`` ``red green blue`` with ``rgb_columns``) for one asset ``[1, N]``.

    Raises :class:`~r2d3.render.gaussians.InvalidGaussiansError` for invalid values (NaN, scales <= 0,
    wrong shapes) and ``ValueError`` for a batch of more than one asset or bad options.
    """
    if sh_degree not in (0, 3):
        raise ValueError(f"sh_degree must be 0 or 3, got {sh_degree!r}")
    if not 0.0 <= min_opacity < 1.0:
        raise ValueError(f"min_opacity must be in [0, 1), got {min_opacity!r}")
    g = gaussians_in_frame(single_asset(gaussians), frame).to(device="cpu", dtype=torch.float64)
    if min_opacity > 0:
        keep = g.opacities[0] >= min_opacity
        if not keep.any():
            raise ValueError(f"min_opacity={min_opacity} drops every splat (max opacity "
                             f"{float(g.opacities.max()):.3g})")
        g = Gaussians(*(t[:, keep] for t in (g.means, g.scales, g.quats, g.opacities, g.colors)))
    means, scales, quats = g.means[0], g.scales[0], g.quats[0]
    opacity = g.opacities[0].clamp(_OPACITY_EPS, 1.0 - _OPACITY_EPS)
    columns = {
        "x": means[:, 0], "y": means[:, 1], "z": means[:, 2],
        **{name: torch.zeros_like(means[:, 0]) for name in ("nx", "ny", "nz")},
        **{f"f_dc_{i}": (g.colors[0, :, i] - 0.5) / SH_C0 for i in range(3)},
        "opacity": torch.logit(opacity),
        **{f"scale_{i}": scales[:, i].log() for i in range(3)},
        **{f"rot_{i}": quats[:, i] for i in range(4)},
    }  # fmt: skip
    names = PLY_PROPERTIES + (F_REST_DEGREE3 if sh_degree == 3 else ())
    rgb = RGB_COLUMNS if rgb_columns else ()
    array = np.zeros(g.num_gaussians, dtype=[(name, "<f4") for name in names] + [(name, "u1") for name in rgb])
    for name in PLY_PROPERTIES:
        array[name] = columns[name].numpy()
    for i, name in enumerate(rgb):
        array[name] = (g.colors[0, :, i] * 255).clamp(0, 255).numpy().astype(np.uint8)  # truncation, as DiffSplat
    return array


def encode_ply(gaussians: Gaussians, *, frame: str = "y-up", sh_degree: int = 0, min_opacity: float = 0.0,
               rgb_columns: bool = False) -> bytes:
    """The bytes of a binary little-endian 3DGS ``.ply`` for one asset (for object stores such as s3)."""
    array = gaussians_to_ply_array(gaussians, frame=frame, sh_degree=sh_degree, min_opacity=min_opacity,
                                   rgb_columns=rgb_columns)
    element = PlyElement.describe(array, "vertex")
    buffer = io.BytesIO()
    PlyData([element], text=False, byte_order="<").write(buffer)
    return buffer.getvalue()


def write_ply(gaussians: Gaussians, path: str | os.PathLike[str], *, frame: str = "y-up", sh_degree: int = 0,
              min_opacity: float = 0.0, rgb_columns: bool = False) -> Path:
    """Write one asset (``B == 1``; pass ``gaussians[i]`` for a batch) to ``path`` atomically.

    The file appears complete or not at all. Parent directories are created. Raises
    :class:`~r2d3.storage.OutputError` naming ``path`` if it cannot be written, and the
    :meth:`Gaussians.validate` error for invalid values (nothing is written then).
    """
    return atomic_write_bytes(path, encode_ply(gaussians, frame=frame, sh_degree=sh_degree, min_opacity=min_opacity,
                                               rgb_columns=rgb_columns))


def _column(vertex, name: str) -> np.ndarray:
    return np.asarray(vertex[name], dtype=np.float64)


def read_ply(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, clamp_colors: bool = True,
    frame: str = "y-up",
) -> Gaussians:
    """Read a 3DGS ``.ply`` back into :class:`Gaussians` ``[1, N]`` (the inverse of :func:`write_ply`).

    Properties are looked up by name, so files from other tools load too; higher-order SH
    coefficients (``f_rest_*``) are ignored. Colours from SH degree 0 are clamped to [0, 1]
    (``clamp_colors``) because trained 3DGS files routinely leave that range while the
    :class:`Gaussians` convention does not. Raises ``FileNotFoundError`` / :class:`PlyFormatError`
    naming the file. ``frame`` is the frame the file was written in; the result is always y-up.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such .ply file: {str(path)!r}")
    try:
        ply = PlyData.read(str(path))
    except (PlyHeaderParseError, PlyElementParseError, ValueError, EOFError) as e:
        raise PlyFormatError(f"{str(path)!r} is not a readable .ply file: {e}") from e
    if "vertex" not in ply:
        names = [e.name for e in ply.elements]
        raise PlyFormatError(f"{str(path)!r} has no 'vertex' element (elements: {names})")
    vertex = ply["vertex"]
    present = {p.name for p in vertex.properties}
    missing = [name for name in PLY_PROPERTIES[:3] + PLY_PROPERTIES[6:] if name not in present]
    if missing:
        raise PlyFormatError(f"{str(path)!r} is not a 3DGS splat file: missing vertex properties {missing}")

    def stack(names: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([_column(vertex, n) for n in names], axis=-1))

    means = stack(["x", "y", "z"])
    colors = stack([f"f_dc_{i}" for i in range(3)]) * SH_C0 + 0.5
    if clamp_colors:
        colors = colors.clamp(0.0, 1.0)
    opacities = torch.sigmoid(torch.from_numpy(_column(vertex, "opacity")))
    scales = stack([f"scale_{i}" for i in range(3)]).exp()
    quats = stack([f"rot_{i}" for i in range(4)])
    gaussians = Gaussians(
        means=means[None],
        scales=scales[None],
        quats=quats[None],
        opacities=opacities[None],
        colors=colors[None],
    ).to(dtype=dtype)
    try:
        return gaussians_in_frame(gaussians.validate(), frame)
    except InvalidGaussiansError as e:
        raise InvalidGaussiansError(f"{str(path)!r}: {e}") from e
