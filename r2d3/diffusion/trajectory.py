"""What one sampling run records: everything the alignment losses read from a stored trajectory.

Shapes (written once here; B trajectories, K sampling steps, S the latent shape, e.g. ``[C, H, W]``):

=================  ==================  ==========================================================
``latents``        ``[B, K+1, *S]``    x_T, ..., x_0; step j maps ``latents[:, j]`` -> ``latents[:, j+1]``
``timesteps``      ``[K]`` long        model-conditioning timestep of ``latents[:, j]``
``next_timesteps`` ``[K]`` long        model-conditioning timestep of ``latents[:, j+1]`` (last: 0)
``step_indices``   ``[K]`` long        0..K-1, the index every sampler method takes
``model_outputs``  ``[B, K, *S]``      CFG-combined network output at step j (the proximal anchor ε_old)
``means``          ``[B, K, *S]``      step mean μ_j
``stds``           ``[K]``             step std σ_j (0 for deterministic steps)
``noises``         ``[B, K, *S]``      standard-normal z_j, with ``latents[:, j+1] = means[:, j] + stds[j]·z_j``
``log_probs``      ``[B, K]`` or None  log N(x_{j+1}; μ_j, σ_j²) summed over S; None if some σ_j = 0
``scores``         ``[B, K, *S]``/None ∇_{x_{j+1}} log p = -(x_{j+1} - μ_j)/σ_j²; only when requested
``extra_outputs``  ``[B, K, ...]``/None the CFG-combined network output beyond the model output (DiffSplat-PixArt-Σ's
                                       learned-variance half); only when an algorithm regularises the full output
=================  ==================  ==========================================================

Everything except ``latents`` is detached; ``latents`` keeps the autograd graph of the steps sampled
with gradients (``StochasticSampler.sample(grad_last_k=...)``, for DRaFT).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

_PER_SAMPLE = ("latents", "model_outputs", "means", "noises", "log_probs", "scores", "clean_final", "extra_outputs")
_PER_STEP = ("timesteps", "next_timesteps", "step_indices", "stds")


@dataclass
class Trajectory:
    """A batch of sampled denoising trajectories (shapes in the module docstring)."""

    latents: Tensor
    timesteps: Tensor
    next_timesteps: Tensor
    step_indices: Tensor
    model_outputs: Tensor
    means: Tensor
    stds: Tensor
    noises: Tensor
    log_probs: Tensor | None = None
    scores: Tensor | None = None
    #: ``[B, *S]`` x̂_0 predicted at the last state, for models whose last noise level is far from clean
    clean_final: Tensor | None = None
    extra_outputs: Tensor | None = None

    def __post_init__(self) -> None:
        if self.latents.ndim < 2:
            raise ValueError(f"latents must be [B, K+1, ...], got shape {tuple(self.latents.shape)}")
        batch, num_states = self.latents.shape[:2]
        steps = num_states - 1
        latent_shape = tuple(self.latents.shape[2:])
        for name in _PER_STEP:
            value = getattr(self, name)
            if tuple(value.shape) != (steps,):
                raise ValueError(f"Trajectory.{name} must have shape [{steps}], got {tuple(value.shape)}")
        for name in ("model_outputs", "means", "noises", "scores"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (batch, steps, *latent_shape):
                raise ValueError(
                    f"Trajectory.{name} must have shape {[batch, steps, *latent_shape]}, got {list(value.shape)}"
                )
        if self.clean_final is not None and tuple(self.clean_final.shape) != (batch, *latent_shape):
            raise ValueError(f"Trajectory.clean_final must have shape {[batch, *latent_shape]}, "
                             f"got {list(self.clean_final.shape)}")
        if self.extra_outputs is not None and tuple(self.extra_outputs.shape[:2]) != (batch, steps):
            raise ValueError(f"Trajectory.extra_outputs must be [{batch}, {steps}, ...], got {list(self.extra_outputs.shape)}")
        if self.log_probs is not None and tuple(self.log_probs.shape) != (batch, steps):
            raise ValueError(f"Trajectory.log_probs must have shape [{batch}, {steps}], got {list(self.log_probs.shape)}")

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.latents.shape[1] - 1

    @property
    def states(self) -> Tensor:
        """``[B, K, *S]`` the latent each step starts from, x_t (= ``latents[:, :-1]``)."""
        return self.latents[:, :-1]

    @property
    def next_states(self) -> Tensor:
        """``[B, K, *S]`` the latent each step produces, x_{t-1} (= ``latents[:, 1:]``)."""
        return self.latents[:, 1:]

    @property
    def final(self) -> Tensor:
        """``[B, *S]`` the sample that is decoded and rewarded: the last state x_K, or x̂_0 predicted there
        when the sampler recorded it (``final_x0``)."""
        return self.latents[:, -1] if self.clean_final is None else self.clean_final

    def select(self, index: Tensor | Sequence[int] | slice) -> Trajectory:
        """The sub-batch of trajectories ``index`` (per-step tensors are shared)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.latents.device)
        updates = {}
        for name in _PER_SAMPLE:
            value = getattr(self, name)
            updates[name] = None if value is None else value[index]
        return replace(self, **updates)

    def to(self, device: torch.device | str) -> Trajectory:
        """A copy with every tensor on ``device``."""
        updates = {}
        for field in fields(self):
            value = getattr(self, field.name)
            updates[field.name] = None if value is None else value.to(device)
        return replace(self, **updates)

    def detach(self) -> Trajectory:
        """A copy without autograd history (what a replay buffer should hold)."""
        updates = {}
        for field in fields(self):
            value = getattr(self, field.name)
            updates[field.name] = None if value is None else value.detach()
        return replace(self, **updates)

    @staticmethod
    def concat(trajectories: Sequence[Trajectory]) -> Trajectory:
        """Concatenate sampling batches drawn with the same sampler (same per-step tensors) along B."""
        if not trajectories:
            raise ValueError("Trajectory.concat needs at least one trajectory")
        first = trajectories[0]
        for other in trajectories[1:]:
            for name in _PER_STEP:
                if not torch.equal(getattr(first, name), getattr(other, name)):
                    raise ValueError(f"cannot concatenate trajectories with different {name}")
        if len({traj.clean_final is None for traj in trajectories}) > 1:
            raise ValueError("cannot concatenate trajectories with and without clean_final: their final samples "
                             "mean different things")
        updates = {}
        for name in _PER_SAMPLE:
            values = [getattr(traj, name) for traj in trajectories]
            if any(value is None for value in values):
                updates[name] = None
            else:
                updates[name] = torch.cat(values, dim=0)
        return replace(first, **updates)
