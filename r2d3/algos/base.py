"""What every alignment algorithm shares: the stored batch, transition subsampling, and the registry.

An algorithm is a loss over stored trajectories: ``accumulate(ctx, batch, scale)`` back-propagates
``scale`` times its loss on one train batch into the LoRA parameters and returns metrics; ``ctx`` is the
run's :class:`~r2d3.pipeline.Pipeline` (backend, sampler, renderer, reward). The loop that
samples, calls it, clips and steps is shared (:mod:`r2d3.train.loop`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor

from r2d3.config import AlgoConfig, Variants, at_least, opt, within
from r2d3.diffusion import Trajectory
from r2d3.pipeline import Generation, Pipeline
from r2d3.plugins import load_plugins
from r2d3.render.cameras import Cameras
from r2d3.text import PromptEmbeds


@dataclass
class Targets:
    """Per-transition regression targets computed once, right after sampling, without any LoRA graph
    (``nabla_gfn`` with ``algo.precompute_targets``): row ``b`` holds trajectory ``b``'s trained steps.

    They travel with their trajectories through the off-policy buffer and checkpoints, so a resumed
    run trains on the very targets the interrupted one computed."""

    steps: Tensor  # [B, n] long: the transitions each trajectory trains
    score_ref: Tensor  # [B, n, *S] the reference model's score of x_{t-1} (LoRA off)
    drive: Tensor  # [B, n, *S] beta * w * grad r at x_{t-1} (clipped), from the sampling policy's x0_hat
    reward: Tensor  # [B, n] reward at that x0_hat (a metric)
    reward_grad_norm: Tensor  # [B, n] |grad r| before scaling (a metric)

    def select(self, index: Tensor) -> Targets:
        return Targets(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def cat(items: Sequence[Targets]) -> Targets:
        return Targets(*(torch.cat([getattr(t, f.name) for t in items]) for f in fields(Targets)))

    def tensors(self) -> dict[str, Tensor]:
        """Flat ``targets.<field>`` tensors, for the buffer in a checkpoint."""
        return {f"targets.{f.name}": getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def from_tensors(data: dict[str, Tensor], device: torch.device) -> Targets | None:
        if "targets.steps" not in data:
            return None
        return Targets(*(data[f"targets.{f.name}"].to(device) for f in fields(Targets)))


@dataclass
class SampleBatch:
    """Trajectories sampled by one policy, with their prompts, text embeddings and final rewards."""

    trajectory: Trajectory
    prompts: list[str]
    cond: PromptEmbeds
    rewards: Tensor  # [B] reward of the final sample (logged; DDPO's advantage source)
    advantages: Tensor | None = None  # [B], set by algorithms that need them (DDPO)
    targets: Targets | None = None  # set by algorithms that precompute them (Algorithm.precompute)

    def __len__(self) -> int:
        return len(self.prompts)

    @staticmethod
    def from_generation(g: Generation) -> SampleBatch:
        return SampleBatch(g.trajectory, g.prompts, g.cond, g.rewards)

    def select(self, index: Tensor) -> SampleBatch:
        idx = index.tolist()
        return SampleBatch(self.trajectory.select(index), [self.prompts[i] for i in idx],
                           PromptEmbeds(self.cond.tokens[index], self.cond.mask[index]), self.rewards[index],
                           None if self.advantages is None else self.advantages[index],
                           None if self.targets is None else self.targets.select(index))

    @staticmethod
    def concat(batches: Sequence[SampleBatch]) -> SampleBatch:
        targets = [b.targets for b in batches]
        return SampleBatch(Trajectory.concat([b.trajectory for b in batches]), sum((b.prompts for b in batches), []),
                           PromptEmbeds.cat([b.cond for b in batches]), torch.cat([b.rewards for b in batches]),
                           targets=Targets.cat(targets) if all(t is not None for t in targets) else None)


@dataclass
class Transitions:
    """Trained transitions stacked as rows, so that the denoiser, decoder, renderer and reward see them
    as one batch: row ``r`` is step ``steps[r]`` of trajectory ``index[r]`` of ``trajectory``, with that
    trajectory's prompt, embedding and reward cameras (and precomputed targets, when there are any)."""

    trajectory: Trajectory
    index: Tensor  # [N] long
    steps: Tensor  # [N] long
    prompts: list[str]
    cond: PromptEmbeds | None
    cameras: Cameras | None
    targets: dict[str, Tensor] | None = None  # the rows of Targets' per-transition tensors

    @staticmethod
    def of(batch: SampleBatch, index: Tensor, steps: Tensor, cameras: Cameras | None = None) -> Transitions:
        """Rows ``(index[r], steps[r])`` of ``batch``; ``cameras`` are per row (None: the toy contexts')."""
        device = batch.trajectory.latents.device
        index, steps = index.to(device), steps.to(device)
        return Transitions(batch.trajectory, index, steps, [batch.prompts[i] for i in index.tolist()],
                           None if batch.cond is None else batch.cond[index], cameras)

    @staticmethod
    def step_major(batch: SampleBatch, steps: Sequence[int], cameras: Cameras | Sequence[Cameras] | None = None
                   ) -> Transitions:
        """Steps ``steps`` of every trajectory of ``batch``, step by step (rows ``j * B .. j * B + B - 1`` are
        step ``steps[j]``). ``cameras``: one set for the batch ``[B, ...]``, one per step, or None."""
        size = len(batch)
        index = torch.arange(size).repeat(len(steps))
        step_rows = torch.tensor(steps, dtype=torch.long).repeat_interleave(size)
        if isinstance(cameras, Cameras):
            cameras = cameras[index.to(cameras.viewmats.device)]
        elif cameras is not None:
            cameras = None if any(c is None for c in cameras) else Cameras.cat(list(cameras))
        return Transitions.of(batch, index, step_rows, cameras)

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, per_step: Tensor) -> Tensor:
        """The rows of a per-sample, per-step tensor ``[B, K, ...]``."""
        return per_step[self.index, self.steps]

    @property
    def x_t(self) -> Tensor:
        return self.trajectory.latents[self.index, self.steps]

    @property
    def x_next(self) -> Tensor:
        return self.trajectory.latents[self.index, self.steps + 1]

    @property
    def t(self) -> Tensor:
        """``[N]`` the model-conditioning timestep of each row's x_t."""
        return self.trajectory.timesteps.to(self.steps.device)[self.steps]

    def chunks(self, rows: int) -> list[Transitions]:
        """Consecutive groups of at most ``rows`` rows (``rows`` <= 0: one group)."""
        if rows <= 0 or rows >= len(self):
            return [self]
        out = []
        for lo in range(0, len(self), rows):
            part = slice(lo, lo + rows)
            out.append(Transitions(self.trajectory, self.index[part], self.steps[part], self.prompts[part],
                                   None if self.cond is None else self.cond[part],
                                   None if self.cameras is None else self.cameras[part],
                                   None if self.targets is None else {k: v[part] for k, v in self.targets.items()}))
        return out


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

    def build_modules(self, ctx: Pipeline) -> dict[str, TrainedModule]:
        """Networks this algorithm trains besides the LoRA, built for ``ctx``'s backend (usually none); also
        where it asks ``ctx`` to record more of each trajectory (``Pipeline.record_full_outputs``)."""
        ...

    def prepare(self, batch: SampleBatch) -> SampleBatch:
        """Annotate a whole epoch's samples before training on them (DDPO's advantages); usually identity."""
        ...

    def precompute(self, ctx: Pipeline, batch: SampleBatch, generator: torch.Generator) -> SampleBatch:
        """Annotate freshly sampled trajectories while the LoRA is still the sampling policy (the targets
        of ``nabla_gfn`` with ``precompute_targets``); usually identity."""
        ...

    def accumulate(self, ctx: Pipeline, batch: SampleBatch, scale: float,
                   generator: torch.Generator) -> dict[str, float]:
        """Add ``scale`` times this batch's loss gradient into the trained parameters; return its metrics."""
        ...


