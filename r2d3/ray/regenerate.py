"""Asset regeneration as a streaming Ray Data job.

    plan parts from shard footers -> from_items(unfinished parts) -> map_batches(RegenActor, ActorPoolStrategy)
        -> progress reports streamed back to the driver -> errors.parquet, manifest.parquet, gallery.html

Each :class:`RegenActor` builds the backend (with every checkpoint's LoRA) and the rewards once, then
reads the prompt rows of each part it is given, writes each asset's files and ``done.json`` and the
part's record itself (:meth:`r2d3.jobs.regenerate.AssetWorker.run_part`); only counts and error rows
travel back. The driver holds neither the prompts nor the rows: it plans parts from Parquet footers,
finds finished ones from one listing of ``parts/``, and at the end streams the part records into the
manifest, each asset once, covering every finished asset under the output (whatever run made it):
a narrower rerun never narrows the library. ``actors=0`` runs the same code in this process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from r2d3.config import reward_label
from r2d3.data.chunks import Chunk, plan_chunks
from r2d3.export.gallery import VIEWER_PATH, gallery_html, viewer_module
from r2d3.jobs.regenerate import (
    GALLERY,
    AssetWorker,
    ErrorLog,
    Part,
    PartRecords,
    RegenSettings,
    commit_manifest,
    error_row,
    manifest_metadata,
    manifest_schema,
    part_id,
    part_records,
    reward_name,
    verify_library,
)
from r2d3.ray.actors import actor_device, map_with_actors
from r2d3.storage import Store

log = logging.getLogger(__name__)


def _part_item(part: Part) -> dict[str, Any]:
    return {"part": json.dumps({"chunk": dataclasses.asdict(part.chunk), "id": part.id, "stale": part.stale})}


def _part_of(item: str) -> Part:
    d = json.loads(item)
    return Part(Chunk(**d["chunk"]), d["id"], tuple(d["stale"]))


class RegenActor:
    """One :class:`~r2d3.jobs.regenerate.AssetWorker` per actor process; yields a report per asset made."""

    def __init__(self, settings: RegenSettings):
        settings = dataclasses.replace(settings, device=actor_device(settings.device))
        self.worker = AssetWorker(settings)

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, list]]:
        for item in batch["part"]:
            for report in self.worker.run_part(_part_of(str(item))):
                yield {"report": [json.dumps(report)]}  # one string column: error rows vary in their keys


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.failed, self.enabled = total, 0, 0, enabled
        self.start = time.time()
        self.last = 0.0

    def update(self, report: dict[str, Any]) -> None:
        self.done += report["made"] + report["skipped"] + report["failed"]
        self.failed += report["failed"]
        now = time.time()
        if self.enabled and now - self.last > 2:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9) * 60
            print(f"\rregenerate: {self.done}/~{self.total} assets ({self.failed} failed), {rate:.1f} assets/min",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.done:
            print(f"\rregenerate: {self.done} assets ({self.failed} failed)", file=sys.stderr, flush=True)


def run_parts(settings: RegenSettings, parts: list[Part], actors: int = 2, batch_size: int = 1,
              cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0) -> Iterator[dict[str, Any]]:
    """Yield progress reports as parts are worked on (streaming), on Ray Data or in-process when
    ``actors == 0``."""
    if not parts:
        return
    if actors == 0:
        worker = AssetWorker(settings)
        for part in parts:
            yield from worker.run_part(part)
        return
    ds = map_with_actors([_part_item(p) for p in parts], RegenActor, {"settings": settings}, actors, batch_size,
                         cpus_per_actor, gpus_per_actor)
    for rec in ds.iter_rows():
        yield json.loads(rec["report"])


def plan_parts(settings: RegenSettings, source: str, part_size: int = 256, max_prompts: int | None = None,
               ) -> tuple[list[Part], PartRecords, list[tuple[str, str]]]:
    """This run's parts, the records under the output (one listing), and the shards skipped."""
    chunks, skipped = plan_chunks(source, settings.column, part_size, max_prompts)
    records = part_records(Store(settings.out))
    parts = [Part(c, pid, tuple(records.partial.get(pid, ()))) for c in chunks for pid in [part_id(c, settings)]]
    return parts, records, skipped


