"""Train the learned judges that ship inside the package, from procedural renders:

- ``clip_tiny`` — the small learned image–text reward (``r2d3/weights/clip_tiny``);
- ``shape_classifier`` — the silhouette shape classifier of the prompt-following check
  (``r2d3/weights/shape_classifier``).

    python pipelines/train_reward.py                           # both, reproduces the shipped weights
    python pipelines/train_reward.py --what clip_tiny          # only the reward
    python pipelines/train_reward.py --what shape_classifier   # only the classifier
    python pipelines/train_reward.py --train-objects 200 --epochs 1 --out runs/judges-smoke   # smoke run

The TRAIN split is rendered once (``--train-objects`` objects x ``--views`` random orbit views at
64x64, seed ``--seed``) and kept in memory; both models train on that cache. A disjoint set of
HELD-OUT-split objects (seed ``--seed + 1``) measures clip_tiny's pairwise accuracy, the shape
classifier's accuracy and the analytic dominant-colour check. Each weights directory gets a
``training_report.json`` with the numbers, the settings and the wall times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from r2d3.data import procedural
from r2d3.eval.prompt_following import colour_accuracy
from r2d3.data.procedural.views import RenderedViews, render_procedural_views
from r2d3.eval.shape_classifier import ShapeClassifierTrainConfig, train_shape_classifier
from r2d3.eval.shape_classifier import default_weights_dir as shape_weights_dir
from r2d3.rewards.clip_tiny import default_weights_dir as clip_weights_dir
from r2d3.rewards.clip_tiny_training import ClipTinyTrainConfig, train_clip_tiny
from r2d3.storage import atomic_dir

WHAT = ("all", "clip_tiny", "shape_classifier")


def _log(message: str) -> None:
    print(message, flush=True)


def _source_digest(package: Path) -> str:
    """sha256 over every module of a package (names and bytes), so a change to any of them shows."""
    digest = hashlib.sha256()
    for file in sorted(package.rglob("*.py")):
        digest.update(file.relative_to(package).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _write_weights(model, report: dict, out: Path) -> None:
    """Write ``model`` + ``training_report.json`` to a sibling temporary directory and swap it in, so an
    interrupted run never leaves a half-written weights directory behind."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
        for file in tmp.iterdir():
            file.chmod(0o644)  # package data: readable by everyone, whatever the writer's umask
    _log(f"wrote {out}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=WHAT, default="all")
    p.add_argument("--out", type=Path, default=None,
                   help="write <out>/clip_tiny and <out>/shape_classifier instead of the package weights")
    p.add_argument("--train-objects", type=int, default=3000)
    p.add_argument("--heldout-objects", type=int, default=300)
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="override both models' epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="keep the rendered views here (torch files keyed by split/objects/views/seed) and "
                        "reuse them on reruns; by default they are only kept in memory")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    argv_used = ["python", "pipelines/train_reward.py", *(sys.argv[1:] if argv is None else argv)]

    def progress(name: str):
        last = [0.0]

        def report(done: int, total: int, seconds: float) -> None:
            if seconds - last[0] > 30 or done == total:
                last[0] = seconds
                _log(f"rendered {name} {done}/{total} objects ({seconds:.0f}s)")

        return report

    def views(split: str, num_objects: int, seed: int) -> RenderedViews:
        cache = None
        if args.cache_dir is not None:
            cache = args.cache_dir / f"views-{split}-{num_objects}x{args.views}-seed{seed}.safetensors"
            if cache.is_file():
                _log(f"reusing rendered views {cache}")
                return RenderedViews.load(cache)
        rendered = render_procedural_views(split, num_objects, args.views, seed=seed,
                                           progress=progress(split))
        if cache is not None:
            rendered.save(cache)
        return rendered

    train = views("train", args.train_objects, args.seed)
    heldout = views("heldout", args.heldout_objects, args.seed + 1)
    render_seconds = train.seconds + heldout.seconds
    colour = colour_accuracy(heldout)
    _log(f"dominant-colour check on held-out ground truth: accept-either {colour['accuracy']:.3f}, "
         f"strict {colour['strict_accuracy']:.3f}")
    common = {
        "command": " ".join(argv_used),
        # which version of the procedural data the weights were trained on
        "procedural_source_sha256": _source_digest(Path(procedural.__file__).parent),
        "render_seconds": render_seconds,
        "torch_threads": torch.get_num_threads(),
        "heldout_objects": len(heldout),
        "heldout_seed": args.seed + 1,
        "train_seed": args.seed,
    }
    reports: dict[str, dict] = {}
    if args.what in ("all", "clip_tiny"):
        config = ClipTinyTrainConfig(seed=args.seed)
        if args.epochs is not None:
            config = replace(config, epochs=args.epochs, eval_every=max(1, args.epochs))
        model, report = train_clip_tiny(train, heldout, config, log=_log)
        out = (args.out / "clip_tiny") if args.out else clip_weights_dir()
        report.update(common, wall_seconds=time.perf_counter() - start)
        _write_weights(model, report, out)
        reports["clip_tiny"] = report
    if args.what in ("all", "shape_classifier"):
        config = ShapeClassifierTrainConfig(seed=args.seed)
        if args.epochs is not None:
            config = replace(config, epochs=args.epochs)
        model, report = train_shape_classifier(train, heldout, config, log=_log)
        out = (args.out / "shape_classifier") if args.out else shape_weights_dir()
        report.update(common, wall_seconds=time.perf_counter() - start, colour_check_heldout=colour)
        _write_weights(model, report, out)
        reports["shape_classifier"] = report

    summary = {"wall_seconds": time.perf_counter() - start, "render_seconds": render_seconds,
               "colour_check_heldout": colour}
    if "clip_tiny" in reports:
        summary["clip_tiny_heldout"] = reports["clip_tiny"]["heldout"]
        summary["clip_tiny_train_seconds"] = reports["clip_tiny"]["train_seconds"]
    if "shape_classifier" in reports:
        summary["shape_classifier_heldout"] = reports["shape_classifier"]["heldout"]
        summary["shape_classifier_train_seconds"] = reports["shape_classifier"]["train_seconds"]
    _log(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
