"""Frontier analysis: interpolation, matched-loss gaps against closed forms, bootstrap intervals."""

from __future__ import annotations

import math

import pytest
import torch

from r2d3.eval.frontier import Draw, Point, analyse, interpolate, level_stats, matched_gap


def test_interpolate_is_piecewise_linear_through_points_sorted_by_x():
    at = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0], dtype=torch.float64)
    got = interpolate([2.0, 0.0, 1.0], [4.0, 0.0, 1.0], at)  # unsorted input
    torch.testing.assert_close(got, torch.tensor([0.0, 0.5, 1.0, 2.5, 4.0, 4.0], dtype=torch.float64))


def test_matched_gap_of_two_lines_is_their_mean_difference_over_the_overlap():
    a = {l: {"fid": x, "gain": 2 * x} for l, x in enumerate([0.0, 1.0, 2.0])}
    b = {l: {"fid": x, "gain": x} for l, x in enumerate([0.5, 1.5, 3.0])}
    # overlap [0.5, 2]: mean of 2x - x = x over it is 1.25
    assert matched_gap(a, b, "fid") == pytest.approx(1.25)
    assert matched_gap(b, a, "fid") == pytest.approx(-1.25)
    far = {0: {"fid": 10.0, "gain": 0.0}, 1: {"fid": 11.0, "gain": 1.0}}
    assert math.isnan(matched_gap(a, far, "fid"))


def _points(method, slope, levels, seeds, gen, p=12, s=3, d=4):
    """Points whose gain is ``slope`` x drift (plus noise), drift set by the level; features shifted by it."""
    out = []
    for level in levels:
        for seed in seeds:
            drift = torch.full((p, s), level, dtype=torch.float64) + 0.01 * torch.randn(p, s, generator=gen, dtype=torch.float64)
            gain = slope * drift + 0.01 * torch.randn(p, s, generator=gen, dtype=torch.float64)
            zeros = torch.zeros(p, s, dtype=torch.float64)
            feats = torch.randn(p, s, d, generator=gen, dtype=torch.float64) + level
            out.append(Point(method, level, seed, {"gain": gain, "drift": drift, "diversity_change": zeros,
                                                   "color_change": zeros, "shape_change": zeros}, feats))
    return out


def test_a_dominating_frontier_is_ahead_with_an_interval_above_zero():
    gen = torch.Generator().manual_seed(0)
    points = _points("nabla_gfn", 2.0, [0.1, 0.2, 0.3, 0.4], [0, 1, 2], gen) \
        + _points("refl", 1.0, [0.1, 0.2, 0.3, 0.4], [0, 1, 2], gen)
    base = torch.randn(12, 3, 4, generator=gen, dtype=torch.float64)
    res = analyse(points, base, [("nabla_gfn", "refl")], draws=40)
    gap, ci = res.gaps[("nabla_gfn", "refl", "drift")], res.gap_ci[("nabla_gfn", "refl", "drift")]
    assert gap == pytest.approx(0.25, abs=0.02)  # mean of (2x - x) over drift in [0.1, 0.4]
    assert 0 < ci[0] < gap < ci[1]
    assert res.gap_valid[("nabla_gfn", "refl", "drift")] == 1.0
    lvl = res.levels["refl"][0.2]
    assert lvl["gain"] == pytest.approx(0.2, abs=0.02) and lvl["fid"] > 0
    lo, hi = res.level_ci["refl"][0.2]["gain"]
    assert lo < lvl["gain"] < hi


def test_equal_frontiers_give_an_interval_that_covers_zero():
    gen = torch.Generator().manual_seed(1)
    points = _points("nabla_gfn", 1.0, [0.1, 0.2, 0.3], [0, 1, 2], gen) + _points("draft", 1.0, [0.1, 0.2, 0.3], [0, 1, 2], gen)
    res = analyse(points, torch.zeros(12, 3, 4, dtype=torch.float64), [("nabla_gfn", "draft")], draws=40)
    lo, hi = res.gap_ci[("nabla_gfn", "draft", "drift")]
    assert lo < 0 < hi


def test_level_stats_resample_prompts_and_seeds():
    gen = torch.Generator().manual_seed(2)
    pts = _points("m", 1.0, [0.2], [0, 1], gen)
    pts[0].values["gain"][0] = 100.0  # one outlier prompt
    base = torch.zeros(12, 3, 4, dtype=torch.float64)
    full = level_stats(pts, base, Draw(None, None, None))
    without = level_stats(pts, base, Draw(torch.arange(1, 12), None, None))
    assert full["gain"] > without["gain"] + 3
    assert without["gain"] == pytest.approx(0.2, abs=0.02)


def test_analyse_refuses_no_points():
    with pytest.raises(ValueError, match="no frontier points"):
        analyse([], torch.zeros(1, 1, 1), [])
