"""Align a 3D-native diffusion model with a 2D reward (Nabla-R2D3 by default) on Ray Train.

    python pipelines/align.py                                   # embedded default, local Ray
    python pipelines/align.py --config my.yaml algo.beta=5e4    # YAML + overrides
    ray job submit -- python pipelines/align.py --config ...    # on a cluster
    python pipelines/align.py scale.in_process=true             # no Ray (debugging)

Prints held-out reward, prompt-following and prior drift before -> after, and writes everything under
run.output_dir/run.name (see r2d3.jobs.align for the layout). Re-running with the same run.name
resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from r2d3.pretrained import WeightsError
from r2d3.cli import parse_cli
from r2d3.config import ConfigError, reward_label
from r2d3.train.config import AlignConfig
from r2d3.data.prompts import PromptSourceError
from r2d3.ray.train import ClusterResourcesError
from r2d3.jobs.align import format_summary, run_worker
from r2d3.train.checkpoint import CheckpointMismatchError, CorruptCheckpointError
from r2d3.train.loop import TrainingAborted, validate
from r2d3.train.run_dir import RunDirError, claim_run_dir

#: failures a user can act on from one line (the message names the input); anything else is a bug and
#: keeps its traceback
KNOWN_ERRORS = (ConfigError, PromptSourceError, RunDirError, CorruptCheckpointError, CheckpointMismatchError,
                WeightsError, TrainingAborted, ClusterResourcesError, OSError)


def default_run_name(config: AlignConfig) -> str:
    return f"{config.algo.name}-{reward_label(config.reward)}-{time.strftime('%Y%m%d-%H%M%S')}"


def _run(config: AlignConfig, run_dir: Path, output_dir: Path, verbose: bool = False) -> dict:
    if config.scale.in_process:
        from r2d3.train.session import LocalSession

        return run_worker(config, LocalSession(run_dir, config.run.keep_checkpoints))
    from r2d3.ray.train import fit_on_ray, read_summary

    storage = config.scale.storage_path or str(output_dir)
    try:
        result = fit_on_ray(config, run_dir, storage_path=storage, verbose=verbose)
    except Exception as err:  # Ray Train raises the workers' failures wrapped
        root = _root_cause(err)
        if root is err:
            raise
        raise root from err
    if result.error is not None:
        raise _root_cause(result.error)
    return read_summary(run_dir, storage)


def _root_cause(err: BaseException) -> BaseException:
    """The worker's own exception inside Ray Train's wrappers (``TrainingFailedError`` and friends), so
    a known failure is reported as the one line it is."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, KNOWN_ERRORS):
            return err
        inner = getattr(err, "worker_failures", None) or {}
        nxt = next(iter(inner.values()), None) if isinstance(inner, dict) else None
        nxt = nxt or getattr(err, "controller_failure", None) or err.__cause__ or err.__context__
        if nxt is None:
            break
        err = nxt
    return err


def main(argv: list[str] | None = None) -> dict:
    config, args = parse_cli(AlignConfig, __doc__.split("\n")[0], argv, extra=[
        (("--verbose",), {"action": "store_true", "help": "full tracebacks and Ray's log lines"})])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        validate(config)
    except ValueError as err:
        sys.exit(f"align: invalid config: {err}")
    if config.run.name is None:
        config = replace(config, run=replace(config.run, name=default_run_name(config)))
    output_dir = Path(config.run.output_dir).expanduser().resolve()
    run_dir = output_dir / config.run.name
    os.environ.setdefault("WANDB_MODE", config.run.wandb_mode)
    start = time.time()
    try:
        with claim_run_dir(config, run_dir):
            summary = _run(config, run_dir, output_dir, verbose=args.verbose)
    except KNOWN_ERRORS as err:
        if args.verbose:
            raise
        sys.exit(f"align: {type(err).__name__}: {err}")
    print(f"\nr2d3 align: {config.algo.name} on reward {reward_label(config.reward)}, {config.train.epochs} epochs, "
          f"{time.time() - start:.0f} s")
    print(format_summary(summary))
    print(f"outputs: {run_dir}")
    return summary


if __name__ == "__main__":
    main()
