"""Align a 3D-native diffusion model with a 2D reward (Nabla-R2D3 by default) on Ray Train.

    python pipelines/align.py                                   # embedded default, local Ray
    python pipelines/align.py --config my.yaml algo.beta=5e4    # YAML + overrides
    ray job submit -- python pipelines/align.py --config ...    # on a cluster
    python pipelines/align.py scale.in_process=true             # no Ray (debugging)

Prints held-out reward, prompt-following and prior drift before -> after, and writes everything under
run.output_dir/run.name (see r2d3.train.align_job for the layout). Re-running with the same run.name
resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from r2d3.config import AlignConfig, parse_cli, reward_label
from r2d3.data.prompts import PromptSourceError
from r2d3.train.align_job import format_summary, run_worker
from r2d3.train.loop import validate


def default_run_name(config: AlignConfig) -> str:
    return f"{config.algo.name}-{reward_label(config.reward)}-{time.strftime('%Y%m%d-%H%M%S')}"


def _run(config: AlignConfig, run_dir: Path, output_dir: Path) -> dict:
    if config.scale.in_process:
        from r2d3.train.session import LocalSession

        return run_worker(config, LocalSession(run_dir, config.run.keep_checkpoints))
    from r2d3.ray.train import fit_on_ray, read_summary

    storage = config.scale.storage_path or str(output_dir)
    result = fit_on_ray(config, run_dir, storage_path=storage)
    if result.error is not None:
        raise result.error
    return read_summary(run_dir, storage)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config, _ = parse_cli(AlignConfig, __doc__.split("\n")[0], argv)
    try:
        validate(config)
    except ValueError as err:
        sys.exit(f"align: invalid config: {err}")
    if config.run.name is None:
        config = replace(config, run=replace(config.run, name=default_run_name(config)))
    output_dir = Path(config.run.output_dir).expanduser().resolve()
    run_dir = output_dir / config.run.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write_test").write_text("")
        (run_dir / ".write_test").unlink()
    except OSError as err:
        sys.exit(f"align: run directory {run_dir} is not writable: {err}")
    os.environ.setdefault("WANDB_MODE", config.run.wandb_mode)
    start = time.time()
    try:
        summary = _run(config, run_dir, output_dir)
    except PromptSourceError as err:
        sys.exit(f"align: {err}")
    print(f"\nr2d3 align: {config.algo.name} on reward {reward_label(config.reward)}, {config.train.epochs} epochs, "
          f"{time.time() - start:.0f} s")
    print(format_summary(summary))
    print(f"outputs: {run_dir}")
    return summary


if __name__ == "__main__":
    main()
