"""Rasterise coloured triangle meshes with the splat renderer's cameras (previews and QA of exported meshes).

Backends:

- ``"torch"``: a pure-torch reference rasteriser (any device, CPU included). Per view it projects the
  vertices with the OpenCV viewmat and pixel intrinsics, tests every pixel centre ``(u + 0.5, v + 0.5)``
  against chunks of triangles with edge functions, keeps the nearest hit in a z-buffer and interpolates
  vertex colours perspective-correctly. Triangles are two-sided; triangles with a vertex nearer than
  ``near`` are dropped whole (no clipping). No gradients, no anti-aliasing.
- ``"nvdiffrast"``: ``nvdiffrast.torch`` on CUDA, with clip-space positions from the same cameras through
  :func:`projection_from_intrinsics`. Imported lazily; not a dependency.
- ``"auto"``: nvdiffrast for CUDA tensors when it can be imported, otherwise torch.

Both backends return ``rgb [V, 3, H, W]`` composited over ``background`` and a binary coverage
``alpha [V, 1, H, W]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from r2d3.render.cameras import Cameras
from r2d3.render.inputs import validate_cameras

MESH_BACKENDS = ("auto", "torch", "nvdiffrast")

#: Bound on (triangle, pixel) pairs evaluated at once by the torch rasteriser.
_PAIRS_PER_CHUNK = 1 << 22

_NVDR_CONTEXTS: dict = {}


def nvdiffrast_available() -> bool:
    try:
        import nvdiffrast.torch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA extension build
        return False
    return True


def select_mesh_backend(backend: str, device: torch.device) -> str:
    if backend not in MESH_BACKENDS:
        raise ValueError(f"unknown mesh render backend {backend!r}; choose one of {MESH_BACKENDS}")
    if backend == "auto":
        return "nvdiffrast" if device.type == "cuda" and nvdiffrast_available() else "torch"
    if backend == "nvdiffrast":
        if device.type != "cuda":
            raise ValueError(f"the nvdiffrast backend needs CUDA tensors, got device {device}")
        if not nvdiffrast_available():
            raise ImportError(
                "the nvdiffrast backend needs nvdiffrast (pip install nvdiffrast); use backend='torch'"
            )
    return backend


def projection_from_intrinsics(Ks: Tensor, width: int, height: int, near: float, far: float) -> Tensor:
    """OpenCV pixel intrinsics ``[..., 3, 3]`` -> clip-space projections ``[..., 4, 4]`` for nvdiffrast.

    Applied to OpenCV camera coordinates (z forward) it gives ``w = z`` and NDC
    ``x = 2 u / W - 1``, ``y = 2 v / H - 1`` for pixel coordinates ``(u, v)``, and depth ``-1`` at ``near``,
    ``+1`` at ``far``. nvdiffrast stores NDC ``y = -1`` in output row 0, so row ``i`` of its image is pixel
    row ``v`` in ``[i, i + 1)`` exactly like the OpenCV image: no flip is needed.
    """
    fx, fy, skew = Ks[..., 0, 0], Ks[..., 1, 1], Ks[..., 0, 1]
    cx, cy = Ks[..., 0, 2], Ks[..., 1, 2]
    proj = Ks.new_zeros(*Ks.shape[:-2], 4, 4)
    proj[..., 0, 0] = 2 * fx / width
    proj[..., 0, 1] = 2 * skew / width
    proj[..., 0, 2] = 2 * cx / width - 1
    proj[..., 1, 1] = 2 * fy / height
    proj[..., 1, 2] = 2 * cy / height - 1
    proj[..., 2, 2] = (far + near) / (far - near)
    proj[..., 2, 3] = -2 * far * near / (far - near)
    proj[..., 3, 2] = 1.0
    return proj


def _check_mesh(vertices: Tensor, faces: Tensor, vertex_colors: Tensor) -> None:
    for name, t in (("vertices", vertices), ("faces", faces), ("vertex_colors", vertex_colors)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if vertices.ndim != 2 or vertices.shape[1] != 3 or vertices.shape[0] == 0:
        raise ValueError(f"vertices must have shape [V, 3] with V > 0, got {list(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape [F, 3], got {list(faces.shape)}")
    if faces.dtype.is_floating_point or faces.dtype == torch.bool:
        raise ValueError(f"faces must be an integer tensor, got {faces.dtype}")
    if vertex_colors.shape != vertices.shape:
        raise ValueError(
            f"vertex_colors must have shape {list(vertices.shape)} (one RGB per vertex), "
            f"got {list(vertex_colors.shape)}"
        )
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]):
        raise ValueError(
            f"faces index vertices out of range: indices in [{int(faces.min())}, {int(faces.max())}] "
            f"but there are {vertices.shape[0]} vertices"
        )
    if not torch.isfinite(vertices).all():
        raise ValueError("vertices contain NaN or inf")


@torch.no_grad()
def render_mesh(
    vertices: Tensor,
    faces: Tensor,
    vertex_colors: Tensor,
    cameras: Cameras,
    background: Sequence[float] | Tensor = (1.0, 1.0, 1.0),
    backend: str = "auto",
    near: float = 0.01,
    far: float = 100.0,
) -> tuple[Tensor, Tensor]:
    """Render one mesh from every view of ``cameras``; returns ``(rgb [V, 3, H, W], alpha [V, 1, H, W])``.

    ``cameras`` are unbatched ``[V, 4, 4]`` or batched with batch size 1 (one mesh). Vertex colours are
    in [0, 1]; pixels no triangle covers get ``background`` and alpha 0.
    """
    _check_mesh(vertices, faces, vertex_colors)
    if not (0 < near < far):
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
    cams = validate_cameras(cameras, 1, dtype=torch.float32, device=vertices.device)
    viewmats, Ks = cams.viewmats[0], cams.Ks[0]  # [V, 4, 4], [V, 3, 3]
    bg = torch.as_tensor(background, dtype=torch.float32, device=vertices.device).reshape(-1)
    if bg.shape != (3,):
        raise ValueError(f"background must be 3 numbers (RGB), got shape {list(bg.shape)}")
    name = select_mesh_backend(backend, vertices.device)
    verts = vertices.float()
    cols = vertex_colors.float()
    faces = faces.long()
    if name == "nvdiffrast":
        rgb, alpha = _render_nvdiffrast(verts, faces, cols, viewmats, Ks, cams.width, cams.height, near, far)
    else:
        rgb, alpha = _render_torch(verts, faces, cols, viewmats, Ks, cams.width, cams.height, near, far)
    rgb = rgb * alpha + bg[None, :, None, None] * (1 - alpha)
    return rgb, alpha


def _render_torch(verts, faces, cols, viewmats, Ks, width, height, near, far):
    n_views, device = viewmats.shape[0], verts.device
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32) + 0.5,
        torch.arange(width, device=device, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    px, py = xs.reshape(-1), ys.reshape(-1)  # [P]
    n_pix = px.numel()
    step = max(1, _PAIRS_PER_CHUNK // n_pix)
    rgb = torch.zeros(n_views, 3, height, width, device=device)
    alpha = torch.zeros(n_views, 1, height, width, device=device)
    for view in range(n_views):
        cam = verts @ viewmats[view, :3, :3].T + viewmats[view, :3, 3]  # [V, 3]
        z = cam[:, 2]
        uvw = cam @ Ks[view].T
        uv = uvw[:, :2] / z.clamp_min(1e-12)[:, None]
        keep = (z[faces] > near).all(dim=1) & (z[faces] < far).all(dim=1)
        face_ids = keep.nonzero().squeeze(-1)
        best_z = torch.full((n_pix,), float("inf"), device=device)
        best_face = torch.full((n_pix,), -1, dtype=torch.long, device=device)
        best_bary = torch.zeros(n_pix, 3, device=device)
        for start in range(0, face_ids.numel(), step):
            ids = face_ids[start : start + step]
            tri = faces[ids]  # [T, 3]
            p0, p1, p2 = uv[tri[:, 0]], uv[tri[:, 1]], uv[tri[:, 2]]  # [T, 2]
            e1, e2 = p1 - p0, p2 - p0
            area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
            ok = area.abs() > 1e-12
            if not ok.any():
                continue
            ids, tri, p0, p1, p2, area = ids[ok], tri[ok], p0[ok], p1[ok], p2[ok], area[ok]

            def edge(a, b):  # [T, P]: signed area of (a, b, pixel), normalised by the triangle's
                return ((b[:, 0, None] - a[:, 0, None]) * (py[None] - a[:, 1, None])
                        - (b[:, 1, None] - a[:, 1, None]) * (px[None] - a[:, 0, None])) / area[:, None]

            b0, b1, b2 = edge(p1, p2), edge(p2, p0), edge(p0, p1)  # screen-space barycentrics
            inside = (b0 >= 0) & (b1 >= 0) & (b2 >= 0)
            zt = z[tri]  # [T, 3]
            inv_z = b0 / zt[:, 0, None] + b1 / zt[:, 1, None] + b2 / zt[:, 2, None]
            depth = torch.where(inside, 1.0 / inv_z.clamp_min(1e-12), torch.full_like(inv_z, float("inf")))
            d_min, t_min = depth.min(dim=0)  # nearest triangle of this chunk per pixel
            better = d_min < best_z
            if not better.any():
                continue
            pix = better.nonzero().squeeze(-1)
            t_sel = t_min[pix]
            best_z[pix] = d_min[pix]
            best_face[pix] = ids[t_sel]
            bary = torch.stack([b0[t_sel, pix], b1[t_sel, pix], b2[t_sel, pix]], dim=-1)
            # perspective-correct barycentrics: weight by 1/z and renormalise
            bary = bary / zt[t_sel]
            best_bary[pix] = bary / bary.sum(dim=-1, keepdim=True)
        hit = best_face >= 0
        if hit.any():
            tri = faces[best_face[hit]]  # [H, 3]
            color = (best_bary[hit][:, :, None] * cols[tri]).sum(dim=1)  # [H, 3]
            flat = torch.zeros(n_pix, 3, device=device)
            flat[hit] = color
            rgb[view] = flat.T.reshape(3, height, width)
            alpha[view, 0] = hit.float().reshape(height, width)
    return rgb, alpha


def _render_nvdiffrast(verts, faces, cols, viewmats, Ks, width, height, near, far):
    import nvdiffrast.torch as dr

    device = verts.device
    ctx = _NVDR_CONTEXTS.get(device)
    if ctx is None:
        ctx = _NVDR_CONTEXTS[device] = dr.RasterizeCudaContext(device=device)
    proj = projection_from_intrinsics(Ks, width, height, near, far)  # [V, 4, 4]
    homo = torch.cat([verts, torch.ones_like(verts[:, :1])], dim=-1)  # [N, 4]
    clip = torch.einsum("vij,vjk,nk->vni", proj, viewmats, homo).contiguous()  # [V, N, 4]
    tri = faces.to(torch.int32).contiguous()
    rast, _ = dr.rasterize(ctx, clip, tri, resolution=[height, width])  # [V, H, W, 4]
    attr = cols[None].expand(clip.shape[0], -1, -1).contiguous()
    color, _ = dr.interpolate(attr, rast, tri)  # [V, H, W, 3]
    alpha = (rast[..., 3:4] > 0).float()
    return color.permute(0, 3, 1, 2).contiguous(), alpha.permute(0, 3, 1, 2).contiguous()
