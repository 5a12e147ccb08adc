"""Sweep alignment hyperparameters with Ray Tune: one Ray Train alignment run per trial, ASHA on a guarded
held-out reward.

    python pipelines/sweep.py --space tune_spaces/default.yaml                  # local Ray, runs/sweeps/<name>
    python pipelines/sweep.py --space tune_spaces/default.yaml --name beta-lr train.epochs=16
    python pipelines/sweep.py --space my.yaml --config base.yaml sweep.guard.max_drift=0.03
    ray job submit -- python pipelines/sweep.py --space ... --storage s3://bucket/sweeps

Prints one row per trial (sampled values, guarded score, held-out reward, drift, prompt-following,
status) and writes results.csv, results.md and best_config.yaml (use it with
``pipelines/align.py --config``) into the sweep directory. Re-running with the same --name restores the
sweep: finished trials are kept, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from r2d3.config import ConfigError, build_config
from r2d3.train.config import AlignConfig

SPACE_HELP = """\
search space file (YAML): dotted AlignConfig keys -> one distribution each
  algo.beta:       {loguniform: [1.0e4, 1.0e5]}   log-uniform floats, 0 < low < high
  algo.reg_scale:  {uniform: [10, 300]}           uniform floats, low < high
  model.lora_rank: {randint: [4, 16]}             integers, both bounds included
  sampler.kind:    {choice: [ddim, sde-dpmsolver++]}   one value at random
  train.lr:        {grid: [5.0e-4, 1.0e-3]}       every value (num_samples repeats the grid)
  sweep: {...}                                    reserved: the sweep settings below

objective (guarded held-out reward), with R the trial's held-out reward and R0 the base model's:
  drop     = 100 * max(base colour acc - colour acc, base shape acc - shape acc)   (points)
  v_drift  = max(0, drift_rgb_l2 - max_drift) / max_drift
  v_follow = max(0, drop - max_acc_drop) / max(max_acc_drop, 1)
  score    = R if v_drift = v_follow = 0, else min(R, R0) - penalty * (1 + v_drift + v_follow)

sweep settings (in the space file under `sweep:`, or sweep.key=value here):"""


def main(argv: list[str] | None = None):
    from r2d3.ray.tune import check_space, describe_settings, load_space, run_sweep

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=SPACE_HELP + "\n" + "\n".join(describe_settings()) +
        "\n\nbase config options (section.key=value): see `python pipelines/align.py --help`",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True,
                        help="search space YAML (see below), e.g. tune_spaces/default.yaml")
    parser.add_argument("--config", action="append", default=[], help="base config YAML (repeatable, later wins)")
    parser.add_argument("--num-samples", type=int, help="trials to draw (overrides sweep.num_samples)")
    parser.add_argument("--name", help="sweep name; reusing one restores that sweep (default: <space>-<time>)")
    parser.add_argument("--storage", help="where sweeps live: a local directory or s3://bucket/prefix "
                                          "(default: <run.output_dir>/sweeps)")
    parser.add_argument("--baseline-evaluation", metavar="SUMMARY",
                        help="the guard's base-model metrics from a pipelines/evaluate.py summary.json (or its "
                             "directory) on the same held-out prompts, instead of evaluating the base model here")
    parser.add_argument("--retry-errored", action="store_true", help="when restoring, rerun errored trials")
    parser.add_argument("overrides", nargs="*", help="section.key=value for the base config, "
                                                     "sweep.key=value for the sweep settings")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    sweep_overrides = [o for o in args.overrides if o.startswith("sweep.")]
    if args.num_samples is not None:
        sweep_overrides.append(f"sweep.num_samples={args.num_samples}")
    if args.retry_errored:
        sweep_overrides.append("sweep.retry_errored=true")
    from r2d3.train.loop import validate  # after --help: it imports torch and the models

    try:
        base = build_config(AlignConfig, args.config, [o for o in args.overrides if not o.startswith("sweep.")])
        validate(base)
        params, settings = load_space(args.space, sweep_overrides)
        check_space(params, base)
        if args.baseline_evaluation:  # checked now, before Ray starts
            from r2d3.eval.summary import load_summary
            from r2d3.ray.tune import baseline_from_evaluation

            baseline_from_evaluation(load_summary(args.baseline_evaluation), base)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    name = args.name or f"{Path(args.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ.setdefault("WANDB_MODE", base.run.wandb_mode)
    start = time.time()
    outcome = run_sweep(base, params, settings, name, args.storage, args.baseline_evaluation)
    print(f"\nr2d3 sweep {name}: {len(outcome.rows)} trials{' (restored)' if outcome.restored else ''}, "
          f"{time.time() - start:.0f} s\n")
    print(outcome.table)
    print(f"sweep directory: {outcome.sweep_dir}")
    if not outcome.finished:
        print(f"sweep interrupted: re-run with --name {name} to continue it (finished trials are kept)")
    if outcome.best_config is None:
        sys.exit("sweep: no trial produced a held-out result; see the errors above")
    print(f"best config: {outcome.best_config}\n  python pipelines/align.py --config {outcome.best_config}")
    return outcome


if __name__ == "__main__":
    main()
