"""Sample 3D assets from a backend: ``python -m r2d3.sample "a red cube" --out DIR``.

Writes ``<slug>_<seed>.ply`` (standard 3DGS layout) and ``<slug>_<seed>.png`` (a multi-view preview)
per prompt and seed, optionally with LoRA weights from an alignment checkpoint. Samples come from
:class:`r2d3.pipeline.Pipeline` with the evaluation job's noise, so ``(prompt, seed)`` here is the same
asset that ``pipelines/evaluate.py`` scored and ``pipelines/regenerate.py`` wrote for that checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from r2d3.backends.base import Backend, sampler_defaults
from r2d3.config import RenderConfig, SamplerConfig
from r2d3.export import render_turntable, save_preview_grid, write_ply
from r2d3.export.frame import FRAMES
from r2d3.jobs.evaluate import ModelBank, resolve_checkpoint
from r2d3.pipeline import Generation, Pipeline
from r2d3.pretrained import WeightsError
from r2d3.storage import slug
from r2d3.train.checkpoint import CorruptCheckpointError


def backend_sampler(backend: Backend, **chosen: object) -> SamplerConfig:
    """The sampler settings of ``backend`` (its own defaults over r2d3's), with ``chosen`` non-None values
    on top."""
    return SamplerConfig(**{**dataclasses.asdict(SamplerConfig()), **sampler_defaults(backend),
                            **{k: v for k, v in chosen.items() if v is not None}})


def generate(backend: Backend, prompts: Sequence[str], seeds: Sequence[int], sampler: SamplerConfig | None = None,
             base: bool = False) -> Generation:
    """Every prompt with every seed (rows prompt-major), sampled and decoded; not rendered or scored.
    ``sampler`` defaults to the backend's own settings; ``base`` disables the LoRA adapters."""
    pipe = Pipeline.build(backend, sampler or backend_sampler(backend), RenderConfig())
    rows = [(p, s) for p in prompts for s in seeds]
    names = [p for p, _ in rows]
    return pipe.generate(names, pipe.seeded_noise(names, [s for _, s in rows]), score=False, render=False,
                         base=base, keep_trajectory=False)


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="+", help="text prompts")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--backend", default="tiny")
    p.add_argument("--weights", default=None, help="backend weights directory (default: shipped)")
    p.add_argument("--lora", default=None, help="alignment run directory (its newest checkpoint), checkpoint "
                                                "directory or lora.safetensors")
    p.add_argument("--sampler", default=None, help="ddim | sde-dpmsolver++ (default: the backend's own)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the backend's own)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the backend's own)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the backend's own)")
    p.add_argument("--resolution", type=int, default=128, help="preview size per view")
    p.add_argument("--frame", choices=FRAMES, default="y-up", help="frame of the .ply (see r2d3.export.frame)")
    p.add_argument("--sh-degree", type=int, choices=(0, 3), default=0, help="3: zero-filled f_rest_* in the .ply")
    args = p.parse_args(argv)
    try:
        spec = resolve_checkpoint(args.lora or "base")
        backend, base = ModelBank(args.backend, args.weights, "cpu", [spec]).backend_for(spec)
        sampler = backend_sampler(backend, kind=args.sampler, num_steps=args.steps, eta=args.eta,
                                  guidance_scale=args.guidance_scale)
        RenderConfig(resolution=args.resolution)  # named on a bad value, before anything is sampled
    except (WeightsError, CorruptCheckpointError, FileNotFoundError, ValueError) as err:
        sys.exit(f"sample: {err}")
    made = generate(backend, args.prompts, args.seeds, sampler, base=base)
    written = []
    for i, (prompt, seed) in enumerate((p, s) for p in args.prompts for s in args.seeds):
        stem = args.out / f"{slug(prompt, 'prompt')}_{seed}"
        asset = made.gaussians[i]
        write_ply(asset, stem.with_suffix(".ply"), frame=args.frame, sh_degree=args.sh_degree)
        views = render_turntable(asset, num_frames=4, size=args.resolution)  # framed to fit the asset
        save_preview_grid(views, stem.with_suffix(".png"), row_labels=[prompt])
        written += [stem.with_suffix(".ply"), stem.with_suffix(".png")]
        print(f"{prompt!r} seed {seed}: {stem}.ply, {stem}.png")
    return written


if __name__ == "__main__":
    main()
