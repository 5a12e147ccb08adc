"""One checkpoint format for every run: a directory holding

    lora.safetensors       adapter weights, peft/diffusers keys (no DDP ``module.`` prefixes)
    optimizer.pt           AdamW state (plain tensors/numbers; loaded with ``weights_only=True``)
    rng.safetensors        the loop's torch.Generator state (so a resumed run draws the same numbers)
    buffer.safetensors     the previous epoch's trajectories (the off-policy lag needs them to resume)
    buffer.json            their prompts
    modules.safetensors    the algorithm's own networks, when it trains any (Nabla-GFlowNet's g_phi)
    state.json             counters (epoch, optimizer steps, skipped batches), the config fingerprint and
                           every other file's size (written last: a copy that does not match is incomplete)
    config.yaml            the resolved config

Writes go to a temporary sibling directory renamed into place, so a crash mid-save never leaves a
checkpoint that looks complete but is not.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from r2d3.config import to_dict, to_yaml
from r2d3.train.config import AlignConfig
from r2d3.storage import atomic_dir

#: options that may change between a run and its resumption without changing what is trained
RESUMABLE_KEYS = {"run.resume", "run.restart", "run.progress", "run.wandb_mode", "run.log_images_every", "run.output_dir",
                  "run.checkpoint_every", "run.keep_checkpoints", "run.name", "train.epochs", "eval",
                  "scale", "run.device", "data.embeddings", "data.shuffle_buffer"}


class CheckpointMismatchError(ValueError):
    """Resuming a run with a config that changes what is trained."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read or holds non-finite weights; the message names the file."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "reward":
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def training_fingerprint(config: AlignConfig) -> dict[str, Any]:
    """The config values that define the training trajectory (everything but logging/length/scale)."""
    flat = _flatten(to_dict(config))
    return {k: v for k, v in flat.items()
            if k not in RESUMABLE_KEYS and k.split(".")[0] not in RESUMABLE_KEYS}


def check_compatible(saved: dict[str, Any], config: AlignConfig) -> None:
    """Refuse to resume under a config that changes the training trajectory. An option added after the
    checkpoint was written counts as its default (the behaviour the checkpoint was trained with)."""
    current = training_fingerprint(config)
    defaults = training_fingerprint(AlignConfig())
    saved = {k: defaults[k] for k in current if k not in saved and k in defaults} | saved
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointMismatchError(
            "cannot resume: the checkpoint was written with a different config ("
            + "; ".join(diffs[:5]) + "). Use a new run.name or set run.resume=false."
        )


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    optimizer_steps: int = 0
    bad_batches: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    before: dict[str, Any] | None = None  # the base model's held-out metrics, kept across resumptions
    resumes: list[int] = field(default_factory=list)  # the epoch each resumption started from


#: written last, listing every other file with its size: a copy (an upload cut short, an optional
#: buffer file missing) that does not match it is incomplete, and uploads send it last
STATE = "state.json"


def _write_checkpoint(tmp: Path, config: AlignConfig, state: TrainState, lora: dict[str, torch.Tensor],
                      optimizer: torch.optim.Optimizer, generator: torch.Generator,
                      buffer: dict[str, torch.Tensor] | None, buffer_prompts: list[str] | None,
                      modules: dict[str, torch.Tensor] | None) -> None:
    save_file(lora, tmp / "lora.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    save_file({"generator": generator.get_state()}, tmp / "rng.safetensors")
    if modules:
        save_file({k: v.contiguous() for k, v in modules.items()}, tmp / "modules.safetensors")
    if buffer is not None:
        save_file({k: v.contiguous() for k, v in buffer.items()}, tmp / "buffer.safetensors")
        (tmp / "buffer.json").write_text(json.dumps({"prompts": buffer_prompts or []}))
    (tmp / "config.yaml").write_text(to_yaml(config))
    meta = {"epoch": state.epoch, "optimizer_steps": state.optimizer_steps, "bad_batches": state.bad_batches,
            "history": state.history, "before": state.before, "resumes": state.resumes,
            "fingerprint": training_fingerprint(config),
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}}
    (tmp / STATE).write_text(json.dumps(meta, indent=1))


