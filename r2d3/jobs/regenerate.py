"""The nightly asset regeneration job's Ray-free parts: output storage (local or ``s3://``), checkpoint
ids, the per-asset work (sample -> Gaussians -> ``.ply`` / ``.glb`` / preview / turntable -> scores) and
the manifest. :mod:`r2d3.ray.regenerate` runs the per-asset work on Ray Data; ``actors=0`` runs the same
code in this process.

Output layout (``out`` is a local directory or an ``s3://bucket/prefix``)::

    <out>/<checkpoint_id>/<prompt_hash>/<seed>/asset.ply      3DGS layout (r2d3.export.write_ply)
                                               mesh.glb       vertex-coloured mesh (r2d3.export.mesh)
                                               preview.png    the render views side by side
                                               turntable.gif
                                               done.json      the asset's manifest row, written last
    <out>/parts/<part_id>.<rows>[.partial].parquet   the manifest rows of one part of the work
    <out>/errors.parquet    one row per bad prompt / failed asset / skipped shard, of every run, with the run
    <out>/gallery.html      static page of the first assets, relative image paths (r2d3.export.gallery)
    <out>/manifest.parquet  one row per (checkpoint_id, prompt, seed) under <out>, committed last

Work comes in parts: one chunk of prompt rows (:mod:`r2d3.data.chunks`; up to ``part_size`` rows of one
shard) x every checkpoint x every seed. The driver plans parts from shard footers and never holds the
prompt list; whoever makes a part reads its rows, makes its missing assets and writes its record. A
record named ``.partial`` means some asset of the part failed (the next run retries those). A rerun finds
finished work from one listing of ``parts/`` (part ids hash the chunk, its shard's size and modification
time, the checkpoint ids and the seeds), so a library of a million assets is not listed file by file;
``verify`` re-checks every asset's files against one full listing.

Reliability: every file is written atomically (temporary name + rename locally; one PUT per object on
S3, which is all-or-nothing). An asset counts as finished only once its ``done.json`` exists, and that is
written after its files; a part's record only after all its assets. A part in progress when a run was
killed is redone asset by asset, skipping assets with a ``done.json``, so a killed run resumes to the
same manifest as an uninterrupted one, and the manifest, rebuilt from the part records with each asset
once, never duplicates rows. Each asset is computed alone from noise seeded by ``noise_seed(prompt,
seed)`` (the evaluation job's scheme, :mod:`r2d3.jobs.evaluate`), so results do not depend on batching,
on parts or on resumption.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Sequence

import torch

import r2d3
from r2d3.config import DEFAULT_REWARD, RenderConfig, SamplerConfig, reward_label
from r2d3.data.chunks import Chunk, read_chunk
from r2d3.data.prompts import PromptSourceError, clean_cells
from r2d3.devices import resolve_device
from r2d3.eval.image_stats import image_stats
from r2d3.eval.prompt_following import prompt_following
from r2d3.eval.samples import gradeable
from r2d3.export import encode_gif, encode_ply, encode_png, make_grid, render_turntable
from r2d3.export.mesh import encode_glb, gaussians_to_mesh
from r2d3.jobs.evaluate import BASE, CheckpointSpec, ModelBank, resolve_checkpoint
from r2d3.pipeline import Pipeline, noise_seed
from r2d3.rewards import load_reward
from r2d3.storage import OutputError, Store, atomic_write_bytes, is_uri, rows_to_table, slug

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
PARTS = "parts"
ERRORS = "errors.parquet"
GALLERY = "gallery.html"
DONE = "done.json"
#: per-asset score columns besides ``reward`` and the extra rewards (``reward_<label>``)
METRICS = ("saturation", "contrast", "background_coverage", "edge_density")
#: per-asset prompt-following checks (pass/fail; null for prompts outside the grammar)
CHECKS = ("color_ok", "shape_ok")
FILES = ("ply", "glb", "preview", "turntable")
FILE_NAMES = {"ply": "asset.ply", "glb": "mesh.glb", "preview": "preview.png", "turntable": "turntable.gif"}
TIMINGS = ("t_sample_s", "t_export_s", "t_score_s", "t_total_s")


def localize(uri: str, cache: str | os.PathLike | None = None) -> str:
    """A local path for ``uri``: itself when local; an ``s3://`` checkpoint directory or
    ``lora.safetensors`` (with its ``config.yaml``) is downloaded into ``cache`` (default: a folder in the
    temporary directory), replacing an earlier copy atomically."""
    if not is_uri(uri):
        return uri
    store = Store(uri)
    if store.exists(""):  # the URI names a file: its checkpoint directory
        store = Store(store.uri.rsplit("/", 1)[0])
    if not store.exists("lora.safetensors"):
        raise FileNotFoundError(f"checkpoint not found: {uri} (no lora.safetensors there)")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    local = Path(cache or Path(tempfile.gettempdir()) / "r2d3-checkpoints") / digest / store.uri.rsplit("/", 1)[-1]
    for name in ("lora.safetensors", "config.yaml"):
        # always fetched again: an object rewritten under the same URI must not be served stale
        if store.exists(name):
            atomic_write_bytes(local / name, store.read_bytes(name))
    return str(local)


def resolve(arg: str, cache: str | os.PathLike | None = None) -> CheckpointSpec:
    """:func:`r2d3.jobs.evaluate.resolve_checkpoint` that also accepts ``s3://`` checkpoints (``LABEL=s3://...``
    too); the name of an S3 checkpoint is its last two path components, like a local one."""
    label, sep, rest = arg.partition("=")
    if sep and label and "/" not in label and rest.startswith("s3://"):
        return dataclasses.replace(resolve(rest, cache), name=label)
    if arg.startswith("s3://"):
        spec = resolve_checkpoint(localize(arg, cache))
        parts = arg.rstrip("/").split("/")
        parts = parts[:-1] if parts[-1] == "lora.safetensors" else parts
        return dataclasses.replace(spec, name="/".join(parts[-2:]))
    return resolve_checkpoint(arg)


def checkpoint_id(spec: CheckpointSpec, generation: str = "") -> str:
    """A filesystem-safe id that changes when the weights do: ``base`` or ``<name>-<sha256[:10]>``,
    suffixed with ``generation`` (:func:`generation_key`) so assets made with other settings are never
    mistaken for finished ones."""
    suffix = f"-{generation}" if generation else ""
    if spec.is_base:
        return BASE + suffix
    digest = hashlib.sha256((Path(spec.path) / "lora.safetensors").read_bytes()).hexdigest()[:10]
    return f"{slug(spec.name)}-{digest}{suffix}"


def generation_key(settings: dict[str, Any]) -> str:
    """Short hash of what makes an asset (backend, weights, sampler, render, mesh/turntable options)."""
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def asset_dir(ckpt_id: str, prompt: str, seed: int) -> str:
    return f"{ckpt_id}/{prompt_hash(prompt)}/{int(seed)}"


# ---------------------------------------------------------------------------------------------------------
# settings and the per-asset worker


@dataclass
class RegenSettings:
    """Everything a worker needs besides the work items (picklable)."""

    out: str
    checkpoints: list[CheckpointSpec]
    ids: dict[str, str]  # checkpoint name -> checkpoint id
    sources: dict[str, str] = field(default_factory=dict)  # checkpoint name -> the URI it was given as
    backend: str = "tiny"
    weights: str | None = None
    rewards: list[Any] = field(default_factory=lambda: [copy.deepcopy(DEFAULT_REWARD)])  # the first is ``reward``
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    device: str = "cpu"
    turntable_frames: int = 12
    turntable_size: int = 128
    preview_size: int = 128  # pixels per view of preview.png (framed to fit the asset)
    mesh: bool = True
    mesh_resolution: int = 64
    frame: str = "y-up"  # exported files' frame (r2d3.export.frame)
    sh_degree: int = 0  # 3: zero-filled f_rest_* in the .ply
    min_opacity: float = 0.0  # splats below it are left out of the .ply
    ply_rgb: bool = False  # uint8 red/green/blue columns in the .ply
    unlit: bool = False  # .glb material: KHR_materials_unlit instead of non-metallic PBR
    seeds: list[int] = field(default_factory=lambda: [0])
    column: str = "prompt"  # the prompt column of Parquet shards
    dry_run: bool = False  # no model and no files: everything else of the job (benchmarks, checking a source)


def reward_name(spec: Any) -> str:
    """The slug naming an extra reward's manifest column (``reward_<name>``)."""
    return slug(reward_label(spec))


