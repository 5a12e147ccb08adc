"""Quaternion helpers shared by the renderer, the exporters, the backends and the procedural data.

Convention (as in :mod:`r2d3.render.gaussians`): unit quaternions ``[..., 4]`` in **(w, x, y, z)**
order, Hamilton product, acting on column vectors (``v' = R(q) v``). A splat's rotation maps its local
axes onto the world: column ``i`` of :func:`quat_to_rotmat` is the world direction of local axis ``i``,
so for a surface splat local +z (its shortest axis) is the surface normal.

Everything is pure torch, batched over leading dimensions, differentiable and dtype-preserving.
"""

from __future__ import annotations

import torch
from torch import Tensor


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` from unit quaternions ``[..., 4]`` in (w, x, y, z) order."""
    w, x, y, z = quats.unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*quats.shape[:-1], 3, 3)


def rotate_z_by(quats: Tensor) -> Tensor:
    """The image of +z under unit quaternions (w, x, y, z): the third column of the rotation matrix."""
    return quat_to_rotmat(quats)[..., 2]


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product ``a * b`` ``[..., 4]`` (broadcast): the rotation ``b`` followed by ``a``."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], dim=-1)  # fmt: skip


def quat_spin_z(quats: Tensor, cos_half: Tensor, sin_half: Tensor) -> Tensor:
    """``quats * (cos_half, 0, 0, sin_half)``: the rotation ``quats`` preceded by a spin about local z
    by the angle whose half has this cosine and sine. The product with the zero components written out,
    so it costs half of :func:`quat_multiply` and keeps the signs of zero results (bit-identical data)."""
    w, x, y, z = quats.unbind(-1)
    c, s = cos_half, sin_half
    return torch.stack([w * c - z * s, x * c + y * s, y * c - x * s, z * c + w * s], -1)


def _arc_from_z(nx: Tensor, ny: Tensor, nz: Tensor) -> Tensor:
    """The shortest-arc quaternion taking +z to the unit vector ``(nx, ny, nz)``, unnormalised: its norm
    ``sqrt(2 (1 + nz))`` vanishes as the vector approaches -z."""
    return torch.stack([1 + nz, -ny, nx, torch.zeros_like(nz)], dim=-1)


def quat_from_z_to(normal: Tensor) -> Tensor:
    """Unit quaternion (w, x, y, z) rotating +z onto the unit vector ``normal`` (shortest arc)."""
    q = _arc_from_z(*normal.unbind(-1))
    norm = q.norm(dim=-1, keepdim=True)
    flip = q.new_tensor([0.0, 1.0, 0.0, 0.0]).expand_as(q)  # +z -> -z: half turn about x
    return torch.where(norm > 1e-6, q / norm.clamp(min=1e-12), flip)


def splat_quats(normals: Tensor, first_axis: Tensor | None = None) -> Tensor:
    """Unit quaternions (w, x, y, z), w >= 0, for surface splats: local +z goes to ``normals`` and
    local +x to ``first_axis`` projected onto the tangent plane (any tangent where it is ~0 or None).

    Built as the shortest arc from +z (from -z after a half turn about x for normals in the lower
    hemisphere, so no branch divides by a vanishing norm), followed by a spin about the normal.
    Unlike :func:`quat_from_z_to` (which the tiny and Shap-E backends decode with, so it stays as it
    is) this is stable for every normal; the two give different tangent frames in the lower hemisphere.
    """
    nx, ny, nz = normals.unbind(-1)
    upper = _arc_from_z(nx, ny, nz)
    lower = torch.stack([-ny, 1 - nz, torch.zeros_like(nz), nx], -1)
    q = torch.nn.functional.normalize(torch.where((nz >= 0)[..., None], upper, lower), dim=-1)
    if first_axis is not None:
        rot = quat_to_rotmat(q)  # its first two columns span the tangent plane
        cos_sin = torch.stack([(first_axis * rot[..., 0]).sum(-1), (first_axis * rot[..., 1]).sum(-1)], -1)
        norm = cos_sin.norm(dim=-1, keepdim=True)
        no_spin = torch.tensor([1.0, 0.0], dtype=q.dtype)
        cos_sin = torch.where(norm > 1e-3, cos_sin / norm.clamp(min=1e-3), no_spin)  # (cos psi, sin psi)
        hc = ((1 + cos_sin[..., 0]) / 2).clamp(min=0).sqrt()  # cos(psi / 2)
        hs = ((1 - cos_sin[..., 0]) / 2).clamp(min=0).sqrt() * torch.where(cos_sin[..., 1] < 0, -1.0, 1.0)
        q = quat_spin_z(q, hc, hs)  # a spin by psi about local z (the normal)
    return torch.where(q[..., :1] < 0, -q, q)
