"""The evaluation job's Ray-free parts: checkpoints, prompts and noise, the per-prompt work unit, and the
aggregation into a summary with bootstrap intervals. :mod:`r2d3.ray.evaluate` runs the work units on
Ray Data; ``actors=0`` runs the same code in-process.

Work unit: **one held-out prompt with all its seeds, for every checkpoint** (base first). Doing all
checkpoints of a prompt together makes the comparisons paired by construction — each checkpoint sees
the same prompt, the same initial and step noise and the same cameras — and lets drift (against the
base model's sample from the same noise) and diversity (across the prompt's seeds) be computed where
the samples are. Each unit is computed alone, with the same tensor shapes whatever else is in the
batch, so results do not depend on how Ray groups units: reruns give identical numbers.

Noise: sample ``(prompt, seed)`` uses ``torch.Generator().manual_seed(noise_seed(prompt, seed))`` to
draw ``[1 + K, *latent_shape]`` (x_T, then the K step noises), exactly the layout of
:func:`r2d3.sample.generate`; ``python -m r2d3.sample PROMPT --seeds NOISE_SEED --lora CKPT`` redraws
the same latent. ``noise_seed`` hashes the prompt with the seed so different prompts get independent
noise (prompts must be independent for the prompt bootstrap to be honest).

Per-sample columns (one row per checkpoint x prompt x seed; ``r2d3.eval.report`` documents them for
readers): ``reward``; ``similarity`` (multi-view prompt–render cosine similarity under the extractor's
image–text model); the image statistics of :mod:`r2d3.eval.image_stats`; ``drift_rgb_l2``,
``drift_dssim``, ``drift_alpha_l1`` (:func:`r2d3.eval.diversity.drift` against the base model's sample
from the same noise) and ``drift_feature`` (RMS distance of the pooled features to the base sample's);
``diversity`` (mean pairwise RMS distance of the pooled features across the prompt's seeds) and
``diversity_latent`` (the same over latents, Chamfer distance), repeated on each seed's row;
``color_ok`` / ``shape_ok`` (prompt-following, grammar prompts only); ``features`` (pooled image
features, for FID).
"""

from __future__ import annotations

import logging
import dataclasses
import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from r2d3.config import AlignConfig, RenderConfig, SamplerConfig

BASE = "base"
#: scalar per-sample metrics, in report order
METRICS = ("reward", "similarity", "saturation", "contrast", "background_coverage", "edge_density",
           "drift_rgb_l2", "drift_dssim", "drift_alpha_l1", "drift_feature", "diversity", "diversity_latent",
           "color_ok", "shape_ok")

log = logging.getLogger(__name__)


def select_prompts(prompts: Sequence[str], n: int) -> list[str]:
    """``n`` prompts spread evenly over ``prompts`` (deterministic; all of them when ``n`` is larger)."""
    n = min(n, len(prompts))
    return [prompts[int(i * len(prompts) / n)] for i in range(n)] if n > 0 else []


def noise_seed(prompt: str, seed: int) -> int:
    """The generator seed of sample ``(prompt, seed)``: a 63-bit hash of both."""
    digest = hashlib.sha256(f"{seed}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_noise(noise_seeds: Sequence[int], num_steps: int, latent_shape: Sequence[int]) -> Tensor:
    """``[N, 1 + K, *S]`` noise, row ``i`` drawn from ``torch.Generator().manual_seed(noise_seeds[i])``."""
    return torch.stack([torch.randn(1 + num_steps, *latent_shape, generator=torch.Generator().manual_seed(s))
                        for s in noise_seeds])


# ---------------------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class CheckpointSpec:
    """One model to evaluate: the base (``path is None``) or a LoRA checkpoint directory."""

    name: str
    path: str | None = None
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the checkpoint's resolved config.yaml, if any

    @property
    def is_base(self) -> bool:
        return self.path is None


def resolve_checkpoint(arg: str) -> CheckpointSpec:
    """``base``; a checkpoint directory (holding ``lora.safetensors``); a ``lora.safetensors`` file; or a
    run directory (its newest complete checkpoint). The name is ``<run>/<checkpoint>``, or ``LABEL`` when
    given as ``LABEL=PATH``."""
    if arg == BASE:
        return CheckpointSpec(BASE)
    label, sep, rest = arg.partition("=")
    if sep and label and "/" not in label and not Path(arg).exists():
        if label == BASE:
            raise ValueError(f"{arg}: the label {BASE!r} is reserved for the base model")
        return dataclasses.replace(resolve_checkpoint(rest), name=label)
    from r2d3.train.checkpoint import latest_checkpoint

    path = Path(arg).expanduser()
    if path.is_file() and path.name == "lora.safetensors":
        path = path.parent
    if path.is_dir() and not (path / "lora.safetensors").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{arg}: neither a checkpoint directory (no lora.safetensors) nor a run "
                                    "directory with a complete checkpoint_* inside")
        path = latest
    if not (path / "lora.safetensors").is_file():
        raise FileNotFoundError(f"checkpoint not found: {arg} (expected 'base', a checkpoint directory with "
                                "lora.safetensors, or a run directory)")
    spec = CheckpointSpec(f"{path.parent.name}/{path.name}", str(path.resolve()))
    if (path / "config.yaml").is_file():
        from omegaconf import OmegaConf

        spec.config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)
        model = spec.config.get("model", {})
        spec.lora_alpha, spec.lora_targets = model.get("lora_alpha"), model.get("lora_targets")
    return spec