class AlgorithmBase:
    """The protocol's defaults: on-policy, no networks besides the LoRA, samples used as drawn."""

    uses_lag = False

    def build_modules(self, ctx: Pipeline) -> dict[str, TrainedModule]:
        return {}

    def prepare(self, batch: SampleBatch) -> SampleBatch:
        return batch

    def precompute(self, ctx: Pipeline, batch: SampleBatch, generator: torch.Generator) -> SampleBatch:
        return batch


#: values of ``algo.subsampling``
SUBSAMPLINGS = ("stratified", "official")


@dataclass
class TransitionOptions(AlgoConfig):
    """Options of the algorithms that train on several stored transitions per trajectory."""

    timestep_fraction: float = opt(0.4, "fraction of each trajectory's transitions trained (stratified, the last "
                                        "always included)", check=within(0, 1, open_low=True))
    subsampling: str = opt("stratified", "which transitions: stratified (round(fraction*K) distinct steps, the last "
                                         "and one per equal block) | official (the reference code's low-variance "
                                         "subsampling: the last step, then steps drawn without replacement from "
                                         "4 equal blocks in turn, int(fraction*K) in all; the last may repeat; "
                                         "needs K divisible by 4)", choices=SUBSAMPLINGS)
    transition_batch: int = opt(32, "trained transitions per pass through the denoiser, decoder, renderer and "
                                    "reward (rows; 0: all of a train batch at once); the memory bound, not the "
                                    "loss: every value gives the same gradient", check=at_least(0))

    def check_steps(self, num_steps: int) -> None:
        """Refuse a schedule the subsampling is not defined for (before anything loads)."""
        if self.subsampling == "official" and (num_steps % 4 or int(self.timestep_fraction * num_steps) < 1):
            raise ValueError(f"algo.subsampling=official needs sampler.num_steps divisible by 4 and "
                             f"int(algo.timestep_fraction * num_steps) >= 1, got {num_steps} steps")

    def transitions(self, num_steps: int, generator: torch.Generator) -> list[int]:
        """The step indices one trajectory trains this time (see ``subsampling``)."""
        if self.subsampling == "official":
            return official_transitions(num_steps, self.timestep_fraction, generator)
        return stratified_transitions(num_steps, self.timestep_fraction, generator)


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


