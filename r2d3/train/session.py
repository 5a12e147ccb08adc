"""Where a worker loop reports to: the one seam between the training loop and its runtime.

:class:`LocalSession` runs in-process (tests, debugging, a laptop without Ray); the Ray Train session
in :mod:`r2d3.ray.train` implements the same methods with ``ray.train.report`` and collective ops.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Protocol

import torch

from r2d3.train.checkpoint import checkpoints_newest_first, prune_checkpoints


class Session(Protocol):
    rank: int
    world_size: int
    run_dir: Path  # where rank 0 writes previews, samples, metrics and the summary
    shows_progress: bool  # the loop draws its own progress bars (in-process); else the runtime reports

    def checkpoint_candidates(self) -> Iterator[Path]:
        """Local directories of the run's checkpoints, newest first (resume takes the first complete one)."""
        ...

    def checkpoint_path(self, epoch: int) -> Path: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None: ...

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None: ...


class LocalSession:
    """Single process: checkpoints are directories ``run_dir/checkpoint_XXXXXX``."""

    rank = 0
    world_size = 1
    shows_progress = True

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

    def checkpoint_candidates(self) -> Iterator[Path]:
        return iter(checkpoints_newest_first(self.run_dir))

    def checkpoint_path(self, epoch: int) -> Path:
        return self.run_dir / f"checkpoint_{epoch:06d}"

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        if checkpoint_dir is not None:
            prune_checkpoints(self.run_dir, self.keep)

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        return None