def resolve_checkpoints(args: Sequence[str]) -> list[CheckpointSpec]:
    """Specs for ``args`` with the base model first (added when missing); names must be unique."""
    specs = [resolve_checkpoint(a) for a in args]
    if not any(s.is_base for s in specs):
        specs.insert(0, CheckpointSpec(BASE))
    specs.sort(key=lambda s: not s.is_base)  # stable: base first, the others in the given order
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"checkpoints listed twice: {', '.join(dupes)}")
    return specs


class ModelBank:
    """The backend once per LoRA layout; checkpoints swap their adapter weights in, the base model runs
    with adapters disabled (exactly the frozen network)."""

    def __init__(self, backend: str, weights: str | None, device: torch.device, checkpoints: list[CheckpointSpec]):
        from safetensors.torch import load_file

        from r2d3.backends import load_backend
        from r2d3.train.lora import add_lora

        self._load = lambda: load_backend(backend, weights=weights, device=str(device))
        self.backends: dict[tuple, Any] = {}
        self.states: dict[str, tuple[tuple, dict[str, Tensor]]] = {}
        self.loaded: dict[tuple, str] = {}
        for spec in checkpoints:
            if spec.is_base:
                continue
            state = load_file(Path(spec.path) / "lora.safetensors")
            rank = next((v.shape[0] for k, v in state.items() if "lora_A" in k), None)
            if rank is None:
                raise ValueError(f"{spec.path}/lora.safetensors holds no LoRA weights")
            key = (rank, spec.lora_alpha, tuple(spec.lora_targets or ()))
            if key not in self.backends:
                b = self._load()
                add_lora(b.denoiser, rank, spec.lora_alpha, list(spec.lora_targets or b.lora_target_modules))
                self.backends[key] = b
            self.states[spec.name] = (key, {k: v.to(device) for k, v in state.items()})
        self.base = next(iter(self.backends.values()), None)
        if self.base is None:
            self.base = self._load()

    def backend_for(self, spec: CheckpointSpec) -> tuple[Any, bool]:
        """(backend, run it with adapters disabled)."""
        from r2d3.train.lora import load_lora_state_dict

        if spec.is_base:
            return self.base, bool(self.backends)
        key, state = self.states[spec.name]
        backend = self.backends[key]
        if self.loaded.get(key) != spec.name:
            load_lora_state_dict(backend.denoiser, state)
            self.loaded[key] = spec.name
        return backend, False


# ---------------------------------------------------------------------------------------------------------
# the work unit


