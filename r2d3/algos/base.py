"""What every alignment algorithm shares: the stored batch, the model/decoder/renderer/reward chain,
transition subsampling, and the registry.

An algorithm is a loss over stored trajectories: ``accumulate(ctx, batch, scale)`` back-propagates
``scale`` times its loss on one train batch into the LoRA parameters and returns metrics. The loop that
samples, calls it, clips and steps is shared (:mod:`r2d3.train.loop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from r2d3.backends.base import Backend
from r2d3.backends.text import PromptEmbeds
from r2d3.config import AlgoConfig, RenderConfig, SamplerConfig
from r2d3.diffusion import StochasticSampler, Trajectory, guided_model_fn, scheduler_from_config
from r2d3.render import render_gaussians
from r2d3.render.cameras import Cameras, jittered_orbit_cameras
from r2d3.render.gaussians import Gaussians
from r2d3.render.output import RenderOutput


@dataclass
class SampleBatch:
    """Trajectories sampled by one policy, with their prompts, text embeddings and final rewards."""

    trajectory: Trajectory
    prompts: list[str]
    cond: PromptEmbeds
    rewards: Tensor  # [B] reward of the final sample (logged; DDPO's advantage source)
    advantages: Tensor | None = None  # [B], set by algorithms that need them (DDPO)

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: Tensor) -> "SampleBatch":
        idx = index.tolist()
        return SampleBatch(self.trajectory.select(index), [self.prompts[i] for i in idx],
                           PromptEmbeds(self.cond.tokens[index], self.cond.mask[index]), self.rewards[index],
                           None if self.advantages is None else self.advantages[index])

    @staticmethod
    def concat(batches: Sequence["SampleBatch"]) -> "SampleBatch":
        return SampleBatch(Trajectory.concat([b.trajectory for b in batches]), sum((b.prompts for b in batches), []),
                           PromptEmbeds.cat([b.cond for b in batches]), torch.cat([b.rewards for b in batches]))


#: Rewards ``[B]`` (mean over views) of decoded assets seen by ``cameras`` for ``prompts``, differentiable
#: in the Gaussians' tensors: the seam where render + reward can move out of the trainer's process.
Scorer = Callable[[Gaussians, Cameras, Sequence[str]], Tensor]


@dataclass
class AlignContext:
    """The frozen pieces of an alignment run on one worker.

    ``scorer``, when set, replaces the in-process render + reward after decoding (a pool of remote
    render/reward actors, say); decoding and the denoiser's chain rule stay in the trainer."""

    backend: Backend
    sampler: StochasticSampler
    reward_fn: Callable[[RenderOutput, Sequence[str]], Tensor]
    render: RenderConfig
    guidance_scale: float
    uncond: PromptEmbeds  # the empty prompt, one row
    scorer: Scorer | None = None

    def model_fn(self, cond: PromptEmbeds) -> Callable[[Tensor, Tensor], Tensor]:
        """The guided network output ``f(x, t)`` for these prompts (differentiable)."""
        both = PromptEmbeds.cat([cond, self.uncond])
        cond, uncond = both[: len(cond)], both[len(cond):]

        def denoise(x: Tensor, t: Tensor, c: dict[str, Tensor]) -> Tensor:
            return self.backend.denoise(x, t, PromptEmbeds(c["tokens"], c["mask"]))

        return guided_model_fn(denoise, {"tokens": cond.tokens, "mask": cond.mask},
                               {"tokens": uncond.tokens, "mask": uncond.mask}, self.guidance_scale)

    def cameras(self, batch_size: int, generator: torch.Generator | None, jitter: bool = True) -> Cameras:
        r = self.render
        cams = jittered_orbit_cameras(
            r.num_views, batch_size, generator=generator, elevation_deg=r.elevation_deg,
            elevation_jitter_deg=r.elevation_jitter_deg if jitter else 0.0,
            azimuth_jitter_deg=r.azimuth_jitter_deg if jitter else 0.0,
            distance=r.distance, fov_deg=r.fov_deg, width=r.resolution, height=r.resolution,
        )
        return cams.to(self.backend.device)

    def render_latents(self, x0: Tensor, cameras: Cameras) -> RenderOutput:
        return render_gaussians(self.backend.decode(x0), cameras, background=tuple(self.render.background),
                                backend=self.render.backend)

    def reward_of_latents(self, x0: Tensor, prompts: Sequence[str], cameras: Cameras) -> Tensor:
        """Decode -> render -> reward averaged over views, ``[B]``; differentiable in ``x0``."""
        if self.scorer is not None:
            return self.scorer(self.backend.decode(x0), cameras, prompts)
        return self.reward_fn(self.render_latents(x0, cameras), prompts)