class AssetWorker:
    """Builds the models and rewards once; ``process`` turns one ``(checkpoint, prompt, seed)`` into
    files and a manifest row (or an error row); calling it on a batch of items returns all rows."""

    def __init__(self, settings: RegenSettings):
        self.settings = settings
        self.store = Store(settings.out)
        self.schema = manifest_schema([reward_name(r) for r in settings.rewards[1:]])
        if settings.dry_run:
            return
        self.device = resolve_device(settings.device)
        specs = []
        for spec in settings.checkpoints:  # an S3 checkpoint may not be on this node yet
            if not spec.is_base and not (Path(spec.path) / "lora.safetensors").is_file():
                spec = dataclasses.replace(spec, path=localize(settings.sources[spec.name]))
            specs.append(spec)
        self.specs = {s.name: s for s in specs}
        self.bank = ModelBank(settings.backend, settings.weights, self.device, specs)
        self.rewards = [load_reward(r, self.device) for r in settings.rewards]
        self._pipelines: dict[int, Pipeline] = {}

    def _pipeline(self, backend) -> Pipeline:
        if id(backend) not in self._pipelines:
            self._pipelines[id(backend)] = Pipeline.build(backend, self.settings.sampler, self.settings.render,
                                                          self.rewards[0])
        return self._pipelines[id(backend)]

    @torch.no_grad()
    def _make(self, spec: CheckpointSpec, prompt: str, seed: int) -> dict[str, Any]:
        s = self.settings
        ckpt_id = s.ids[spec.name]
        where = asset_dir(ckpt_id, prompt, seed)
        t0 = time.perf_counter()
        backend, disable = self.bank.backend_for(spec)
        pipeline = self._pipeline(backend)
        g = pipeline.generate([prompt], pipeline.seeded_noise([prompt], [seed]), base=disable, keep_trajectory=False)
        render, on_device = g.renders, g.gaussians  # one asset, decoded once, rendered where it was sampled
        gaussians = on_device.detach().to(torch.device("cpu"))
        t1 = time.perf_counter()
        # previews and turntables frame the asset (the reward renders keep the training cameras)
        views = render_turntable(on_device, num_frames=s.render.num_views, size=s.preview_size,
                                 elevation_deg=s.render.elevation_deg, fov_deg=s.render.fov_deg)
        frames = render_turntable(on_device, num_frames=s.turntable_frames, size=s.turntable_size,
                                  elevation_deg=s.render.elevation_deg, fov_deg=s.render.fov_deg)
        files = {"ply": encode_ply(gaussians, frame=s.frame, sh_degree=s.sh_degree, min_opacity=s.min_opacity,
                                  rgb_columns=s.ply_rgb),
                 "preview": encode_png(make_grid(views.float().cpu(), row_labels=[prompt])),
                 "turntable": encode_gif(frames.float().cpu(), fps=8)}
        if s.mesh:
            files["glb"] = self._glb(gaussians)
        paths = {}
        for kind, data in files.items():
            rel = f"{where}/{FILE_NAMES[kind]}"
            self.store.write_bytes(rel, data)
            paths[f"{kind}_path"] = rel
        t2 = time.perf_counter()
        scores: dict[str, Any] = {"reward": float(g.rewards[0])}
        for spec_r, fn in zip(s.rewards[1:], self.rewards[1:]):
            scores[f"reward_{reward_name(spec_r)}"] = float(fn(render, [prompt])[0])
        scores.update({k: float(v[0]) for k, v in image_stats(render).items()})
        if gradeable(prompt):
            pf = prompt_following(render, [prompt])["per_sample"][0]
            scores["color_ok"], scores["shape_ok"] = bool(pf["color_ok"]), bool(pf["shape_ok"])
        else:  # free text: only the grammar's prompts can be graded
            scores["color_ok"] = scores["shape_ok"] = None
        t3 = time.perf_counter()
        return {**scores, **paths, "t_sample_s": t1 - t0, "t_export_s": t2 - t1, "t_score_s": t3 - t2,
                "t_total_s": t3 - t0}

    def _glb(self, gaussians) -> bytes:
        s = self.settings
        return encode_glb(gaussians_to_mesh(gaussians, resolution=s.mesh_resolution), unlit=s.unlit, frame=s.frame)

    def process(self, checkpoint: str, prompt: str, seed: int) -> dict[str, Any]:
        """The manifest row of one asset (written to its ``done.json``), or an error row (``error`` set)."""
        key = {"checkpoint": checkpoint, "checkpoint_id": self.settings.ids[checkpoint], "prompt": prompt,
               "prompt_hash": prompt_hash(prompt), "seed": int(seed), "noise_seed": noise_seed(prompt, int(seed))}
        if self.settings.dry_run:
            return {**key, "error": None}
        try:
            row = {**key, **self._make(self.specs[checkpoint], prompt, int(seed)), "error": None}
        except OutputError:  # storage down after its retries: not this asset's fault, stop the job
            raise
        except Exception as err:  # one bad asset must not end a nightly run
            log.warning("asset %s / %r / seed %s failed: %s", checkpoint, prompt, seed, err)
            return {**key, "error": f"{type(err).__name__}: {err}",
                    "traceback": "".join(traceback.format_exception(err))[-4000:]}
        self.store.write_bytes(f"{asset_dir(key['checkpoint_id'], prompt, seed)}/{DONE}",
                               json.dumps(row).encode())  # last: the asset is finished
        return row

    def run_part(self, part: Part) -> Iterator[dict[str, Any]]:
        """Make the missing assets of ``part`` and write its record; yields progress reports (``made``,
        ``skipped``, ``failed`` counts and ``errors`` rows since the last report) after each asset made and
        at the end. Assets with a ``done.json`` are taken as they are (a part a killed run left half done)."""
        s = self.settings
        report = _report()
        try:
            cells = read_chunk(part.chunk, s.column)
        except PromptSourceError as err:
            report["errors"].append(error_row("shard", source=part.chunk.source, reason=str(err)))
            yield report
            return
        prompts, bad = clean_cells(cells, part.chunk.start)
        report["errors"] += [error_row("prompt", source=part.chunk.source, row=row, reason=reason)
                             for row, reason in bad]
        rows, failed = [], 0
        for name in (c.name for c in s.checkpoints):
            for prompt in dict.fromkeys(prompts):  # a prompt listed twice is one asset
                for seed in s.seeds:
                    row = self._finished(f"{asset_dir(s.ids[name], prompt, seed)}/{DONE}")
                    if row is not None:
                        report["skipped"] += 1
                        rows.append(row)
                        continue
                    row = self.process(name, prompt, seed)
                    if row.get("error"):
                        failed += 1
                        report["failed"] += 1
                        report["errors"].append(error_row("asset", checkpoint=name, prompt=prompt, seed=seed,
                                                          reason=row["error"], traceback=row.get("traceback")))
                        continue
                    rows.append(row)
                    report["made"] += 1
                    if not s.dry_run:
                        yield report
                        report = _report()
        record = part_record(part.id, len(rows), partial=bool(failed))
        self.store.write_table(record, rows_to_table(rows, self.schema))
        for old in part.stale:  # earlier runs' partial records of this part are superseded
            if old != record:
                self.store.delete(old)
        yield report


    def _finished(self, marker: str) -> dict[str, Any] | None:
        """The row in an asset's ``done.json``, or None: one read per asset, no existence check first."""
        try:
            return json.loads(self.store.read_bytes(marker))
        except FileNotFoundError:
            return None


