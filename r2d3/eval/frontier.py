"""Reward–prior frontiers: how much reward each method buys for a given loss of the base model's prior.

A method swept over its strength knob (beta, lr, ...) traces a curve of (prior loss, reward gain); one
setting per method says nothing about which method is better, since a weaker setting of any method
keeps more of the prior. Methods are compared at *matched prior loss*: each frontier is linearly
interpolated through its levels' means (sorted by prior loss), and the gain of one method minus the
other's is averaged over the prior-loss range both frontiers cover.

Intervals are a bootstrap over held-out prompts and evaluation seeds (one draw shared by every method,
since all of them are scored on the same prompts and noise) and over training seeds (drawn per method
level). Every statistic, FID included, is recomputed on each draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from r2d3.eval.bootstrap import percentile_interval
from r2d3.eval.fid import FrechetReference

#: the prior-loss axes and the per-sample measures a frontier point carries
AXES = ("fid", "drift")
MEASURES = ("gain", "drift", "diversity_change", "color_change", "shape_change")


@dataclass
class Point:
    """One trained checkpoint scored on ``P`` prompts x ``S`` evaluation seeds (same noise as the base)."""

    method: str
    level: float
    seed: int
    values: dict[str, Tensor]  # measure -> [P, S]
    features: Tensor  # [P, S, D] pooled image features
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Draw:
    """One bootstrap draw: prompt and evaluation-seed indices, and a generator for training seeds."""

    prompts: Tensor | None
    seeds: Tensor | None
    generator: torch.Generator | None


def _sub(x: Tensor, draw: Draw) -> Tensor:
    if draw.prompts is not None:
        x = x[draw.prompts]
    if draw.seeds is not None:
        x = x[:, draw.seeds]
    return x


def level_stats(points: Sequence[Point], base_features: Tensor, draw: Draw,
                reference: FrechetReference | None = None) -> dict[str, float]:
    """Means over the level's training seeds (resampled in ``draw``) of every measure and of FID against
    the base's features of the same draw (``reference``: their precomputed statistics)."""
    if draw.generator is not None:
        idx = torch.randint(len(points), (len(points),), generator=draw.generator).tolist()
        points = [points[i] for i in idx]
    out = {m: sum(float(_sub(p.values[m], draw).nanmean()) for p in points) / len(points)
           for m in MEASURES if m in points[0].values}
    if reference is None:
        reference = FrechetReference(_sub(base_features, draw).reshape(-1, base_features.shape[-1]))
    dim = base_features.shape[-1]
    out["fid"] = sum(reference.distance(_sub(p.features, draw).reshape(-1, dim)) for p in points) / len(points)
    return out


