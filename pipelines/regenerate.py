"""Nightly asset regeneration: prompts x seeds -> .ply, .glb, preview PNG, turntable GIF, scores, a
Parquet manifest and a static HTML gallery, as a streaming Ray Data job.

    python pipelines/regenerate.py --prompts prompts/ --checkpoint runs/x --seeds 0 1 2 --out out/nightly
    python pipelines/regenerate.py --prompts s3://b/prompts/ --checkpoint s3://b/runs/x/checkpoint_000024 \\
        --out s3://b/nightly/<date> --actors 8 --gpus-per-actor 1
    python pipelines/regenerate.py --compare runs/x --prompts procedural:heldout --out out/cmp   # base vs aligned
    python pipelines/regenerate.py ... --actors 0                          # no Ray (debugging)

Rerunning with the same --out skips finished (prompt, seed, checkpoint) assets and rewrites the
manifest without duplicates; a killed run resumes where it stopped. Bad prompt rows and failed assets
go to errors.parquet with the reason; the job carries on. See r2d3/jobs/regenerate.py for the layout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, replace
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    from r2d3.config import RenderConfig, SamplerConfig
    from r2d3.export.frame import FRAMES

    lines = __doc__.split("\n")
    s, r = SamplerConfig(), RenderConfig()
    p = argparse.ArgumentParser(description=lines[0], epilog="\n".join(lines[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True,
                   help="prompt source: Parquet shards (file, dir, glob, s3://), a .txt file or procedural:<split>")
    p.add_argument("--prompt-column", default="prompt", help="column holding prompts in Parquet shards")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="'base', a LoRA checkpoint directory / run directory / lora.safetensors, local or s3://, "
                        "optionally LABEL=PATH; repeat for several (default: base)")
    p.add_argument("--compare", default=None, metavar="CHECKPOINT",
                   help="comparison mode: render base and CHECKPOINT on the same prompts and seeds, side by side "
                        "in the gallery with reward deltas")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per prompt (default: 0)")
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    p.add_argument("--reward", action="append", default=None,
                   help="reward spec (name or JSON/YAML); repeat for more scores, the first is 'reward' "
                        "(default: the embedded default's reward)")
    p.add_argument("--actors", type=int, default=2, help="Ray Data actors (0: in this process, no Ray)")
    p.add_argument("--batch-size", type=int, default=1, help="assets per actor call (default: 1)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default: 0; >0 on GPU nodes)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (inside each actor)")
    p.add_argument("--backend", default="tiny")
    p.add_argument("--weights", default=None, help="backend weights directory (default: the backend's own)")
    p.add_argument("--sampler", default=s.kind)
    p.add_argument("--steps", type=int, default=s.num_steps)
    p.add_argument("--eta", type=float, default=s.eta)
    p.add_argument("--guidance-scale", type=float, default=s.guidance_scale)
    p.add_argument("--views", type=int, default=r.num_views,
                   help=f"views scored by the rewards and shown in the preview (default: {r.num_views})")
    p.add_argument("--resolution", type=int, default=r.resolution,
                   help=f"render size the rewards score, from the training cameras (default: {r.resolution})")
    p.add_argument("--preview-size", type=int, default=128,
                   help="pixels per view of preview.png, cameras framed to fit the asset (default: 128)")
    p.add_argument("--turntable-frames", type=int, default=12)
    p.add_argument("--turntable-size", type=int, default=128, help="turntable frame size (default: 128)")
    p.add_argument("--mesh-resolution", type=int, default=64)
    p.add_argument("--no-mesh", action="store_true", help="skip the .glb meshes")
    p.add_argument("--frame", choices=FRAMES, default="y-up",
                   help="frame of the .ply/.glb files: y-up (r2d3's and glTF's; three.js, Blender, PlayCanvas, "
                        "GaussianSplats3D) or y-down (INRIA/COLMAP-style viewers: SuperSplat Viewer, gsplat.js)")
    p.add_argument("--sh-degree", type=int, choices=(0, 3), default=0,
                   help="3: write zero f_rest_* coefficients for loaders that require SH degree 3 (INRIA's)")
    p.add_argument("--min-opacity", type=float, default=0.0,
                   help="leave splats below this opacity out of the .ply (default 0: keep all)")
    p.add_argument("--unlit", action="store_true", help=".glb material KHR_materials_unlit (default: PBR, "
                                                        "non-metallic)")
    p.add_argument("--no-gallery", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--max-assets", type=int, default=None, help="make at most N new assets, then commit (partial run)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    import yaml

    from r2d3.pretrained import WeightsError
    from r2d3.config import AlignConfig, RenderConfig, SamplerConfig
    from r2d3.data.prompts import PromptSourceError, load_prompts
    from r2d3.jobs.evaluate import BASE
    from r2d3.ray.regenerate import run_regeneration
    from r2d3.jobs.regenerate import RegenSettings, checkpoint_id, generation_key, resolve
    from r2d3.storage import OutputError
    from r2d3.rewards import reward_terms

    if len(set(args.seeds)) != len(args.seeds):
        sys.exit(f"regenerate: --seeds must not repeat, got {args.seeds}")
    positive = {"--max-prompts": args.max_prompts, "--max-assets": args.max_assets,
                "--turntable-frames": args.turntable_frames, "--batch-size": args.batch_size}
    sized = {"--turntable-size": args.turntable_size, "--mesh-resolution": args.mesh_resolution,
             "--preview-size": args.preview_size}
    try:  # the config sections check the values (a bad one is named as its config key)
        sampler = replace(SamplerConfig(), kind=args.sampler, num_steps=args.steps, eta=args.eta,
                          guidance_scale=args.guidance_scale)
        render = replace(RenderConfig(), num_views=args.views, resolution=args.resolution)
        for flag, value in positive.items():
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        for flag, value in sized.items():
            if value < 8:
                raise ValueError(f"{flag} must be >= 8, got {value}")
        if not 0.0 <= args.min_opacity < 1.0:
            raise ValueError(f"--min-opacity must be in [0, 1), got {args.min_opacity}")
        if args.actors < 0 or args.cpus_per_actor < 0 or args.gpus_per_actor < 0:
            raise ValueError("--actors, --cpus-per-actor and --gpus-per-actor must be >= 0")
    except ValueError as err:
        sys.exit(f"regenerate: {err}")
    try:
        given = ([BASE, args.compare] if args.compare else []) + args.checkpoint
        given = list(dict.fromkeys(given or [BASE]))
        specs = [resolve(a) for a in given]
        names = [c.name for c in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"checkpoints listed twice: {names}")
        rewards = [yaml.safe_load(r) for r in args.reward] if args.reward else [AlignConfig().reward]
        for r in rewards:
            reward_terms(r)  # fail on a bad spec before starting any actor
        loaded = load_prompts(args.prompts, args.prompt_column)
    except (FileNotFoundError, ValueError, PromptSourceError) as err:
        sys.exit(f"regenerate: {err}")
    prompts = loaded.prompts[: args.max_prompts] if args.max_prompts else loaded.prompts
    bad = [{"source": loaded.source, "row": row, "checkpoint": None, "prompt": None, "seed": None, "reason": reason}
           for row, reason in loaded.skipped]
    bad += [{"stage": "shard", "source": shard, "row": None, "checkpoint": None, "prompt": None, "seed": None,
             "reason": f"shard skipped: {reason}"} for shard, reason in loaded.skipped_shards]
    generation = generation_key({"backend": args.backend, "weights": args.weights, "sampler": asdict(sampler),
                                 "render": asdict(render), "mesh": not args.no_mesh,
                                 "mesh_resolution": args.mesh_resolution, "turntable": [args.turntable_frames,
                                                                                        args.turntable_size],
                                 "preview_size": args.preview_size,
                                 "export": [args.frame, args.sh_degree, args.min_opacity, args.unlit]})
    settings = RegenSettings(out=args.out, checkpoints=specs,
                             ids={c.name: checkpoint_id(c, generation) for c in specs},
                             sources=dict(zip(names, [a.partition("=")[2] if "=" in a and not a.startswith("s3://")
                                                      else a for a in given])),
                             backend=args.backend, weights=args.weights, rewards=rewards, sampler=sampler,
                             render=render, device=args.device, turntable_frames=args.turntable_frames,
                             turntable_size=args.turntable_size, preview_size=args.preview_size,
                             mesh=not args.no_mesh,
                             mesh_resolution=args.mesh_resolution, frame=args.frame, sh_degree=args.sh_degree,
                             min_opacity=args.min_opacity, unlit=args.unlit)
    try:
        summary = run_regeneration(settings, prompts, args.seeds, bad_prompts=bad, actors=args.actors,
                                   batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor,
                                   gpus_per_actor=args.gpus_per_actor, progress=not args.no_progress,
                                   gallery=not args.no_gallery, max_items=args.max_assets)
    except (WeightsError, ValueError, OutputError) as err:
        sys.exit(f"regenerate: {err}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
