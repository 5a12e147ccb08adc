"""``render_gaussians``: the one entry point for rendering Gaussian splats, whatever the backend.

Backends (the registry :data:`SPLAT_BACKENDS`):
- ``"torch"``  tiled pure-torch reference (:mod:`r2d3.render.splat_torch`), CPU and CUDA, float32/64;
- ``"gsplat"`` gsplat's CUDA kernels (:mod:`r2d3.render.splat_gsplat`), float32 CUDA only.
``"auto"`` picks gsplat for float32 CUDA tensors when gsplat is installed, otherwise torch, and logs
the choice once per distinct reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from r2d3.render.cameras import Cameras
from r2d3.render.gaussians import Gaussians
from r2d3.render.inputs import background_tensor, validate_cameras
from r2d3.render.output import RenderOutput
from r2d3.render.splat_gsplat import gsplat_available, render_gsplat
from r2d3.render.splat_torch import render_torch

logger = logging.getLogger(__name__)

SPLAT_BACKENDS: dict[str, Callable[..., RenderOutput]] = {"torch": render_torch, "gsplat": render_gsplat}
DEFAULT_TILE_SIZE: dict[str, int] = {"torch": 8, "gsplat": 16}
_logged_choices: set[str] = set()


def select_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``"auto"`` to a concrete backend name for tensors on ``device`` of ``dtype``."""
    if backend != "auto":
        if backend not in SPLAT_BACKENDS:
            raise ValueError(
                f"unknown render backend {backend!r}; choose 'auto' or one of {sorted(SPLAT_BACKENDS)}"
            )
        return backend
    if device.type != "cuda":
        choice, reason = "torch", f"tensors are on {device.type}"
    elif dtype != torch.float32:
        choice, reason = "torch", f"gsplat needs float32, got {dtype}"
    elif not gsplat_available():
        choice, reason = "torch", "gsplat is not installed (pip install 'r2d3[gpu]')"
    else:
        choice, reason = "gsplat", "float32 CUDA tensors and gsplat is installed"
    message = f"render_gaussians: backend 'auto' -> '{choice}' ({reason})"
    if message not in _logged_choices:
        _logged_choices.add(message)
        logger.info(message)
    return choice


def render_gaussians(
    gaussians: Gaussians,
    cameras: Cameras,
    background: float | Sequence[float] | Tensor = (1.0, 1.0, 1.0),
    backend: str = "auto",
    *,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    tile_size: int | None = None,
    chunk_size: int = 16,
    min_transmittance: float = 1e-6,
    max_chunk_elements: int = 1 << 21,
    raw_quaternions: bool = False,
) -> RenderOutput:
    """Render ``B`` Gaussian-splat assets from ``V`` cameras each (differentiable).

    Gradients reach ``means``, ``scales``, ``quats``, ``opacities`` and ``colors`` (not the cameras).

    Args:
        gaussians: :class:`~r2d3.render.gaussians.Gaussians` with ``means [B, N, 3]`` (world, y up),
            ``scales [B, N, 3]`` (linear std-devs > 0), ``quats [B, N, 4]`` (w, x, y, z; normalised
            here), ``opacities [B, N]`` (probabilities) and ``colors [B, N, 3]`` (linear RGB). Checked
            with :meth:`Gaussians.validate` (raises ``InvalidGaussiansError``).
        cameras: :class:`~r2d3.render.cameras.Cameras` with world-to-camera OpenCV ``viewmats``
            ``[B, V, 4, 4]`` and pixel intrinsics ``Ks [B, V, 3, 3]``, or unbatched ``[V, 4, 4]`` /
            ``[V, 3, 3]`` shared by all assets; cast to the Gaussians' dtype and device.
        background: grey level, RGB triple, or ``[B, V, 3]`` colour behind the splats.
        backend: ``"auto"``, ``"torch"`` or ``"gsplat"`` (see :data:`SPLAT_BACKENDS`).
        eps2d: low-pass variance in pixels^2 added to every projected 2D covariance (anti-aliasing).
        near_plane, far_plane: Gaussians whose centre depth lies outside are culled.
        tile_size: tile edge in pixels; ``None`` takes the backend's best (8 for torch on CPU, where
            smaller tiles waste fewer evaluations on pixels outside a footprint; 16 for gsplat).
        chunk_size, min_transmittance, max_chunk_elements: torch backend only; Gaussians composited per
            tile per step, the transmittance below which a whole tile stops early (the image then
            differs from exhaustive compositing by at most this), and the memory bound per step.
        raw_quaternions: build each covariance's rotation with the 3DGS formula at the quaternion as given
            (not normalised), as DiffSplat's renderer does: for ``q = n u`` (``|u| = 1``) that matrix is
            ``(1 - n²) I + n² R(u)``, so footprints change with ``n``. Normals keep ``R(u)``.

    Returns:
        :class:`~r2d3.render.output.RenderOutput` with ``rgb [B, V, 3, H, W]`` composited over the
        background, ``alpha [B, V, 1, H, W]``, ``depth [B, V, 1, H, W]`` (expected camera z, normalised by
        alpha, 0 where empty), ``normal [B, V, 3, H, W]`` (camera-space OpenCV normals of each Gaussian's
        shortest axis facing the camera, composited like colour and normalised by alpha, 0 where empty)
        and the batched ``cameras`` used.
    """
    if not isinstance(gaussians, Gaussians):
        raise TypeError(f"gaussians must be r2d3.render.Gaussians, got {type(gaussians).__name__}")
    raw_quats = gaussians.quats if raw_quaternions else None
    gaussians = gaussians.validate()
    if raw_quats is not None:
        raw_quats = raw_quats.to(gaussians.quats)
    dtype, device = gaussians.means.dtype, gaussians.means.device
    cameras = validate_cameras(cameras, gaussians.batch_size, dtype=dtype, device=device)
    bg = background_tensor(background, gaussians.batch_size, cameras.num_views, dtype, device)
    if (tile_size is not None and tile_size <= 0) or chunk_size <= 0:
        raise ValueError(f"tile_size and chunk_size must be positive, got {tile_size} and {chunk_size}")
    if not 0 <= min_transmittance < 1:
        raise ValueError(f"min_transmittance must be in [0, 1), got {min_transmittance}")
    if near_plane <= 0 or far_plane <= near_plane:
        raise ValueError(f"need 0 < near_plane < far_plane, got {near_plane} and {far_plane}")
    name = select_backend(backend, device, dtype)
    if tile_size is None:
        tile_size = DEFAULT_TILE_SIZE[name]
    common = dict(eps2d=eps2d, near_plane=near_plane, far_plane=far_plane, tile_size=tile_size, raw_quats=raw_quats)
    if name == "torch":
        return render_torch(
            gaussians, cameras, bg, chunk_size=chunk_size, min_transmittance=min_transmittance,
            max_chunk_elements=max_chunk_elements, **common,
        )  # fmt: skip
    return SPLAT_BACKENDS[name](gaussians, cameras, bg, **common)
