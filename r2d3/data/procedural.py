"""A procedural text-to-3D dataset: coloured primitives as surface Gaussian splats, with prompts.

The embedded default model is pretrained on this data, and evaluation uses its structured
attributes as labels, so three things matter more than realism:

- **A closed, deterministic grammar.** Every object is described by a :class:`ShapeAttributes`
  (shape, colour, pattern, second colour, size, aspect) and its prompt is a pure function of the
  attributes and a template index; :func:`parse_prompt` inverts it. A fixed set of
  (shape, colour, pattern) combinations is held out (:data:`HELDOUT_COMBOS`, about 12.5 %) so
  prompt-following can be measured on compositions never seen in training; every shape/colour,
  shape/pattern and colour/pattern pair of a held-out combination still occurs in training.
- **Clean targets.** Each asset has exactly ``num_gaussians`` Gaussians spread uniformly by area
  over the analytic surface (a scrambled Sobol sequence, randomly shifted per object, so faces and
  caps are covered without clumps), each a flat disc tangent to the surface: its shortest axis
  (``scales[..., 2]``, third column of its rotation) is the outward unit normal, the tangential
  standard deviation is ``tangent_scale * sqrt(area / N)`` (narrowed towards sharp edges so cubes
  stay crisp) and the normal one a tenth of that. Opacities are in [0.9, 1.0). Colours are the
  palette colours with a mild baked shading (:data:`SHADING`) so flat-shaded renders still read as 3D.
- **Speed.** Generation is vectorised over objects of the same shape; ten thousand 512-Gaussian
  objects take a few seconds on a laptop CPU, so nothing is stored on disk.

Geometry conventions follow :mod:`r2d3.render.gaussians`: y up, objects centred at the origin and
inside ``[-HALF_EXTENT, HALF_EXTENT]^3`` for any yaw and tilts up to :data:`MAX_TILT_DEG`. Objects
stand upright (random rotation about y, then a small tilt) so "tall" stays meaningful; the torus
stands on its rim (ring in a vertical plane) because a lying ring seen from the usual 15-20 degree
camera elevation hides its hole. White is only used for stripes: a white body would vanish on the
white render background.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor

from r2d3.render.gaussians import Gaussians

# ---------------------------------------------------------------------------------------------
# vocabulary (module constants: evaluation code uses them as class labels)

SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus", "capsule", "pyramid")

COLORS: dict[str, tuple[float, float, float]] = {
    # Chosen to be separable by hue or brightness on a white background (linear RGB in [0, 1]).
    "red": (0.86, 0.10, 0.10),
    "orange": (1.00, 0.50, 0.00),
    "yellow": (0.95, 0.82, 0.05),
    "green": (0.10, 0.62, 0.18),
    "blue": (0.10, 0.28, 0.92),
    "purple": (0.52, 0.18, 0.78),
    "pink": (1.00, 0.45, 0.72),
    "brown": (0.48, 0.28, 0.10),
    "black": (0.06, 0.06, 0.06),
    "white": (0.97, 0.97, 0.97),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
PRIMARY_COLORS: tuple[str, ...] = tuple(c for c in COLORS if c != "white")
"""Colours an object's body may have (everything but white, which is for stripes only)."""

PATTERNS: tuple[str, ...] = ("solid", "two-tone", "striped")
"""``two-tone``: the first colour on one half (top, or +x for wide/flat objects), the second on the
other; ``striped``: bands of the second colour across the longest axis (around the ring for a torus)."""

SIZES: tuple[str, ...] = ("small", "medium", "large")
"""``medium`` is the unmarked default: its prompts carry no size word."""
SIZE_SCALES: dict[str, float] = {"small": 0.55, "medium": 0.78, "large": 1.0}

ASPECTS: tuple[str, ...] = ("regular", "tall", "wide", "flat")
"""``regular`` is the unmarked default: its prompts carry no aspect word."""
_UNMARKED = frozenset({"medium", "regular"})  # default size and aspect: never written in a prompt

# Shape parameters per aspect, as ratios; shape_dimensions() scales them to fit the box. Meaning:
# sphere (radius,), cube (half-extent x, y, z), cylinder/cone/capsule (radius, half-height of the
# body along y), torus (ring radius, tube radius), pyramid (half-side of the square base, half-height).
_RATIOS: dict[str, dict[str, tuple[float, ...]]] = {
    "sphere": {"regular": (1.0,)},
    "cube": {
        "regular": (1.0, 1.0, 1.0),
        "tall": (1.0, 2.2, 1.0),
        "wide": (2.2, 1.0, 1.0),
        "flat": (1.0, 0.25, 1.0),
    },
    "cylinder": {"regular": (1.0, 1.0), "tall": (1.0, 2.5), "wide": (2.0, 1.0), "flat": (1.0, 0.15)},
    "cone": {"regular": (1.0, 1.0), "tall": (1.0, 2.2), "wide": (2.0, 0.8)},
    "torus": {"regular": (1.0, 0.4)},
    "capsule": {"regular": (1.0, 1.0)},
    "pyramid": {"regular": (1.0, 0.8), "tall": (1.0, 2.0), "flat": (1.0, 0.35)},
}
SHAPE_ASPECTS: dict[str, tuple[str, ...]] = {s: tuple(a for a in ASPECTS if a in _RATIOS[s]) for s in SHAPES}

