"""Alignment on Ray Train: a ``TorchTrainer`` whose workers run :func:`r2d3.train.loop.run`.

The driver only builds ``ScalingConfig``/``RunConfig`` and calls ``fit()``; the worker loop is the same
plain-torch function used in-process, with :class:`RaySession` reporting metrics and checkpoints through
``ray.train.report`` and all-reducing LoRA gradients across workers (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from r2d3.config import AlignConfig, from_dict, to_dict


class RaySession:
    """:class:`~r2d3.train.session.Session` inside a Ray Train worker."""

    def __init__(self, run_dir: Path):
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.run_dir = run_dir
        if self.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        self._restored: Path | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="r2d3-ckpt-"))

    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        local = self._tmp / "restored"
        shutil.rmtree(local, ignore_errors=True)
        checkpoint.to_directory(str(local))
        return local

    def checkpoint_path(self, epoch: int) -> Path:
        return self._tmp / f"checkpoint_{epoch:06d}"

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        if self.world_size == 1 or not dist.is_initialized():
            return
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)


def _worker_loop(payload: dict[str, Any]) -> None:
    from r2d3.train import align_job

    config = from_dict(AlignConfig, payload["config"])
    session = RaySession(Path(payload["run_dir"]))
    align_job.run_worker(config, session)


def fit_on_ray(config: AlignConfig, run_dir: Path, storage_path: str, callbacks: list | None = None) -> Any:
    """Run the alignment as a Ray Train job; returns the ``ray.train.Result``.

    Starts a local Ray instance when none is running (``ray job submit`` sets ``RAY_ADDRESS`` and the
    job joins the cluster instead). Re-running with the same ``run.name`` resumes from the last
    checkpoint; ``FailureConfig`` restarts crashed workers from it as well.
    """
    if not ray.is_initialized():
        # the dashboard serves the state API that Train's controller polls (and `ray job submit`)
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, configure_logging=False)
    use_gpu = config.scale.use_gpu == "true" or (config.scale.use_gpu == "auto" and torch.cuda.is_available())
    scaling = ScalingConfig(num_workers=config.scale.num_workers, use_gpu=use_gpu,
                            resources_per_worker={"CPU": config.scale.cpus_per_worker})
    run_config = RunConfig(
        name=run_dir.name, storage_path=storage_path,
        checkpoint_config=CheckpointConfig(num_to_keep=max(config.run.keep_checkpoints, 1)),
        failure_config=FailureConfig(max_failures=2),
        callbacks=callbacks,
    )
    trainer = TorchTrainer(_worker_loop, train_loop_config={"config": to_dict(config), "run_dir": str(run_dir)},
                           scaling_config=scaling, run_config=run_config)
    return trainer.fit()
