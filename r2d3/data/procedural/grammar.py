"""The procedural prompt grammar: object descriptions, their prompts, the parser and the splits.

Every object is described by a :class:`ShapeAttributes` (shape, colour, pattern, second colour, size,
aspect) and its prompt is a pure function of the attributes and a template index; :func:`parse_prompt`
inverts it. A fixed set of (shape, colour, pattern) combinations is held out (:data:`HELDOUT_COMBOS`,
about 12.5 %) so prompt-following can be measured on compositions never seen in training; every
shape/colour, shape/pattern and colour/pattern pair of a held-out combination still occurs in training.
White is only used for stripes: a white body would vanish on the white render background.

Nothing here depends on torch; the geometry lives in :mod:`r2d3.data.procedural.shapes`.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache

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

ASPECTS: tuple[str, ...] = ("regular", "tall", "wide", "flat")
"""``regular`` is the unmarked default: its prompts carry no aspect word."""
_UNMARKED = frozenset({"medium", "regular"})  # default size and aspect: never written in a prompt

# Shape parameters per aspect, as ratios; shape_dimensions() scales them to fit the box. Meaning:
# sphere (radius,), cube (half-extent x, y, z), cylinder/cone/capsule (radius, half-height of the
# body along y), torus (ring radius, tube radius), pyramid (half-side of the square base, half-height).
# The keys also define which aspects each shape has (SHAPE_ASPECTS).
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


@cache
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
