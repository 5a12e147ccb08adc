"""Hyperparameter sweeps on Ray Tune: every trial is one alignment run on Ray Train.

Search space files (``tune_spaces/*.yaml``) map dotted :class:`~r2d3.config.AlignConfig` keys to a
distribution, each written as a one-key mapping::

    algo.beta:      {loguniform: [1.0e4, 1.0e5]}   # log-uniform floats, 0 < low < high
    algo.reg_scale: {uniform: [10, 300]}           # uniform floats, low < high
    model.lora_rank: {randint: [4, 16]}            # integers, both bounds included
    sampler.kind:   {choice: [ddim, sde-dpmsolver++]}   # one value at random per trial
    train.lr:       {grid: [5.0e-4, 1.0e-3]}       # every value (num_samples repeats the whole grid)
    sweep:                                         # reserved key: the sweep's own settings
      num_samples: 8
      eval_every: 4
      scheduler: {name: asha, grace_period: 8, reduction_factor: 2}
      guard: {max_drift: 0.04, max_acc_drop: 5.0, penalty: 1.0}

Errors name the key: unknown distributions, bad bounds, values of the wrong type and keys that are
not AlignConfig options are all rejected before Ray starts. ``sweep`` holds :class:`SweepSettings`
(``python pipelines/sweep.py --help`` lists them); ``sweep.key=value`` on the command line overrides it.

The objective is a **guarded held-out reward** (:func:`guarded_score`), so a trial cannot win by reward
hacking: a trial whose held-out prior drift exceeds ``guard.max_drift``, or whose colour or shape
accuracy falls more than ``guard.max_acc_drop`` points below the base model's, scores below the base
model's reward minus ``guard.penalty``.

How metrics reach Tune: each trial is a function trainable that runs :func:`r2d3.ray.train.fit_on_ray`
with a :class:`GuardedReportCallback`. That Train callback runs in the Train controller, sees rank 0's
per-epoch report, and forwards only the epochs that carry held-out metrics (``eval.every`` is set by the
sweep), adding ``guarded_score``; every result Tune sees therefore holds the scheduler's metric. After
the run, the trial also reports the final held-out evaluation from ``summary.json``. ASHA compares
trials on ``guarded_score`` with ``epoch`` as its time axis.

Layout of a sweep (``<storage>/<name>``)::

    sweep.yaml  base_config.yaml   the space, settings and base config the sweep was started with
    results.csv results.md         one row per trial (written after every run and every restore)
    best_config.yaml               the winning trial's full config, for pipelines/align.py --config
    baselines/                     held-out metrics of the base model (the guard's reference)
    runs/<trial id>/               each trial's alignment run (see r2d3.train.align_job)
    trial_<trial id>/ ...          Tune's own state (re-running the same name restores from it)
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import json
import logging
import math
import os
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import ray
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from r2d3.config import AlignConfig, ConfigError, describe, from_dict, opt, section, to_dict, to_yaml

log = logging.getLogger(__name__)

#: The metric Tune optimises (maximised) and ASHA compares.
METRIC = "guarded_score"
#: ASHA's time axis: alignment epochs (every forwarded result carries it).
TIME_ATTR = "epoch"
#: Top-level key of a space file that holds :class:`SweepSettings` instead of a search dimension.
RESERVED = "sweep"
DISTRIBUTIONS = {
    "uniform": "[low, high]: floats, uniform, low < high",
    "loguniform": "[low, high]: floats, log-uniform, 0 < low < high",
    "randint": "[low, high]: integers, uniform, both bounds included",
    "choice": "[v1, v2, ...]: one of the values at random",
    "grid": "[v1, v2, ...]: every value, one trial each (num_samples repeats the grid)",
}


#: Options the sweep sets itself, so a space may not sample them.
SET_BY_SWEEP = {
    "run.name": "each trial's run is named after its trial id",
    "run.output_dir": "trials run under the sweep directory",
    "eval.every": "set sweep.eval_every instead",
    "train.epochs": "ASHA's time axis; set it in the base config (early stopping shortens trials)",
}


class SpaceError(ConfigError):
    """A bad search space or sweep setting; the message names the key and the file."""


# ---------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class SchedulerSettings:
    name: str = opt("asha", "asha (asynchronous successive halving on guarded_score) | fifo (no early stopping)")
    max_t: Optional[int] = opt(None, "asha: epochs a trial may run; default: train.epochs")
    grace_period: Optional[int] = opt(None, "asha: epochs before a trial can be stopped; default: "
                                            "sweep.eval_every (its first held-out evaluation)")
    reduction_factor: float = opt(2.0, "asha: keep the best 1/reduction_factor of the trials at each rung")


@dataclass
class GuardSettings:
    max_drift: Optional[float] = opt(0.04, "largest held-out prior drift (heldout/drift_rgb_l2) allowed "
                                           "(null: no drift guard)")
    max_acc_drop: Optional[float] = opt(5.0, "largest drop of held-out colour or shape accuracy below the base "
                                             "model, in percentage points (null: no prompt-following guard)")
    penalty: float = opt(1.0, "a guarded trial scores at most base reward - penalty; keep it above the "
                              "reward's range")


@dataclass
class SweepSettings:
    num_samples: int = opt(1, "trials drawn from the space (with grid entries: repeats of the whole grid)")
    eval_every: Optional[int] = opt(None, "held-out evaluation every N epochs in each trial; default: eval.every "
                                          "when set, else train.epochs // 4")
    max_concurrent: int = opt(0, "trials running at once (0: as many as the cluster's resources allow)")
    trial_cpus: float = opt(0.05, "CPUs held by each trial's driver function (its Train workers reserve "
                                  "scale.cpus_per_worker each on top)")
    seed: Optional[int] = opt(0, "random state of the search (null: a fresh draw every sweep)")
    retry_errored: bool = opt(False, "when restoring, rerun trials that errored (their Train runs resume from "
                                     "their last checkpoint)")
    scheduler: SchedulerSettings = section(SchedulerSettings, "early stopping")
    guard: GuardSettings = section(GuardSettings, "the guarded objective (see r2d3.ray.tune.guarded_score)")


def describe_settings() -> list[str]:
    """``--help`` lines of the sweep settings (``sweep.key``)."""
    return describe(SweepSettings, prefix=f"{RESERVED}.")


# ---------------------------------------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class Param:
    """One search dimension: ``key`` (dotted AlignConfig option), distribution ``kind`` and its ``args``."""

    key: str
    kind: str
    args: tuple


def _option_keys(cls: type = AlignConfig, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_option_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def option_type(key: str) -> Any:
    """The type of AlignConfig option ``key`` (``Optional`` unwrapped); :class:`SpaceError` if none."""
    cls: Any = AlignConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if not dataclasses.is_dataclass(cls) or part not in hints:
            close = difflib.get_close_matches(key, _option_keys(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            if not dataclasses.is_dataclass(cls):
                hint = f"; {'.'.join(parts[:i])} is a free-form option: sweep its whole value with choice or grid"
            raise SpaceError(f"{key}: not an AlignConfig option{hint} (see pipelines/align.py --help)")
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        raise SpaceError(f"{key}: is a config section, not an option; name one of its keys ({key}.<name>)")
    return _unwrap_optional(cls)


def _number(key: str, kind: str, value: Any) -> float:
    if isinstance(value, bool):
        raise SpaceError(f"{key}: {kind} bounds must be numbers, got {value!r}")
    if isinstance(value, str):  # YAML 1.1 reads 1e3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise SpaceError(f"{key}: {kind} bounds must be numbers, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpaceError(f"{key}: {kind} bounds must be finite numbers, got {value!r}")
    return value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data[part]
    data[leaf] = value


def _get_dotted(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def apply_params(config: AlignConfig, values: dict[str, Any]) -> AlignConfig:
    """``config`` with the dotted ``values`` set (validated; errors name the key)."""
    data = to_dict(config)
    for key, value in values.items():
        option_type(key)
        _set_dotted(data, key, value)
        try:
            from_dict(AlignConfig, data)
        except OmegaConfBaseException as err:
            reason = getattr(err, "msg", err)
            raise SpaceError(f"{key}: invalid value {value!r}: {reason}") from None
        except ConfigError as err:  # NaN / inf
            raise SpaceError(f"{key}: invalid value {value!r}: {err}") from None
    return from_dict(AlignConfig, data)


def _canonical(key: str, value: Any) -> Any:
    """``value`` as the config stores it (``"1e3"`` -> 1000.0 for a float option); checks its type."""
    return _get_dotted(to_dict(apply_params(AlignConfig(), {key: value})), key)


def parse_param(key: str, spec: Any) -> Param:
    """One ``key: {distribution: args}`` entry of a space file."""
    tp = option_type(key)
    if key in SET_BY_SWEEP:
        raise SpaceError(f"{key}: set by the sweep, cannot be searched ({SET_BY_SWEEP[key]})")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(f"{key}: expected a one-key mapping {{distribution: args}} with a distribution among "
                         f"{', '.join(DISTRIBUTIONS)}; got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), list(DISTRIBUTIONS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SpaceError(f"{key}: unknown distribution {kind!r}{hint}; valid: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        form = DISTRIBUTIONS[kind].split(":")[0]
        raise SpaceError(f"{key}: {kind} takes a non-empty list {form}, got {args!r}")
    if kind in ("choice", "grid"):
        return Param(key, kind, tuple(_canonical(key, v) for v in args))
    if len(args) != 2:
        raise SpaceError(f"{key}: {kind} takes [low, high], got {args!r}")
    low, high = (_number(key, kind, v) for v in args)
    if kind == "randint":
        if tp not in (int, float) or any(float(v) != int(v) for v in (low, high)):
            raise SpaceError(f"{key}: randint needs integer bounds and a numeric option, got {args!r} for "
                             f"{getattr(tp, '__name__', tp)}")
        low, high = int(low), int(high)
        if low > high:
            raise SpaceError(f"{key}: randint needs low <= high, got [{low}, {high}]")
        for v in (low, high):
            _canonical(key, v)
        return Param(key, kind, (low, high))
    if tp is not float:
        raise SpaceError(f"{key}: {kind} draws floats but {key} is {getattr(tp, '__name__', tp)}; use randint, "
                         f"choice or grid")
    if not low < high:
        raise SpaceError(f"{key}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{key}: loguniform needs 0 < low, got [{low}, {high}]")
    return Param(key, kind, (float(low), float(high)))


def parse_space(data: Any, source: str = "<space>",
                overrides: Sequence[str] = ()) -> tuple[list[Param], SweepSettings]:
    """Search dimensions and settings from a space mapping (see the module docstring)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: a search space is a mapping of dotted config keys to distributions")
    params = []
    for key, spec in data.items():
        if key == RESERVED:
            continue
        try:
            params.append(parse_param(str(key), spec))
        except SpaceError as err:
            raise SpaceError(f"{source}: {err}") from None
    if not params:
        raise SpaceError(f"{source}: the search space has no dimensions")
    bad = [o for o in overrides if "=" not in o or not o.startswith(f"{RESERVED}.")]
    if bad:
        raise SpaceError(f"sweep overrides must look like {RESERVED}.key=value, got: {' '.join(bad)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepSettings), OmegaConf.create(data.get(RESERVED) or {}))
        cli = OmegaConf.from_dotlist([o[len(RESERVED) + 1:] for o in overrides])
        settings: SweepSettings = OmegaConf.to_object(OmegaConf.merge(merged, cli))  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise SpaceError(f"{source}: invalid {RESERVED} settings: {err}") from None
    s = settings.scheduler
    checks = [
        (settings.num_samples >= 1, f"{RESERVED}.num_samples must be >= 1, got {settings.num_samples}"),
        (settings.eval_every is None or settings.eval_every >= 1,
         f"{RESERVED}.eval_every must be >= 1, got {settings.eval_every}"),
        (settings.max_concurrent >= 0, f"{RESERVED}.max_concurrent must be >= 0"),
        (settings.trial_cpus >= 0, f"{RESERVED}.trial_cpus must be >= 0"),
        (s.name in ("asha", "fifo"), f"{RESERVED}.scheduler.name must be asha or fifo, got {s.name!r}"),
        (s.reduction_factor > 1, f"{RESERVED}.scheduler.reduction_factor must be > 1, got {s.reduction_factor}"),
        (s.grace_period is None or s.grace_period >= 1, f"{RESERVED}.scheduler.grace_period must be >= 1"),
        (s.max_t is None or s.max_t >= 1, f"{RESERVED}.scheduler.max_t must be >= 1"),
        (settings.guard.max_drift is None or settings.guard.max_drift > 0,
         f"{RESERVED}.guard.max_drift must be > 0"),
        (settings.guard.max_acc_drop is None or settings.guard.max_acc_drop >= 0,
         f"{RESERVED}.guard.max_acc_drop must be >= 0"),
        (settings.guard.penalty > 0, f"{RESERVED}.guard.penalty must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise SpaceError(f"{source}: {message}")
    return params, settings


def load_space(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[list[Param], SweepSettings]:
    """Parse a space file (``overrides``: ``sweep.key=value`` strings)."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"cannot parse search space file {path}: {err}") from None
    return parse_space(data, str(path), overrides)


def check_space(params: Sequence[Param], base: AlignConfig) -> None:
    """Every bound and listed value, applied to ``base``, passes :func:`r2d3.train.loop.validate`, and
    ``base`` evaluates on held-out prompts."""
    from r2d3.train.loop import validate

    if base.eval.num_prompts < 1:
        raise SpaceError("a sweep scores trials on held-out prompts: eval.num_prompts must be >= 1")
    for p in params:
        for value in p.args:
            try:
                validate(apply_params(base, {p.key: value}))
            except ValueError as err:
                raise SpaceError(f"{p.key}={value!r}: {err}") from None


def to_param_space(params: Sequence[Param]) -> dict[str, Any]:
    """Tune's ``param_space`` (flat dotted keys)."""
    make = {
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(a[0], a[1] + 1),  # Tune's upper bound is exclusive
        "choice": lambda a: tune.choice(list(a)),
        "grid": lambda a: tune.grid_search(list(a)),
    }
    return {p.key: make[p.kind](p.args) for p in params}


# ---------------------------------------------------------------------------------------------------------
# The guarded objective


def guarded_score(metrics: dict[str, Any], base: dict[str, Any], guard: GuardSettings) -> dict[str, float]:
    """The sweep's objective from held-out ``metrics`` of a trial and ``base`` (the base model's).

    Keys without prefix: ``reward_mean``, ``drift_rgb_l2``, ``color_acc``, ``shape_acc``. With R the
    held-out reward, R0 the base model's, and accuracies in [0, 1]::

        drop       = 100 * max(base color_acc - color_acc, base shape_acc - shape_acc)   (points)
        v_drift    = max(0, drift_rgb_l2 - max_drift) / max_drift
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
    drift = metrics.get("drift_rgb_l2")
    if guard.max_drift is not None and drift is not None:
        drift = float(drift)
        excess = max(0.0, drift - guard.max_drift) / guard.max_drift if math.isfinite(drift) else 1.0
        out["guard/drift_excess"] = excess
        violation += excess
    drops = [100.0 * (float(base[k]) - float(metrics[k])) for k in ("color_acc", "shape_acc")
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


# ---------------------------------------------------------------------------------------------------------
# The base model's held-out metrics (the guard's reference)

_BASELINE_SECTIONS = ("model.backend", "model.weights", "sampler", "render", "reward", "data.heldout_prompts",
                      "data.prompt_column", "eval.num_prompts", "eval.seeds_per_prompt", "run.seed", "run.device")


def baseline_key(config: AlignConfig) -> str:
    """Hash of everything the base model's held-out evaluation depends on."""
    data = to_dict(config)
    parts = {key: _get_dotted(data, key) for key in _BASELINE_SECTIONS}
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _compute_baseline(payload: dict[str, Any]) -> dict[str, float]:
    from r2d3.train import loop
    from r2d3.train.align_job import Evaluator

    config = from_dict(AlignConfig, payload["config"])
    worker = loop.build_worker(config)  # LoRA starts at zero: its outputs are the base model's
    held = Evaluator(config, Path(payload["out_dir"]))(worker, "base")
    return {k: float(v) for k, v in held.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def baseline_from_evaluation(summary: dict[str, Any], config: AlignConfig) -> dict[str, float]:
    """The base model's metrics from a ``pipelines/evaluate.py`` summary, for the guard.

    Accepted only if that job scored the same held-out prompts with the same reward as the trials'
    evaluations (``eval.num_prompts`` of ``data.heldout_prompts``); otherwise the guard would compare
    different things, so the mismatch is an error naming what differs."""
    from r2d3.train.align_job import heldout_prompts

    job = summary.get("job", {})
    if "base" not in summary.get("checkpoints", {}):
        raise ValueError("the evaluation summary has no 'base' checkpoint (run pipelines/evaluate.py with "
                         "--checkpoints base ...)")
    if job.get("reward") != config.reward:
        raise ValueError(f"the evaluation summary scored reward {job.get('reward')!r}, the sweep uses "
                         f"{config.reward!r}")
    if summary.get("prompts") != heldout_prompts(config):
        raise ValueError(f"the evaluation summary used {len(summary.get('prompts', []))} other held-out prompts; "
                         f"evaluate with --prompts {config.data.heldout_prompts} --num-prompts "
                         f"{config.eval.num_prompts}")
    base = summary["checkpoints"]["base"]
    out = {"reward_mean": float(base["reward_mean"]), "drift_rgb_l2": 0.0}
    for ours, theirs in (("color_acc", "color_ok_mean"), ("shape_acc", "shape_ok_mean")):
        if theirs in base:
            out[ours] = float(base[theirs])
    return out


def start_baseline(config: AlignConfig, local_dir: Path, evaluation: str | None = None) -> Any:
    """``ObjectRef`` of the base model's held-out metrics: cached under ``local_dir/baselines`` or
    computed by a Ray task with one training worker's resources; or read from the summary of an
    evaluation job (``evaluation``: its ``summary.json`` or output directory)."""
    if evaluation is not None:
        from r2d3.eval.job import load_summary

        return ray.put(baseline_from_evaluation(load_summary(evaluation), config))
    key = baseline_key(config)
    cached = local_dir / "baselines" / f"{key}.json"
    if cached.is_file():
        return ray.put(json.loads(cached.read_text()))
    use_gpu = config.scale.use_gpu == "true" or (config.scale.use_gpu == "auto"
                                                 and ray.cluster_resources().get("GPU", 0) > 0)
    task = ray.remote(_compute_baseline).options(num_cpus=config.scale.cpus_per_worker, num_gpus=int(use_gpu))
    return task.remote({"config": to_dict(config), "out_dir": str(local_dir / "baselines" / key)})


def save_baseline(config: AlignConfig, local_dir: Path, metrics: dict[str, float]) -> None:
    path = local_dir / "baselines" / f"{baseline_key(config)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(metrics, indent=1))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------
# One trial


def trial_config(base: AlignConfig, params: dict[str, Any], trial_id: str, runs_dir: Path,
                 eval_every: int) -> AlignConfig:
    config = apply_params(base, params)
    return replace(config, run=replace(config.run, name=trial_id, output_dir=str(runs_dir), resume=True),
                   eval=replace(config.eval, every=eval_every))


def _trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """A Tune trial: one alignment run on Ray Train, streaming guarded held-out results to Tune."""
    from r2d3.ray.train import fit_on_ray

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
    if not summary_path.is_file():
        return
    summary = json.loads(summary_path.read_text())
    after, history = summary.get("after", {}), summary.get("history", [])
    if "reward_mean" not in after or not history or history[-1].get("epoch") != config.train.epochs:
        return
    final = {k: v for k, v in history[-1].items() if not k.startswith("heldout/")}
    final.update({f"heldout/{k}": v for k, v in after.items() if isinstance(v, (int, float))})
    tune.report({**heldout_result(final, baseline, guard), "final": 1})


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepOutcome:
    sweep_dir: Path
    rows: list[dict[str, Any]]
    table: str  # Markdown
    best_config: Path | None
    restored: bool
    baseline: dict[str, float]
    finished: bool  # False when interrupted: re-run the same name to continue


def resolve_paths(config: AlignConfig) -> AlignConfig:
    """Relative local paths made absolute (trials run in other working directories)."""
    def absolute(value: str | None) -> str | None:
        if value and "://" not in value and ":" not in value.split("/")[0] and Path(value).exists():
            return str(Path(value).resolve())
        return value

    return replace(config, model=replace(config.model, weights=absolute(config.model.weights)),
                   data=replace(config.data, prompts=absolute(config.data.prompts),
                                heldout_prompts=absolute(config.data.heldout_prompts)),
                   run=replace(config.run, output_dir=str(Path(config.run.output_dir).expanduser().resolve())))


def default_eval_every(config: AlignConfig, settings: SweepSettings) -> int:
    if settings.eval_every:
        return settings.eval_every
    if config.eval.every:
        return config.eval.every
    return max(1, config.train.epochs // 4)


def _scheduler(settings: SweepSettings, epochs: int, eval_every: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = settings.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    max_t = s.max_t or epochs
    grace = min(s.grace_period or eval_every, max_t)
    # stop_last_trials=False: a trial that reaches max_t finishes its run (final evaluation, summary.json)
    return ASHAScheduler(time_attr=TIME_ATTR, max_t=max_t, grace_period=grace,
                         reduction_factor=s.reduction_factor, stop_last_trials=False)


def _space_document(params: Sequence[Param], settings: SweepSettings) -> dict[str, Any]:
    doc: dict[str, Any] = {p.key: {p.kind: list(p.args)} for p in params}
    doc[RESERVED] = OmegaConf.to_container(OmegaConf.structured(settings))
    return doc


def _init_ray() -> None:
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, configure_logging=False)


def run_sweep(base: AlignConfig, params: Sequence[Param], settings: SweepSettings, name: str,
              storage: str | None = None, baseline_evaluation: str | None = None) -> SweepOutcome:
    """Run (or restore, when ``<storage>/<name>`` holds one) a sweep; write its tables and best config.

    ``storage`` (default ``<run.output_dir>/sweeps``): a local path or a URI such as ``s3://b/prefix``
    for Tune's state and the trials' checkpoints; tables, best config and run directories are written
    under ``<storage>/<name>`` when it is local, else under ``<run.output_dir>/sweeps/<name>``.
    """
    base = resolve_paths(base)
    local_root = Path(base.run.output_dir) / "sweeps"
    remote = storage is not None and "://" in storage
    if storage is None or not remote:
        storage = str(Path(storage).expanduser().resolve()) if storage else str(local_root)
        local_dir = Path(storage) / name
    else:
        local_dir = local_root / name
    sweep_path = f"{storage.rstrip('/')}/{name}"
    local_dir.mkdir(parents=True, exist_ok=True)
    _init_ray()

    restored = tune.Tuner.can_restore(sweep_path)
    doc_path, base_path = local_dir / "sweep.yaml", local_dir / "base_config.yaml"
    if restored and base_path.is_file() and doc_path.is_file():
        stored_base = from_dict(AlignConfig, yaml.safe_load(base_path.read_text()))
        stored_params, stored_settings = parse_space(yaml.safe_load(doc_path.read_text()), str(doc_path))
        if to_dict(stored_base) != to_dict(base) or list(stored_params) != list(params):
            log.warning("sweep %s exists: restoring it with the base config and space it was started with "
                        "(%s); start a new name to change them", name, local_dir)
        base, params = stored_base, stored_params
        settings = replace(stored_settings, retry_errored=settings.retry_errored)
    else:
        base_path.write_text(to_yaml(base))
        doc_path.write_text(yaml.safe_dump(_space_document(params, settings), sort_keys=False))

    eval_every = default_eval_every(base, settings)
    baseline_ref = start_baseline(base, local_dir, baseline_evaluation)
    context = {
        "base": to_dict(base), "eval_every": eval_every, "guard": dataclasses.asdict(settings.guard),
        "baseline": [baseline_ref], "baseline_key": baseline_key(base), "local_dir": str(local_dir),
        "train_storage": f"{sweep_path}/runs",
    }
    trainable = tune.with_resources(tune.with_parameters(_trial, context=context), {"cpu": settings.trial_cpus})
    if restored:
        log.info("restoring sweep %s", sweep_path)
        tuner = tune.Tuner.restore(sweep_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=settings.retry_errored)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        tuner = tune.Tuner(
            trainable,
            param_space=to_param_space(params),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=settings.num_samples,
                scheduler=_scheduler(settings, base.train.epochs, eval_every),
                search_alg=BasicVariantGenerator(max_concurrent=settings.max_concurrent,
                                                 random_state=settings.seed),
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    tuner.fit()
    baseline = ray.get(baseline_ref)
    save_baseline(base, local_dir, baseline)
    records = trial_records(sweep_path)
    rows = result_rows(records, params, base.train.epochs)
    finished = sum(r["status"] in ("TERMINATED", "ERROR") for r in records) >= expected_trials(params, settings)
    table = write_tables(rows, params, local_dir, baseline, settings.guard)
    best = write_best_config(rows, params, base, local_dir, name)
    return SweepOutcome(local_dir, rows, table, best, restored, baseline, finished)


# ---------------------------------------------------------------------------------------------------------
# Results


def trial_records(sweep_path: str) -> list[dict[str, Any]]:
    """``{trial, status, config, metrics}`` of every trial in the sweep's saved state (Tune status words:
    TERMINATED, ERROR, RUNNING, PENDING, PAUSED; ``metrics``: the last result)."""
    analysis = tune.ExperimentAnalysis(sweep_path)
    return [{"trial": t.trial_id, "status": t.status, "config": dict(t.config or {}),
             "metrics": dict(t.last_result or {})} for t in analysis.trials]


def _trial_status(status: str, epoch: Any, epochs: int) -> str:
    if status == "ERROR":
        return "error"
    if status != "TERMINATED":
        return "unfinished" if epoch is None else f"unfinished (epoch {int(epoch)})"
    if epoch is None:
        return "no result"
    if epoch >= epochs:
        return "completed"
    return f"stopped early (epoch {int(epoch)})"


def result_rows(records: Sequence[dict[str, Any]], params: Sequence[Param], epochs: int) -> list[dict[str, Any]]:
    """One table row per trial record (:func:`trial_records`), best guarded score first (trials without
    a score last)."""
    rows = []
    for record in records:
        m = record["metrics"]
        row: dict[str, Any] = {"trial": record["trial"]}
        row.update({p.key: record["config"].get(p.key) for p in params})
        row.update({
            METRIC: m.get(METRIC), "reward": m.get("heldout/reward_mean"),
            "drift_rgb_l2": m.get("heldout/drift_rgb_l2"),
            "color_acc": m.get("heldout/color_acc"), "shape_acc": m.get("heldout/shape_acc"),
            "acc_drop_points": m.get("guard/acc_drop_points"),
            "guard": None if METRIC not in m else ("violated" if m.get("guard/violated") else "ok"),
            "epoch": m.get(TIME_ATTR), "status": _trial_status(record["status"], m.get(TIME_ATTR), epochs),
        })
        rows.append(row)
    rows.sort(key=lambda r: (r[METRIC] is None, -(r[METRIC] if r[METRIC] is not None else 0.0)))
    return rows


def expected_trials(params: Sequence[Param], settings: SweepSettings) -> int:
    return settings.num_samples * math.prod(len(p.args) for p in params if p.kind == "grid")


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
             f"{pct(baseline.get('color_acc'))}, shape {pct(baseline.get('shape_acc'))}. Guard: drift <= "
             f"{_fmt(guard.max_drift) or 'off'}, accuracy drop <= {_fmt(guard.max_acc_drop) or 'off'} points, "
             f"penalty {_fmt(guard.penalty)}.\n\n")
    md.write("| " + " | ".join(columns) + " |\n")
    md.write("|" + "---|" * len(columns) + "\n")
    for row in rows:
        md.write("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |\n")
    text = md.getvalue()
    (out_dir / "results.md").write_text(text)
    return text


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The winner: highest guarded score among completed trials (among all scored ones if none completed)."""
    scored = [r for r in rows if r[METRIC] is not None and math.isfinite(r[METRIC])]
    completed = [r for r in scored if r["status"] == "completed"]
    pool = completed or scored
    return max(pool, key=lambda r: r[METRIC]) if pool else None


def write_best_config(rows: list[dict[str, Any]], params: Sequence[Param], base: AlignConfig, out_dir: Path,
                      name: str) -> Path | None:
    """``best_config.yaml``: the base config with the winner's values (run.name unset: a new run)."""
    row = best_row(rows)
    path = out_dir / "best_config.yaml"
    if row is None:
        return None
    config = apply_params(base, {p.key: row[p.key] for p in params})
    config = replace(config, run=replace(config.run, name=None))
    header = (f"# best trial of sweep {name}: {row['trial']} ({row['status']}), {METRIC} {_fmt(row[METRIC])}, "
              f"held-out reward {_fmt(row['reward'])}\n"
              f"# {', '.join(f'{p.key}={_fmt(row[p.key])}' for p in params)}\n"
              "# use: python pipelines/align.py --config <this file>\n")
    path.write_text(header + to_yaml(config))
    return path
