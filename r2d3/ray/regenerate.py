"""Asset regeneration as a streaming Ray Data job.

    from_items(missing (checkpoint, prompt, seed) items) -> map_batches(RegenActor, ActorPoolStrategy)
        -> rows streamed back to the driver (progress) -> errors.parquet, gallery.html, manifest.parquet

Each :class:`RegenActor` builds the backend (with every checkpoint's LoRA) and the rewards once, then
writes each asset's files and ``done.json`` itself (:class:`r2d3.jobs.regenerate.AssetWorker`); only small
rows travel back. ``actors=0`` runs the same code in this process without Ray. Finished assets (the
manifest plus ``done.json`` markers) are skipped, so a rerun or a resumed run only does what is missing,
and the manifest is rewritten from scratch from all finished rows under the output (whatever run made
them) — never appended to, never narrowed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Sequence

from r2d3.config import reward_label
from r2d3.eval.samples import sort_rows
from r2d3.export.gallery import VIEWER_PATH, gallery_html, viewer_module
from r2d3.jobs.regenerate import (
    ERRORS,
    GALLERY,
    MANIFEST,
    AssetWorker,
    RegenSettings,
    error_schema,
    finished_rows,
    manifest_metadata,
    manifest_schema,
    reward_name,
    row_key,
)
from r2d3.ray.actors import actor_device, map_with_actors
from r2d3.storage import Store, rows_to_table

log = logging.getLogger(__name__)


class RegenActor:
    """One :class:`~r2d3.jobs.regenerate.AssetWorker` per actor process."""

    def __init__(self, settings: RegenSettings):
        import dataclasses

        settings = dataclasses.replace(settings, device=actor_device(settings.device))
        self.worker = AssetWorker(settings)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = self.worker(batch)
        return {"row": [json.dumps(r) for r in rows]}  # one string column: rows differ in their keys


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.failed, self.enabled = total, 0, 0, enabled
        self.start = time.time()
        self.last = 0.0

    def update(self, row: dict[str, Any]) -> None:
        self.done += 1
        self.failed += bool(row.get("error"))
        now = time.time()
        if self.enabled and (now - self.last > 2 or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9) * 60
            print(f"\rregenerate: {self.done}/{self.total} assets ({self.failed} failed), {rate:.1f} assets/min",
                  end="\n" if self.done == self.total else "", file=sys.stderr, flush=True)


def run_items(settings: RegenSettings, items: list[dict[str, Any]], actors: int = 2, batch_size: int = 1,
              cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, progress: bool = True):
    """Yield one row per item as it finishes (streaming), on Ray Data or in-process when ``actors == 0``."""
    bar = _Progress(len(items), progress)
    if not items:
        return
    if actors == 0:
        worker = AssetWorker(settings)
        for it in items:
            row = worker.process(it["checkpoint"], it["prompt"], it["seed"])
            bar.update(row)
            yield row
        return

    ds = map_with_actors(items, RegenActor, {"settings": settings}, actors, batch_size, cpus_per_actor,
                         gpus_per_actor)
    for rec in ds.iter_rows():
        row = json.loads(rec["row"])
        bar.update(row)
        yield row


def run_regeneration(settings: RegenSettings, prompts: Sequence[str], seeds: Sequence[int], *,
                     bad_prompts: Sequence[dict[str, Any]] = (), actors: int = 2, batch_size: int = 1,
                     cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, progress: bool = True,
                     gallery: bool = True, max_items: int | None = None) -> dict[str, Any]:
    """Generate every missing (checkpoint, prompt, seed) asset, then write ``errors.parquet``,
    ``gallery.html`` and, last, ``manifest.parquet`` under ``settings.out``; returns a summary.
    ``max_items`` stops after that many new assets (a partial run; the next run resumes)."""
    if actors < 0 or batch_size < 1 or cpus_per_actor < 0 or gpus_per_actor < 0:
        raise ValueError(f"need actors >= 0, batch_size >= 1 and non-negative resources (got actors={actors}, "
                         f"batch_size={batch_size}, cpus_per_actor={cpus_per_actor}, gpus_per_actor={gpus_per_actor})")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"need at least one seed and no repeats, got {list(seeds)}")
    store = Store(settings.out)
    store.check_writable()
    names = [c.name for c in settings.checkpoints]
    prompts = list(dict.fromkeys(prompts))  # a prompt listed twice is one asset
    done, incomplete = finished_rows(store)
    wanted = [{"checkpoint": c, "prompt": p, "seed": int(s)} for c in names for p in prompts for s in seeds]
    todo = [it for it in wanted if (settings.ids[it["checkpoint"]], it["prompt"], it["seed"]) not in done]
    skipped = len(wanted) - len(todo)
    todo = todo[:max_items] if max_items is not None else todo
    log.info("regenerate: %d assets wanted, %d finished already, %d to make", len(wanted), len(wanted) - len(todo),
             len(todo))
    start = time.time()
    errors = [{"stage": "prompt", **b} for b in bad_prompts]
    made = 0
    for row in run_items(settings, todo, actors, batch_size, cpus_per_actor, gpus_per_actor, progress):
        if row.get("error"):
            errors.append({"stage": "asset", "source": None, "row": None, "checkpoint": row["checkpoint"],
                           "prompt": row["prompt"], "seed": row["seed"], "reason": row["error"],
                           "traceback": row.get("traceback")})
        else:
            done[row_key(row)] = row
            made += 1
    seconds = time.time() - start
    # the manifest covers every finished asset under --out, this run's selection first: a narrower
    # rerun adds to the library, never drops what earlier runs made
    rows = sort_rows(list(done.values()), names, prompts, seeds)
    shown = names + sorted({r["checkpoint"] for r in rows} - set(names))
    extra = [reward_name(r) for r in settings.rewards[1:]]
    schema = manifest_schema(extra)
    store.write_table(ERRORS, rows_to_table(errors, error_schema()))
    if gallery:
        keys = ["reward", *[f"reward_{e}" for e in extra]]
        score_help = {k: f"the reward {json.dumps(spec, default=str)} on the views the rewards score"
                      for k, spec in zip(keys, settings.rewards)}
        score_labels = {"reward": f"reward: {reward_label(settings.rewards[0])}"}
        store.write_bytes(VIEWER_PATH, viewer_module())
        store.write_bytes(GALLERY, gallery_html(rows, shown, title=f"r2d3 regeneration: {', '.join(names)}",
                                                score_keys=keys, score_help=score_help, score_labels=score_labels,
                                                frame=settings.frame).encode())
    store.write_table(MANIFEST, rows_to_table(rows, schema, manifest_metadata(settings)))  # committed last
    return {"out": settings.out, "wanted": len(wanted), "made": made, "skipped": skipped,
            "remade_incomplete": incomplete, "manifest_rows": len(rows), "errors": len(errors),
            "seconds": round(seconds, 3),
            "assets_per_min": round(made / max(seconds, 1e-9) * 60, 2) if made else 0.0}


__all__ = ["RegenActor", "run_items", "run_regeneration"]