@dataclass
class EvalSettings:
    """Everything a worker needs besides the prompts (picklable; shared by all units)."""

    checkpoints: list[CheckpointSpec]
    seeds: list[int]
    backend: str = "tiny"
    weights: str | None = None
    reward: Any = field(default_factory=lambda: AlignConfig().reward)
    extractor: str = "clip_tiny"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    device: str = "cpu"
    previews: bool = True  # PNG of the first seed's views per (checkpoint, prompt), for the report

    def describe(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["checkpoints"] = [{"name": c.name, "path": c.path} for c in self.checkpoints]
        return out


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _png(views: Tensor) -> bytes:
    """PNG of an asset's views ``[V, 3, H, W]`` side by side (one strip ``[H, V * W]``)."""
    from PIL import Image

    from r2d3.export.preview import encode_png, to_uint8

    return encode_png(Image.fromarray(to_uint8(torch.cat(list(views.detach().cpu()), dim=-1))))


class PromptEvaluator:
    """Builds the models, reward and extractor once; ``evaluate_prompt`` returns one row per checkpoint x
    seed; calling it on a batch of units ``{"prompt_index": [...], "prompt": [...]}`` returns all rows."""

    def __init__(self, settings: EvalSettings):
        from r2d3.eval.extractors import load_extractor
        from r2d3.rewards import load_reward

        if len(settings.seeds) < 1 or len(set(settings.seeds)) != len(settings.seeds):
            raise ValueError(f"need at least one seed and no repeats, got {settings.seeds}")
        if not settings.checkpoints or not settings.checkpoints[0].is_base:
            raise ValueError("the base model must be the first checkpoint (drift and FID are measured against it)")
        self.settings = settings
        self.device = _device(settings.device)
        self.bank = ModelBank(settings.backend, settings.weights, self.device, settings.checkpoints)
        self.reward_fn = load_reward(settings.reward, self.device)
        self.extractor = load_extractor(settings.extractor, self.device)
        self._contexts: dict[int, Any] = {}

    def _context(self, backend):
        from r2d3.algos.base import make_context

        if id(backend) not in self._contexts:
            self._contexts[id(backend)] = make_context(backend, self.settings.sampler, self.reward_fn,
                                                       self.settings.render)
        return self._contexts[id(backend)]

    def evaluate_prompt(self, prompt_index: int, prompt: str) -> list[dict[str, Any]]:
        """The job's unit: one prompt, all its seeds, every checkpoint."""
        return self.evaluate_prompts([prompt_index], [prompt])

    @torch.no_grad()
    def evaluate_prompts(self, prompt_indices: Sequence[int], prompts: Sequence[str],
                         chunk: int | None = None) -> list[dict[str, Any]]:
        """Several prompts sampled together, ``chunk`` samples per model call (default: the training
        loop's evaluation chunk); faster on small models. Every sample keeps its own noise and cameras,
        so the values equal the one-prompt unit's up to float round-off."""
        from r2d3.data.procedural import PromptParseError, parse_prompt
        from r2d3.eval.diversity import diversity, drift, rms_distance
        from r2d3.eval.extractors import pool_views, prompt_similarity, view_features
        from r2d3.eval.image_stats import image_stats
        from r2d3.eval.prompt_following import prompt_following
        from r2d3.render.output import RenderOutput
        from r2d3.train.align_job import sample_and_render

        seeds = self.settings.seeds
        n = len(seeds)
        batch_prompts = [p for p in prompts for _ in seeds]
        noise_seeds = [noise_seed(p, s) for p in prompts for s in seeds]
        noise = initial_noise(noise_seeds, self.settings.sampler.num_steps, self.bank.base.latent_shape)
        text = self.extractor.text_features(list(prompts)).repeat_interleave(n, dim=0) \
            if self.extractor.has_text else None
        gradeable = []
        for prompt in prompts:
            try:
                parse_prompt(prompt)
                gradeable.append(True)
            except PromptParseError:
                gradeable.append(False)
        rows: list[dict[str, Any]] = []
        base_render = base_feats = None
        for spec in self.settings.checkpoints:
            backend, disable = self.bank.backend_for(spec)
            latents, rewards, render = sample_and_render(self._context(backend), batch_prompts, noise, base=disable,
                                                         chunk=chunk)
            render.rgb, render.alpha = render.rgb.float().cpu(), render.alpha.float().cpu()
            vf = view_features(self.extractor, render.rgb)
            feats = pool_views(vf)
            if spec.is_base:
                base_render, base_feats = render, feats
            cols: dict[str, Any] = {"reward": rewards.float().cpu()}
            cols["similarity"] = prompt_similarity(vf, text) if text is not None else None
            cols.update(image_stats(render))
            cols.update({f"drift_{k}": v for k, v in drift(base_render, render).items()})
            cols["drift_feature"] = rms_distance(feats, base_feats)
            if n > 1:  # across each prompt's seeds
                cols["diversity"] = torch.cat([diversity(f, metric="rms").expand(n) for f in feats.split(n)])
                cols["diversity_latent"] = torch.cat([diversity(x).expand(n) for x in latents.float().cpu().split(n)])
            if any(gradeable):
                ok = torch.tensor(gradeable).repeat_interleave(n)
                graded = RenderOutput(render.rgb[ok], render.alpha[ok], render.depth[ok], render.normal[ok],
                                      render.cameras)  # the classifiers read pixels only
                pf = prompt_following(graded, [p for p, g in zip(batch_prompts, ok.tolist()) if g])["per_sample"]
                colour, shape = torch.full((len(ok),), math.nan), torch.full((len(ok),), math.nan)
                colour[ok] = torch.tensor([float(p["color_ok"]) for p in pf])
                shape[ok] = torch.tensor([float(p["shape_ok"]) for p in pf])
                cols["color_ok"], cols["shape_ok"] = colour, shape
            for k, (index, prompt) in enumerate(zip(prompt_indices, prompts)):
                preview = _png(render.rgb[k * n]) if self.settings.previews else None
                for j, seed in enumerate(seeds):
                    i = k * n + j
                    row: dict[str, Any] = {"checkpoint": spec.name, "prompt_index": int(index), "prompt": prompt,
                                           "seed_index": j, "seed": int(seed), "noise_seed": noise_seeds[i]}
                    for m in METRICS:
                        v = cols.get(m)
                        ungraded = m in ("color_ok", "shape_ok") and not gradeable[k]
                        row[m] = None if v is None or ungraded else float(v[i])
                    row["features"] = feats[i].tolist()
                    row["preview_png"] = preview if j == 0 else None
                    rows.append(row)
        return rows

    def __call__(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for index, prompt in zip(batch["prompt_index"], batch["prompt"]):
            rows += self.evaluate_prompt(int(index), str(prompt))
        return rows


# ---------------------------------------------------------------------------------------------------------
# aggregation


def _grid(rows: list[dict[str, Any]], checkpoint: str, key: str, num_prompts: int, num_seeds: int) -> Tensor | None:
    """``[P, S]`` values of ``key`` for one checkpoint (NaN where missing); None if all missing."""
    out = torch.full((num_prompts, num_seeds), math.nan, dtype=torch.float64)
    for r in rows:
        if r["checkpoint"] == checkpoint and r.get(key) is not None:
            out[r["prompt_index"], r["seed_index"]] = r[key]
    return None if torch.isnan(out).all() else out


def summarize(rows: list[dict[str, Any]], prompts: Sequence[str], seeds: Sequence[int], checkpoints: Sequence[str],
              draws: int = 1000, fid_draws: int = 200) -> dict[str, Any]:
    """Per-checkpoint means, 95 % prompt-bootstrap intervals, paired deltas vs the base model, FID vs
    the base model's renders, and per-prompt values (see ``docs``/the report for definitions)."""
    from r2d3.eval.bootstrap import bootstrap_ci
    from r2d3.eval.fid import fid, fid_bootstrap

    num_p, num_s = len(prompts), len(seeds)
    present = {(r["checkpoint"], r["prompt_index"], r["seed_index"]) for r in rows}
    for name in checkpoints:  # identical prompts and seeds for every compared checkpoint
        missing = [(p, s) for p in range(num_p) for s in range(num_s) if (name, p, s) not in present]
        if missing:
            raise ValueError(f"checkpoint {name!r} lacks {len(missing)} of the {num_p * num_s} (prompt, seed) "
                             f"samples (first: prompt {missing[0][0]}, seed index {missing[0][1]})")
    feats = {}
    for name in checkpoints:
        by_key = {(r["prompt_index"], r["seed_index"]): r["features"] for r in rows if r["checkpoint"] == name}
        feats[name] = torch.tensor([by_key[(p, s)] for p in range(num_p) for s in range(num_s)], dtype=torch.float64)
    base = checkpoints[0]
    out: dict[str, Any] = {}
    for name in checkpoints:
        res: dict[str, Any] = {"samples": num_p * num_s}
        for m in METRICS:
            grid = _grid(rows, name, m, num_p, num_s)
            if grid is None:
                continue
            finite = torch.isfinite(grid).all(dim=1)  # prompts whose every sample scored
            if not finite.all():  # NaN/inf scores: counted, and the statistics use the complete prompts
                res[f"{m}_nonfinite"] = int((~torch.isfinite(grid)).sum())
                log.warning("%s: %d non-finite %s values; %s uses the %d prompts whose samples all scored",
                            name, res[f"{m}_nonfinite"], m, m, int(finite.sum()))
            if not finite.any():
                continue
            flat = grid[finite].flatten()
            res[f"{m}_mean"] = float(flat.mean())
            res[f"{m}_ci95"] = list(bootstrap_ci(flat, int(finite.sum()), draws))
            if m == "reward":
                res["reward_std"] = float(flat.std(unbiased=False))
                res["reward_per_prompt"] = grid.mean(dim=1).tolist()
            if name != base and not m.startswith("drift_"):  # drift is already measured against the base
                ref = _grid(rows, base, m, num_p, num_s)
                if ref is not None:
                    both = finite & torch.isfinite(ref).all(dim=1)
                    if not both.any():
                        continue
                    delta = (grid - ref)[both].flatten()  # paired: same prompt, noise and cameras
                    res[f"{m}_delta_vs_base"] = float(delta.mean())
                    res[f"{m}_delta_ci95"] = list(bootstrap_ci(delta, int(both.sum()), draws))
                    if m in ("reward", "similarity"):
                        res[f"{m}_delta_per_prompt"] = (grid - ref).mean(dim=1).tolist()
        if num_p * num_s >= 2:
            res["fid_vs_base"] = fid(feats[name], feats[base])
            res["fid_ci95"] = list(fid_bootstrap(feats[name], feats[base], num_p, fid_draws)) if num_p > 1 else None
        if num_s >= 2 and num_p * (num_s // 2) >= 2:
            half = num_s // 2  # this checkpoint's first seeds vs the base's other seeds: no shared noise
            a = feats[name].view(num_p, num_s, -1)[:, :half].reshape(-1, feats[name].shape[-1])
            b = feats[base].view(num_p, num_s, -1)[:, half: 2 * half].reshape(-1, feats[base].shape[-1])
            res["fid_disjoint_seeds"] = fid(a, b)
        out[name] = res
    return out


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    """A ``summary.json`` written by the job (a file or the job's output directory)."""
    import json

    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    try:
        summary = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{file} is not an evaluation summary.json: {err}") from None
    if not isinstance(summary, dict) or "checkpoints" not in summary:
        raise ValueError(f"{file} is not an evaluation summary.json (no 'checkpoints' in it)")
    return summary


def scalar_metrics(summary: dict[str, Any], checkpoint: str | None = None) -> dict[str, float]:
    """The flat ``{metric: value}`` scalars of one checkpoint (default: the last one listed, i.e. the
    newest model evaluated) — what a sweep or benchmark records; intervals become ``<key>_lo``/``_hi``."""
    name = checkpoint or list(summary["checkpoints"])[-1]
    out: dict[str, float] = {}
    for key, value in summary["checkpoints"][name].items():
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif key.endswith("_ci95") and value:
            out[key[:-5] + "_lo"], out[key[:-5] + "_hi"] = float(value[0]), float(value[1])
    return out


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``samples.parquet`` written by the job."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def row_schema(previews: bool = False):
    """The pyarrow schema of per-sample rows (fixed column order and types; ``preview_png`` optional)."""
    import pyarrow as pa

    fields = [("checkpoint", pa.string()), ("prompt_index", pa.int64()), ("prompt", pa.string()),
              ("seed_index", pa.int64()), ("seed", pa.int64()), ("noise_seed", pa.int64()),
              *[(m, pa.float64()) for m in METRICS], ("features", pa.list_(pa.float32()))]
    return pa.schema(fields + ([("preview_png", pa.binary())] if previews else []))


def rows_to_table(rows: list[dict[str, Any]], previews: bool = False):
    """A pyarrow table of per-sample rows (previews dropped unless asked for)."""
    import pyarrow as pa

    schema = row_schema(previews)
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def sort_rows(rows: list[dict[str, Any]], checkpoints: Sequence[str]) -> list[dict[str, Any]]:
    order = {n: i for i, n in enumerate(checkpoints)}
    return sorted(rows, key=lambda r: (order[r["checkpoint"]], r["prompt_index"], r["seed_index"]))


def previews_from_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, int], Tensor]:
    """``(checkpoint, prompt_index) -> [3, H, V * W]`` view strips decoded from the rows' PNG bytes."""
    import numpy as np
    from PIL import Image

    out = {}
    for r in rows:
        if r.get("preview_png"):
            img = np.asarray(Image.open(io.BytesIO(r["preview_png"])).convert("RGB"))
            out[(r["checkpoint"], r["prompt_index"])] = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255
    return out


__all__ = ["BASE", "METRICS", "CheckpointSpec", "EvalSettings", "ModelBank", "PromptEvaluator", "initial_noise",
           "load_rows", "load_summary", "noise_seed", "previews_from_rows", "resolve_checkpoint", "resolve_checkpoints",
           "row_schema", "rows_to_table", "scalar_metrics", "select_prompts", "sort_rows", "summarize"]
