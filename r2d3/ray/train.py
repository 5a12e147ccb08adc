"""Alignment on Ray Train: a ``TorchTrainer`` whose workers run :func:`r2d3.train.loop.run`.

The driver builds ``ScalingConfig``/``RunConfig`` (and, for Parquet prompt shards, a Ray Dataset
streamed into the workers) and calls ``fit()``; the worker loop is the same plain-torch function used
in-process, with :class:`RaySession` reporting metrics and checkpoints through ``ray.train.report`` and
all-reducing LoRA gradients across workers (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import psutil
import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2.api.exceptions import ControllerError
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from r2d3 import devices
from r2d3.config import from_dict, to_dict
from r2d3.train.config import AlignConfig
from r2d3.data.prompts import PromptStream, check_shards, is_parquet_source
from r2d3.jobs import align as align_job
from r2d3.ray.connect import init_ray
from r2d3.ray.reward_actors import make_remote_scorer, start_reward_actors
from r2d3.storage import is_uri, retrying_filesystem

log = logging.getLogger(__name__)

#: run outputs rank 0 copies next to the checkpoints when the storage is not the local run directory
OUTPUTS = "outputs"


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Rank 0's latest epoch metrics, for the driver's progress bar: a worker's own bar would reach the
    console through Ray's log forwarding, one line per redraw with raw cursor escapes."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def put(self, metrics: dict[str, float]) -> None:
        self.metrics = metrics

    def get(self) -> dict[str, float]:
        return self.metrics


class DriverProgress:
    """One tqdm bar on the driver (epochs, current reward, ETA) fed by :class:`ProgressBoard`."""

    def __init__(self, config: AlignConfig, name: str):
        import threading

        from tqdm.auto import tqdm

        self.board = ProgressBoard.options(name=name).remote()
        self.bar = tqdm(total=config.train.epochs, desc="align", unit="epoch")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            self._refresh()

    def _refresh(self) -> None:
        try:
            metrics = ray.get(self.board.get.remote(), timeout=10)
        except Exception:  # the board is best effort: a missed update is drawn on the next poll
            return
        if metrics.get("epoch") and int(metrics["epoch"]) != self.bar.n:
            self.bar.n = int(metrics["epoch"])
            self.bar.set_postfix(reward=f"{metrics.get('reward_mean', float('nan')):.4f}", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._refresh()
        self.bar.close()
        ray.kill(self.board)


class RaySession:
    """:class:`~r2d3.train.session.Session` inside a Ray Train worker.

    ``prompt_stream`` is this worker's disjoint share of the streamed prompt shards (when the driver
    passed a dataset); ``scorer`` sends render + reward to the shared actor pool when
    ``scale.reward_actors`` > 0; rank 0 posts each epoch's metrics to the driver's progress board."""

    shows_progress = False

    def __init__(self, run_dir: Path, config: AlignConfig, streamed: bool = False, progress_board: str | None = None):
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.run_dir = run_dir
        if self.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        self._tmp = _checkpoint_scratch()
        self.prompt_stream = None
        if streamed:
            shard = ray.train.get_dataset_shard("prompts")
            column, batch = config.data.prompt_column, config.train.sample_batch_size
            self.prompt_stream = PromptStream(
                lambda: (b.column(column).to_pylist() for b in shard.iter_batches(
                    batch_size=batch, batch_format="pyarrow", local_shuffle_buffer_size=config.data.shuffle_buffer,
                    local_shuffle_seed=config.run.seed + self.rank)),
                config.data.prompts)
        self.board = None
        if progress_board and self.rank == 0:
            try:
                self.board = ray.get_actor(progress_board)
            except ValueError:  # the driver did not start one (or it is gone): no bar, no harm
                self.board = None
        self.scorer = None
        if config.scale.reward_actors > 0:
            self.scorer = make_remote_scorer(config)

    def checkpoint_candidates(self) -> Iterator[Path]:
        """Every checkpoint directory in the run's storage, newest first, each downloaded when asked for.

        Not only the one ``ray.train.get_checkpoint()`` restores: Ray Train registers a reported
        checkpoint when its controller next polls the worker, so a worker killed right after reporting
        leaves a newer checkpoint in storage than the one Ray restores (or none at all, and the run would
        start over). Partial uploads fail to load and fall back to the next older one."""
        storage = ray.train.get_context().get_storage()  # retried through outages (fit_on_ray)
        fs, root = storage.storage_filesystem, storage.experiment_fs_path
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        names = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                        and i.base_name.startswith("checkpoint_")), reverse=True)  # Ray names them by time
        restored = ray.train.get_checkpoint()
        if restored is not None and restored.path not in names:
            names.insert(0, restored.path)
        for path in names:
            yield self._restore(Checkpoint(path, filesystem=fs))

    def _restore(self, checkpoint: Checkpoint) -> Path:
        local = self._tmp / "restored"
        shutil.rmtree(local, ignore_errors=True)
        checkpoint.to_directory(str(local))
        return local

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def checkpoint_path(self, epoch: int) -> Path:
        return self._tmp / f"checkpoint_{epoch:06d}"

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if self.board is not None:
            self.board.put.remote(metrics)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        if self.world_size == 1 or not dist.is_initialized():
            return
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)


def _checkpoint_scratch() -> Path:
    """This worker's scratch directory for checkpoints on their way to storage. The pid in its name lets
    the next worker remove scratch left by killed ones (a SIGKILL runs no cleanup)."""
    root = Path(tempfile.gettempdir())
    for old in root.glob("r2d3-ckpt-*"):
        try:
            pid = int(old.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if not psutil.pid_exists(pid):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"r2d3-ckpt-{os.getpid()}-"))


class ClusterResourcesError(RuntimeError):
    """The cluster does not offer what the job asks for (after waiting for an autoscaler)."""


def wait_for_resources(need: dict[str, float], timeout_s: float, poll_s: float = 2.0,
                       available: bool = False) -> None:
    """Return once the cluster's total (or, with ``available``, free) resources cover ``need``; otherwise
    fail after ``timeout_s`` naming what is missing. Ray itself would wait forever for a placement group it
    cannot place (a ``scale.use_gpu=true`` job on a machine without a GPU retried its worker group
    endlessly)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        have = ray.available_resources() if available else ray.cluster_resources()
        short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > 0 and have.get(k, 0.0) + 1e-9 < v}
        if not short:
            return
        if time.monotonic() >= deadline:
            missing = ", ".join(f"{v:g} {k} (the cluster has {h:g})" for k, (v, h) in short.items())
            hint = "scale.use_gpu=false, " if "GPU" in short else ""
            waited = f" (waited {timeout_s:.0f} s, scale.resource_wait_s)" if timeout_s else ""
            raise ClusterResourcesError(
                f"the job needs {missing}{waited}; lower {hint}scale.num_workers, scale.cpus_per_worker or "
                "scale.reward_actors, or add nodes")
        time.sleep(poll_s)