def run_regeneration(settings: RegenSettings, source: str, *, part_size: int = 256, max_prompts: int | None = None,
                     actors: int = 2, batch_size: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                     progress: bool = True, gallery: bool = True, gallery_assets: int = 1000, verify: bool = False,
                     max_items: int | None = None) -> dict[str, Any]:
    """Generate every missing (checkpoint, prompt, seed) asset of the prompt ``source``, then write
    ``errors.parquet``, ``gallery.html`` (the first ``gallery_assets`` assets) and, last,
    ``manifest.parquet`` under ``settings.out``; returns a summary with the time the bookkeeping took
    (``plan_s``: finding the work; ``commit_s``: manifest, errors and gallery). ``max_items`` stops once
    that many new assets are made (a partial run; the next run resumes); ``verify`` re-checks every
    finished asset's files first (one full listing)."""
    if actors < 0 or batch_size < 1 or cpus_per_actor < 0 or gpus_per_actor < 0:
        raise ValueError(f"need actors >= 0, batch_size >= 1 and non-negative resources (got actors={actors}, "
                         f"batch_size={batch_size}, cpus_per_actor={cpus_per_actor}, gpus_per_actor={gpus_per_actor})")
    if len(set(settings.seeds)) != len(settings.seeds) or not settings.seeds:
        raise ValueError(f"need at least one seed and no repeats, got {list(settings.seeds)}")
    store = Store(settings.out)
    store.check_writable()
    start = time.time()
    remade = verify_library(store) if verify else 0
    parts, records, skipped_shards = plan_parts(settings, source, part_size, max_prompts)
    todo = [p for p in parts if p.id not in records.complete]
    skipped = sum(records.rows(records.complete[p.id]) for p in parts if p.id in records.complete)
    per_row = len(settings.checkpoints) * len(settings.seeds)
    log.info("regenerate: %d parts (%d assets at most), %d finished already (%d assets), %d to work on",
             len(parts), sum(len(p.chunk) for p in parts) * per_row, len(parts) - len(todo), skipped, len(todo))
    errors = ErrorLog(uuid.uuid4().hex[:12])
    errors.add([error_row("shard", source=shard, reason=f"shard skipped: {reason}") for shard, reason in skipped_shards])
    plan_s = time.time() - start
    bar = _Progress(sum(len(p.chunk) for p in todo) * per_row, progress)
    made = failed = 0
    for report in run_parts(settings, todo, actors, batch_size, cpus_per_actor, gpus_per_actor):
        bar.update(report)
        made, skipped, failed = made + report["made"], skipped + report["skipped"], failed + report["failed"]
        errors.add(report["errors"])
        if max_items is not None and made >= max_items:
            break
    bar.close()
    seconds = time.time() - start - plan_s
    commit = time.time()
    names = [c.name for c in settings.checkpoints]
    extra = [reward_name(r) for r in settings.rewards[1:]]
    errors.commit(store)
    rows, first = commit_manifest(store, [p.id for p in parts], manifest_schema(extra), manifest_metadata(settings),
                                  keep=gallery_assets if gallery else 0,
                                  rewrite=gallery and not store.exists(GALLERY))
    if gallery and first is not None:
        keys = ["reward", *[f"reward_{e}" for e in extra]]
        score_help = {k: f"the reward {json.dumps(spec, default=str)} on the views the rewards score"
                      for k, spec in zip(keys, settings.rewards)}
        score_labels = {"reward": f"reward: {reward_label(settings.rewards[0])}"}
        shown = names + sorted({r["checkpoint"] for r in first} - set(names))
        store.write_bytes(VIEWER_PATH, viewer_module())
        store.write_bytes(GALLERY, gallery_html(first, shown, title=f"r2d3 regeneration: {', '.join(names)}",
                                                score_keys=keys, score_help=score_help, score_labels=score_labels,
                                                frame=settings.frame).encode())
    return {"out": settings.out, "wanted": made + skipped + failed, "made": made, "skipped": skipped,
            "failed": failed, "remade_incomplete": remade, "manifest_rows": rows, "errors": errors.count,
            "parts": len(parts), "parts_worked": len(todo), "seconds": round(seconds, 3),
            "plan_s": round(plan_s, 3), "commit_s": round(time.time() - commit, 3),
            "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "assets_per_min": round(made / max(seconds, 1e-9) * 60, 2) if made else 0.0}


__all__ = ["RegenActor", "plan_parts", "run_parts", "run_regeneration"]
