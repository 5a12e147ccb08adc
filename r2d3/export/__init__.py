"""Exports for people and other tools: ``.ply`` splats (standard 3DGS layout), previews (multi-view PNG
grids, turntable GIF/MP4) and coloured ``.glb`` meshes (opacity-density isosurfaces; needs the ``mesh``
extra). Every writer is atomic (:mod:`r2d3.storage`): a file appears complete or not at all."""

from r2d3.export.frame import FRAMES, gaussians_in_frame
from r2d3.export.mesh import DEFAULT_LEVEL, NoSurfaceError, encode_glb, gaussians_to_mesh, load_glb, write_glb
from r2d3.export.ply import (
    PLY_PROPERTIES,
    SH_C0,
    PlyFormatError,
    encode_ply,
    gaussians_to_ply_array,
    read_ply,
    write_ply,
)
from r2d3.export.preview import (
    VideoBackendUnavailableError,
    encode_gif,
    encode_png,
    make_grid,
    mp4_available,
    render_output_images,
    render_turntable,
    save_preview_grid,
    save_turntable,
    to_uint8,
)

__all__ = [
    "DEFAULT_LEVEL",
    "FRAMES",
    "NoSurfaceError",
    "PLY_PROPERTIES",
    "PlyFormatError",
    "SH_C0",
    "VideoBackendUnavailableError",
    "encode_gif",
    "encode_glb",
    "encode_ply",
    "gaussians_in_frame",
    "gaussians_to_mesh",
    "encode_png",
    "gaussians_to_ply_array",
    "load_glb",
    "make_grid",
    "mp4_available",
    "read_ply",
    "render_output_images",
    "render_turntable",
    "save_preview_grid",
    "save_turntable",
    "to_uint8",
    "write_glb",
    "write_ply",
]
