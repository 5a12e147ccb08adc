"""Sample 3D assets from a backend: ``python -m r2d3.sample "a red cube" --out DIR``.

Writes ``<slug>_<seed>.ply`` (standard 3DGS layout) and ``<slug>_<seed>.png`` (a multi-view preview)
per prompt and seed, optionally with LoRA weights from an alignment checkpoint. The sampler is the
backend's own (DiffSplat: 20-step SDE-DPM-Solver++, CFG 5) unless a flag, ``sampler.key=value`` or
``--config runs/x/config.yaml`` (the run's own sampler) says otherwise; every option is listed below.
Samples come from :class:`r2d3.pipeline.Pipeline` with the evaluation job's noise, so ``(prompt, seed)``
here is the same asset that ``pipelines/evaluate.py`` scored and ``pipelines/regenerate.py`` wrote for
that checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from r2d3.backends.base import Backend
from r2d3.cli import parse_cli
from r2d3.config import RenderConfig, SamplerConfig
from r2d3.devices import resolve_device
from r2d3.export import render_turntable, save_preview_grid, write_ply
from r2d3.jobs.configs import SAMPLE_FLAGS, InferenceSamplerConfig, SampleConfig
from r2d3.jobs.evaluate import ModelBank, resolve_checkpoint
from r2d3.pipeline import Generation, Pipeline
from r2d3.pretrained import WeightsError
from r2d3.storage import slug
from r2d3.train.checkpoint import CorruptCheckpointError


def generate(backend: Backend, prompts: Sequence[str], seeds: Sequence[int], sampler: SamplerConfig | None = None,
             base: bool = False) -> Generation:
    """Every prompt with every seed (rows prompt-major), sampled and decoded; not rendered or scored.
    ``sampler`` defaults to the backend's own settings; ``base`` disables the LoRA adapters."""
    pipe = Pipeline.build(backend, sampler or InferenceSamplerConfig().resolve(backend.name), RenderConfig())
    rows = [(p, s) for p in prompts for s in seeds]
    names = [p for p, _ in rows]
    return pipe.generate(names, pipe.seeded_noise(names, [s for _, s in rows]), score=False, render=False,
                         base=base, keep_trajectory=False)


def main(argv: list[str] | None = None) -> list[Path]:
    lines = __doc__.split("\n")
    config, _ = parse_cli(SampleConfig, lines[0], argv, flags=SAMPLE_FLAGS, positional="sample.prompts",
                          epilog="\n".join(lines[1:]))
    o = config.sample
    missing = [f"{key} ({flag})" for flag, key in (("PROMPT", "sample.prompts"), ("--out", "sample.out"))
               if not getattr(o, key.split(".")[1])]
    if missing:
        sys.exit(f"sample: {' and '.join(missing)} must be given")
    try:
        sampler = config.sampler.resolve(config.model.backend)
        spec = resolve_checkpoint(o.lora or "base")
        backend, base = ModelBank(config.model.backend, config.model.weights, resolve_device(o.device),
                                  [spec]).backend_for(spec)
    except (WeightsError, CorruptCheckpointError, FileNotFoundError, ValueError) as err:
        sys.exit(f"sample: {err}")
    made = generate(backend, o.prompts, o.seeds, sampler, base=base)
    written = []
    for i, (prompt, seed) in enumerate((p, s) for p in o.prompts for s in o.seeds):
        stem = Path(o.out) / f"{slug(prompt, 'prompt')}_{seed}"
        asset = made.gaussians[i].detach().to("cpu")
        write_ply(asset, stem.with_suffix(".ply"), frame=o.frame, sh_degree=o.sh_degree, rgb_columns=o.ply_rgb)
        views = render_turntable(asset, num_frames=4, size=o.resolution)  # framed to fit the asset
        save_preview_grid(views, stem.with_suffix(".png"), row_labels=[prompt])
        written += [stem.with_suffix(".ply"), stem.with_suffix(".png")]
        print(f"{prompt!r} seed {seed}: {stem}.ply, {stem}.png")
    return written


if __name__ == "__main__":
    main()