def _report() -> dict[str, Any]:
    return {"made": 0, "skipped": 0, "failed": 0, "errors": []}


# ---------------------------------------------------------------------------------------------------------
# manifest, errors and resumption


def manifest_schema(extra_rewards: Sequence[str] = ()):
    import pyarrow as pa

    fields = [("checkpoint", pa.string()), ("checkpoint_id", pa.string()), ("prompt", pa.string()),
              ("prompt_hash", pa.string()), ("seed", pa.int64()), ("noise_seed", pa.int64()),
              ("reward", pa.float64()), *[(f"reward_{r}", pa.float64()) for r in extra_rewards],
              *[(m, pa.float64()) for m in METRICS], *[(c, pa.bool_()) for c in CHECKS],
              *[(f"{k}_path", pa.string()) for k in FILES],
              *[(t, pa.float64()) for t in TIMINGS], ("error", pa.string())]
    return pa.schema(fields)


def error_schema():
    import pyarrow as pa

    return pa.schema([("stage", pa.string()), ("source", pa.string()), ("row", pa.int64()),
                      ("checkpoint", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()),
                      ("reason", pa.string()), ("traceback", pa.string()), ("run", pa.string()),
                      ("time", pa.string())])


def row_key(row: dict[str, Any]) -> tuple[str, str, int]:
    return row["checkpoint_id"], row["prompt"], int(row["seed"])


