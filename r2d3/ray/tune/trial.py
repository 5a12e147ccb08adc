"""One Tune trial: an alignment run on Ray Train (:func:`r2d3.ray.train.fit_on_ray`) that streams guarded
held-out results to Tune, then reports the run's final held-out evaluation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray import tune

from r2d3.config import from_dict
from r2d3.train.config import AlignConfig
from r2d3.ray.train import fit_on_ray
from r2d3.ray.tune.baseline import baseline_key, save_baseline, start_baseline
from r2d3.ray.tune.guard import GuardedReportCallback, heldout_result
from r2d3.ray.tune.settings import FINAL_METRIC, METRIC, GuardSettings
from r2d3.ray.tune.space import apply_params


def trial_config(base: AlignConfig, params: dict[str, Any], trial_id: str, runs_dir: Path,
                 eval_every: int) -> AlignConfig:
    """``base`` with a trial's sampled ``params``, run as ``runs_dir/<trial_id>`` (resumed when it exists)
    with a held-out evaluation every ``eval_every`` epochs."""
    config = apply_params(base, params)
    return replace(config, run=replace(config.run, name=trial_id, output_dir=str(runs_dir), resume=True),
                   eval=replace(config.eval, every=eval_every))


def final_result(summary: dict[str, Any], epochs: int, baseline: dict[str, Any],
                 guard: GuardSettings) -> dict[str, Any] | None:
    """The last Tune result of a run that trained all ``epochs``: its last epoch's metrics with the final
    held-out evaluation (``summary["after"]``), guarded, marked ``final`` and carrying
    ``final_guarded_score``; ``None`` when the run's ``summary.json`` holds no such evaluation."""
    after, history = summary.get("after", {}), summary.get("history", [])
    if "reward_mean" not in after or not history or history[-1].get("epoch") != epochs:
        return None
    final = {k: v for k, v in history[-1].items() if not k.startswith("heldout/")}
    final.update({f"heldout/{k}": v for k, v in after.items() if isinstance(v, (int, float))})
    result = heldout_result(final, baseline, guard)
    return {**result, "final": 1, FINAL_METRIC: result[METRIC]}


def _trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """A Tune trial: one alignment run on Ray Train, streaming guarded held-out results to Tune."""
    trial_id = tune.get_context().get_trial_id()
    local_dir = Path(context["local_dir"])
    guard = GuardSettings(**context["guard"])
    config = trial_config(from_dict(AlignConfig, context["base"]), params, trial_id, local_dir / "runs",
                          context["eval_every"])
    baseline_ref = context["baseline"][0]
    if baseline_key(config) != context["baseline_key"]:  # the space moves what the base model's eval uses
        baseline_ref = start_baseline(config, local_dir)
    run_dir = local_dir / "runs" / trial_id
    result = fit_on_ray(config, run_dir, storage_path=context["train_storage"],
                        callbacks=[GuardedReportCallback(baseline_ref, guard)])
    if result.error is not None:
        raise result.error
    baseline = ray.get(baseline_ref)
    save_baseline(config, local_dir, baseline)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        final = final_result(json.loads(summary_path.read_text()), config.train.epochs, baseline, guard)
        if final is not None:
            tune.report(final)


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"
