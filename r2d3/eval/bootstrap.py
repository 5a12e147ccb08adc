"""Confidence intervals by resampling **prompts** (the unit the held-out set is drawn in).

Why prompts and not samples: the seeds of one prompt are not independent draws from the population of
prompts, so resampling samples would give intervals that are too narrow. Every interval here keeps the
seeds of a prompt together and resamples prompts with replacement (percentile bootstrap, 95 % by
default, a fixed generator seed so the interval of a given table is reproducible).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

DRAWS = 1000


def resample_indices(groups: int, draws: int = DRAWS, seed: int = 0) -> Tensor:
    """``[draws, groups]`` indices of prompts drawn with replacement (the same for a given seed)."""
    if groups < 1:
        raise ValueError(f"bootstrap needs at least one prompt, got {groups}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(groups, (draws, groups), generator=g)


def percentile_interval(values: Tensor, level: float = 0.95) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` order statistics of bootstrap replicates."""
    v = values.flatten().sort().values
    n = v.numel()
    lo = int((1 - level) / 2 * n)
    hi = max(lo, int((1 + level) / 2 * n) - 1)
    return float(v[lo]), float(v[hi])


def bootstrap_ci(values: Tensor, groups: int, draws: int = DRAWS, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Interval of the mean of ``values`` (``groups`` prompts x the same number of seeds each, prompt-major:
    ``values.view(groups, -1)``) by resampling prompts; the seeds of one prompt stay together."""
    per_prompt = values.detach().double().reshape(groups, -1).mean(dim=1)
    idx = resample_indices(groups, draws, seed)
    return percentile_interval(per_prompt[idx].mean(dim=1), level)


def bootstrap_replicates(statistic: Callable[[Tensor], float], groups: int, draws: int = 200,
                         seed: int = 0) -> Tensor:
    """``[draws]`` values of a set-level statistic, ``statistic(prompt_indices)``, on resamples of the
    ``groups`` prompts (indices may repeat)."""
    idx = resample_indices(groups, draws, seed)
    return torch.tensor([statistic(row) for row in idx], dtype=torch.float64)


def bootstrap_statistic(statistic: Callable[[Tensor], float], groups: int, draws: int = 200, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of any set-level statistic (see :func:`bootstrap_replicates`)."""
    return percentile_interval(bootstrap_replicates(statistic, groups, draws, seed), level)