def make_context(backend: Backend, sampler: SamplerConfig, reward_fn: Callable[[RenderOutput, Sequence[str]], Tensor],
                 render: RenderConfig, scorer: Scorer | None = None) -> AlignContext:
    """An :class:`AlignContext` for ``backend`` with the configured stochastic sampler: what the trainer,
    the evaluation job and the regeneration job all sample with."""
    stochastic = StochasticSampler(scheduler_from_config(backend.scheduler_config, kind=sampler.kind),
                                   sampler.num_steps, eta=sampler.eta)
    return AlignContext(backend, stochastic, reward_fn, render, sampler.guidance_scale,
                        backend.encode_prompts([""]), scorer=scorer)


@dataclass
class TrainedModule:
    """A network an algorithm trains besides the LoRA (its own AdamW parameter group; checkpointed)."""

    module: torch.nn.Module
    lr: float
    weight_decay: float


class Algorithm(Protocol):
    name: str
    #: train on the previous epoch's samples (off-policy lag) instead of this epoch's
    uses_lag: bool

    def build_modules(self, ctx: AlignContext) -> dict[str, TrainedModule]:
        """Networks this algorithm trains besides the LoRA, built for ``ctx``'s backend (usually none)."""
        ...

    def accumulate(self, ctx: AlignContext, batch: SampleBatch, scale: float,
                   generator: torch.Generator) -> dict[str, float]: ...


class AlgorithmBase:
    """The protocol's defaults: on-policy, no networks besides the LoRA."""

    uses_lag = False

    def build_modules(self, ctx: AlignContext) -> dict[str, TrainedModule]:
        return {}


def prepare_batch(algorithm: Algorithm, batch: SampleBatch) -> SampleBatch:
    """Let an algorithm annotate a whole epoch's samples before training (DDPO's advantages)."""
    prepare = getattr(algorithm, "prepare", None)
    return prepare(batch) if prepare else batch


def stratified_transitions(num_steps: int, fraction: float, generator: torch.Generator) -> list[int]:
    """``ceil(fraction * K)`` distinct step indices: the last transition (into x_0) always, the rest one
    uniform draw per equal-width block of the schedule ("low-variance subsampling")."""
    if not 0 < fraction <= 1:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {fraction}")
    count = max(1, min(num_steps, round(fraction * num_steps)))
    if count == num_steps:
        return list(range(num_steps))
    rest = num_steps - 1  # steps 0..K-2 are split into count-1 blocks
    edges = torch.linspace(0, rest, count).round().long().tolist()
    picks = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        hi = max(hi, lo + 1)
        picks.append(lo + int(torch.randint(hi - lo, (1,), generator=generator)))
    return sorted(set(picks)) + [num_steps - 1]


_REGISTRY: dict[str, Callable[[AlgoConfig, int], Algorithm]] = {}


def register_algorithm(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_algorithms() -> list[str]:
    return sorted(_REGISTRY)


def build_algorithm(config: AlgoConfig, num_steps: int) -> Algorithm:
    """Validate the hyperparameters and build the named algorithm; unknown names list the valid ones."""
    if config.name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {config.name!r}; valid algorithms: {', '.join(available_algorithms())}")
    return _REGISTRY[config.name](config, num_steps)


def as_dict(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in metrics.items()}



