"""Hyperparameter sweeps on Ray Tune: every trial is one alignment run on Ray Train.

Search space files (``tune_spaces/*.yaml``) map dotted :class:`~r2d3.train.config.AlignConfig` keys to a
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
the run, the trial also reports the final held-out evaluation from ``summary.json`` (with
``final_guarded_score``, so the winner is chosen among the trials that ran all epochs). ASHA compares
trials on ``guarded_score`` with ``epoch`` as its time axis.

Layout of a sweep (``<storage>/<name>``)::

    sweep.yaml  base_config.yaml   the space, settings and base config the sweep was started with
    results.csv results.md         one row per trial (written after every run and every restore)
    best_config.yaml               the winning trial's full config, for pipelines/align.py --config
    baselines/                     held-out metrics of the base model (the guard's reference)
    runs/<trial id>/               each trial's alignment run (see r2d3.jobs.align)
    trial_<trial id>/ ...          Tune's own state (re-running the same name restores from it)

Modules: :mod:`~r2d3.ray.tune.settings` (sweep settings, shared names), :mod:`~r2d3.ray.tune.space` (the
space DSL and its checks), :mod:`~r2d3.ray.tune.guard` (the objective), :mod:`~r2d3.ray.tune.baseline`
(the base model's metrics), :mod:`~r2d3.ray.tune.trial` (the trainable), :mod:`~r2d3.ray.tune.driver`
(:func:`run_sweep`) and :mod:`~r2d3.ray.tune.results` (tables and best config from Tune's ``ResultGrid``).
"""

from r2d3.ray.tune.baseline import baseline_from_evaluation, baseline_key, baseline_resources, start_baseline
from r2d3.ray.tune.driver import SweepOutcome, default_eval_every, expected_trials, resolve_paths, run_sweep
from r2d3.ray.tune.guard import GuardedReportCallback, guarded_score, heldout_result
from r2d3.ray.tune.results import best_result, result_rows, trial_status, write_best_config, write_tables
from r2d3.ray.tune.settings import (
    FINAL_METRIC,
    METRIC,
    RESERVED,
    TIME_ATTR,
    GuardSettings,
    SchedulerSettings,
    SpaceError,
    SweepSettings,
    describe_settings,
)
from r2d3.ray.tune.space import (
    DISTRIBUTIONS,
    SET_BY_SWEEP,
    Param,
    apply_params,
    check_space,
    load_space,
    option_type,
    parse_param,
    parse_space,
    to_param_space,
)

# _trial, _trial_dirname: Tune's saved state of a sweep started when this was one module names them here
from r2d3.ray.tune.trial import _trial, _trial_dirname, final_result, trial_config  # noqa: F401

__all__ = [
    "DISTRIBUTIONS", "FINAL_METRIC", "METRIC", "RESERVED", "SET_BY_SWEEP", "TIME_ATTR", "GuardSettings",
    "GuardedReportCallback", "Param", "SchedulerSettings", "SpaceError", "SweepOutcome", "SweepSettings",
    "apply_params", "baseline_from_evaluation", "baseline_key", "baseline_resources", "best_result",
    "check_space", "default_eval_every", "describe_settings", "expected_trials", "final_result",
    "guarded_score", "heldout_result", "load_space", "option_type", "parse_param", "parse_space",
    "resolve_paths", "result_rows", "run_sweep", "start_baseline", "to_param_space", "trial_config",
    "trial_status", "write_best_config", "write_tables",
]
