"""Where a worker loop reports to: the one seam between the training loop and its runtime.

:class:`LocalSession` runs in-process (tests, debugging, a laptop without Ray); the Ray Train session
in :mod:`r2d3.ray.train` implements the same methods with ``ray.train.report`` and collective ops.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch

from r2d3.train.checkpoint import latest_checkpoint, prune_checkpoints


class Session(Protocol):
    rank: int
    world_size: int
    run_dir: Path  # where rank 0 writes previews, samples, metrics and the summary

    def latest_checkpoint(self) -> Path | None: ...

    def checkpoint_path(self, epoch: int) -> Path: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None: ...

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None: ...


class LocalSession:
    """Single process: checkpoints are directories ``run_dir/checkpoint_XXXXXX``."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir: str | os.PathLike, keep_checkpoints: int = 2):
        self.run_dir = Path(run_dir)
        self.keep = keep_checkpoints
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise PermissionError(f"run directory {self.run_dir} is not writable: {err}") from err

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def checkpoint_path(self, epoch: int) -> Path:
        return self.run_dir / f"checkpoint_{epoch:06d}"

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if checkpoint_dir is not None:
            prune_checkpoints(self.run_dir, self.keep)

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        return None
