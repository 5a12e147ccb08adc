"""The sweep driver: :func:`run_sweep` sets up (or restores) the Tuner, runs it and writes the results."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from r2d3.config import from_dict, to_dict, to_yaml
from r2d3.train.config import AlignConfig
from r2d3.ray.connect import init_ray
from r2d3.ray.tune.baseline import baseline_key, save_baseline, start_baseline
from r2d3.ray.tune.results import best_result, result_rows, trial_id, write_best_config, write_tables
from r2d3.ray.tune.settings import METRIC, TIME_ATTR, SweepSettings
from r2d3.ray.tune.space import Param, parse_space, space_document, to_param_space
from r2d3.ray.tune.trial import _trial, _trial_dirname

log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    sweep_dir: Path
    rows: list[dict[str, Any]]
    table: str  # Markdown
    best_config: Path | None
    restored: bool
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


def expected_trials(params: Sequence[Param], settings: SweepSettings) -> int:
    return settings.num_samples * math.prod(len(p.args) for p in params if p.kind == "grid")


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
    init_ray()

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
        doc_path.write_text(yaml.safe_dump(space_document(params, settings), sort_keys=False))

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
    grid = tuner.fit()
    baseline = ray.get(baseline_ref)
    save_baseline(base, local_dir, baseline)
    rows = result_rows(grid, params, base.train.epochs)
    finished = grid.num_terminated + grid.num_errors >= expected_trials(params, settings)
    table = write_tables(rows, params, local_dir, baseline, settings.guard)
    best = best_result(grid)
    winner = None if best is None else next(r for r in rows if r["trial"] == trial_id(best))
    return SweepOutcome(local_dir, rows, table, write_best_config(winner, params, base, local_dir, name), restored,
                        finished)