def asset_files(row: dict[str, Any]) -> list[str]:
    """The files a finished row stands for: its exports and its ``done.json`` marker."""
    files = [row[f"{k}_path"] for k in FILES if row.get(f"{k}_path")]
    return files + [f"{asset_dir(row['checkpoint_id'], row['prompt'], row['seed'])}/{DONE}"]


# ---------------------------------------------------------------------------------------------------------
# parts: the units of work, and their records


@dataclass(frozen=True)
class Part:
    """One chunk of prompt rows x every checkpoint x every seed; ``stale`` names the earlier partial
    records of the same part, removed once its new record is written."""

    chunk: Chunk
    id: str
    stale: tuple[str, ...] = ()


def part_id(chunk: Chunk, settings: RegenSettings) -> str:
    """Changes with the rows (source, its version, the row range) and with what is made of them."""
    key = [chunk.source, chunk.version, chunk.start, chunk.stop, settings.column,
           [settings.ids[c.name] for c in settings.checkpoints], [int(x) for x in settings.seeds]]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]


def part_record(pid: str, rows: int, partial: bool = False) -> str:
    """The record's name carries its row count (a rerun counts finished assets from one listing) and
    whether some asset of the part failed."""
    return f"{PARTS}/{pid}.{rows}{'.partial' if partial else ''}.parquet"


