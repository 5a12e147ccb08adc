"""The paper's comparison on one backend: Nabla-R2D3 vs DDPO vs ReFL vs DRaFT-K under the same
sampler, reward, LoRA and sample budget, over several seeds; plus the cost of one update of each.

Used by ``pipelines/benchmark.py methods``; every run is an ordinary in-process alignment run, so its
outputs (checkpoints, previews, summary) stay inspectable under the comparison directory.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import psutil
import torch

from r2d3.algos import available_algorithms, build_algorithm
from r2d3.algos.base import algorithm_options
from r2d3.config import carry_over
from r2d3.train.config import AlignConfig
from r2d3.jobs.align import run_worker
from r2d3.train import loop
from r2d3.train.session import LocalSession

#: Nabla-R2D3 options whose effect the comparison measures: name -> algo overrides
VARIANTS: dict[str, dict[str, Any]] = {
    "nabla_gfn+jacobian_free": {"name": "nabla_gfn", "jacobian_free": True},
    "nabla_gfn+x0_shift": {"name": "nabla_gfn", "x0_timestep_shift": True},
    "nabla_gfn+precomputed": {"name": "nabla_gfn", "jacobian_free": True, "precompute_targets": True},
}


def all_methods() -> tuple[str, ...]:
    """Every registered algorithm, then the :data:`VARIANTS`: a newly registered algorithm joins the
    comparison without being listed here."""
    return tuple(available_algorithms()) + tuple(VARIANTS)


def algo_for(base: AlignConfig, method: str):
    """The algo section of ``base`` set to one registered algorithm or one of the :data:`VARIANTS`."""
    if method not in all_methods():
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(all_methods())}")
    changes = dict(VARIANTS.get(method, {"name": method}))
    name = changes.pop("name")
    return carry_over(base.algo, algorithm_options(name), name, **changes)


def updates_per_epoch(config: AlignConfig) -> int:
    t = config.train
    batches = math.ceil(t.sample_batch_size * t.sample_batches_per_epoch / t.train_batch_size)
    return math.ceil(batches / t.grad_accum)


def method_config(base: AlignConfig, method: str, reward: Any, seed: int, updates: int, eval_every_updates: int,
                  run_name: str) -> AlignConfig:
    """The base config with one method, reward and seed; every method samples the same trajectories per
    epoch and takes the same number of optimizer steps per epoch (Nabla-R2D3 trains on the previous
    epoch's samples, so it gets one extra sampling epoch to reach the same number of updates)."""
    per_epoch = updates_per_epoch(base)
    algo = algo_for(base, method)
    extra = 1 if build_algorithm(algo, base.sampler.num_steps).uses_lag else 0
    return replace(
        base,
        reward=reward,
        algo=algo,
        run=replace(base.run, seed=seed, name=run_name, progress=False, log_images_every=0, wandb_mode="disabled"),
        train=replace(base.train, epochs=math.ceil(updates / per_epoch) + extra),
        eval=replace(base.eval, every=max(1, eval_every_updates // per_epoch)),
    )


def run_method(config: AlignConfig, out_dir: Path) -> dict[str, Any]:
    """Align in-process and return the summary (held-out metrics before/after and per-epoch history)."""
    summary = run_worker(config, LocalSession(out_dir / config.run.name, keep_checkpoints=1))
    return summary


class _PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


class _PeakCUDA:
    """Peak CUDA memory allocated above the level at entry while the block runs."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        self.delta_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20


def _count_rows(module: torch.nn.Module) -> tuple[dict[str, int], list]:
    """Rows (batch entries) that go through ``module`` forward and backward: a pass over 8 stacked
    transitions counts 8 rows, like 8 passes over one."""
    counts = {"forward": 0, "backward": 0}

    def fwd(_, inputs):
        counts["forward"] += inputs[0].shape[0]

    def bwd(_, grad_input, grad_output):
        counts["backward"] += grad_output[0].shape[0]

    handles = [module.register_forward_pre_hook(fwd), module.register_full_backward_hook(bwd)]
    return counts, handles


def update_cost(base: AlignConfig, methods: Sequence[str] | None = None, repeats: int = 3) -> dict[str, dict]:
    """Time, peak memory and denoiser passes of one optimizer update of each method on the same batch.

    Passes per trained transition: the denoiser rows a method processes over those of one pass over its
    trained transitions (a CFG-doubled batch counts once); backward counts passes that reach the denoiser
    (input-gradient passes included). Work done once per sampled batch before training (precomputed
    targets) is timed apart as ``precompute_s``, per update's batch."""
    results: dict[str, dict] = {}
    for method in all_methods() if methods is None else methods:
        config = replace(base, algo=algo_for(base, method), run=replace(base.run, progress=False))
        worker = loop.build_worker(config)
        gen = torch.Generator().manual_seed(0)
        prompts = worker.prompts[: config.train.train_batch_size]
        batch = loop.sample_batch(worker.ctx, prompts, gen)
        start = time.perf_counter()
        batch = worker.algorithm.prepare(worker.algorithm.precompute(worker.ctx, batch, gen))
        precompute_s = time.perf_counter() - start
        counts, handles = _count_rows(worker.ctx.backend.denoiser)
        times, mems = [], []
        cuda = worker.device.type == "cuda"
        for _ in range(repeats + cuda):  # on CUDA the first update (kernel compiles, allocator) is not timed
            counts.update(forward=0, backward=0)
            worker.optimizer.zero_grad(set_to_none=True)
            with (_PeakCUDA(worker.device) if cuda else _PeakRSS()) as mem:
                start = time.perf_counter()
                metrics = worker.algorithm.accumulate(worker.ctx, batch, 1.0, torch.Generator().manual_seed(1))
                worker.optimizer.step()
                if cuda:
                    torch.cuda.synchronize(worker.device)
                times.append(time.perf_counter() - start)
            mems.append(mem.delta_mb)
        if cuda:
            times, mems = times[1:], mems[1:]
        transitions = int(metrics.get("transitions", 1))
        for h in handles:
            h.remove()
        rows = transitions * len(batch) * (2 if config.sampler.guidance_scale != 1 else 1)
        results[method] = {
            "update_s": statistics.median(times),
            "precompute_s": precompute_s,
            "peak_mem_mb": max(mems),
            "transitions": transitions,
            "denoiser_fwd_per_transition": counts["forward"] / rows,
            "denoiser_bwd_per_transition": counts["backward"] / rows,
        }
    return results
