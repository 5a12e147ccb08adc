"""The evaluation job's Ray-free parts: checkpoints, prompts and noise, the per-prompt work unit, and the
aggregation into a summary with bootstrap intervals. :mod:`r2d3.ray.evaluate` runs the work units on
Ray Data; ``actors=0`` runs the same code in-process.

Work unit: **one held-out prompt with all its seeds, for every checkpoint** (base first). Doing all
checkpoints of a prompt together makes the comparisons paired by construction — each checkpoint sees
the same prompt, the same initial and step noise and the same cameras — and lets drift (against the
base model's sample from the same noise) and diversity (across the prompt's seeds) be computed where
the samples are. Each unit is computed alone, with the same tensor shapes whatever else is in the
batch, so results do not depend on how Ray groups units: reruns give identical numbers.

Noise and per-sample columns: the pipeline's noise scheme (:mod:`r2d3.pipeline`) and the rows of
:func:`r2d3.eval.samples.measure`; :mod:`r2d3.eval.summary` aggregates them.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from r2d3.backends import load_backend
from r2d3.backends.lora import add_lora, load_lora_state_dict
from r2d3.config import DEFAULT_REWARD, RenderConfig, SamplerConfig
from r2d3.devices import resolve_device
from r2d3.eval.extractors import load_extractor
from r2d3.eval.samples import Measurer
from r2d3.pipeline import Pipeline
from r2d3.rewards import load_reward
from r2d3.train.checkpoint import CorruptCheckpointError, latest_checkpoint, load_lora_file

BASE = "base"


# ---------------------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class CheckpointSpec:
    """One model to evaluate: the base (``path is None``) or a LoRA checkpoint directory."""

    name: str
    path: str | None = None
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the checkpoint's resolved config.yaml, if any

    @property
    def is_base(self) -> bool:
        return self.path is None


def resolve_checkpoint(arg: str) -> CheckpointSpec:
    """``base``; a checkpoint directory (holding ``lora.safetensors``); a ``lora.safetensors`` file; or a
    run directory (its newest complete checkpoint). The name is ``<run>/<checkpoint>``, or ``LABEL`` when
    given as ``LABEL=PATH``."""
    if arg == BASE:
        return CheckpointSpec(BASE)
    label, sep, rest = arg.partition("=")
    if sep and label and "/" not in label and not Path(arg).exists():
        if label == BASE:
            raise ValueError(f"{arg}: the label {BASE!r} is reserved for the base model")
        return dataclasses.replace(resolve_checkpoint(rest), name=label)
    path = Path(arg).expanduser()
    if path.is_file() and path.name == "lora.safetensors":
        path = path.parent
    if path.is_dir() and not (path / "lora.safetensors").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{arg}: neither a checkpoint directory (no lora.safetensors) nor a run "
                                    "directory with a complete checkpoint_* inside")
        path = latest
    if not (path / "lora.safetensors").is_file():
        raise FileNotFoundError(f"checkpoint not found: {arg} (expected 'base', a checkpoint directory with "
                                "lora.safetensors, or a run directory)")
    spec = CheckpointSpec(f"{path.parent.name}/{path.name}", str(path.resolve()))
    if (path / "config.yaml").is_file():
        from omegaconf import OmegaConf

        spec.config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)
        model = spec.config.get("model", {})
        spec.lora_alpha, spec.lora_targets = model.get("lora_alpha"), model.get("lora_targets")
    return spec


def resolve_checkpoints(args: Sequence[str]) -> list[CheckpointSpec]:
    """Specs for ``args`` with the base model first (added when missing); names must be unique."""
    specs = [resolve_checkpoint(a) for a in args]
    if not any(s.is_base for s in specs):
        specs.insert(0, CheckpointSpec(BASE))
    specs.sort(key=lambda s: not s.is_base)  # stable: base first, the others in the given order
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"checkpoints listed twice: {', '.join(dupes)}")
    return specs


class ModelBank:
    """The backend once per LoRA layout; checkpoints swap their adapter weights in, the base model runs
    with adapters disabled (exactly the frozen network)."""

    def __init__(self, backend: str, weights: str | None, device: torch.device | str,
                 checkpoints: list[CheckpointSpec]):
        self._load = lambda: load_backend(backend, weights=weights, device=str(device))
        self.backends: dict[tuple, Any] = {}
        self.states: dict[str, tuple[tuple, dict[str, Tensor]]] = {}
        self.loaded: dict[tuple, str] = {}
        for spec in checkpoints:
            if spec.is_base:
                continue
            file = Path(spec.path) / "lora.safetensors"
            state = load_lora_file(file)
            rank = next((v.shape[0] for k, v in state.items() if "lora_A" in k), None)
            if rank is None:
                raise CorruptCheckpointError(f"{file} holds no LoRA weights (no lora_A tensors): not an r2d3 "
                                             "checkpoint")
            key = (rank, spec.lora_alpha, tuple(spec.lora_targets or ()))
            if key not in self.backends:
                b = self._load()
                add_lora(b.denoiser, rank, spec.lora_alpha, list(spec.lora_targets or b.lora_target_modules))
                self.backends[key] = b
            self.states[spec.name] = (key, {k: v.to(device) for k, v in state.items()})
            self._swap_in(spec.name, file)  # a checkpoint that does not fit the backend fails here, not mid-job
        self.base = next(iter(self.backends.values()), None)
        if self.base is None:
            self.base = self._load()

    def _swap_in(self, name: str, file: Path | None = None) -> Any:
        key, state = self.states[name]
        backend = self.backends[key]
        if self.loaded.get(key) != name:
            try:
                load_lora_state_dict(backend.denoiser, state)
            except (RuntimeError, ValueError) as err:
                raise CorruptCheckpointError(f"{file or name} does not fit backend {backend.name!r}: "
                                             f"{str(err).splitlines()[0]}") from err
            self.loaded[key] = name
        return backend

    def backend_for(self, spec: CheckpointSpec) -> tuple[Any, bool]:
        """(backend, run it with adapters disabled)."""
        if spec.is_base:
            return self.base, bool(self.backends)
        return self._swap_in(spec.name), False


# ---------------------------------------------------------------------------------------------------------
# the work unit


@dataclass
class EvalSettings:
    """Everything a worker needs besides the prompts (picklable; shared by all units)."""

    checkpoints: list[CheckpointSpec]
    seeds: list[int]
    backend: str = "tiny"
    weights: str | None = None
    reward: Any = field(default_factory=lambda: copy.deepcopy(DEFAULT_REWARD))
    extractor: str = "clip_tiny"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    device: str = "cpu"
    previews: bool = True  # PNG of the first seed's views per (checkpoint, prompt), for the report

    def describe(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["checkpoints"] = [{"name": c.name, "path": c.path} for c in self.checkpoints]
        return out


class PromptEvaluator:
    """Builds the models, reward and extractor once; ``evaluate_prompts`` returns one row per checkpoint x
    prompt x seed; calling it on a batch of units ``{"prompt_index": [...], "prompt": [...]}`` returns all rows."""

    def __init__(self, settings: EvalSettings):
        if len(settings.seeds) < 1 or len(set(settings.seeds)) != len(settings.seeds):
            raise ValueError(f"need at least one seed and no repeats, got {settings.seeds}")
        if not settings.checkpoints or not settings.checkpoints[0].is_base:
            raise ValueError("the base model must be the first checkpoint (drift and FID are measured against it)")
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.bank = ModelBank(settings.backend, settings.weights, self.device, settings.checkpoints)
        self.reward_fn = load_reward(settings.reward, self.device)
        self.extractor = load_extractor(settings.extractor, self.device)
        self._pipelines: dict[int, Pipeline] = {}

    def pipeline(self, backend) -> Pipeline:
        """The pipeline over one of the bank's backends (built once per backend)."""
        if id(backend) not in self._pipelines:
            self._pipelines[id(backend)] = Pipeline.build(backend, self.settings.sampler, self.settings.render,
                                                          self.reward_fn)
        return self._pipelines[id(backend)]

    def evaluate_prompts(self, prompt_indices: Sequence[int], prompts: Sequence[str],
                         chunk: int | None = None) -> list[dict[str, Any]]:
        """The job's unit: prompts with all their seeds, for every checkpoint (sampled ``chunk`` at a time).
        Every sample keeps its own noise and cameras, so values do not depend on how prompts are grouped
        (up to float round-off)."""
        meter = Measurer(self.extractor, prompt_indices, prompts, self.settings.seeds, self.settings.previews, chunk)
        rows: list[dict[str, Any]] = []
        for spec in self.settings.checkpoints:  # base first: the drift reference
            backend, disable = self.bank.backend_for(spec)  # loads this checkpoint's LoRA
            rows += meter.rows(spec.name, self.pipeline(backend), disable)
        return rows

    def __call__(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for index, prompt in zip(batch["prompt_index"], batch["prompt"]):
            rows += self.evaluate_prompts([int(index)], [str(prompt)])
        return rows


__all__ = ["BASE", "CheckpointSpec", "EvalSettings", "ModelBank", "PromptEvaluator", "resolve_checkpoint",
           "resolve_checkpoints"]
