"""Per-model summaries of evaluation rows (:mod:`r2d3.eval.samples`): means, 95 % prompt-bootstrap
intervals, paired deltas against the base model, FID against the base model's renders, per-prompt values.
Shared by the evaluation job's ``summary.json`` and the training job's held-out before/after numbers."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from r2d3.eval.bootstrap import bootstrap_ci
from r2d3.eval.fid import fid, fid_bootstrap
from r2d3.eval.samples import METRICS

log = logging.getLogger(__name__)


def metric_grid(rows: list[dict[str, Any]], checkpoint: str, key: str, num_prompts: int, num_seeds: int) -> Tensor | None:
    """``[P, S]`` values of ``key`` for one checkpoint (NaN where missing); None if all missing."""
    out = torch.full((num_prompts, num_seeds), math.nan, dtype=torch.float64)
    for r in rows:
        if r["checkpoint"] == checkpoint and r.get(key) is not None:
            out[r["prompt_index"], r["seed_index"]] = r[key]
    return None if torch.isnan(out).all() else out


def summarize(rows: list[dict[str, Any]], prompts: Sequence[str], seeds: Sequence[int], checkpoints: Sequence[str],
              draws: int = 1000, fid_draws: int = 200) -> dict[str, Any]:
    """Per-checkpoint means, 95 % prompt-bootstrap intervals, paired deltas vs the base model, FID vs
    the base model's renders, and per-prompt values (see ``docs``/the report for definitions)."""
    num_p, num_s = len(prompts), len(seeds)
    present = {(r["checkpoint"], r["prompt_index"], r["seed_index"]) for r in rows}
    for name in checkpoints:  # identical prompts and seeds for every compared checkpoint
        missing = [(p, s) for p in range(num_p) for s in range(num_s) if (name, p, s) not in present]
        if missing:
            raise ValueError(f"checkpoint {name!r} lacks {len(missing)} of the {num_p * num_s} (prompt, seed) "
                             f"samples (first: prompt {missing[0][0]}, seed index {missing[0][1]})")
    feats = {}
    for name in checkpoints:
        by_key = {(r["prompt_index"], r["seed_index"]): r["features"] for r in rows if r["checkpoint"] == name}
        feats[name] = torch.tensor([by_key[(p, s)] for p in range(num_p) for s in range(num_s)], dtype=torch.float64)
    base = checkpoints[0]
    out: dict[str, Any] = {}
    for name in checkpoints:
        res: dict[str, Any] = {"samples": num_p * num_s}
        for m in METRICS:
            grid = metric_grid(rows, name, m, num_p, num_s)
            if grid is None:
                continue
            finite = torch.isfinite(grid).all(dim=1)  # prompts whose every sample scored
            if not finite.all():  # NaN/inf scores: counted, and the statistics use the complete prompts
                res[f"{m}_nonfinite"] = int((~torch.isfinite(grid)).sum())
                log.warning("%s: %d non-finite %s values; %s uses the %d prompts whose samples all scored",
                            name, res[f"{m}_nonfinite"], m, m, int(finite.sum()))
            if not finite.any():
                continue
            flat = grid[finite].flatten()
            res[f"{m}_mean"] = float(flat.mean())
            res[f"{m}_ci95"] = list(bootstrap_ci(flat, int(finite.sum()), draws))
            if m == "reward":
                res["reward_std"] = float(flat.std(unbiased=False))
                res["reward_per_prompt"] = grid.mean(dim=1).tolist()
            if name != base and not m.startswith("drift_"):  # drift is already measured against the base
                ref = metric_grid(rows, base, m, num_p, num_s)
                if ref is not None:
                    both = finite & torch.isfinite(ref).all(dim=1)
                    if not both.any():
                        continue
                    delta = (grid - ref)[both].flatten()  # paired: same prompt, noise and cameras
                    res[f"{m}_delta_vs_base"] = float(delta.mean())
                    res[f"{m}_delta_ci95"] = list(bootstrap_ci(delta, int(both.sum()), draws))
                    if m in ("reward", "similarity"):
                        res[f"{m}_delta_per_prompt"] = (grid - ref).mean(dim=1).tolist()
        if num_p * num_s >= 2:
            res["fid_vs_base"] = fid(feats[name], feats[base])
            res["fid_ci95"] = list(fid_bootstrap(feats[name], feats[base], num_p, fid_draws)) if num_p > 1 else None
        if num_s >= 2 and num_p * (num_s // 2) >= 2:
            half = num_s // 2  # this checkpoint's first seeds vs the base's other seeds: no shared noise
            a = feats[name].view(num_p, num_s, -1)[:, :half].reshape(-1, feats[name].shape[-1])
            b = feats[base].view(num_p, num_s, -1)[:, half: 2 * half].reshape(-1, feats[base].shape[-1])
            res["fid_disjoint_seeds"] = fid(a, b)
        out[name] = res
    return out


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    """A ``summary.json`` written by the job (a file or the job's output directory)."""

    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    try:
        summary = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{file} is not an evaluation summary.json: {err}") from None
    if not isinstance(summary, dict) or "checkpoints" not in summary:
        raise ValueError(f"{file} is not an evaluation summary.json (no 'checkpoints' in it)")
    return summary


def scalar_metrics(summary: dict[str, Any], checkpoint: str | None = None) -> dict[str, float]:
    """The flat ``{metric: value}`` scalars of one checkpoint (default: the last one listed, i.e. the
    newest model evaluated) — what a sweep or benchmark records; intervals become ``<key>_lo``/``_hi``."""
    name = checkpoint or list(summary["checkpoints"])[-1]
    out: dict[str, float] = {}
    for key, value in summary["checkpoints"][name].items():
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif key.endswith("_ci95") and value:
            out[key[:-5] + "_lo"], out[key[:-5] + "_hi"] = float(value[0]), float(value[1])
    return out


__all__ = ["load_summary", "metric_grid", "scalar_metrics", "summarize"]