def _worker_loop(payload: dict[str, Any]) -> None:
    config = from_dict(AlignConfig, payload["config"])
    run_dir = Path(payload["run_dir"])
    session = RaySession(run_dir, config, streamed=payload["streamed"], progress_board=payload.get("progress_board"))
    try:
        align_job.run_worker(config, session)
    finally:
        session.close()
    outputs = payload.get("outputs_uri")
    if session.rank == 0 and outputs:  # rank 0 may run on another node: publish next to the checkpoints
        fs, path = retrying_filesystem(outputs)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(run_dir), path, destination_filesystem=fs)


def prompt_dataset(config: AlignConfig) -> tuple[ray.data.Dataset, list[tuple[str, str]]]:
    """The Parquet prompt shards as a Ray Dataset (readable shards only) and the skipped ones."""
    shards = check_shards(config.data.prompts, config.data.prompt_column)
    ds = ray.data.read_parquet(shards.files, shuffle="files").select_columns([config.data.prompt_column])
    return ds, shards.skipped


def with_worker_cpus(config: AlignConfig, started_here: bool) -> AlignConfig:
    """``config`` with ``scale.cpus_per_worker`` resolved when it is null: on a Ray instance this job
    started (one machine), the CPUs the reward actors leave, split over the workers (Ray sets each worker's
    OMP_NUM_THREADS, hence its torch threads, from them: with 1 CPU a 2-core machine trains at half speed);
    on a running cluster 1 CPU, so the job fits next to others."""
    s = config.scale
    if s.cpus_per_worker is not None:
        return config
    cpus = 1.0
    if started_here:  # one CPU stays free for Ray Data's read tasks when prompts stream from shards
        free = (ray.cluster_resources().get("CPU", 1.0) - s.reward_actors * s.reward_actor_cpus
                - (1.0 if is_parquet_source(config.data.prompts) else 0.0))
        cpus = max(1.0, float(int(free // s.num_workers)))
    return replace(config, scale=replace(s, cpus_per_worker=cpus))


def regroup_size(config: AlignConfig, workers: int, gpus: bool) -> int:
    """The worker-group size to go on with after ``workers`` could not be placed (a node was lost): as many
    as the cluster's free resources fit now, fewer than before, at least ``scale.min_workers`` (waiting up
    to ``scale.resource_wait_s`` for them). The run resumes from its newest checkpoint at that size."""
    s = config.scale
    wait_for_resources({"CPU": s.min_workers * s.cpus_per_worker, "GPU": s.min_workers if gpus else 0},
                       s.resource_wait_s, available=True)
    free = ray.available_resources()
    fits = int(free.get("CPU", 0.0) // s.cpus_per_worker)
    if gpus:
        fits = min(fits, int(free.get("GPU", 0.0)))
    size = max(s.min_workers, min(fits, workers - 1))
    log.warning("a worker group of %d could not be placed (a node was lost?): going on with %d workers from "
                "the last checkpoint (scale.min_workers=%d)", workers, size, s.min_workers)
    return size


def fit_on_ray(config: AlignConfig, run_dir: Path, storage_path: str, callbacks: list | None = None,
               verbose: bool = False) -> Any:
    """Run the alignment as a Ray Train job; returns the ``ray.train.Result``.

    Starts a local Ray instance when none is running (``ray job submit`` sets ``RAY_ADDRESS`` and the
    job joins the cluster instead). Checkpoints go to ``storage_path/<run name>`` (local or ``s3://``);
    when that is not the local run directory's parent, rank 0 also copies the run outputs (summary,
    previews, samples, metrics) to ``storage_path/<run name>/outputs``. Re-running with the same
    ``run.name`` resumes from the last checkpoint, with any number of workers; ``FailureConfig``
    restarts a crashed worker group from it as well. With ``scale.min_workers`` a worker group that can no
    longer be placed at its size (a node was lost) re-forms with the workers that fit (:func:`regroup_size`):
    Ray Train's own elastic policy sizes the group from the nodes' total resources, counting CPUs and GPUs
    the reward actors hold, and would retry a group that does not fit forever.

    The console shows one progress bar drawn by the driver (``run.progress``); the workers' and Ray's
    own log lines reach it only with ``verbose`` (they are always in Ray's log directory).
    """
    started_here = init_ray(log_to_driver=verbose)
    config = with_worker_cpus(config, started_here)
    gpus = devices.use_gpu(config.scale.use_gpu)
    s = config.scale
    fewest = s.num_workers if s.min_workers is None else s.min_workers
    need = {"CPU": fewest * s.cpus_per_worker + s.reward_actors * s.reward_actor_cpus,
            "GPU": (fewest if gpus else 0) + s.reward_actors * s.reward_actor_gpus}
    wait_for_resources(need, 0.0 if started_here else s.resource_wait_s)
    # an object store goes through a filesystem that retries every call (Ray Train's uploads, its
    # checkpoint-manager snapshot, the resume's listing and downloads) through an outage
    fs, path = retrying_filesystem(storage_path) if is_uri(storage_path) else (None, storage_path)
    run_config = RunConfig(
        name=run_dir.name, storage_path=path, storage_filesystem=fs,
        checkpoint_config=CheckpointConfig(num_to_keep=max(config.run.keep_checkpoints, 1)),
        # elastic runs end a fit whose restarted worker group cannot be placed (Ray Train would wait for
        # the lost nodes forever) and re-form it below with the workers that fit
        failure_config=FailureConfig(max_failures=s.max_failures,
                                     controller_failure_limit=-1 if s.min_workers is None else 0),
        callbacks=callbacks,
    )
    datasets = {}
    if is_parquet_source(config.data.prompts):
        datasets["prompts"], skipped = prompt_dataset(config)
        if skipped:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "skipped_shards.json").write_text(json.dumps([{"shard": s, "reason": r} for s, r in skipped],
                                                                    indent=1))
    local_storage = "://" not in storage_path and Path(storage_path).resolve() == run_dir.parent.resolve()
    board = f"r2d3-progress-{run_dir.name}-{os.getpid()}"
    progress = DriverProgress(config, board) if config.run.progress else None
    payload = {"config": to_dict(config), "run_dir": str(run_dir), "streamed": bool(datasets),
               "outputs_uri": None if local_storage else f"{storage_path.rstrip('/')}/{run_dir.name}/{OUTPUTS}",
               "progress_board": None if progress is None else board}
    reward_pool = None
    if config.scale.reward_actors > 0:
        # the driver owns the actors, so they outlive any one trainer (and worker-group restarts)
        reward_pool = start_reward_actors(config)
    workers, regroups = s.num_workers, s.max_failures
    try:
        while True:
            # one worker has nothing to all-reduce: no torch.distributed process group (whose rendezvous
            # store would listen on every interface) and a faster start; several use TorchTrainer's group
            trainer_cls = TorchTrainer if workers > 1 else DataParallelTrainer
            scaling = ScalingConfig(num_workers=workers, use_gpu=gpus, resources_per_worker={"CPU": s.cpus_per_worker})
            trainer = trainer_cls(_worker_loop, train_loop_config=payload, scaling_config=scaling,
                                  run_config=run_config, datasets=datasets or None)
            try:
                result = trainer.fit()
                break
            except ControllerError as err:
                if not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError) or regroups == 0:
                    raise
                workers = regroup_size(config, workers, gpus)
                regroups -= 1
    finally:
        if progress is not None:
            progress.close()
    del reward_pool  # trainers looked the actors up by name; release them only now
    return result


def read_summary(run_dir: Path, storage_path: str) -> dict[str, Any]:
    """The finished run's summary: from the local run directory, or from the storage copy when rank 0
    ran on another node."""
    local = run_dir / "summary.json"
    if local.exists():
        return json.loads(local.read_text())
    fs, path = retrying_filesystem(f"{storage_path.rstrip('/')}/{run_dir.name}/{OUTPUTS}/summary.json")
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())