HALF_EXTENT = 0.6
"""Large objects just fit inside ``[-HALF_EXTENT, HALF_EXTENT]^3``."""
MAX_TILT_DEG = 10.0
"""Default largest tilt away from upright; the fit inside the box is guaranteed up to this tilt."""
TANGENT_SCALE = 0.6
"""Tangential standard deviation of a Gaussian in units of the mean spacing ``sqrt(area / N)``."""
NORMAL_SCALE_RATIO = 0.1
"""Standard deviation along the normal relative to the tangential one (flat discs)."""
SHADING = 0.35
"""Strength of the lighting baked into colours: ``color * (1 - SHADING + SHADING * (0.5 + 0.5 n.l))`` for a
fixed world light :data:`LIGHT_DIRECTION`. Splat colours are view-independent and the renderer does no
lighting, so without it a cube renders as a flat hexagon and a sphere as a disc; the factor only
scales brightness, so the hue (the colour label) is unchanged."""
LIGHT_DIRECTION = (0.36, 0.80, 0.48)
"""Unit vector towards the baked light: above, in front (+z) and to the right (+x)."""
EDGE_SCALE_RATIO = 0.5
"""Near a sharp edge a splat's standard deviation towards it is at most this times the distance, ..."""
EDGE_MIN_SCALE = 0.3
"""... but at least this times the tangential one, so edges stay covered."""
NUM_STRIPE_BANDS = 7  # alternating body/stripe bands along the axis: 3 stripes
NUM_TORUS_STRIPE_SEGMENTS = 8  # alternating segments around a ring: 4 stripes
NUM_TEMPLATES = 2
HELDOUT_FRACTION = 0.125
SPLITS: tuple[str, ...] = ("train", "heldout", "all")

_SHAPE_SYNONYMS = {"ball": "sphere", "box": "cube", "donut": "torus", "ring": "torus"}
_FILLER_WORDS = {"a", "an", "and"}


class PromptParseError(ValueError):
    """A prompt outside the procedural grammar (names the prompt and the offending word)."""


# ---------------------------------------------------------------------------------------------
# attributes, prompts and splits


