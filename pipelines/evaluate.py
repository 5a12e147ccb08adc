"""Evaluate checkpoints on held-out prompts with a Ray Data job (reward, multi-view FID, similarity, ...).

Measures the reward, the multi-view FID against the base model's renders, the prompt–render similarity,
diversity across seeds, drift from the base model and image statistics, with 95 % bootstrap intervals
over prompts.

    python pipelines/evaluate.py --checkpoints base runs/x/checkpoint_000024 --out runs/eval-x
    python pipelines/evaluate.py --checkpoints base aligned=runs/x --num-prompts 60 --seeds $(seq 0 31) --actors 8
    python pipelines/evaluate.py --checkpoints base runs/x --extractor clip:/models/clip-vit-b32 --out ...
    python pipelines/evaluate.py --checkpoints base runs/x --prompts s3://bucket/heldout/ --out ...
    ray job submit -- python pipelines/evaluate.py ...                      # on a cluster
    python pipelines/evaluate.py --checkpoints base runs/x --actors 0 ...   # no Ray (debugging)
    python pipelines/evaluate.py --config runs/x/config.yaml --checkpoints runs/x   # the run's own sampler
    python pipelines/evaluate.py --checkpoints base runs/x sampler.num_steps=10 evaluate.seeds=[0,1]

Every flag is a view of one option of the config below (r2d3.jobs.configs.EvaluateConfig), which also
takes YAML files (--config; an alignment config or a run's config.yaml sets model, sampler, render and
reward, its other sections are read past) and section.key=value overrides; a bad value is named by its
key before anything loads.

The base model is always evaluated (added when not listed): drift and FID are measured against it, and
every checkpoint sees the same prompts, initial noise and cameras. A run directory stands for its newest
checkpoint. Writes samples.parquet (one row per checkpoint x prompt x seed), summary.json (what sweeps
and benchmarks read) and report.md / report.html with plots and image grids into --out.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from r2d3.cli import parse_cli
    from r2d3.data.prompts import PromptSourceError, load_prompts, select_prompts
    from r2d3.eval.report import headline_rows
    from r2d3.jobs.configs import EVALUATE_FLAGS, EvaluateConfig
    from r2d3.jobs.evaluate import EvalSettings, resolve_checkpoints
    from r2d3.pretrained import WeightsError
    from r2d3.rewards import reward_terms
    from r2d3.storage import Store

    lines = __doc__.split("\n")
    config, _ = parse_cli(EvaluateConfig, lines[0], argv, flags=EVALUATE_FLAGS, epilog="\n".join(lines[1:]))
    e, a = config.evaluate, config.actors
    try:
        sampler = config.sampler.resolve(config.model.backend)  # the backend's own for options not given
        checkpoints = resolve_checkpoints(e.checkpoints)
        reward_terms(config.reward)  # fail on a bad spec before starting any actor
        prompts = select_prompts(load_prompts(e.prompts, e.prompt_column).prompts, e.num_prompts)
        out = Path(e.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
        Store(str(out)).check_writable()  # before any sample is computed
    except (FileNotFoundError, ValueError, OSError, PromptSourceError) as err:
        sys.exit(f"evaluate: {err}")
    for c in checkpoints:  # one sampler for all keeps the comparison fair; say when a run trained with another
        trained = c.config.get("sampler", {})
        diff = {k: (trained[k], getattr(sampler, k)) for k in ("kind", "num_steps", "eta", "guidance_scale")
                if k in trained and trained[k] != getattr(sampler, k)}
        if diff:
            logging.warning("%s was trained with sampler settings %s (trained, evaluated)", c.name, diff)
        model = c.config.get("model", {})
        if model and (model.get("backend") != config.model.backend or model.get("weights") != config.model.weights):
            logging.warning("%s was trained on backend %s (weights %s), evaluated on %s (weights %s)", c.name,
                            model.get("backend"), model.get("weights"), config.model.backend, config.model.weights)
    settings = EvalSettings(checkpoints=checkpoints, seeds=list(e.seeds), backend=config.model.backend,
                            weights=config.model.weights, reward=config.reward, extractor=e.extractor,
                            sampler=sampler, render=config.render, device=a.device)
    try:
        from r2d3.eval.extractors import load_extractor

        load_extractor(e.extractor)  # a missing-weights error here, not inside an actor
        from r2d3.ray.evaluate import run_evaluation

        summary = run_evaluation(settings, prompts, out, prompts_source=e.prompts, actors=a.num,
                                 batch_size=a.batch_size, cpus_per_actor=a.cpus, gpus_per_actor=a.gpus,
                                 draws=e.bootstrap, fid_draws=e.fid_bootstrap, report=e.report)
    except (WeightsError, ValueError) as err:
        sys.exit(f"evaluate: {err}")
    t = summary["timing"]
    print(f"\nr2d3 evaluate: {len(prompts)} prompts x {len(e.seeds)} seeds x {len(checkpoints)} checkpoints = "
          f"{t['samples']} samples, {t['seconds_total']:.0f} s ({t['seconds_sampling']:.0f} s sampling)")
    print("\n".join(headline_rows(summary)))
    for name, r in summary["checkpoints"].items():
        bad = {k[: -len("_nonfinite")]: v for k, v in r.items() if k.endswith("_nonfinite")}
        if bad:
            print(f"  warning: {name} had non-finite scores ({bad}); its means use the prompts whose samples all "
                  "scored")
    print(f"outputs: {out} (summary.json, samples.parquet" + (", report.md, report.html" if e.report else "")
          + ")")
    print(json.dumps({n: {k: r.get(k) for k in ("reward_mean", "fid_vs_base", "similarity_mean")}
                      for n, r in summary["checkpoints"].items()}))
    return summary


if __name__ == "__main__":
    main()
