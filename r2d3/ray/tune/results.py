"""A sweep's result tables (``results.csv``, ``results.md``) and ``best_config.yaml``, from Tune's
:class:`~ray.tune.ResultGrid`: one row per :class:`~ray.tune.Result` (its ``metrics``, ``config`` and
``error``), the winner from :meth:`ResultGrid.get_best_result`."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray.tune import Result, ResultGrid

from r2d3.config import to_yaml
from r2d3.train.config import AlignConfig
from r2d3.ray.tune.settings import FINAL_METRIC, METRIC, TIME_ATTR, GuardSettings
from r2d3.ray.tune.space import Param, apply_params


def trial_id(result: Result) -> str:
    """The Tune trial id of ``result`` (Tune sets ``trial_id`` in every result; else the trial directory)."""
    return (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial_")


def trial_status(result: Result, epochs: int) -> str:
    """``completed``, ``stopped early (epoch N)``, ``error``, ``unfinished [(epoch N)]`` (an interrupted
    sweep) or ``no result``; Tune marks the last result of a trial that ended (finished or stopped) ``done``."""
    metrics = result.metrics or {}
    epoch = metrics.get(TIME_ATTR)
    if result.error is not None:
        return "error"
    if not metrics.get("done"):
        return "unfinished" if epoch is None else f"unfinished (epoch {int(epoch)})"
    if epoch is None:
        return "no result"
    if epoch >= epochs:
        return "completed"
    return f"stopped early (epoch {int(epoch)})"


def trial_params(result: Result) -> dict[str, Any]:
    """The trial's sampled values: :attr:`Result.config`, or, for a trial that has not reported (its
    ``config`` comes with its results), the ``params.json`` Tune wrote into the trial directory."""
    if result.config is not None:
        return result.config
    try:
        with result.filesystem.open_input_stream(f"{result.path}/params.json") as f:
            return json.loads(f.readall())
    except (OSError, ValueError):  # a trial that never started
        return {}


def result_rows(results: Iterable[Result], params: Sequence[Param], epochs: int) -> list[dict[str, Any]]:
    """One table row per trial's :class:`~ray.tune.Result` (a :class:`~ray.tune.ResultGrid` is one such
    sequence), best guarded score first (trials without a score last)."""
    rows = []
    for result in results:
        m, values = result.metrics or {}, trial_params(result)
        row: dict[str, Any] = {"trial": trial_id(result)}
        row.update({p.key: values.get(p.key) for p in params})
        row.update({
            METRIC: m.get(METRIC), "reward": m.get("heldout/reward_mean"),
            "drift_rgb_l2_mean": m.get("heldout/drift_rgb_l2_mean"),
            "color_ok_mean": m.get("heldout/color_ok_mean"), "shape_ok_mean": m.get("heldout/shape_ok_mean"),
            "acc_drop_points": m.get("guard/acc_drop_points"),
            "guard": None if METRIC not in m else ("violated" if m.get("guard/violated") else "ok"),
            "epoch": m.get(TIME_ATTR), "status": trial_status(result, epochs),
        })
        rows.append(row)
    rows.sort(key=lambda r: (r[METRIC] is None, -(r[METRIC] if r[METRIC] is not None else 0.0)))
    return rows


def best_result(grid: ResultGrid) -> Result | None:
    """The winner: the best final evaluation among the trials that ran all epochs (``final_guarded_score``),
    else, when none did, the best last guarded score; ``None`` when no trial has a finite score."""
    for metric in (FINAL_METRIC, METRIC):
        try:
            best = grid.get_best_result(metric, "max")
        except RuntimeError:  # no trial reported a finite value of ``metric``
            continue
        value = (best.metrics or {}).get(metric)  # (a grid of one trial returns it whatever it reported)
        if value is not None and math.isfinite(value):
            return best
    return None


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_tables(rows: list[dict[str, Any]], params: Sequence[Param], out_dir: Path, baseline: dict[str, float],
                 guard: GuardSettings) -> str:
    """``results.csv`` and ``results.md`` in ``out_dir``; returns the Markdown."""
    columns = list(rows[0]) if rows else ["trial", *(p.key for p in params), METRIC, "status"]
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    md = io.StringIO()

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f} %"

    md.write(f"Base model (held-out): reward {_fmt(baseline.get('reward_mean')) or 'n/a'}, colour "
             f"{pct(baseline.get('color_ok_mean'))}, shape {pct(baseline.get('shape_ok_mean'))}. Guard: drift <= "
             f"{_fmt(guard.max_drift) or 'off'}, accuracy drop <= {_fmt(guard.max_acc_drop) or 'off'} points, "
             f"penalty {_fmt(guard.penalty)}.\n\n")
    md.write("| " + " | ".join(columns) + " |\n")
    md.write("|" + "---|" * len(columns) + "\n")
    for row in rows:
        md.write("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |\n")
    text = md.getvalue()
    (out_dir / "results.md").write_text(text)
    return text


def write_best_config(row: dict[str, Any] | None, params: Sequence[Param], base: AlignConfig, out_dir: Path,
                      name: str) -> Path | None:
    """``best_config.yaml``: the base config with the values of the winner's ``row`` (:func:`result_rows`;
    run.name unset: a new run); ``None`` (nothing written) without a winner."""
    if row is None:
        return None
    path = out_dir / "best_config.yaml"
    config = apply_params(base, {p.key: row[p.key] for p in params})
    config = replace(config, run=replace(config.run, name=None))
    header = (f"# best trial of sweep {name}: {row['trial']} ({row['status']}), {METRIC} {_fmt(row[METRIC])}, "
              f"held-out reward {_fmt(row['reward'])}\n"
              f"# {', '.join(f'{p.key}={_fmt(row[p.key])}' for p in params)}\n"
              "# use: python pipelines/align.py --config <this file>\n")
    path.write_text(header + to_yaml(config))
    return path