@dataclass(frozen=True)
class ShapeAttributes:
    """What an object is, independent of its pose and sampling: the labels evaluation scores against.

    ``color2`` is the second colour of ``two-tone`` objects and the stripe colour of ``striped`` ones
    (``None`` for ``solid``). Invalid combinations raise ``ValueError`` naming the field.
    """

    shape: str
    color: str
    pattern: str = "solid"
    color2: str | None = None
    size: str = "medium"
    aspect: str = "regular"

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in PRIMARY_COLORS:
            extra = " (white is only used for stripes)" if self.color == "white" else ""
            raise ValueError(f"unknown body color {self.color!r}{extra}; expected one of {PRIMARY_COLORS}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; expected one of {PATTERNS}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        if self.aspect not in SHAPE_ASPECTS[self.shape]:
            raise ValueError(f"aspect {self.aspect!r} is not defined for a {self.shape}; expected one of "
                             f"{SHAPE_ASPECTS[self.shape]}")
        if self.pattern == "solid":
            if self.color2 is not None:
                raise ValueError(f"a solid object has no second color, got color2={self.color2!r}")
            return
        allowed = _second_colors(self.color, self.pattern)
        if self.color2 not in allowed:
            raise ValueError(f"color2 {self.color2!r} is not valid for a {self.pattern} {self.color} object; "
                             f"expected one of {allowed}")

    @property
    def combo(self) -> tuple[str, str, str]:
        """The (shape, color, pattern) key that decides the train/held-out split."""
        return (self.shape, self.color, self.pattern)

    @property
    def split(self) -> str:
        """``"heldout"`` or ``"train"``."""
        return "heldout" if self.combo in HELDOUT_COMBOS else "train"

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    def prompt(self, template: int = 0) -> str:
        """The prompt for these attributes; ``template`` picks the phrasing (0 .. NUM_TEMPLATES - 1).

        Template 0: ``"a small tall blue cylinder with white stripes"``, ``"a red and yellow cube"``.
        Template 1: ``"small tall cylinder, blue with white stripes"``, ``"cube, red and yellow"``.
        """
        modifiers = [w for w in (self.size, self.aspect) if w not in _UNMARKED]
        colors = [self.color] if self.pattern != "two-tone" else [self.color, "and", self.color2]
        stripes = ["with", self.color2, "stripes"] if self.pattern == "striped" else []
        if template == 0:
            words = [*modifiers, *colors, self.shape, *stripes]
            article = "an" if words[0][0] in "aeiou" else "a"
            return " ".join([article, *words])
        if template == 1:
            return " ".join([*modifiers, self.shape]) + ", " + " ".join([*colors, *stripes])
        raise ValueError(f"template must be in [0, {NUM_TEMPLATES}), got {template}")


@lru_cache(maxsize=None)
def _second_colors(color: str, pattern: str) -> tuple[str, ...]:
    if pattern == "two-tone":
        return tuple(c for c in PRIMARY_COLORS if c != color)
    if pattern == "striped":
        return tuple(c for c in COLOR_NAMES if c != color)
    return ()


VOCABULARY: tuple[str, ...] = tuple(
    sorted({"a", "an", "and", "with", "stripes", *SHAPES, *COLOR_NAMES, *SIZES, *ASPECTS} - _UNMARKED)
)
"""Every word the grammar produces (for a learned-vocabulary text encoder); prompts also contain commas."""


def _combo_key(combo: tuple[str, str, str]) -> str:
    return hashlib.sha256("|".join(combo).encode()).hexdigest()


def _choose_heldout_combos() -> frozenset[tuple[str, str, str]]:
    """Hold out ~HELDOUT_FRACTION of (shape, color, pattern) combos, in a fixed pseudo-random order,
    skipping any whose removal would leave one of its pairs with fewer than two training combos, so
    each held-out prompt is a new *composition* of parts the model has seen together before."""
    combos = list(itertools.product(SHAPES, PRIMARY_COLORS, PATTERNS))
    target = round(HELDOUT_FRACTION * len(combos))
    pairs = Counter()
    for s, c, p in combos:
        pairs.update([("sc", s, c), ("sp", s, p), ("cp", c, p)])
    held: set[tuple[str, str, str]] = set()
    for s, c, p in sorted(combos, key=_combo_key):
        if len(held) == target:
            break
        keys = [("sc", s, c), ("sp", s, p), ("cp", c, p)]
        if all(pairs[k] > 2 for k in keys):
            held.add((s, c, p))
            pairs.subtract(keys)
    return frozenset(held)


HELDOUT_COMBOS: frozenset[tuple[str, str, str]] = _choose_heldout_combos()
"""The (shape, color, pattern) combinations of the held-out split."""


def split_combos(split: str) -> list[tuple[str, str, str]]:
    """The (shape, color, pattern) combinations of ``split`` (train, heldout or all), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    combos = itertools.product(SHAPES, PRIMARY_COLORS, PATTERNS)
    return [c for c in combos if split == "all" or (c in HELDOUT_COMBOS) == (split == "heldout")]


def split_attributes(split: str) -> list[ShapeAttributes]:
    """Every distinct object description of ``split`` (all second colours, sizes and aspects)."""
    out = []
    for shape, color, pattern in split_combos(split):
        for color2 in _second_colors(color, pattern) or (None,):
            for size in SIZES:
                for aspect in SHAPE_ASPECTS[shape]:
                    out.append(ShapeAttributes(shape, color, pattern, color2, size, aspect))
    return out


def split_prompts(split: str, templates: Sequence[int] | None = None) -> list[str]:
    """Every prompt of ``split`` in every template (or only ``templates``), in a fixed order."""
    templates = range(NUM_TEMPLATES) if templates is None else templates
    return [a.prompt(t) for a in split_attributes(split) for t in templates]


def parse_prompt(prompt: str) -> ShapeAttributes:
    """The attributes a grammar prompt describes (the inverse of :meth:`ShapeAttributes.prompt`).

    Case, commas and word order are free; ``ball``/``box``/``donut``/``ring`` are accepted for
    sphere/cube/torus. Raises :class:`PromptParseError` naming the prompt for anything else.
    """
    tokens = re.findall(r"[a-z]+", prompt.lower())
    color2 = None
    if "stripes" in tokens:
        i = tokens.index("stripes")
        if i < 2 or tokens[i - 2] != "with" or tokens[i - 1] not in COLORS:
            raise PromptParseError(f"cannot parse {prompt!r}: stripes must be written 'with <color> stripes'")
        color2 = tokens[i - 1]
        tokens = tokens[: i - 2] + tokens[i + 1 :]
    shapes, sizes, aspects, colors = [], [], [], []
    for word in tokens:
        if word in _FILLER_WORDS:
            continue
        if word in SHAPES or word in _SHAPE_SYNONYMS:
            shapes.append(_SHAPE_SYNONYMS.get(word, word))
        elif word in SIZES:
            sizes.append(word)
        elif word in ASPECTS:
            aspects.append(word)
        elif word in COLORS:
            colors.append(word)
        else:
            raise PromptParseError(f"cannot parse {prompt!r}: unknown word {word!r}")
    if len(shapes) != 1:
        found = shapes or "none"
        raise PromptParseError(f"cannot parse {prompt!r}: expected exactly one shape word, found {found}")
    if len(sizes) > 1 or len(aspects) > 1:
        raise PromptParseError(f"cannot parse {prompt!r}: more than one size or aspect word")
    if color2 is not None:
        if len(colors) != 1:
            raise PromptParseError(f"cannot parse {prompt!r}: a striped object needs exactly one body color")
        pattern = "striped"
    elif len(colors) == 1:
        pattern = "solid"
    elif len(colors) == 2:
        pattern, color2 = "two-tone", colors[1]
    else:
        found = colors or "none"
        raise PromptParseError(f"cannot parse {prompt!r}: expected one or two colors, found {found}")
    try:
        return ShapeAttributes(
            shape=shapes[0], color=colors[0], pattern=pattern, color2=color2,
            size=sizes[0] if sizes else "medium", aspect=aspects[0] if aspects else "regular",
        )  # fmt: skip
    except ValueError as e:
        raise PromptParseError(f"cannot parse {prompt!r}: {e}") from e


# ---------------------------------------------------------------------------------------------
# geometry


def _support(eta: float, rho: float, lo: float, hi: float) -> float:
    """max of eta * x + rho * sqrt(1 - x^2) over x in [lo, hi] (support of a cylinder along a direction
    whose cosine with the cylinder axis lies in [lo, hi])."""
    x = min(max(eta / math.hypot(eta, rho), lo), hi)
    return eta * x + rho * math.sqrt(max(0.0, 1.0 - x * x))


def _bounding_cylinder(shape: str, dims: tuple[float, ...]) -> tuple[float, float]:
    """(radius, half-height) of a y-axis cylinder around the origin containing the shape."""
    if shape == "sphere":
        return dims[0], dims[0]
    if shape == "cube":
        return math.hypot(dims[0], dims[2]), dims[1]
    if shape in ("cylinder", "cone"):
        return dims[0], dims[1]
    if shape == "torus":
        return dims[0] + dims[1], dims[0] + dims[1]
    if shape == "capsule":
        return dims[0], dims[1] + dims[0]
    return math.sqrt(2.0) * dims[0], dims[1]  # pyramid


def _half_extents_xy(shape: str, dims: tuple[float, ...]) -> tuple[float, float]:
    """Half-extents of the upright shape along x and y (for placing two-tone halves and stripes)."""
    if shape == "cube":
        return dims[0], dims[1]
    rho, eta = _bounding_cylinder(shape, dims)
    return (dims[0] if shape == "pyramid" else rho), eta


def shape_dimensions(shape: str, aspect: str = "regular", size: str = "medium") -> tuple[float, ...]:
    """The shape's parameters (meaning per shape in :data:`_RATIOS`'s comment) in world units.

    Scaled so a ``large`` object at any yaw and tilt up to :data:`MAX_TILT_DEG` just fits inside
    ``[-HALF_EXTENT, HALF_EXTENT]^3``; ``medium`` and ``small`` are :data:`SIZE_SCALES` of that.
    """
    ShapeAttributes(shape, PRIMARY_COLORS[0], size=size, aspect=aspect)  # validates the names
    ratios = _RATIOS[shape][aspect]
    if shape == "sphere":
        extent = ratios[0]
    else:
        rho, eta = _bounding_cylinder(shape, ratios)
        tilt = math.radians(MAX_TILT_DEG)
        horizontal = _support(eta, rho, 0.0, math.sin(tilt))
        vertical = _support(eta, rho, math.cos(tilt), 1.0)
        extent = max(horizontal, vertical)
    scale = HALF_EXTENT * SIZE_SCALES[size] / extent
    return tuple(r * scale for r in ratios)


class SurfaceSample(NamedTuple):
    """Points on an upright shape (object frame) and what is needed to shape a splat around each.

    ``edge_dir`` is the unit in-surface direction towards the nearest sharp edge (a face border, a
    cap rim, a cone apex) and ``edge_dist`` the distance to it; smooth surfaces have no edges
    (``edge_dist = inf``, ``edge_dir = 0``). Splats are narrowed along ``edge_dir`` near edges so
    they do not stick out past them (otherwise cubes and cylinders render with furry borders).
    """

    points: Tensor  # [G, N, 3]
    normals: Tensor  # [G, N, 3] outward, unit
    areas: Tensor  # [G] total surface area
    edge_dir: Tensor  # [G, N, 3]
    edge_dist: Tensor  # [G, N]


def _gather(per_face: Tensor, idx: Tensor) -> Tensor:
    """``per_face`` ``[G, F, C]`` indexed by ``idx`` ``[G, N]`` -> ``[G, N, C]``."""
    return torch.gather(per_face, 1, idx[..., None].expand(*idx.shape, per_face.shape[-1]))


def _pick_face(areas: Tensor, u: Tensor) -> Tensor:
    """Face index per point ``[G, N]``, chosen with probability proportional to ``areas`` ``[G, F]``."""
    cdf = areas.cumsum(-1) / areas.sum(-1, keepdim=True)
    return torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=areas.shape[-1] - 1)


def _xyz(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    return torch.stack(torch.broadcast_tensors(x, y, z), dim=-1)


def _smooth(points: Tensor, normals: Tensor, areas: Tensor) -> SurfaceSample:
    inf = torch.full(points.shape[:-1], math.inf, dtype=points.dtype)
    return SurfaceSample(points, normals, areas, torch.zeros_like(points), inf)


def _sample_sphere(d: Tensor, u: Tensor) -> SurfaceSample:
    r = d[:, 0:1]
    y = 1 - 2 * u[..., 1]  # uniform height is area-uniform on a sphere (Archimedes)
    theta = 2 * math.pi * u[..., 2]
    rho = (1 - y * y).clamp(min=0).sqrt()
    normals = _xyz(rho * theta.cos(), y, rho * theta.sin())
    return _smooth(r[..., None] * normals, normals, 4 * math.pi * r[:, 0] ** 2)


def _sample_cube(d: Tensor, u: Tensor) -> SurfaceSample:
    face_area = 4 * torch.stack([d[:, 1] * d[:, 2], d[:, 0] * d[:, 2], d[:, 0] * d[:, 1]], -1)  # per axis
    idx = _pick_face(face_area.repeat_interleave(2, dim=-1), u[..., 0])  # faces +x -x +y -y +z -z
    axis, sign = idx // 2, 1.0 - 2.0 * (idx % 2).to(u.dtype)
    axis1, axis2 = (axis + 1) % 3, (axis + 2) % 3
    a1, a2 = 2 * u[..., 1] - 1, 2 * u[..., 2] - 1  # in-face coordinates in [-1, 1]
    unit = torch.zeros_like(u)
    unit.scatter_(-1, axis[..., None], sign[..., None])
    unit.scatter_(-1, axis1[..., None], a1[..., None])
    unit.scatter_(-1, axis2[..., None], a2[..., None])
    extents = d[:, None, :].expand_as(u)
    e1, e2 = extents.gather(-1, axis1[..., None])[..., 0], extents.gather(-1, axis2[..., None])[..., 0]
    dist1, dist2 = e1 * (1 - a1.abs()), e2 * (1 - a2.abs())
    first = dist1 <= dist2
    edge_axis = torch.where(first, axis1, axis2)
    edge_sign = torch.where(first, a1, a2).sign()
    edge_dir = torch.zeros_like(u).scatter_(-1, edge_axis[..., None], edge_sign[..., None])
    normals = torch.zeros_like(u).scatter_(-1, axis[..., None], sign[..., None])
    edge_dist = torch.minimum(dist1, dist2)
    return SurfaceSample(unit * extents, normals, 2 * face_area.sum(-1), edge_dir, edge_dist)


def _sample_cylinder(d: Tensor, u: Tensor) -> SurfaceSample:
    r, h = d[:, 0:1], d[:, 1:2]
    areas = torch.cat([2 * math.pi * r * 2 * h, math.pi * r * r, math.pi * r * r], -1)  # side, top, bottom
    idx = _pick_face(areas, u[..., 0])
    side = idx == 0
    theta = 2 * math.pi * u[..., 1]
    c, s, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    # side: (theta, height); caps: (theta, area-uniform radius)
    y_side = (2 * u[..., 2] - 1) * h
    rho = r * u[..., 2].sqrt()
    cap_sign = torch.where(idx == 1, 1.0, -1.0).to(u.dtype)
    radius = torch.where(side, r.expand_as(rho), rho)
    y = torch.where(side, y_side, cap_sign * h)
    points = _xyz(radius * c, y, radius * s)
    normals = torch.where(side[..., None], _xyz(c, zero, s), _xyz(zero, cap_sign, zero))
    edge_dir = torch.where(side[..., None], _xyz(zero, y_side.sign(), zero), _xyz(c, zero, s))
    edge_dist = torch.where(side, h - y_side.abs(), r - rho)
    return SurfaceSample(points, normals, areas.sum(-1), edge_dir, edge_dist)


def _sample_cone(d: Tensor, u: Tensor) -> SurfaceSample:
    r, h = d[:, 0:1], d[:, 1:2]  # apex at +h, base at -h
    slant = (r * r + 4 * h * h).sqrt()
    areas = torch.cat([math.pi * r * slant, math.pi * r * r], -1)  # lateral, base
    idx = _pick_face(areas, u[..., 0])
    lateral = idx == 0
    theta = 2 * math.pi * u[..., 1]
    c, s, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    # lateral: fraction t of the way from apex to rim (sqrt: circumference grows linearly); base: radius
    t = u[..., 2].sqrt()
    rho = r * t  # the same map is area-uniform on the lateral surface (as a radius) and on the base
    y = torch.where(lateral, h - 2 * h * t, -h.expand_as(t))
    points = _xyz(rho * c, y, rho * s)
    lateral_n = _xyz(2 * h * c, r.expand_as(c), 2 * h * s) / slant[..., None]
    normals = torch.where(lateral[..., None], lateral_n, _xyz(zero, -torch.ones_like(c), zero))
    down_slant = _xyz(r * c, -2 * h.expand_as(c), r * s) / slant[..., None]  # apex -> rim, unit
    near_apex = t < 0.5
    lateral_dir = torch.where(near_apex[..., None], -down_slant, down_slant)
    lateral_dist = torch.where(near_apex, t, 1 - t) * slant
    edge_dir = torch.where(lateral[..., None], lateral_dir, _xyz(c, zero, s))
    edge_dist = torch.where(lateral, lateral_dist, r - rho)
    return SurfaceSample(points, normals, areas.sum(-1), edge_dir, edge_dist)


def _sample_torus(d: Tensor, u: Tensor) -> SurfaceSample:
    big, small = d[:, 0:1], d[:, 1:2]  # ring radius, tube radius; the ring stands upright in the xy plane
    # Area density along the tube angle phi is proportional to (R + r cos phi): invert its CDF
    # R phi + r sin phi = 2 pi R u by Newton's method (monotone, derivative >= R - r > 0).
    # Starting from the first-order inverse, four steps reach float64 round-off for r / R <= 0.5.
    uniform = 2 * math.pi * u[..., 2]
    target = big * uniform
    phi = uniform - (small / big) * uniform.sin()
    for _ in range(4):
        phi = phi - (big * phi + small * phi.sin() - target) / (big + small * phi.cos())
    theta = 2 * math.pi * u[..., 1]
    c, s = theta.cos(), theta.sin()
    cp, sp = phi.cos(), phi.sin()
    ring = big + small * cp
    points = _xyz(ring * c, ring * s, small * sp)
    normals = _xyz(cp * c, cp * s, sp)
    return _smooth(points, normals, 4 * math.pi**2 * big[:, 0] * small[:, 0])


def _sample_capsule(d: Tensor, u: Tensor) -> SurfaceSample:
    r, h = d[:, 0:1], d[:, 1:2]  # a cylinder of half-height h with hemispherical caps of radius r
    areas = torch.cat([2 * math.pi * r * 2 * h, 2 * math.pi * r * r, 2 * math.pi * r * r], -1)
    idx = _pick_face(areas, u[..., 0])
    side = idx == 0
    theta = 2 * math.pi * u[..., 1]
    c, s = theta.cos(), theta.sin()
    sign = torch.where(idx == 1, 1.0, -1.0).to(u.dtype)
    height = u[..., 2]  # uniform in height: area-uniform on the hemisphere too
    rho = torch.where(side, torch.ones_like(height), (1 - height * height).clamp(min=0).sqrt())
    ny = torch.where(side, torch.zeros_like(height), sign * height)
    normals = _xyz(rho * c, ny, rho * s)
    centre_y = torch.where(side, (2 * height - 1) * h, sign * h)
    points = r[..., None] * normals + _xyz(torch.zeros_like(c), centre_y, torch.zeros_like(c))
    return _smooth(points, normals, areas.sum(-1))


def _sample_pyramid(d: Tensor, u: Tensor) -> SurfaceSample:
    a, h = d[:, 0], d[:, 1]  # square base of half-side a at y = -h, apex at y = +h
    zero = torch.zeros_like(a)
    apex = torch.stack([zero, h, zero], -1)
    corners = [torch.stack([sx * a, -h, sz * a], -1) for sx, sz in ((1, 1), (1, -1), (-1, -1), (-1, 1))]
    triangles = [(apex, corners[i], corners[(i + 1) % 4]) for i in range(4)]
    triangles += [(corners[0], corners[1], corners[2]), (corners[0], corners[2], corners[3])]  # the base
    verts = torch.stack([torch.stack(t, 1) for t in triangles], 1)  # [G, 6 faces, 3 vertices, 3]
    cross = torch.linalg.cross(verts[:, :, 1] - verts[:, :, 0], verts[:, :, 2] - verts[:, :, 0])
    areas = cross.norm(dim=-1) / 2
    face_normals = torch.nn.functional.normalize(cross, dim=-1)
    # The origin is inside this convex solid: flip normals that point towards it.
    face_normals = face_normals * torch.sign((face_normals * verts.mean(2)).sum(-1, keepdim=True))
    # In-plane outward normals of each triangle's edges (v_i -> v_{i+1}); the base's diagonal is no
    # edge of the solid, so its distance is infinite.
    starts, ends = verts, verts.roll(-1, dims=2)
    edge_out = torch.linalg.cross(ends - starts, face_normals[:, :, None].expand_as(starts))
    edge_out = torch.nn.functional.normalize(edge_out, dim=-1)
    inward = ((verts.mean(2, keepdim=True) - starts) * edge_out).sum(-1, keepdim=True) > 0
    edge_out = torch.where(inward, -edge_out, edge_out)
    idx = _pick_face(areas, u[..., 0])
    v = _gather(verts.flatten(2), idx).unflatten(-1, (3, 3))  # [G, N, 3 vertices, 3]
    s = u[..., 1:2].sqrt()  # area-uniform barycentric coordinates
    w = u[..., 2:3]
    points = (1 - s) * v[..., 0, :] + s * (1 - w) * v[..., 1, :] + s * w * v[..., 2, :]
    out = _gather(edge_out.flatten(2), idx).unflatten(-1, (3, 3))  # [G, N, 3 edges, 3]
    dist = ((v - points[..., None, :]) * out).sum(-1)  # distance to each edge line, >= 0 inside
    diagonal = torch.tensor([[False, False, False]] * 4 + [[False, False, True], [True, False, False]])
    dist = torch.where(diagonal[idx], math.inf, dist)
    nearest = dist.argmin(-1, keepdim=True)
    edge_dir = out.gather(-2, nearest[..., None].expand(*nearest.shape, 3))[..., 0, :]
    edge_dist = dist.gather(-1, nearest)[..., 0]
    return SurfaceSample(points, _gather(face_normals, idx), areas.sum(-1), edge_dir, edge_dist)


_SAMPLERS = {
    "sphere": _sample_sphere,
    "cube": _sample_cube,
    "cylinder": _sample_cylinder,
    "cone": _sample_cone,
    "torus": _sample_torus,
    "capsule": _sample_capsule,
    "pyramid": _sample_pyramid,
}


def sample_surface(
    shape: str,
    dims: Tensor,
    num_points: int,
    generator: torch.Generator | None = None,
    shift: Tensor | None = None,
) -> SurfaceSample:
    """Area-uniform points on upright shapes (object frame, centred at the origin).

    Args:
        shape: one of :data:`SHAPES`.
        dims: ``[G, D]`` shape parameters (see :func:`shape_dimensions`); their dtype is the output's.
        num_points: N points per shape.
        generator: draws the per-shape random shift when ``shift`` is not given.
        shift: ``[G, 3]`` in [0, 1): the Cranley-Patterson rotation of the shared Sobol points.
    """
    if shape not in _SAMPLERS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if shift is None:
        shift = torch.rand(dims.shape[0], 3, generator=generator, dtype=dims.dtype)
    u = (_sobol_points(num_points)[None].to(dims.dtype) + shift[:, None, :].to(dims.dtype)) % 1.0
    return _SAMPLERS[shape](dims, u)


@lru_cache(maxsize=8)
def _sobol_points(n: int) -> Tensor:
    """The first n points of a fixed scrambled 3D Sobol sequence (shared by all objects)."""
    return torch.quasirandom.SobolEngine(3, scramble=True, seed=20250618).draw(n, dtype=torch.float64)


def _rotation_matrices(yaw: Tensor, tilt: Tensor, tilt_axis: Tensor) -> Tensor:
    """``[G, 3, 3]``: yaw about +y, then tilt by ``tilt`` about the horizontal axis at angle ``tilt_axis``
    (all radians)."""
    cy, sy = yaw.cos(), yaw.sin()
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)
    r_yaw = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).view(-1, 3, 3)
    k = torch.stack([tilt_axis.cos(), zero, tilt_axis.sin()], -1)  # unit horizontal axis
    kx = torch.zeros(len(yaw), 3, 3, dtype=yaw.dtype)
    kx[:, 0, 1], kx[:, 0, 2], kx[:, 1, 0] = -k[:, 2], k[:, 1], k[:, 2]
    kx[:, 1, 2], kx[:, 2, 0], kx[:, 2, 1] = -k[:, 0], -k[:, 1], k[:, 0]
    st, ct = tilt.sin()[:, None, None], tilt.cos()[:, None, None]
    r_tilt = torch.eye(3, dtype=yaw.dtype) + st * kx + (1 - ct) * (kx @ kx)  # Rodrigues
    return r_tilt @ r_yaw


def splat_quats(normals: Tensor, first_axis: Tensor | None = None) -> Tensor:
    """Unit quaternions (w, x, y, z), w >= 0, for surface splats: local +z goes to ``normals`` and
    local +x to ``first_axis`` projected onto the tangent plane (any tangent where it is ~0 or None).

    Built as the shortest arc from +z (from -z after a half turn about x for normals in the lower
    hemisphere, so no branch divides by a vanishing norm), followed by a spin about the normal.
    """
    nx, ny, nz = normals.unbind(-1)
    upper = torch.stack([1 + nz, -ny, nx, torch.zeros_like(nz)], -1)
    lower = torch.stack([-ny, 1 - nz, torch.zeros_like(nz), nx], -1)
    q = torch.nn.functional.normalize(torch.where((nz >= 0)[..., None], upper, lower), dim=-1)
    if first_axis is not None:
        w, x, y, z = q.unbind(-1)
        axis_x = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y + w * z), 2 * (x * z - w * y)], -1)
        axis_y = torch.stack([2 * (x * y - w * z), 1 - 2 * (x * x + z * z), 2 * (y * z + w * x)], -1)
        cos_sin = torch.stack([(first_axis * axis_x).sum(-1), (first_axis * axis_y).sum(-1)], -1)
        norm = cos_sin.norm(dim=-1, keepdim=True)
        no_spin = torch.tensor([1.0, 0.0], dtype=q.dtype)
        cos_sin = torch.where(norm > 1e-3, cos_sin / norm.clamp(min=1e-3), no_spin)  # (cos psi, sin psi)
        hc = ((1 + cos_sin[..., 0]) / 2).clamp(min=0).sqrt()  # cos(psi / 2)
        hs = ((1 - cos_sin[..., 0]) / 2).clamp(min=0).sqrt() * torch.where(cos_sin[..., 1] < 0, -1.0, 1.0)
        # q * (cos psi/2, 0, 0, sin psi/2): a spin by psi about the local z axis (the normal)
        q = torch.stack([w * hc - z * hs, x * hc + y * hs, y * hc - x * hs, z * hc + w * hs], -1)
    return torch.where(q[..., :1] < 0, -q, q)


def _secondary_mask(shape: str, pattern: Tensor, dims: tuple[Tensor, ...], points: Tensor) -> Tensor:
    """Which points take the second colour ``[G, N]`` (object frame, before the pose)."""
    ex, ey = dims
    use_y = ey >= 0.75 * ex  # split / stripe along y unless the object is clearly wider than tall
    coord = torch.where(use_y[:, None], points[..., 1], points[..., 0])
    mask = torch.zeros(coord.shape, dtype=torch.bool)
    two_tone, striped = pattern == PATTERNS.index("two-tone"), pattern == PATTERNS.index("striped")
    if two_tone.any():
        mask[two_tone] = coord[two_tone] < 0  # the first colour on top (or on +x)
    if striped.any():
        if shape == "torus":  # stripes go around the ring
            angle = torch.atan2(points[striped][..., 1], points[striped][..., 0]) + math.pi
            segment = (angle / (2 * math.pi) * NUM_TORUS_STRIPE_SEGMENTS).long() % NUM_TORUS_STRIPE_SEGMENTS
        else:
            extent = torch.where(use_y, ey, ex)[striped, None]
            band = ((coord[striped] / extent + 1) / 2 * NUM_STRIPE_BANDS).long()
            segment = band.clamp(0, NUM_STRIPE_BANDS - 1)
        mask[striped] = segment % 2 == 1
    return mask


# per-object random numbers: yaw, tilt, tilt axis, Sobol shift (3), then one opacity per Gaussian
_POSE_U, _SHIFT_U, _OPACITY_U = slice(0, 3), slice(3, 6), 6


def _build(
    attributes: Sequence[ShapeAttributes],
    u: Tensor,
    max_tilt_deg: float,
    tangent_scale: float,
    shading: float,
    yaw_deg: float | None = None,
    tilt_deg: float | None = None,
) -> Gaussians:
    """Vectorised core: Gaussians ``[B, N]`` for ``attributes`` from uniforms ``u`` ``[B, 6 + N]``."""
    num = u.shape[1] - _OPACITY_U
    dtype = torch.float32  # float32 keeps points on the surface to ~1e-7 and is twice as fast as float64
    batch = len(attributes)
    means = torch.empty(batch, num, 3, dtype=dtype)
    normals, edge_dir = torch.empty_like(means), torch.empty_like(means)
    edge_dist = torch.empty(batch, num, dtype=dtype)
    spacing = torch.empty(batch, dtype=dtype)
    colors = torch.empty(batch, num, 3, dtype=dtype)
    palette = torch.tensor(list(COLORS.values()), dtype=dtype)
    color_index = {name: i for i, name in enumerate(COLORS)}
    for shape in SHAPES:
        rows = [i for i, a in enumerate(attributes) if a.shape == shape]
        if not rows:
            continue
        group = [attributes[i] for i in rows]
        dims_list = [shape_dimensions(shape, a.aspect, a.size) for a in group]
        dims = torch.tensor(dims_list, dtype=dtype)
        surface = sample_surface(shape, dims, num, shift=u[rows, _SHIFT_U].to(dtype))
        points = surface.points
        half = torch.tensor([_half_extents_xy(shape, d) for d in dims_list], dtype=dtype)
        pattern = torch.tensor([PATTERNS.index(a.pattern) for a in group])
        second = _secondary_mask(shape, pattern, (half[:, 0], half[:, 1]), points)
        c1 = palette[[color_index[a.color] for a in group]]
        c2 = palette[[color_index[a.color2 or a.color] for a in group]]
        colors[rows] = torch.where(second[..., None], c2[:, None], c1[:, None])
        means[rows], normals[rows], spacing[rows] = points, surface.normals, (surface.areas / num).sqrt()
        edge_dir[rows], edge_dist[rows] = surface.edge_dir, surface.edge_dist

    pose = u[:, _POSE_U]
    yaw = torch.full((batch,), math.radians(yaw_deg), dtype=dtype) if yaw_deg is not None \
        else 2 * math.pi * pose[:, 0].to(dtype)
    tilt = torch.full((batch,), math.radians(tilt_deg), dtype=dtype) if tilt_deg is not None \
        else math.radians(max_tilt_deg) * pose[:, 1].to(dtype)
    rotation = _rotation_matrices(yaw, tilt, 2 * math.pi * pose[:, 2].to(dtype))  # [B, 3, 3]
    means = means @ rotation.transpose(1, 2)
    normals = torch.nn.functional.normalize(normals @ rotation.transpose(1, 2), dim=-1)
    edge_dir = edge_dir @ rotation.transpose(1, 2)

    # Discs of the tangential size, narrowed towards a nearby edge so they end near it (axis 0).
    tangential = (tangent_scale * spacing[:, None]).expand(batch, num)
    towards_edge = torch.minimum(EDGE_SCALE_RATIO * edge_dist, tangential)
    towards_edge = towards_edge.clamp(min=EDGE_MIN_SCALE * tangential)
    scales = torch.stack([towards_edge, tangential, NORMAL_SCALE_RATIO * tangential], -1)
    quats = splat_quats(normals, edge_dir)
    light = torch.tensor(LIGHT_DIRECTION, dtype=dtype)
    colors = colors * (1 - shading + shading * (0.5 + 0.5 * (normals @ light)))[..., None]
    opacities = 0.9 + 0.1 * u[:, _OPACITY_U:].to(dtype)
    return Gaussians(means=means, scales=scales, quats=quats, opacities=opacities, colors=colors)


# ---------------------------------------------------------------------------------------------
# public constructors and the dataset


class ProceduralSample(NamedTuple):
    gaussians: Gaussians  # [1, N]
    prompt: str
    attributes: ShapeAttributes


class ProceduralBatch(NamedTuple):
    gaussians: Gaussians  # [B, N]
    prompts: list[str]
    attributes: list[ShapeAttributes]


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
    if tangent_scale <= 0 or not 0 <= shading <= 1:
        raise ValueError(f"need tangent_scale > 0 and shading in [0, 1], got {tangent_scale}, {shading}")
    if num_gaussians < 1:
        raise ValueError(f"num_gaussians must be >= 1, got {num_gaussians}")
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
    attributes = parse_prompt(prompt)
    gaussians = build_gaussians([attributes], num_gaussians, generator, **options)
    return ProceduralSample(gaussians, prompt, attributes)


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
        if num_gaussians < 1:
            raise ValueError(f"num_gaussians must be >= 1, got {num_gaussians}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if tangent_scale <= 0 or not 0 <= shading <= 1:
            raise ValueError(f"need tangent_scale > 0 and shading in [0, 1], got {tangent_scale}, {shading}")
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
        width = self._NUM_CHOICES + _OPACITY_U + self.num_gaussians
        return torch.rand(width, generator=generator, dtype=torch.float64)

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
        width = self._NUM_CHOICES + _OPACITY_U + self.num_gaussians
        return self._from_uniforms(torch.rand(n, width, generator=generator, dtype=torch.float64))

    def _options(self, options: dict[str, float]) -> dict[str, float]:
        defaults = {"max_tilt_deg": self.max_tilt_deg, "tangent_scale": self.tangent_scale}
        return {**defaults, "shading": self.shading, **options}

    def from_attributes(
        self,
        attributes: ShapeAttributes,
        generator: torch.Generator | None = None,
        template: int = 0,
        **options: float,
    ) -> ProceduralSample:
        """:func:`from_attributes` with this dataset's number of Gaussians and geometry settings."""
        return from_attributes(attributes, self.num_gaussians, generator, template, **self._options(options))

    def from_prompt(
        self, prompt: str, generator: torch.Generator | None = None, **options: float
    ) -> ProceduralSample:
        """:func:`from_prompt` with this dataset's number of Gaussians and geometry settings."""
        return from_prompt(prompt, self.num_gaussians, generator, **self._options(options))

    @staticmethod
    def collate(samples: Sequence[ProceduralSample]) -> ProceduralBatch:
        """Stack samples (e.g. from a ``DataLoader``) into one batch."""
        gaussians = Gaussians.cat([s.gaussians for s in samples])
        return ProceduralBatch(gaussians, [s.prompt for s in samples], [s.attributes for s in samples])
