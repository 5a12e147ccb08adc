"""Evaluation as a Ray Data job: held-out prompts x seeds x checkpoints -> per-sample Parquet, summary
JSON and a Markdown/HTML report.

    from_items(one unit per prompt) -> map_batches(EvalActor, ActorPoolStrategy(size=actors))
                                    -> rows (checkpoint x prompt x seed) -> driver: summary + report

Each :class:`EvalActor` builds the backend (with every checkpoint's LoRA), the reward and the feature
extractor once, then evaluates whole prompts (all seeds, all checkpoints; see :mod:`r2d3.jobs.evaluate` for
why that unit). ``actors=0`` runs the same code in this process without Ray. The driver gathers the
rows (small: scalars, pooled features and one preview PNG per checkpoint x prompt), checks that every
checkpoint has every (prompt, seed), and writes into ``out_dir``::

    samples.parquet   one row per checkpoint x prompt x seed (r2d3.jobs.evaluate documents the columns)
    summary.json      the job's settings, prompts, per-checkpoint metrics with intervals, timings
    report.md/.html   tables, tradeoff.png, per_prompt_delta.png, grid_<checkpoint>_{best,worst}.png
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from r2d3.config import reward_label
from r2d3.eval.report import write_report
from r2d3.eval.samples import previews_from_rows, row_schema, sort_rows
from r2d3.eval.summary import summarize
from r2d3.jobs.evaluate import EvalSettings, PromptEvaluator
from r2d3.ray.actors import actor_device, map_with_actors
from r2d3.storage import rows_to_table

log = logging.getLogger(__name__)
SUMMARY_VERSION = 1


class EvalActor:
    """One :class:`~r2d3.jobs.evaluate.PromptEvaluator` per actor process; batches of prompt units -> rows."""

    def __init__(self, settings: EvalSettings):
        import dataclasses

        settings = dataclasses.replace(settings, device=actor_device(settings.device))
        self.evaluator = PromptEvaluator(settings)
        self.schema = row_schema(previews=True)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        rows = self.evaluator(batch)
        return pa.Table.from_pylist([{k: r.get(k) for k in self.schema.names} for r in rows], schema=self.schema)


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A row read back from Ray Data with Python values (list columns may come back as numpy arrays)."""
    out = {k: v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v for k, v in row.items()}
    if out.get("features") is not None and not isinstance(out["features"], list):
        out["features"] = [float(x) for x in out["features"]]
    return out


def run_units(settings: EvalSettings, prompts: list[str], actors: int = 2, batch_size: int = 1,
              cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0) -> list[dict[str, Any]]:
    """All per-sample rows (unsorted), on Ray Data with ``actors`` actors or in-process when 0."""
    units = [{"prompt_index": i, "prompt": p} for i, p in enumerate(prompts)]
    if actors == 0:
        evaluator = PromptEvaluator(settings)
        return [r for u in units for r in evaluator({"prompt_index": [u["prompt_index"]], "prompt": [u["prompt"]]})]
    ds = map_with_actors(units, EvalActor, {"settings": settings}, actors, batch_size, cpus_per_actor,
                         gpus_per_actor)
    return [_plain(r) for r in ds.take_all()]


def run_evaluation(settings: EvalSettings, prompts: list[str], out_dir: str | os.PathLike, *,
                   prompts_source: str = "", actors: int = 2, batch_size: int = 1, cpus_per_actor: float = 1.0,
                   gpus_per_actor: float = 0.0, draws: int = 1000, fid_draws: int = 200,
                   report: bool = True) -> dict[str, Any]:
    """Run the job and write ``samples.parquet``, ``summary.json`` and the report into ``out_dir``;
    returns the summary."""
    import pyarrow.parquet as pq

    if not prompts:
        raise ValueError("no prompts to evaluate")
    if actors < 0 or batch_size < 1 or cpus_per_actor < 0 or gpus_per_actor < 0:
        raise ValueError(f"need actors >= 0, batch_size >= 1 and non-negative resources (got actors={actors}, "
                         f"batch_size={batch_size}, cpus_per_actor={cpus_per_actor}, gpus_per_actor={gpus_per_actor})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in settings.checkpoints]
    start = time.time()
    rows = sort_rows(run_units(settings, prompts, actors, batch_size, cpus_per_actor, gpus_per_actor), names, prompts,
                     settings.seeds)
    sampled = time.time() - start
    metrics = summarize(rows, prompts, settings.seeds, names, draws=draws, fid_draws=fid_draws)
    job = settings.describe()
    job.update({"prompts": prompts_source, "num_prompts": len(prompts), "reward_label": reward_label(settings.reward),
                "actors": actors, "batch_size": batch_size,
                "bootstrap": {"unit": "prompt", "level": 0.95, "draws": draws, "fid_draws": fid_draws, "seed": 0},
                "noise": "per (prompt, seed): torch.Generator().manual_seed(noise_seed) draws [1 + K, *latent] "
                         "(x_T, then the step noises); noise_seed = r2d3.pipeline.noise_seed(prompt, seed), in "
                         "samples.parquet"})
    summary: dict[str, Any] = {"version": SUMMARY_VERSION, "job": job, "prompts": list(prompts),
                               "checkpoints": metrics}
    pq.write_table(rows_to_table(rows, row_schema()), out / "samples.parquet")
    summary["timing"] = {"seconds_sampling": round(sampled, 2), "samples": len(rows),
                         "samples_per_s": round(len(rows) / max(sampled, 1e-9), 3)}
    if report:
        summary["timing"]["seconds_total"] = round(time.time() - start, 2)
        written = write_report(summary, previews_from_rows(rows), out)
        summary["files"] = {k: str(Path(v).relative_to(out)) for k, v in written.items()}
    summary["timing"]["seconds_total"] = round(time.time() - start, 2)
    summary.setdefault("files", {}).update({"samples": "samples.parquet", "summary": "summary.json"})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = ["EvalActor", "run_evaluation", "run_units"]