def save_checkpoint(
    path: str | os.PathLike,
    config: AlignConfig,
    lora: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: TrainState,
    buffer: dict[str, torch.Tensor] | None = None,
    buffer_prompts: list[str] | None = None,
    modules: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Every file of a resumable checkpoint, written to a sibling directory that replaces ``path`` only
    once complete (a crash mid-write leaves the previous checkpoints as they were)."""
    path = Path(path)
    try:
        with atomic_dir(path) as tmp:
            _write_checkpoint(tmp, config, state, lora, optimizer, generator, buffer, buffer_prompts, modules)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError from its zip writer
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
        full = "no space left on the device" if free < 64 * 2**20 or "No space" in str(err) or "enforce fail" in str(err) \
            else str(err).splitlines()[0]
        raise OSError(f"cannot write checkpoint {path}: {full} ({free / 2**20:.0f} MiB free there); the previous "
                      "checkpoint is kept") from err
    return path


@dataclass
class LoadedCheckpoint:
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    generator_state: torch.Tensor
    state: TrainState
    buffer: dict[str, torch.Tensor] | None
    buffer_prompts: list[str] | None
    fingerprint: dict[str, Any]
    modules: dict[str, torch.Tensor] | None = None  # the algorithm's own networks (g_phi), when it has any


def _read(path: Path, name: str, reader):
    try:
        return reader(path / name)
    except Exception as err:  # truncated/empty safetensors, bad zip, bad JSON: one message naming the file
        raise CorruptCheckpointError(f"checkpoint file {path / name} is unreadable "
                                     f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err


def load_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``lora.safetensors`` file's tensors, checked to be readable and finite (errors name the file)."""
    path = Path(path)
    lora = _read(path.parent, path.name, load_file)
    bad = [k for k, v in lora.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CorruptCheckpointError(f"checkpoint file {path} holds non-finite weights ({len(bad)} tensors, "
                                     f"first {bad[0]})")
    if not lora:
        raise CorruptCheckpointError(f"checkpoint file {path} holds no tensors")
    return lora


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Every file of a checkpoint; :class:`CorruptCheckpointError` names the first unreadable one."""
    path = Path(path)
    needed = ["lora.safetensors", "optimizer.pt", "rng.safetensors", "state.json"]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise CorruptCheckpointError(f"incomplete checkpoint {path}: missing {', '.join(missing)}")
    meta = _read(path, STATE, lambda p: json.loads(p.read_text()))
    listed = meta.get("files") if isinstance(meta, dict) else None
    if isinstance(listed, dict):  # checkpoints written before the list was kept lack it
        short = [n for n, size in listed.items() if not (path / n).is_file() or (path / n).stat().st_size != size]
        if short:
            raise CorruptCheckpointError(f"incomplete checkpoint {path}: {', '.join(short)} missing or cut short")
    try:
        state = TrainState(int(meta["epoch"]), int(meta["optimizer_steps"]), int(meta["bad_batches"]),
                           list(meta.get("history", [])), meta.get("before"), list(meta.get("resumes", [])))
        fingerprint = dict(meta["fingerprint"])
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptCheckpointError(f"checkpoint file {path / 'state.json'} lacks {err}") from err
    has_buffer = (path / "buffer.safetensors").is_file()
    return LoadedCheckpoint(
        lora=load_lora_file(path / "lora.safetensors"),
        optimizer=_read(path, "optimizer.pt", lambda p: torch.load(p, weights_only=True)),
        generator_state=_read(path, "rng.safetensors", lambda p: load_file(p)["generator"]),
        state=state,
        buffer=_read(path, "buffer.safetensors", load_file) if has_buffer else None,
        buffer_prompts=_read(path, "buffer.json", lambda p: json.loads(p.read_text())["prompts"]) if has_buffer
        else None,
        fingerprint=fingerprint,
        modules=load_lora_file(path / "modules.safetensors") if (path / "modules.safetensors").is_file() else None,
    )


def checkpoints_newest_first(run_dir: str | os.PathLike) -> list[Path]:
    """The run's ``checkpoint_XXXXXX`` directories that were renamed into place, newest first."""
    return sorted((p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir() and not p.name.endswith(".tmp")
                   and (p / "state.json").is_file()), reverse=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint_XXXXXX`` directory of a run, if any."""
    ckpts = checkpoints_newest_first(run_dir)
    return ckpts[0] if ckpts else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    ckpts = sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