@dataclass
class PartRecords:
    complete: dict[str, str] = field(default_factory=dict)  # part id -> record path
    partial: dict[str, list[str]] = field(default_factory=dict)  # part id -> partial record paths

    @staticmethod
    def rows(record: str) -> int:
        return int(record.rsplit("/", 1)[-1].split(".")[1])

    def all(self) -> dict[str, list[str]]:
        """Part id -> the records to read for its rows (the complete one, else its partial ones)."""
        ids = sorted(set(self.complete) | set(self.partial))
        return {i: [self.complete[i]] if i in self.complete else self.partial[i] for i in ids}


def part_records(store: Store) -> PartRecords:
    """Every part record under the output, from one listing of ``parts/``."""
    records = PartRecords()
    for rel in sorted(store.listing(PARTS)):
        name = rel.rsplit("/", 1)[-1].split(".")
        if len(name) < 3 or name[-1] != "parquet" or not name[1].isdigit():
            continue
        if name[2] == "partial":
            records.partial.setdefault(name[0], []).append(rel)
        else:
            records.complete[name[0]] = rel
    return records


def verify_library(store: Store) -> int:
    """Check every recorded asset's files against one full listing of the output; an asset with a file
    missing loses its ``done.json`` and its part its record, so the next pass makes it again. Returns the
    number of such assets. Linear in the library: run it when files may have been deleted."""
    listing = store.listing()
    records = part_records(store)
    broken = 0
    for pid, paths in records.all().items():
        bad_part = False
        for rel in paths:
            for r in store.read_table(rel).to_pylist():
                if not all(f in listing for f in asset_files(r)):
                    broken += 1
                    bad_part = True
                    store.delete(f"{asset_dir(r['checkpoint_id'], r['prompt'], r['seed'])}/{DONE}")
        if bad_part:
            for rel in paths:
                store.delete(rel)
    for rel in (p for p in listing if p.rsplit("/", 1)[-1] == DONE):  # markers no record lists yet
        try:
            r = json.loads(store.read_bytes(rel))
        except (OSError, ValueError):
            store.delete(rel)
            continue
        if not all(f in listing for f in asset_files(r)):
            broken += 1
            store.delete(rel)
    if broken:
        log.warning("regenerate: %d finished assets have missing files and will be made again", broken)
    return broken


def conform(table, schema):
    """``table`` with exactly ``schema``'s columns (records of runs with other extra rewards: missing
    columns are null, others dropped)."""
    import pyarrow as pa

    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def commit_manifest(store: Store, order: Sequence[str], schema, metadata: dict[str, Any],
                    keep: int = 0, rewrite: bool = False) -> tuple[int, list[dict[str, Any]] | None]:
    """Write ``manifest.parquet`` from every part record under the output, the parts in ``order`` first
    (this run's, in the order of its prompts), each (checkpoint_id, prompt, seed) once, streaming one
    part at a time (the driver holds one 64-bit hash per asset, not the rows). Returns the number of
    rows and the first ``keep`` rows (the gallery's), or None for them when the manifest already stands
    for exactly these records and settings (a rerun with nothing to do rewrites nothing)."""
    import pyarrow.parquet as pq

    records = part_records(store).all()
    ids = [i for i in dict.fromkeys(order) if i in records] + [i for i in records if i not in set(order)]
    digest = hashlib.sha256(json.dumps([[records[i] for i in ids], metadata], sort_keys=True,
                                       default=str).encode()).hexdigest()
    if store.exists(MANIFEST) and not rewrite:
        def footer():
            with store.fs.open_input_file(store.full(MANIFEST)) as f:
                return pq.ParquetFile(f).metadata
        meta = store._io(footer, MANIFEST)
        if json.loads((meta.metadata or {}).get(b"r2d3", b"{}")).get("records_digest") == digest:
            return meta.num_rows, None
    schema = schema.with_metadata({"r2d3": json.dumps({**metadata, "records_digest": digest}, sort_keys=True,
                                                      default=str)})
    seen: set[int] = set()
    first: list[dict[str, Any]] = []
    total = 0
    with store.table_writer(MANIFEST, schema) as writer:
        for pid in ids:
            for rel in records[pid]:
                table = conform(store.read_table(rel), schema)
                keys = zip(table.column("checkpoint_id").to_pylist(), table.column("prompt").to_pylist(),
                           table.column("seed").to_pylist())
                mask = []
                for k in keys:
                    h = hash(k)
                    mask.append(h not in seen)
                    seen.add(h)
                table = table.filter(mask)
                if len(first) < keep:
                    first += table.slice(0, keep - len(first)).to_pylist()
                writer.write_table(table)
                total += len(table)
    return total, first


