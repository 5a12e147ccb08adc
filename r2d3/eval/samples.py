"""Per-sample measures of generated assets, for every model on identical prompts, noise and cameras.

One row per (model, prompt, seed): ``reward``; ``similarity`` (multi-view prompt–render cosine
similarity under the extractor's image–text model); the image statistics of
:mod:`r2d3.eval.image_stats`; ``drift_rgb_l2``, ``drift_dssim``, ``drift_alpha_l1``
(:func:`r2d3.eval.diversity.drift` against the base model's sample from the same noise) and
``drift_feature`` (RMS distance of the pooled features to the base sample's); ``diversity`` (mean pairwise
RMS distance of the pooled features across the prompt's seeds) and ``diversity_latent`` (the same over
latents, Chamfer distance), repeated on each seed's row; ``color_ok`` / ``shape_ok`` (prompt-following,
grammar prompts only); ``features`` (pooled image features, for FID). The first model is the base every
drift is measured against. The training job's held-out evaluation and the evaluation job both call
:class:`Measurer`, so their numbers agree; :mod:`r2d3.eval.summary` aggregates the rows.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from r2d3.data.procedural import PromptParseError, parse_prompt
from r2d3.eval.diversity import diversity, drift, rms_distance
from r2d3.eval.extractors import FeatureExtractor, pool_views, prompt_similarity, view_features
from r2d3.eval.image_stats import image_stats
from r2d3.eval.prompt_following import prompt_following
from r2d3.export.preview import encode_png, to_uint8
from r2d3.pipeline import Generation, Pipeline, noise_seed
from r2d3.render.output import RenderOutput

#: scalar per-sample metrics, in report order
METRICS = ("reward", "similarity", "saturation", "contrast", "background_coverage", "edge_density",
           "drift_rgb_l2", "drift_dssim", "drift_alpha_l1", "drift_feature", "diversity", "diversity_latent",
           "color_ok", "shape_ok")
#: samples per model call when a set is larger than that
EVAL_CHUNK = 16
def gradeable(prompt: str) -> bool:
    """Whether prompt-following can grade ``prompt`` (only the procedural grammar's prompts can)."""
    try:
        parse_prompt(prompt)
        return True
    except PromptParseError:
        return False


def view_strip_png(views: Tensor) -> bytes:
    """PNG of an asset's views ``[V, 3, H, W]`` side by side (one strip ``[H, V * W]``)."""
    from PIL import Image

    return encode_png(Image.fromarray(to_uint8(torch.cat(list(views.detach().cpu()), dim=-1))))


class Measurer:
    """Rows of models sampled on every ``prompt`` x ``seed`` from the same noise and cameras. The first
    model measured is the reference for drift (normally the base model; its renders and features are
    kept), so later calls measure each checkpoint in turn — checkpoints may share one backend whose LoRA
    is swapped between calls. ``chunk`` samples are drawn per model call (default :data:`EVAL_CHUNK`);
    each sample's values depend only on its own prompt and noise."""

    def __init__(self, extractor: FeatureExtractor, prompt_indices: Sequence[int], prompts: Sequence[str],
                 seeds: Sequence[int], previews: bool = False, chunk: int | None = None):
        self.extractor, self.previews, self.chunk = extractor, previews, chunk or EVAL_CHUNK
        self.prompt_indices, self.prompts, self.seeds = [int(i) for i in prompt_indices], list(prompts), list(seeds)
        n = len(self.seeds)
        self.batch_prompts = [p for p in self.prompts for _ in self.seeds]
        self.batch_seeds = [s for _ in self.prompts for s in self.seeds]
        self.noise_seeds = [noise_seed(p, s) for p, s in zip(self.batch_prompts, self.batch_seeds)]
        self.text = extractor.text_features(self.prompts).repeat_interleave(n, dim=0) if extractor.has_text else None
        self.graded = [gradeable(p) for p in self.prompts]
        self.reference: tuple[RenderOutput, Tensor] | None = None

    @torch.no_grad()
    def rows(self, name: str, pipeline: Pipeline, base: bool = False,
             on_generation: Callable[[Generation], None] | None = None) -> list[dict[str, Any]]:
        """One row per (prompt, seed) of ``pipeline``'s model (``base``: with the LoRA disabled);
        ``on_generation`` sees the samples themselves (renders, Gaussians) before they are dropped."""
        n = len(self.seeds)
        noise = pipeline.seeded_noise(self.batch_prompts, self.batch_seeds)
        g = pipeline.generate(self.batch_prompts, noise, base=base, chunk=self.chunk, keep_trajectory=False)
        if on_generation is not None:
            on_generation(g)
        render = g.renders
        render.rgb, render.alpha = render.rgb.float().cpu(), render.alpha.float().cpu()
        vf = view_features(self.extractor, render.rgb)
        feats = pool_views(vf)
        if self.reference is None:
            self.reference = (render, feats)
        base_render, base_feats = self.reference
        cols: dict[str, Any] = {"reward": g.rewards.float().cpu()}
        cols["similarity"] = prompt_similarity(vf, self.text) if self.text is not None else None
        cols.update(image_stats(render))
        cols.update({f"drift_{k}": v for k, v in drift(base_render, render).items()})
        cols["drift_feature"] = rms_distance(feats, base_feats)
        if n > 1:  # across each prompt's seeds
            cols["diversity"] = torch.cat([diversity(f, metric="rms").expand(n) for f in feats.split(n)])
            cols["diversity_latent"] = torch.cat([diversity(x).expand(n) for x in g.latents.float().cpu().split(n)])
        if any(self.graded):
            ok = torch.tensor(self.graded).repeat_interleave(n)
            kept = RenderOutput(render.rgb[ok], render.alpha[ok], render.depth[ok], render.normal[ok],
                                render.cameras)  # the classifiers read pixels only
            pf = prompt_following(kept, [p for p, k in zip(self.batch_prompts, ok.tolist()) if k])["per_sample"]
            colour, shape = torch.full((len(ok),), math.nan), torch.full((len(ok),), math.nan)
            colour[ok] = torch.tensor([float(p["color_ok"]) for p in pf])
            shape[ok] = torch.tensor([float(p["shape_ok"]) for p in pf])
            cols["color_ok"], cols["shape_ok"] = colour, shape
        rows: list[dict[str, Any]] = []
        for k, (index, prompt) in enumerate(zip(self.prompt_indices, self.prompts)):
            preview = view_strip_png(render.rgb[k * n]) if self.previews else None
            for j, seed in enumerate(self.seeds):
                i = k * n + j
                row: dict[str, Any] = {"checkpoint": name, "prompt_index": index, "prompt": prompt,
                                       "seed_index": j, "seed": int(seed), "noise_seed": self.noise_seeds[i]}
                for m in METRICS:
                    v = cols.get(m)
                    ungraded = m in ("color_ok", "shape_ok") and not self.graded[k]
                    row[m] = None if v is None or ungraded else float(v[i])
                row["features"] = feats[i].tolist()
                row["preview_png"] = preview if j == 0 else None
                rows.append(row)
        return rows


def row_schema(previews: bool = False):
    """The pyarrow schema of per-sample rows (fixed column order and types; ``preview_png`` optional)."""
    import pyarrow as pa

    fields = [("checkpoint", pa.string()), ("prompt_index", pa.int64()), ("prompt", pa.string()),
              ("seed_index", pa.int64()), ("seed", pa.int64()), ("noise_seed", pa.int64()),
              *[(m, pa.float64()) for m in METRICS], ("features", pa.list_(pa.float32()))]
    return pa.schema(fields + ([("preview_png", pa.binary())] if previews else []))


def sort_rows(rows: list[dict[str, Any]], checkpoints: Sequence[str], prompts: Sequence[str],
              seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Rows in (checkpoint, prompt, seed) order of the given lists; rows of others last, by prompt and seed."""
    corder = {n: i for i, n in enumerate(checkpoints)}
    porder = {p: i for i, p in enumerate(prompts)}
    sorder = {s: i for i, s in enumerate(seeds)}
    big = 1 << 30
    return sorted(rows, key=lambda r: (corder.get(r["checkpoint"], big), porder.get(r["prompt"], big),
                                       sorder.get(int(r["seed"]), big), r["prompt"], int(r["seed"])))


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




__all__ = ["EVAL_CHUNK", "METRICS", "Measurer", "gradeable", "previews_from_rows", "row_schema",
           "sort_rows", "view_strip_png"]
