"""Procedural samples: the public constructors (Gaussians with their prompt) and the torch Dataset.

Every random number of a sample is drawn here, in one ``[B, W]`` float64 uniform draw per call:
for the dataset first the description (:attr:`ProceduralShapes._NUM_CHOICES` columns), then the
geometry (the layout of :func:`r2d3.data.procedural.shapes._build`). Keep that order: the dataset is
deterministic by (split, seed, index), and trained weights and evaluation caches rely on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from r2d3.data.procedural.grammar import (
    NUM_TEMPLATES,
    SHAPE_ASPECTS,
    SIZES,
    ShapeAttributes,
    _second_colors,
    parse_prompt,
    split_combos,
)
from r2d3.data.procedural.shapes import _OPACITY_U, MAX_TILT_DEG, SHADING, TANGENT_SCALE, _build
from r2d3.render.gaussians import Gaussians


class ProceduralSample(NamedTuple):
    gaussians: Gaussians  # [1, N]
    prompt: str
    attributes: ShapeAttributes


class ProceduralBatch(NamedTuple):
    gaussians: Gaussians  # [B, N]
    prompts: list[str]
    attributes: list[ShapeAttributes]


def _check_options(num_gaussians: int, tangent_scale: float, shading: float) -> None:
    if tangent_scale <= 0 or not 0 <= shading <= 1:
        raise ValueError(f"need tangent_scale > 0 and shading in [0, 1], got {tangent_scale}, {shading}")
    if num_gaussians < 1:
        raise ValueError(f"num_gaussians must be >= 1, got {num_gaussians}")


def build_gaussians(
    attributes: Sequence[ShapeAttributes],
    num_gaussians: int = 512,
    generator: torch.Generator | None = None,
    yaw_deg: float | None = None,
    tilt_deg: float | None = None,
    max_tilt_deg: float = MAX_TILT_DEG,
    tangent_scale: float = TANGENT_SCALE,
    shading: float = SHADING,
) -> Gaussians:
    """Gaussians ``[len(attributes), num_gaussians]`` for the given descriptions, vectorised.

    The pose (yaw uniform in [0, 360), tilt uniform in [0, ``max_tilt_deg``] about a random
    horizontal axis), sampling shift and opacities are drawn from ``generator``; ``yaw_deg`` /
    ``tilt_deg`` fix them for every object (``yaw_deg=0, tilt_deg=0`` gives the upright object frame).
    ``tangent_scale`` and ``shading`` are explained at :data:`TANGENT_SCALE` and :data:`SHADING`
    (``shading=0`` gives the exact palette colours).
    """
    _check_options(num_gaussians, tangent_scale, shading)
    if not attributes:
        raise ValueError("build_gaussians needs at least one ShapeAttributes")
    u = torch.rand(len(attributes), _OPACITY_U + num_gaussians, generator=generator, dtype=torch.float64)
    return _build(attributes, u, max_tilt_deg, tangent_scale, shading, yaw_deg, tilt_deg)


def from_attributes(
    attributes: ShapeAttributes,
    num_gaussians: int = 512,
    generator: torch.Generator | None = None,
    template: int = 0,
    **options: float,
) -> ProceduralSample:
    """One object ``[1, N]`` with its prompt (in ``template``); ``options`` as in :func:`build_gaussians`."""
    gaussians = build_gaussians([attributes], num_gaussians, generator, **options)
    return ProceduralSample(gaussians, attributes.prompt(template), attributes)


def from_prompt(
    prompt: str, num_gaussians: int = 512, generator: torch.Generator | None = None, **options: float
) -> ProceduralSample:
    """One object for a grammar prompt (see :func:`parse_prompt`); the prompt is returned unchanged.
    ``options`` as in :func:`build_gaussians`."""
    sample = from_attributes(parse_prompt(prompt), num_gaussians, generator, **options)
    return sample._replace(prompt=prompt)


class ProceduralShapes(torch.utils.data.Dataset):
    """An on-the-fly dataset of ``length`` objects from one split, deterministic by ``seed``.

    ``dataset[i]`` is the same :class:`ProceduralSample` for the same (split, seed, i) on every
    machine; :meth:`batch` builds many indices at once (vectorised) and :meth:`sample` draws fresh
    random objects from a generator. Descriptions are drawn hierarchically: a (shape, color,
    pattern) combination of the split uniformly, then second colour, size, aspect and prompt
    template uniformly, so every shape and pattern is equally common.

    With a ``DataLoader`` use ``collate_fn=ProceduralShapes.collate``.
    """

    # per-object uniforms before the geometry ones: combo, second colour, size, aspect, template
    _NUM_CHOICES = 5

    def __init__(
        self,
        num_gaussians: int = 512,
        split: str = "train",
        seed: int = 0,
        length: int = 10_000,
        max_tilt_deg: float = MAX_TILT_DEG,
        tangent_scale: float = TANGENT_SCALE,
        shading: float = SHADING,
    ):
        _check_options(num_gaussians, tangent_scale, shading)
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.num_gaussians = num_gaussians
        self.split = split
        self.combos = split_combos(split)  # validates the split name
        self.seed = seed
        self.length = length
        self.max_tilt_deg = max_tilt_deg
        self.tangent_scale = tangent_scale
        self.shading = shading

    def __len__(self) -> int:
        return self.length

    @property
    def _width(self) -> int:
        """Uniforms per object: the description choices, then the geometry's."""
        return self._NUM_CHOICES + _OPACITY_U + self.num_gaussians

    def _choose(self, u: Tensor) -> tuple[ShapeAttributes, int]:
        def pick(options: Sequence, x: float):
            return options[min(int(x * len(options)), len(options) - 1)]

        x = u.tolist()
        shape, color, pattern = pick(self.combos, x[0])
        color2 = pick(_second_colors(color, pattern), x[1]) if pattern != "solid" else None
        size, aspect = pick(SIZES, x[2]), pick(SHAPE_ASPECTS[shape], x[3])
        attributes = ShapeAttributes(shape, color, pattern, color2, size, aspect)
        return attributes, pick(range(NUM_TEMPLATES), x[4])

    def _from_uniforms(self, u: Tensor) -> ProceduralBatch:
        chosen = [self._choose(row[: self._NUM_CHOICES]) for row in u]
        attributes = [a for a, _ in chosen]
        geometry_u = u[:, self._NUM_CHOICES :]
        gaussians = _build(attributes, geometry_u, self.max_tilt_deg, self.tangent_scale, self.shading)
        return ProceduralBatch(gaussians, [a.prompt(t) for a, t in chosen], attributes)

    def _index_uniforms(self, index: int) -> Tensor:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        digest = hashlib.sha256(f"{self.seed}|{self.split}|{index}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.rand(self._width, generator=generator, dtype=torch.float64)

    def __getitem__(self, index: int) -> ProceduralSample:
        index = index + self.length if index < 0 else index
        gaussians, prompts, attributes = self.batch([index])
        return ProceduralSample(gaussians, prompts[0], attributes[0])

    def batch(self, indices: Sequence[int]) -> ProceduralBatch:
        """``dataset[i]`` for every ``i`` in ``indices`` as one batch (``[len(indices), N]``), vectorised."""
        if len(indices) == 0:
            raise ValueError("batch needs at least one index")
        return self._from_uniforms(torch.stack([self._index_uniforms(int(i)) for i in indices]))

    def sample(self, n: int, generator: torch.Generator | None = None) -> ProceduralBatch:
        """``n`` fresh random objects of this split, not tied to indices; deterministic by ``generator``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return self._from_uniforms(torch.rand(n, self._width, generator=generator, dtype=torch.float64))

    def _options(self, options: dict[str, float]) -> dict[str, float]:
        """This dataset's geometry settings, overridden by ``options``."""
        own = {"max_tilt_deg": self.max_tilt_deg, "tangent_scale": self.tangent_scale, "shading": self.shading}
        return {**own, **options}

    def from_attributes(
        self, attributes: ShapeAttributes, generator: torch.Generator | None = None, template: int = 0,
        **options: float,
    ) -> ProceduralSample:
        """:func:`from_attributes` with this dataset's number of Gaussians and geometry settings."""
        return from_attributes(attributes, self.num_gaussians, generator, template, **self._options(options))

    def from_prompt(self, prompt: str, generator: torch.Generator | None = None, **options: float) -> ProceduralSample:
        """:func:`from_prompt` with this dataset's number of Gaussians and geometry settings."""
        return from_prompt(prompt, self.num_gaussians, generator, **self._options(options))

    @staticmethod
    def collate(samples: Sequence[ProceduralSample]) -> ProceduralBatch:
        """Stack samples (e.g. from a ``DataLoader``) into one batch."""
        gaussians = Gaussians.cat([s.gaussians for s in samples])
        return ProceduralBatch(gaussians, [s.prompt for s in samples], [s.attributes for s in samples])
