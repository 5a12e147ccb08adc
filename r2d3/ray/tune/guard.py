"""The guarded objective (:func:`guarded_score`) and the Train callback that reports it to Tune."""

from __future__ import annotations

import math
from typing import Any

import ray
from ray.tune.integration.ray_train import TuneReportCallback

from r2d3.ray.tune.settings import METRIC, GuardSettings


def guarded_score(metrics: dict[str, Any], base: dict[str, Any], guard: GuardSettings) -> dict[str, float]:
    """The sweep's objective from held-out ``metrics`` of a trial and ``base`` (the base model's).

    Keys without prefix: ``reward_mean``, ``drift_rgb_l2_mean``, ``color_ok_mean``, ``shape_ok_mean``. With R the
    held-out reward, R0 the base model's, and accuracies in [0, 1]::

        drop       = 100 * max(base color_ok_mean - color_ok_mean, base shape_ok_mean - shape_ok_mean)   (points)
        v_drift    = max(0, drift_rgb_l2_mean - max_drift) / max_drift
        v_follow   = max(0, drop - max_acc_drop) / max(max_acc_drop, 1)
        score      = R                                             if v_drift = v_follow = 0
                   = min(R, R0) - penalty * (1 + v_drift + v_follow)   otherwise

    So a guarded trial scores below R0 - penalty whatever reward it reached, and among guarded trials
    the one that breaks the guard least ranks first. A guard whose threshold is ``None`` or whose
    metrics are missing is skipped; non-finite held-out metrics count as a violation (excess 1).
    """
    reward = float(metrics.get("reward_mean", float("nan")))
    base_reward = base.get("reward_mean")
    out: dict[str, float] = {}
    violation = 0.0
    if not math.isfinite(reward):
        violation += 1.0
    drift = metrics.get("drift_rgb_l2_mean")
    if guard.max_drift is not None and drift is not None:
        drift = float(drift)
        excess = max(0.0, drift - guard.max_drift) / guard.max_drift if math.isfinite(drift) else 1.0
        out["guard/drift_excess"] = excess
        violation += excess
    drops = [100.0 * (float(base[k]) - float(metrics[k])) for k in ("color_ok_mean", "shape_ok_mean")
             if k in metrics and base.get(k) is not None]
    if drops:
        drop = max(drops)
        out["guard/acc_drop_points"] = drop
        if guard.max_acc_drop is not None:
            excess = (max(0.0, drop - guard.max_acc_drop) / max(guard.max_acc_drop, 1.0)
                      if math.isfinite(drop) else 1.0)
            out["guard/acc_excess"] = excess
            violation += excess
    violated = violation > 0
    if not violated:
        score = reward
    else:
        anchor = [v for v in (reward, base_reward) if v is not None and math.isfinite(float(v))]
        score = min(float(v) for v in anchor) - guard.penalty * (1.0 + violation) if anchor else \
            -guard.penalty * (1.0 + violation)
    out.update({METRIC: score, "guard/violated": float(violated)})
    return out


def heldout_result(metrics: dict[str, Any], base: dict[str, Any], guard: GuardSettings) -> dict[str, Any] | None:
    """The Tune result for one Train report: ``None`` unless it carries held-out metrics."""
    if "heldout/reward_mean" not in metrics:
        return None
    result = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    held = {k[len("heldout/"):]: v for k, v in result.items() if k.startswith("heldout/")}
    result.update(guarded_score(held, base, guard))
    return result


class GuardedReportCallback(TuneReportCallback):
    """Forward rank 0's Train reports that carry held-out metrics to Tune, with ``guarded_score``.

    Runs in the Train controller. ``baseline`` is an ``ObjectRef`` of the base model's held-out metrics
    (resolved at the first held-out report, so the run need not wait for it)."""

    def __init__(self, baseline: Any, guard: GuardSettings):
        super().__init__()
        self._baseline_ref = [baseline]  # in a list: kept as a reference, not resolved on the way
        self._baseline: dict[str, Any] | None = None
        self._guard = guard

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics or "heldout/reward_mean" not in metrics[0]:
            return
        if self._baseline is None:
            self._baseline = ray.get(self._baseline_ref[0])
        result = heldout_result(metrics[0], self._baseline, self._guard)
        super().after_report(run_context, [result], None)
