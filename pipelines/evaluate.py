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

The base model is always evaluated (added when not listed): drift and FID are measured against it, and
every checkpoint sees the same prompts, initial noise and cameras. A run directory stands for its newest
checkpoint. Writes samples.parquet (one row per checkpoint x prompt x seed), summary.json (what sweeps
and benchmarks read) and report.md / report.html with plots and image grids into --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    from r2d3.config import RenderConfig, SamplerConfig

    lines = __doc__.split("\n")
    s, r = SamplerConfig(), RenderConfig()
    p = argparse.ArgumentParser(description=lines[0], epilog="\n".join(lines[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", default=["base"],
                   help="'base', checkpoint directories (with lora.safetensors) or run directories (their newest "
                        "checkpoint), each optionally as LABEL=PATH to name it in the report; default: base only")
    p.add_argument("--prompts", default="procedural:heldout",
                   help="held-out prompts: procedural:<split>, a .txt file, or Parquet shards (file, dir, glob, "
                        "s3://); default: procedural:heldout")
    p.add_argument("--prompt-column", default="prompt", help="column holding prompts in Parquet shards")
    p.add_argument("--num-prompts", type=int, default=16,
                   help="prompts spread evenly over the source (default: 16; the paper uses 60)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="seeds per prompt, the same for every checkpoint (default: 0 1 2 3; the paper uses 32)")
    p.add_argument("--reward", default=None,
                   help="reward spec: a registered name or a JSON/YAML mapping, e.g. clip_tiny or "
                        "'{name: dnc, kwargs: {detach_depth: false}}' (default: the embedded default's reward)")
    p.add_argument("--extractor", default="clip_tiny",
                   help="features for FID/diversity and the image–text model for similarity: clip_tiny "
                        "(shipped, offline), clip_tiny:<dir>, clip:<dir> (transformers CLIP saved locally), "
                        "vision:<dir> (a transformers image backbone, safetensors); nothing is downloaded")
    p.add_argument("--out", default=None, help="output directory (default: runs/eval-<timestamp>)")
    p.add_argument("--actors", type=int, default=2, help="Ray Data evaluation actors (0: in this process, no Ray)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per actor call (default: 1)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per actor (default: 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default: 0, CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (inside each actor)")
    p.add_argument("--backend", default="tiny", help="registered backend (default: tiny)")
    p.add_argument("--weights", default=None, help="backend weights directory (default: the backend's own)")
    p.add_argument("--sampler", default=s.kind, help=f"ddim | sde-dpmsolver++ (default: {s.kind})")
    p.add_argument("--steps", type=int, default=s.num_steps, help=f"sampling steps (default: {s.num_steps})")
    p.add_argument("--eta", type=float, default=s.eta, help=f"DDIM eta (default: {s.eta})")
    p.add_argument("--guidance-scale", type=float, default=s.guidance_scale,
                   help=f"classifier-free guidance (default: {s.guidance_scale})")
    p.add_argument("--views", type=int, default=r.num_views, help=f"views per asset (default: {r.num_views})")
    p.add_argument("--resolution", type=int, default=r.resolution, help=f"render size (default: {r.resolution})")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws for mean intervals (default: 1000)")
    p.add_argument("--fid-bootstrap", type=int, default=200, help="bootstrap draws for FID intervals (default: 200)")
    p.add_argument("--no-report", action="store_true", help="write samples.parquet and summary.json only")
    return p


def parse_reward(text: str | None) -> Any:
    """A reward spec from the command line (a name, or JSON/YAML); None: the embedded default's."""
    if text is None:
        from r2d3.config import AlignConfig

        return AlignConfig().reward
    import yaml

    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from r2d3.pretrained import WeightsError
    from r2d3.config import RenderConfig, SamplerConfig
    from r2d3.data.prompts import PromptSourceError, load_prompts
    from r2d3.data.prompts import select_prompts
    from r2d3.jobs.evaluate import EvalSettings, resolve_checkpoints
    from r2d3.eval.report import headline_rows
    from r2d3.storage import Store
    from r2d3.rewards import reward_terms

    if args.num_prompts < 1:
        sys.exit(f"evaluate: --num-prompts must be >= 1, got {args.num_prompts}")
    if len(set(args.seeds)) != len(args.seeds):
        sys.exit(f"evaluate: --seeds must not repeat, got {args.seeds}")
    try:
        checkpoints = resolve_checkpoints(args.checkpoints)
        reward = parse_reward(args.reward)
        reward_terms(reward)  # fail on a bad spec before starting any actor
        prompts = select_prompts(load_prompts(args.prompts, args.prompt_column).prompts, args.num_prompts)
    except (FileNotFoundError, ValueError, PromptSourceError) as err:
        sys.exit(f"evaluate: {err}")
    out = Path(args.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    try:  # the config sections check the values (a bad one is named as its config key)
        sampler = replace(SamplerConfig(), kind=args.sampler, num_steps=args.steps, eta=args.eta,
                          guidance_scale=args.guidance_scale)
        render = replace(RenderConfig(), num_views=args.views, resolution=args.resolution)
        if args.actors < 0 or args.batch_size < 1 or args.bootstrap < 1 or args.fid_bootstrap < 1:
            raise ValueError("--actors must be >= 0 and --batch-size, --bootstrap, --fid-bootstrap >= 1")
        Store(str(out)).check_writable()  # before any sample is computed
    except (ValueError, OSError) as err:
        sys.exit(f"evaluate: {err}")
    for c in checkpoints:  # one sampler for all keeps the comparison fair; say when a run trained with another
        trained = c.config.get("sampler", {})
        diff = {k: (trained[k], getattr(sampler, k)) for k in ("kind", "num_steps", "eta", "guidance_scale")
                if k in trained and trained[k] != getattr(sampler, k)}
        if diff:
            logging.warning("%s was trained with sampler settings %s (trained, evaluated)", c.name, diff)
        model = c.config.get("model", {})
        if model and (model.get("backend") != args.backend or model.get("weights") != args.weights):
            logging.warning("%s was trained on backend %s (weights %s), evaluated on %s (weights %s)", c.name,
                            model.get("backend"), model.get("weights"), args.backend, args.weights)
    settings = EvalSettings(checkpoints=checkpoints, seeds=list(args.seeds), backend=args.backend,
                            weights=args.weights, reward=reward, extractor=args.extractor, sampler=sampler,
                            render=render, device=args.device)
    try:
        from r2d3.eval.extractors import load_extractor

        load_extractor(args.extractor)  # a missing-weights error here, not inside an actor
        from r2d3.ray.evaluate import run_evaluation

        summary = run_evaluation(settings, prompts, out, prompts_source=args.prompts, actors=args.actors,
                                 batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor,
                                 gpus_per_actor=args.gpus_per_actor, draws=args.bootstrap,
                                 fid_draws=args.fid_bootstrap, report=not args.no_report)
    except (WeightsError, ValueError) as err:
        sys.exit(f"evaluate: {err}")
    t = summary["timing"]
    print(f"\nr2d3 evaluate: {len(prompts)} prompts x {len(args.seeds)} seeds x {len(checkpoints)} checkpoints = "
          f"{t['samples']} samples, {t['seconds_total']:.0f} s ({t['seconds_sampling']:.0f} s sampling)")
    print("\n".join(headline_rows(summary)))
    for name, r in summary["checkpoints"].items():
        bad = {k[: -len("_nonfinite")]: v for k, v in r.items() if k.endswith("_nonfinite")}
        if bad:
            print(f"  warning: {name} had non-finite scores ({bad}); its means use the prompts whose samples all "
                  "scored")
    print(f"outputs: {out} (summary.json, samples.parquet" + ("" if args.no_report else ", report.md, report.html")
          + ")")
    print(json.dumps({n: {k: r.get(k) for k in ("reward_mean", "fid_vs_base", "similarity_mean")}
                      for n, r in summary["checkpoints"].items()}))
    return summary


if __name__ == "__main__":
    main()