# ---------------------------------------------------------------------------------------------------------
# errors


def error_row(stage: str, *, source: str | None = None, row: int | None = None, checkpoint: str | None = None,
              prompt: str | None = None, seed: int | None = None, reason: str,
              traceback: str | None = None) -> dict[str, Any]:
    return {"stage": stage, "source": source, "row": row, "checkpoint": checkpoint, "prompt": prompt,
            "seed": seed, "reason": reason, "traceback": traceback}


class ErrorLog:
    """This run's error rows, spilled to a local Parquet file as they come (a run in which every asset
    fails must not hold a million tracebacks in the driver), then added to ``errors.parquet`` after the
    earlier runs' rows, each row with the run that saw it."""

    def __init__(self, run: str):
        import pyarrow.parquet as pq

        self.run, self.count = run, 0
        self.schema = error_schema()
        self._dir = tempfile.TemporaryDirectory(prefix="r2d3-errors-")
        self._path = os.path.join(self._dir.name, "errors.parquet")
        self._writer = pq.ParquetWriter(self._path, self.schema)

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self._writer.write_table(rows_to_table([{**r, "run": self.run, "time": stamp} for r in rows],
                                                   self.schema))
            self.count += len(rows)

    def commit(self, store: Store) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._writer.close()
        with store.table_writer(ERRORS, self.schema) as writer:
            if store.exists(ERRORS):
                for batch in store.batches(ERRORS):
                    writer.write_table(conform(pa.Table.from_batches([batch]), self.schema))
            for batch in pq.ParquetFile(self._path).iter_batches():
                writer.write_table(pa.Table.from_batches([batch], self.schema))
        self._dir.cleanup()


def manifest_metadata(settings: RegenSettings, generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """What made the assets, for the manifest's schema metadata: backend and weights, sampler and render
    settings, reward specs, and per checkpoint its id, source and LoRA file hash."""
    checkpoints = {}
    for spec in settings.checkpoints:
        lora = None if spec.is_base else Path(spec.path) / "lora.safetensors"
        checkpoints[spec.name] = {"id": settings.ids[spec.name], "source": settings.sources.get(spec.name),
                                  "lora_sha256": hashlib.sha256(lora.read_bytes()).hexdigest() if lora else None}
    return {"r2d3_version": r2d3.__version__, "backend": settings.backend, "weights": settings.weights,
            "sampler": dataclasses.asdict(settings.sampler), "render": dataclasses.asdict(settings.render),
            "rewards": settings.rewards, "reward_columns": ["reward", *[f"reward_{reward_name(r)}"
                                                                       for r in settings.rewards[1:]]],
            "mesh": settings.mesh, "mesh_resolution": settings.mesh_resolution, "frame": settings.frame,
            "sh_degree": settings.sh_degree, "min_opacity": settings.min_opacity, "ply_rgb": settings.ply_rgb, "unlit": settings.unlit,
            "turntable": {"frames": settings.turntable_frames, "size": settings.turntable_size},
            "preview_size": settings.preview_size,
            "checkpoints": checkpoints}


__all__ = ["AssetWorker", "DONE", "ERRORS", "ErrorLog", "GALLERY", "MANIFEST", "PARTS", "Part", "PartRecords",
           "RegenSettings", "asset_dir", "asset_files", "checkpoint_id", "commit_manifest", "conform", "error_row",
           "error_schema", "localize", "manifest_metadata", "manifest_schema", "part_id", "part_record",
           "part_records", "prompt_hash", "resolve", "row_key", "verify_library"]
