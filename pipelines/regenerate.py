"""Nightly asset regeneration: prompts x seeds -> .ply, .glb, preview PNG, turntable GIF, scores, a
Parquet manifest and a static HTML gallery, as a streaming Ray Data job.

    python pipelines/regenerate.py --prompts prompts/ --checkpoint runs/x --seeds 0 1 2 --out out/nightly
    python pipelines/regenerate.py --prompts s3://b/prompts/ --checkpoint s3://b/runs/x/checkpoint_000024 \\
        --out s3://b/nightly/<date> --actors 8 --gpus-per-actor 1
    python pipelines/regenerate.py --compare runs/x --prompts procedural:heldout --out out/cmp   # base vs aligned
    python pipelines/regenerate.py ... --actors 0                          # no Ray (debugging)

Every flag is a view of one option of r2d3.jobs.configs.RegenerateConfig (listed below), which also
takes YAML files (--config: an alignment config or a run's config.yaml sets model, sampler, render and
reward; its other sections are read past) and section.key=value overrides; a bad value is named by its
key before any asset is made. --reward is the score named 'reward'; --score adds more columns.

Rerunning with the same --out skips finished (prompt, seed, checkpoint) assets and rewrites the
manifest without duplicates; a killed run resumes where it stopped. Prompts are streamed from the
shards in parts (--part-size rows), never held whole by the driver; finished parts are found from their
records, not by listing the library (--verify does list it, to remake deleted assets). Bad prompt rows
and failed assets go to errors.parquet with the run and the reason; the job carries on. --dry-run does
everything but the model. See r2d3/jobs/regenerate.py for the layout.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from r2d3.cli import parse_cli
    from r2d3.jobs.configs import REGENERATE_FLAGS, RegenerateConfig
    from r2d3.jobs.evaluate import BASE
    from r2d3.jobs.regenerate import RegenSettings, checkpoint_id, generation_key, resolve
    from r2d3.pretrained import WeightsError
    from r2d3.ray.regenerate import run_regeneration
    from r2d3.rewards import reward_terms
    from r2d3.storage import OutputError

    lines = __doc__.split("\n")
    config, _ = parse_cli(RegenerateConfig, lines[0], argv, flags=REGENERATE_FLAGS, epilog="\n".join(lines[1:]))
    g, a, m = config.regenerate, config.actors, config.model
    missing = [f"{key} ({flag})" for flag, key in (("--prompts", "regenerate.prompts"), ("--out", "regenerate.out"))
               if getattr(g, key.split(".")[1]) is None]
    if missing:
        sys.exit(f"regenerate: {' and '.join(missing)} must be given")
    try:
        sampler = config.sampler.resolve(m.backend)  # the backend's own for options not given
        given = list(dict.fromkeys(([BASE, g.compare] if g.compare else []) + g.checkpoints))
        specs = [resolve(c) for c in given]
        names = [c.name for c in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"checkpoints listed twice: {names}")
        rewards = [config.reward, *g.scores]
        for r in rewards:
            reward_terms(r)  # fail on a bad spec before starting any actor
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"regenerate: {err}")
    generation = generation_key({"backend": m.backend, "weights": m.weights, "sampler": asdict(sampler),
                                 "render": asdict(config.render), "mesh": g.mesh,
                                 "mesh_resolution": g.mesh_resolution, "turntable": [g.turntable_frames,
                                                                                     g.turntable_size],
                                 "preview_size": g.preview_size,
                                 # (dry_run and ply_rgb only when set: libraries made before them keep their ids)
                                 **({"dry_run": True} if g.dry_run else {}),
                                 "export": [g.frame, g.sh_degree, g.min_opacity, g.unlit] + ["ply_rgb"] * g.ply_rgb})
    settings = RegenSettings(out=g.out, checkpoints=specs,
                             ids={c.name: checkpoint_id(c, generation) for c in specs},
                             sources=dict(zip(names, [c.partition("=")[2] if "=" in c and not c.startswith("s3://")
                                                      else c for c in given])),
                             backend=m.backend, weights=m.weights, rewards=rewards, sampler=sampler,
                             render=config.render, device=a.device, turntable_frames=g.turntable_frames,
                             turntable_size=g.turntable_size, preview_size=g.preview_size, mesh=g.mesh,
                             mesh_resolution=g.mesh_resolution, frame=g.frame, sh_degree=g.sh_degree,
                             min_opacity=g.min_opacity, ply_rgb=g.ply_rgb, unlit=g.unlit, seeds=g.seeds,
                             column=g.prompt_column, dry_run=g.dry_run)
    try:
        summary = run_regeneration(settings, g.prompts, part_size=g.part_size, max_prompts=g.max_prompts,
                                   actors=a.num, batch_size=a.batch_size, cpus_per_actor=a.cpus,
                                   gpus_per_actor=a.gpus, progress=g.progress, gallery=g.gallery,
                                   gallery_assets=g.gallery_assets, verify=g.verify, max_items=g.max_assets)
    except (WeightsError, ValueError, OutputError) as err:
        sys.exit(f"regenerate: {err}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
