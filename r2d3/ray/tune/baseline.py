"""The base model's held-out metrics: the guard's reference, computed once per sweep (cached under
``<sweep>/baselines``) or taken from an evaluation job's summary."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import ray

from r2d3.config import from_dict, to_dict
from r2d3.train.config import AlignConfig
from r2d3.ray.tune.space import get_dotted

_BASELINE_SECTIONS = ("model.backend", "model.weights", "sampler", "render", "reward", "data.heldout_prompts",
                      "data.prompt_column", "eval.num_prompts", "eval.seeds_per_prompt", "run.seed", "run.device")


def baseline_key(config: AlignConfig) -> str:
    """Hash of everything the base model's held-out evaluation depends on."""
    data = to_dict(config)
    parts = {key: get_dotted(data, key) for key in _BASELINE_SECTIONS}
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _compute_baseline(payload: dict[str, Any]) -> dict[str, float]:
    from r2d3.jobs.align import Evaluator  # torch and the models: not at import time (sweep.py --help)
    from r2d3.train import loop

    config = from_dict(AlignConfig, payload["config"])
    worker = loop.build_worker(config)  # LoRA starts at zero: its outputs are the base model's
    held = Evaluator(config, Path(payload["out_dir"]))(worker, "base")
    return {k: float(v) for k, v in held.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def baseline_from_evaluation(summary: dict[str, Any], config: AlignConfig) -> dict[str, float]:
    """The base model's metrics from a ``pipelines/evaluate.py`` summary, for the guard.

    Accepted only if that job scored the same held-out prompts with the same reward as the trials'
    evaluations (``eval.num_prompts`` of ``data.heldout_prompts``); otherwise the guard would compare
    different things, so the mismatch is an error naming what differs."""
    from r2d3.jobs.align import heldout_prompts

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
    out = {"reward_mean": float(base["reward_mean"]), "drift_rgb_l2_mean": 0.0}  # the job's own names
    out.update({k: float(base[k]) for k in ("color_ok_mean", "shape_ok_mean") if k in base})
    return out


def baseline_resources(config: AlignConfig) -> dict[str, float]:
    """Ray resources of the baseline task: one training worker's (``scale.cpus_per_worker``, and a GPU when
    ``scale.use_gpu`` asks for one, as the trials' Train workers do)."""
    from r2d3.devices import use_gpu  # imports torch: not at import time (pipelines/sweep.py --help)

    return {"num_cpus": config.scale.cpus_per_worker or 1.0, "num_gpus": int(use_gpu(config.scale.use_gpu))}


def start_baseline(config: AlignConfig, local_dir: Path, evaluation: str | None = None) -> Any:
    """``ObjectRef`` of the base model's held-out metrics: cached under ``local_dir/baselines`` or
    computed by a Ray task with one training worker's resources (:func:`baseline_resources`); or read
    from the summary of an evaluation job (``evaluation``: its ``summary.json`` or output directory)."""
    if evaluation is not None:
        from r2d3.eval.summary import load_summary

        return ray.put(baseline_from_evaluation(load_summary(evaluation), config))
    key = baseline_key(config)
    cached = local_dir / "baselines" / f"{key}.json"
    if cached.is_file():
        return ray.put(json.loads(cached.read_text()))
    task = ray.remote(_compute_baseline).options(**baseline_resources(config))
    return task.remote({"config": to_dict(config), "out_dir": str(local_dir / "baselines" / key)})


def save_baseline(config: AlignConfig, local_dir: Path, metrics: dict[str, float]) -> None:
    """Cache the base model's metrics under ``local_dir/baselines`` (read by :func:`start_baseline`)."""
    path = local_dir / "baselines" / f"{baseline_key(config)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(metrics, indent=1))
    tmp.replace(path)
