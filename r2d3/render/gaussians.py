"""The Gaussian-splat asset: the one 3D representation every backend decodes to.

Conventions (stated once, here):
- world frame is right-handed, **y up**; assets live roughly inside the unit cube centred at the origin;
- ``means``      ``[B, N, 3]`` world positions;
- ``scales``     ``[B, N, 3]`` standard deviations along the Gaussian's local axes, **linear** (not log), > 0;
- ``quats``      ``[B, N, 4]`` rotation quaternions in **(w, x, y, z)** order, unit norm (helpers in
  :mod:`r2d3.render.quaternions`);
- ``opacities``  ``[B, N]`` opacity as a **probability** in [0, 1] (the PLY file stores its logit);
- ``colors``     ``[B, N, 3]`` linear RGB in [0, 1] (the PLY file stores SH degree-0 coefficients).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from r2d3.render.quaternions import quat_from_z_to, rotate_z_by  # noqa: F401 (re-exported for older imports)


class InvalidGaussiansError(ValueError):
    """Raised when a Gaussian set has the wrong shape, dtype or non-finite / out-of-range values."""


@dataclass
class Gaussians:
    means: Tensor
    scales: Tensor
    quats: Tensor
    opacities: Tensor
    colors: Tensor

    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[1]

    def to(self, *args, **kwargs) -> Gaussians:
        return Gaussians(**{f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self)})

    def detach(self) -> Gaussians:
        return Gaussians(**{f.name: getattr(self, f.name).detach() for f in fields(self)})

    def __getitem__(self, index) -> Gaussians:
        """Select assets along the batch axis (keeps the batch axis for int indices too)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Gaussians(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def cat(items: list[Gaussians]) -> Gaussians:
        return Gaussians(**{f.name: torch.cat([getattr(g, f.name) for g in items]) for f in fields(Gaussians)})

    def validate(self, normalize_quats: bool = True) -> Gaussians:
        """Check shapes, dtypes and values; return a copy with unit quaternions.

        Non-unit quaternions are normalised (documented normalisation: any non-zero quaternion
        is a valid rotation); zero quaternions, non-positive scales, opacities outside [0, 1]
        and NaN/inf anywhere raise :class:`InvalidGaussiansError` naming the field.
        """
        expected_last = {"means": 3, "scales": 3, "quats": 4, "colors": 3}
        if self.means.ndim != 3:
            raise InvalidGaussiansError(
                f"Gaussians.means must have shape [B, N, 3], got {tuple(self.means.shape)}"
            )
        b, n = self.means.shape[:2]
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, Tensor):
                raise InvalidGaussiansError(f"Gaussians.{f.name} must be a torch.Tensor, got {type(value)}")
            if not value.is_floating_point():
                raise InvalidGaussiansError(f"Gaussians.{f.name} must be floating point, got {value.dtype}")
            if value.dtype != self.means.dtype:
                raise InvalidGaussiansError(
                    f"Gaussians.{f.name} has dtype {value.dtype}, but means has {self.means.dtype}"
                )
            want = (b, n, expected_last[f.name]) if f.name in expected_last else (b, n)
            if tuple(value.shape) != want:
                raise InvalidGaussiansError(
                    f"Gaussians.{f.name} must have shape {list(want)}, got {list(value.shape)}"
                )
            if not torch.isfinite(value).all():
                raise InvalidGaussiansError(f"Gaussians.{f.name} contains NaN or inf")
        if (self.scales <= 0).any():
            raise InvalidGaussiansError("Gaussians.scales must be > 0 (linear standard deviations, not logs)")
        if ((self.opacities < 0) | (self.opacities > 1)).any():
            raise InvalidGaussiansError("Gaussians.opacities must be probabilities in [0, 1], not logits")
        norm = self.quats.norm(dim=-1, keepdim=True)
        if (norm < 1e-8).any():
            raise InvalidGaussiansError("Gaussians.quats contains a zero quaternion (no rotation defined)")
        quats = self.quats / norm if normalize_quats else self.quats
        return Gaussians(self.means, self.scales, quats, self.opacities, self.colors)
