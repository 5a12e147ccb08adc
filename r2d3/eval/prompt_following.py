"""Prompt-following of rendered assets, judged by measures that are NOT the alignment rewards.

Why: alignment raises the reward it is given; these checks tell whether the model still draws the
colour and the shape the prompt asks for while it does so:

- colour: the analytic dominant-colour classifier of :mod:`r2d3.eval.color` (the procedural
  palette; the best one- or two-colour model of the alpha > 0.9 pixels of all views, fitted in Lab
  allowing for shading and blends); correct if the dominant colour is the body colour or, for
  two-tone/striped prompts, the second colour ("accept either"); ``color_strict_acc`` only accepts
  the body colour;
- shape: the silhouette classifier of :mod:`r2d3.eval.shape_classifier` (alpha + normalised depth,
  its own weights).

Expected labels come from :class:`~r2d3.data.procedural.ShapeAttributes` or are parsed from
procedural-grammar prompts (:func:`~r2d3.data.procedural.parse_prompt`; prompts outside the grammar
raise ``PromptParseError`` naming them).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from r2d3.data.procedural import COLORS, ShapeAttributes, parse_prompt
from r2d3.eval.color import dominant_colours
from r2d3.data.procedural.views import RenderedViews
from r2d3.eval.shape_classifier import ShapeClassifier, classify_shapes
from r2d3.render.output import RenderOutput


def expected_attributes(labels: Sequence[ShapeAttributes | str]) -> list[ShapeAttributes]:
    """Attributes for each asset: taken as given, or parsed from a grammar prompt."""
    if isinstance(labels, str):
        raise TypeError("expected one prompt or ShapeAttributes per asset, got a single string")
    return [a if isinstance(a, ShapeAttributes) else parse_prompt(a) for a in labels]


def _colour_ok(predicted: str | None, expected: ShapeAttributes, strict: bool) -> bool:
    if predicted is None:
        return False
    return predicted == expected.color or (not strict and predicted == expected.color2)


def _colour_results(
    rgb: Tensor, alpha: Tensor, expected: list[ShapeAttributes]
) -> tuple[list[str | None], list[bool], list[bool]]:
    top = dominant_colours(rgb, alpha, COLORS, top_k=1)
    predicted = [t[0] if t else None for t in top]
    either = [_colour_ok(p, e, strict=False) for p, e in zip(predicted, expected)]
    strict = [_colour_ok(p, e, strict=True) for p, e in zip(predicted, expected)]
    return predicted, either, strict


def prompt_following(
    render: RenderOutput,
    labels: Sequence[ShapeAttributes | str],
    shape_model: ShapeClassifier | None = None,
) -> dict:
    """Colour and shape accuracy of ``B`` rendered assets against their prompts or attributes.

    Returns ``{"color_acc", "color_strict_acc", "shape_acc", "per_sample": [...]}``; each per-sample
    entry has the expected and predicted colour and shape and whether each is correct.
    """
    expected = expected_attributes(labels)
    if len(expected) != render.rgb.shape[0]:
        raise ValueError(f"got {len(expected)} prompts/attributes for {render.rgb.shape[0]} rendered assets")
    # both judges are small CPU models: the renders (a few 64^2 views per asset) move to the CPU
    rgb, alpha, depth = (t.detach().cpu() for t in (render.rgb, render.alpha, render.depth))
    colours, colour_ok, strict_ok = _colour_results(rgb, alpha, expected)
    shapes = classify_shapes(alpha, depth, shape_model)
    per_sample = [
        {
            "expected_color": e.color, "expected_color2": e.color2, "predicted_color": c, "color_ok": ok,
            "color_strict_ok": sok, "expected_shape": e.shape, "predicted_shape": s, "shape_ok": s == e.shape,
        }  # fmt: skip
        for e, c, ok, sok, s in zip(expected, colours, colour_ok, strict_ok, shapes)
    ]
    n = max(len(per_sample), 1)
    return {
        "color_acc": sum(colour_ok) / n,
        "color_strict_acc": sum(strict_ok) / n,
        "shape_acc": sum(p["shape_ok"] for p in per_sample) / n,
        "per_sample": per_sample,
    }


def colour_accuracy(views: RenderedViews, batch_size: int = 256) -> dict:
    """Dominant-colour check on cached ground-truth renders: accept-either and strict accuracy, and the
    strict accuracy of solid objects alone."""
    either, strict, solid = [], [], []
    for lo in range(0, len(views), batch_size):
        sl = slice(lo, lo + batch_size)
        expected = views.attributes[sl]
        _, ok, sok = _colour_results(views.rgb_float(sl), views.alpha[sl].float(), expected)
        either += ok
        strict += sok
        solid += [s for s, e in zip(sok, expected) if e.pattern == "solid"]
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {"accuracy": mean(either), "strict_accuracy": mean(strict), "solid_accuracy": mean(solid),
            "objects": len(either)}