def interpolate(xs: Sequence[float], ys: Sequence[float], at: Tensor) -> Tensor:
    """Piecewise-linear y(x) through the points sorted by x (ties averaged), evaluated at ``at``."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    x = torch.tensor([xs[i] for i in order], dtype=torch.float64)
    y = torch.tensor([ys[i] for i in order], dtype=torch.float64)
    if len(x) == 1:
        return y.expand(len(at)).clone()
    pos = torch.searchsorted(x, at.clamp(x[0], x[-1]), right=True).clamp(1, len(x) - 1)
    x0, x1, y0, y1 = x[pos - 1], x[pos], y[pos - 1], y[pos]
    w = torch.where(x1 > x0, (at - x0) / (x1 - x0).clamp(min=1e-300), torch.zeros_like(at))
    return y0 + w.clamp(0, 1) * (y1 - y0)


def matched_gap(a: dict[float, dict[str, float]], b: dict[float, dict[str, float]], axis: str,
                grid: int = 25) -> float:
    """Mean of gain_a(x) - gain_b(x) over the prior-loss range both frontiers span (NaN: no overlap)."""
    xa, xb = [s[axis] for s in a.values()], [s[axis] for s in b.values()]
    lo, hi = max(min(xa), min(xb)), min(max(xa), max(xb))
    if not hi > lo:
        return float("nan")
    at = torch.linspace(lo, hi, grid, dtype=torch.float64)
    ga = interpolate(xa, [s["gain"] for s in a.values()], at)
    gb = interpolate(xb, [s["gain"] for s in b.values()], at)
    return float((ga - gb).mean())


def frontier_stats(points: Sequence[Point], base_features: Tensor,
                   draw: Draw) -> dict[str, dict[float, dict[str, float]]]:
    """method -> level -> stats for one draw."""
    groups: dict[str, dict[float, list[Point]]] = {}
    for p in points:
        groups.setdefault(p.method, {}).setdefault(p.level, []).append(p)
    reference = FrechetReference(_sub(base_features, draw).reshape(-1, base_features.shape[-1]))
    return {m: {lvl: level_stats(ps, base_features, draw, reference) for lvl, ps in sorted(levels.items())}
            for m, levels in groups.items()}


@dataclass
class FrontierResult:
    """Point estimates and 95 % intervals of every level's statistics and of the matched-loss gaps."""

    levels: dict[str, dict[float, dict[str, float]]]
    level_ci: dict[str, dict[float, dict[str, tuple[float, float]]]]
    gaps: dict[tuple[str, str, str], float]  # (method, baseline, axis) -> gap
    gap_ci: dict[tuple[str, str, str], tuple[float, float]]
    gap_valid: dict[tuple[str, str, str], float] = field(default_factory=dict)  # share of draws with overlap


def analyse(points: Sequence[Point], base_features: Tensor, pairs: Sequence[tuple[str, str]], draws: int = 200,
            seed: int = 0, progress: Callable[[int], None] | None = None) -> FrontierResult:
    """Frontiers of every method and, for each ``(method, other)`` pair present, the matched-loss gap
    gain_method - gain_other on every axis, with intervals."""
    if not points:
        raise ValueError("no frontier points to analyse")
    num_p, num_s = points[0].values["gain"].shape
    full = frontier_stats(points, base_features, Draw(None, None, None))
    keys = [(m, o, axis) for m, o in pairs if m in full and o in full for axis in AXES]
    gaps = {k: matched_gap(full[k[0]], full[k[1]], k[2]) for k in keys}
    gen = torch.Generator().manual_seed(seed)
    reps: dict[tuple[str, str, str], list[float]] = {k: [] for k in keys}
    level_reps: dict[tuple[str, float, str], list[float]] = {}
    for i in range(draws):
        draw = Draw(torch.randint(num_p, (num_p,), generator=gen), torch.randint(num_s, (num_s,), generator=gen),
                    torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen))))
        stats = frontier_stats(points, base_features, draw)
        for k in keys:
            reps[k].append(matched_gap(stats[k[0]], stats[k[1]], k[2]))
        for m, levels in stats.items():
            for lvl, s in levels.items():
                for name, v in s.items():
                    level_reps.setdefault((m, lvl, name), []).append(v)
        if progress is not None:
            progress(i)
    gap_ci, valid = {}, {}
    for k, vals in reps.items():
        t = torch.tensor(vals, dtype=torch.float64)
        ok = t[torch.isfinite(t)]
        valid[k] = float(len(ok)) / max(len(vals), 1)
        gap_ci[k] = percentile_interval(ok) if len(ok) >= 10 else (float("nan"), float("nan"))
    level_ci: dict[str, dict[float, dict[str, tuple[float, float]]]] = {}
    for (m, lvl, name), vals in level_reps.items():
        interval = percentile_interval(torch.tensor(vals, dtype=torch.float64))
        level_ci.setdefault(m, {}).setdefault(lvl, {})[name] = interval
    return FrontierResult(full, level_ci, gaps, gap_ci, valid)


__all__ = ["AXES", "Draw", "FrontierResult", "MEASURES", "Point", "analyse", "frontier_stats", "interpolate",
           "level_stats", "matched_gap"]