def official_transitions(num_steps: int, fraction: float, generator: torch.Generator) -> list[int]:
    """The reference code's "low-variance subsampling", generalised from its hard-coded 20 steps to any K
    divisible by 4: a random permutation of each of the 4 equal blocks of the schedule, read block by block
    in turn (1st of block 0, of block 1, ..., 2nd of block 0, ...), after the last step; the first
    ``int(fraction * K)`` are trained. At K = 20, fraction 0.4: step 19 plus two distinct draws from each of
    blocks 0-4, 5-9, 10-14 and one from 15-19 (so step 19 is trained twice in 1 of 5 trajectories)."""
    block = num_steps // 4
    perms = [torch.randperm(block, generator=generator) + b * block for b in range(4)]
    interleaved = [int(perms[b][i]) for i in range(block) for b in range(4)]
    return ([num_steps - 1] + interleaved)[: int(fraction * num_steps)]


_REGISTRY: dict[str, tuple[Callable[[Any, int], Algorithm], type[AlgoConfig]]] = {}


def register_algorithm(name: str, options: type[AlgoConfig] = AlgoConfig):
    """Register ``factory(options, num_steps) -> Algorithm`` (a class or a function) under ``name``.

    ``options`` is the algorithm's own option group: a dataclass subclass of
    :class:`~r2d3.config.AlgoConfig` (``opt`` fields with help, choices and checks) whose ``name``
    defaults to ``name``. With ``algo.name=<name>`` the config's ``algo`` section is this class, so its
    options appear in ``--help``, are checked when the config is built and are errors under any other
    algorithm."""
    if not (isinstance(options, type) and issubclass(options, AlgoConfig)):
        raise TypeError(f"options of algorithm {name!r} must be a subclass of AlgoConfig, got {options!r}")
    if options is not AlgoConfig and options().name != name:
        raise ValueError(f"options of algorithm {name!r} ({options.__name__}) default name to {options().name!r}")

    def wrap(factory):
        _REGISTRY[name] = (factory, options)
        return factory

    return wrap


def available_algorithms() -> list[str]:
    load_plugins()
    return sorted(_REGISTRY)


def algorithm_options(name: str) -> type[AlgoConfig]:
    """The option class of algorithm ``name``; unknown names list the valid ones."""
    if name not in available_algorithms():
        raise ValueError(f"unknown algorithm {name!r}; valid algorithms: {', '.join(available_algorithms())}")
    return _REGISTRY[name][1]


#: the ``algo`` section's variants, for configs that compose it (:func:`r2d3.config.variant_section`)
ALGORITHM_VARIANTS = Variants(resolve=algorithm_options, names=available_algorithms)


def build_algorithm(config: AlgoConfig, num_steps: int) -> Algorithm:
    """Build ``config.name`` from its options (checked when ``config`` was built); what combines options
    or depends on the number of steps is checked here, named as ``algo.<key>``."""
    cls = algorithm_options(config.name)
    if not isinstance(config, cls):
        raise TypeError(f"algorithm {config.name!r} takes {cls.__name__} options, got {type(config).__name__}")
    return _REGISTRY[config.name][0](config, num_steps)


def as_dict(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in metrics.items()}



