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
    <out>/errors.parquet    one row per bad prompt / failed asset: what, where and why
    <out>/gallery.html      static page, relative image paths (r2d3.export.gallery)
    <out>/manifest.parquet  one row per (checkpoint_id, prompt, seed), committed last

Reliability: every file is written atomically (temporary name + rename locally; one PUT per object on
S3, which is all-or-nothing). An asset counts as finished only once its ``done.json`` exists, and that is
written after its files. A rerun reads ``manifest.parquet`` plus every ``done.json`` and only works on
the missing keys, so a killed run resumes to the same manifest as an uninterrupted one and reruns never
duplicate rows. Each asset is computed alone from noise seeded by ``noise_seed(prompt, seed)`` (the
evaluation job's scheme, :mod:`r2d3.jobs.evaluate`), so results do not depend on batching or on resumption.
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
from typing import Any, Sequence

import torch

import r2d3
from r2d3.config import DEFAULT_REWARD, RenderConfig, SamplerConfig, reward_label
from r2d3.devices import resolve_device
from r2d3.eval.image_stats import image_stats
from r2d3.eval.prompt_following import prompt_following
from r2d3.eval.samples import gradeable
from r2d3.export import encode_gif, encode_ply, encode_png, make_grid, render_turntable
from r2d3.export.mesh import encode_glb, gaussians_to_mesh
from r2d3.jobs.evaluate import BASE, CheckpointSpec, ModelBank, resolve_checkpoint
from r2d3.pipeline import Pipeline, noise_seed
from r2d3.rewards import load_reward
from r2d3.storage import Store, atomic_write_bytes, is_uri, slug

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
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


def reward_name(spec: Any) -> str:
    """The slug naming an extra reward's manifest column (``reward_<name>``)."""
    return slug(reward_label(spec))


class AssetWorker:
    """Builds the models and rewards once; ``process`` turns one ``(checkpoint, prompt, seed)`` into
    files and a manifest row (or an error row); calling it on a batch of items returns all rows."""

    def __init__(self, settings: RegenSettings):
        self.settings = settings
        self.device = resolve_device(settings.device)
        specs = []
        for spec in settings.checkpoints:  # an S3 checkpoint may not be on this node yet
            if not spec.is_base and not (Path(spec.path) / "lora.safetensors").is_file():
                spec = dataclasses.replace(spec, path=localize(settings.sources[spec.name]))
            specs.append(spec)
        self.specs = {s.name: s for s in specs}
        self.bank = ModelBank(settings.backend, settings.weights, self.device, specs)
        self.rewards = [load_reward(r, self.device) for r in settings.rewards]
        self.store = Store(settings.out)
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
        spec = self.specs[checkpoint]
        key = {"checkpoint": checkpoint, "checkpoint_id": self.settings.ids[checkpoint], "prompt": prompt,
               "prompt_hash": prompt_hash(prompt), "seed": int(seed), "noise_seed": noise_seed(prompt, int(seed))}
        try:
            row = {**key, **self._make(spec, prompt, int(seed)), "error": None}
        except Exception as err:  # one bad asset must not end a nightly run
            log.warning("asset %s / %r / seed %s failed: %s", checkpoint, prompt, seed, err)
            return {**key, "error": f"{type(err).__name__}: {err}",
                    "traceback": "".join(traceback.format_exception(err))[-4000:]}
        self.store.write_bytes(f"{asset_dir(key['checkpoint_id'], prompt, seed)}/{DONE}",
                               json.dumps(row).encode())  # last: the asset is finished
        return row

    def __call__(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return [self.process(str(c), str(p), int(s))
                for c, p, s in zip(batch["checkpoint"], batch["prompt"], batch["seed"])]


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
                      ("reason", pa.string()), ("traceback", pa.string())])


def row_key(row: dict[str, Any]) -> tuple[str, str, int]:
    return row["checkpoint_id"], row["prompt"], int(row["seed"])


def asset_files(row: dict[str, Any]) -> list[str]:
    """The files a finished row stands for: its exports and its ``done.json`` marker."""
    files = [row[f"{k}_path"] for k in FILES if row.get(f"{k}_path")]
    return files + [f"{asset_dir(row['checkpoint_id'], row['prompt'], row['seed'])}/{DONE}"]


def finished_rows(store: Store) -> tuple[dict[tuple[str, str, int], dict[str, Any]], int]:
    """Rows of finished assets, keyed by (checkpoint_id, prompt, seed): the committed manifest plus every
    ``done.json`` (a run killed before it committed the manifest), kept only while all their files are
    there (one listing of the output), so a deleted or partly deleted asset is made again. Also returns
    how many rows were dropped for missing files."""
    listing = store.listing()
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    if MANIFEST in listing:
        for r in store.read_table(MANIFEST).to_pylist():
            if not r.get("error"):
                rows[row_key(r)] = r
    for rel in sorted(p for p in listing if p.rsplit("/", 1)[-1] == DONE):
        try:
            r = json.loads(store.read_bytes(rel))
        except (OSError, ValueError) as err:  # cannot happen with atomic writes; redo the asset if it does
            log.warning("ignoring unreadable marker %s: %s", rel, err)
            continue
        rows.setdefault(row_key(r), r)
    complete = {k: r for k, r in rows.items() if all(f in listing for f in asset_files(r))}
    if len(complete) < len(rows):
        log.warning("regenerate: %d finished assets have missing files and will be made again",
                    len(rows) - len(complete))
    return complete, len(rows) - len(complete)


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


__all__ = ["AssetWorker", "DONE", "ERRORS", "GALLERY", "MANIFEST", "RegenSettings",
           "asset_dir", "asset_files",
           "checkpoint_id", "error_schema", "finished_rows", "localize", "manifest_metadata", "manifest_schema", "prompt_hash", "resolve",
           "row_key"]
