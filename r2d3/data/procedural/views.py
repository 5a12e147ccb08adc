"""Rendered views of procedural objects: the labelled images that train and test the learned judges.

Both learned models trained in this repo (the ``clip_tiny`` reward and the silhouette shape
classifier) learn from, and are measured on, renders of :mod:`r2d3.data.procedural` objects from
random orbit cameras. Rendering is the expensive part on CPU (tens of milliseconds per 64x64 view),
so a set is rendered once, kept in memory as :class:`RenderedViews` (uint8 RGB, float alpha/depth),
and every epoch re-reads it.

Cameras (the reward cameras of the alignment loop, widened): per object ``num_views`` views evenly
spaced in azimuth with one random offset in [0, 360), elevation uniform in
[``elevation_deg`` − ``elevation_jitter_deg``, ``elevation_deg`` + ``elevation_jitter_deg``]
(10–30° by default), distance 2.5, vertical FoV 40°, white background.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from safetensors.torch import save
from torch import Tensor

from r2d3.data.procedural.dataset import ProceduralShapes
from r2d3.data.procedural.grammar import ShapeAttributes
from r2d3.render import jittered_orbit_cameras, render_gaussians
from r2d3.storage import atomic_write_bytes


@dataclass
class RenderedViews:
    """``V`` views of ``M`` objects: ``rgb`` uint8 ``[M, V, 3, S, S]``, ``alpha`` and ``depth`` float16
    ``[M, V, 1, S, S]``, and per object its ``attributes`` and dataset ``prompts``."""

    rgb: Tensor
    alpha: Tensor
    depth: Tensor
    attributes: list[ShapeAttributes]
    prompts: list[str]
    seconds: float = 0.0

    def __len__(self) -> int:
        return self.rgb.shape[0]

    @property
    def num_views(self) -> int:
        return self.rgb.shape[1]

    def rgb_float(self, index: Tensor | slice | None = None) -> Tensor:
        rgb = self.rgb if index is None else self.rgb[index]
        return rgb.float() / 255.0

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self) * self.num_views // batch_size)

    def single_view_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """One epoch of shuffled single views, ``(object, view, flip)`` index tensors per minibatch, where
        ``flip`` marks the items to mirror horizontally: both judges train on single views this way, and
        drawing the permutation and the flips here (lazily, one step at a time) keeps their seeded runs
        reproducible."""
        order = torch.randperm(len(self) * self.num_views)
        for s in range(self.steps_per_epoch(batch_size)):
            items = order[s * batch_size : (s + 1) * batch_size]
            yield items // self.num_views, items % self.num_views, torch.rand(len(items)) < 0.5

    @staticmethod
    def mirror(images: Tensor, flip: Tensor) -> Tensor:
        """``images`` ``[B, C, H, W]`` with the rows marked in ``flip`` ``[B]`` mirrored horizontally."""
        return torch.where(flip[:, None, None, None], images.flip(-1), images)

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file (tensors, labels in its JSON metadata), written atomically: a cache that
        loads without unpickling, so a file planted in the cache directory cannot run code."""
        meta = {"attributes": json.dumps([dataclasses.asdict(a) for a in self.attributes]),
                "prompts": json.dumps(self.prompts), "seconds": repr(float(self.seconds))}
        tensors = {k: getattr(self, k).contiguous() for k in ("rgb", "alpha", "depth")}
        atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RenderedViews":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("rgb", "alpha", "depth")}
        return cls(**tensors, attributes=[ShapeAttributes(**a) for a in json.loads(meta["attributes"])],
                   prompts=json.loads(meta["prompts"]), seconds=float(meta.get("seconds", 0.0)))


def render_procedural_views(
    split: str,
    num_objects: int,
    num_views: int = 3,
    seed: int = 0,
    size: int = 64,
    num_gaussians: int = 256,
    elevation_deg: float = 20.0,
    elevation_jitter_deg: float = 10.0,
    distance: float = 2.5,
    fov_deg: float = 40.0,
    batch_size: int = 64,
    progress: Callable[[int, int, float], None] | None = None,
) -> RenderedViews:
    """Render ``num_objects`` objects of ``split`` (``ProceduralShapes(split, seed)`` indices 0..M−1),
    ``num_views`` views each at ``size``x``size``; deterministic given the arguments.

    ``progress(done, total, seconds)`` is called after each batch (e.g. to print a line).
    """
    if num_objects < 1 or num_views < 1:
        raise ValueError(f"need at least one object and one view, got {num_objects} and {num_views}")
    dataset = ProceduralShapes(num_gaussians=num_gaussians, split=split, seed=seed, length=num_objects)
    generator = torch.Generator().manual_seed(seed)
    rgb, alpha, depth, attributes, prompts = [], [], [], [], []
    start = time.perf_counter()
    for lo in range(0, num_objects, batch_size):
        batch = dataset.batch(range(lo, min(lo + batch_size, num_objects)))
        cameras = jittered_orbit_cameras(
            num_views, len(batch.prompts), generator=generator, elevation_deg=elevation_deg,
            elevation_jitter_deg=elevation_jitter_deg, azimuth_jitter_deg=180.0, distance=distance,
            fov_deg=fov_deg, width=size, height=size,
        )  # fmt: skip
        with torch.no_grad():
            out = render_gaussians(batch.gaussians, cameras)
        rgb.append((out.rgb.clamp(0, 1) * 255).round().to(torch.uint8))
        alpha.append(out.alpha.to(torch.float16))
        depth.append(out.depth.to(torch.float16))
        attributes += batch.attributes
        prompts += batch.prompts
        if progress is not None:
            progress(len(prompts), num_objects, time.perf_counter() - start)
    return RenderedViews(
        torch.cat(rgb), torch.cat(alpha), torch.cat(depth), attributes, prompts, time.perf_counter() - start
    )
