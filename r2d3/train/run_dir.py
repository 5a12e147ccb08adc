"""Claiming a run directory for one job: the lock that keeps two jobs with the same ``run.name`` from
mixing their checkpoints, and what ``run.resume=false`` means for a directory that already holds a run.

The lock is an ``flock`` on ``<run_dir>/.lock`` held by the driver for the whole job: the kernel drops
it when the process dies, so a killed job never leaves a stale lock behind. It guards the local run
directory; with ``scale.storage_path=s3://...`` two drivers on different machines are not seen.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from r2d3.train.config import AlignConfig

#: files whose presence means a directory already holds (part of) a run
RUN_MARKERS = ("config.yaml", "summary.json", "metrics.csv", "checkpoint_manager_snapshot.json")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says why and what to do."""


class RunDirLock:
    """Exclusive claim on a run directory (a context manager; released on exit or process death)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._file = None

    def acquire(self) -> "RunDirLock":
        path = self.run_dir / ".lock"
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirError(f"run directory {self.run_dir} is in use by another job ({holder}); wait for it "
                              "to finish or choose another run.name") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%FT%T")}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire() if self._file is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / m).exists() for m in RUN_MARKERS) or any(run_dir.glob("checkpoint_*"))


def claim_run_dir(config: AlignConfig, run_dir: Path) -> RunDirLock:
    """Create and lock ``run_dir``. With ``run.resume=false`` a directory that already holds a run is
    refused, unless ``run.restart=true``: then the old run is moved aside to ``<name>.old-<time>`` (never
    overwritten or mixed with the new one) and the job starts over in an empty directory."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"run directory {run_dir} is not writable: {err}") from err
    lock = RunDirLock(run_dir).acquire()
    if config.run.resume or not holds_a_run(run_dir):
        return lock
    if not config.run.restart:
        lock.release()
        raise RunDirError(f"run directory {run_dir} already holds a run and run.resume=false: add "
                          "run.restart=true to move it aside and start over, or choose another run.name")
    storage = config.scale.storage_path
    if storage and "://" in storage:
        lock.release()
        raise RunDirError(f"run.restart=true cannot move a run stored at {storage}; choose another run.name")
    lock.release()
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(run_dir, aside)
    run_dir.mkdir()
    return RunDirLock(run_dir).acquire()
