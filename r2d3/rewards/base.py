"""The reward registry: every 2D reward has one signature and is built from a config spec.

Signature (the only one samplers, losses and logging rely on)::

    reward(render: RenderOutput, prompts: Sequence[str]) -> Tensor [B]

A reward scores each of the ``V`` rendered views of an asset and averages over views; the result is
differentiable w.r.t. every tensor of the :class:`~r2d3.render.output.RenderOutput` it uses (learned
rewards are frozen: their own parameters never receive gradients). ``reward.per_view(render, prompts)``
returns the ``[B, V]`` scores before averaging, for logging.

Specs accepted by :func:`build_reward` (YAML/omegaconf containers work too)::

    "dnc"                                          # one reward, default options
    {"dnc": 1.0, "clip_tiny": 0.5}                 # weighted sum
    {"name": "dnc", "kwargs": {"detach_depth": False}}                 # one reward with options
    [{"name": "dnc", "weight": 1.0}, {"name": "colorfulness", "weight": 0.1, "kwargs": {...}}]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from r2d3.plugins import load_plugins
from r2d3.pretrained import WeightsError
from r2d3.render.output import RenderOutput


class Reward(nn.Module):
    """Base class: subclasses implement :meth:`per_view`; calling the reward averages over views.

    A reward is an ``nn.Module`` so that learned rewards move with ``.to(device)`` and their weights
    are visible to ``state_dict``; analytic rewards simply have no parameters.
    """

    #: registry name, set by :func:`register_reward`
    name: str = ""

    def per_view(self, render: RenderOutput, prompts: Sequence[str]) -> Tensor:
        """Per-view scores ``[B, V]``."""
        raise NotImplementedError

    def forward(self, render: RenderOutput, prompts: Sequence[str]) -> Tensor:
        """Per-asset reward ``[B]``: the mean of :meth:`per_view` over the ``V`` views."""
        return self.per_view(render, prompts).mean(dim=1)


class WeightedSum(Reward):
    """``sum_i w_i * reward_i`` (per view, hence also per asset); ``terms`` keeps the parts for logging."""

    def __init__(self, terms: Sequence[tuple[str, float, Reward]]):
        super().__init__()
        if not terms:
            raise ValueError("a weighted-sum reward needs at least one term")
        self.term_names = [name for name, _, _ in terms]
        self.weights = [float(weight) for _, weight, _ in terms]
        self.rewards = nn.ModuleList(reward for _, _, reward in terms)
        self.name = " + ".join(f"{w:g}*{n}" for n, w in zip(self.term_names, self.weights))

    def components(self, render: RenderOutput, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Each term's unweighted per-view scores ``[B, V]``, keyed by its registry name."""
        return {n: r.per_view(render, prompts) for n, r in zip(self.term_names, self.rewards)}

    def per_view(self, render: RenderOutput, prompts: Sequence[str]) -> Tensor:
        total: Tensor | None = None
        for weight, reward in zip(self.weights, self.rewards):
            part = weight * reward.per_view(render, prompts)
            total = part if total is None else total + part
        assert total is not None
        return total


class FunctionReward(Reward):
    """Adapter for factories that return a plain callable ``fn(render, prompts) -> [B]`` instead of a
    :class:`Reward`: its per-view scores are the per-asset scores as one column ``[B, 1]`` (the mean over
    that column, and hence weighted sums, are unchanged)."""

    def __init__(self, fn: Callable[[RenderOutput, Sequence[str]], Tensor]):
        super().__init__()
        self.fn = fn

    def per_view(self, render: RenderOutput, prompts: Sequence[str]) -> Tensor:
        return self.fn(render, prompts)[:, None]


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator registering a reward class or factory under ``name`` (keyword options only). A factory
    should return a :class:`Reward`; a plain callable ``fn(render, prompts) -> [B]`` is wrapped in
    :class:`FunctionReward`."""

    def wrap(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_rewards() -> list[str]:
    load_plugins()
    return sorted(_REGISTRY)


def _check_weight(name: str, weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"weight of reward {name!r} must be a number, got {weight!r}")
    weight = float(weight)
    if math.isnan(weight) or math.isinf(weight):
        raise ValueError(f"weight of reward {name!r} must be finite, got {weight}")
    if weight < 0:
        raise ValueError(
            f"weight of reward {name!r} must be >= 0, got {weight} (rewards are maximised; "
            "to penalise a quantity register a reward that negates it)"
        )
    return weight


def _known(name: Any) -> str:
    if not isinstance(name, str) or name not in available_rewards():
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(available_rewards())}")
    return name


def _make(name: str, kwargs: Mapping[str, Any]) -> Reward:
    reward = _REGISTRY[name](**dict(kwargs))
    if not isinstance(reward, Reward):
        if not callable(reward):
            raise TypeError(f"the factory of reward {name!r} returned {type(reward).__name__}, not a Reward")
        reward = FunctionReward(reward)
    reward.name = name
    return reward


def _entry(item: Any) -> tuple[str, float, dict[str, Any]]:
    if not isinstance(item, Mapping) or "name" not in item:
        raise ValueError("reward list entries must be mappings with 'name' (and optional 'weight', "
                         f"'kwargs'), got {item!r}")
    unknown = set(item) - {"name", "weight", "kwargs"}
    if unknown:
        raise ValueError(f"reward entry {item!r} has unknown keys {sorted(unknown)}; "
                         "allowed: 'name', 'weight', 'kwargs'")
    weight = _check_weight(str(item["name"]), item.get("weight", 1.0))
    return _known(item["name"]), weight, dict(item.get("kwargs") or {})


def reward_terms(spec: str | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[tuple[str, float, dict[str, Any]]]:
    """``(name, weight, kwargs)`` of every term of a spec, checked (unknown names raise ``ValueError``
    listing the valid ones; negative / NaN / non-numeric weights raise naming the reward) without building
    anything: how jobs check a spec before any model, or reward weights, load."""
    if isinstance(spec, str):
        return [(_known(spec), 1.0, {})]
    if isinstance(spec, Mapping):
        if "name" in spec:  # one reward with options: {"name": ..., "kwargs": ..., "weight": ...}
            return [_entry(spec)]
        return [(_known(n), _check_weight(str(n), w), {}) for n, w in spec.items()]
    if isinstance(spec, SequenceABC):
        return [_entry(item) for item in spec]
    raise ValueError(f"cannot build a reward from {spec!r}: expected a name, a {{name: weight}} mapping or a "
                     f"list of {{name, weight, kwargs}}; valid rewards: {', '.join(available_rewards())}")


def build_reward(spec: str | Mapping[str, Any] | Sequence[Mapping[str, Any]] | Reward) -> Reward:
    """Build a reward from a spec (see the module docstring and :func:`reward_terms`): one term with
    weight 1 is the reward itself, anything else a :class:`WeightedSum`."""
    if isinstance(spec, Reward):
        return spec
    terms = [(name, weight, _make(name, kwargs)) for name, weight, kwargs in reward_terms(spec)]
    single = isinstance(spec, str) or (isinstance(spec, Mapping) and "name" in spec)
    return terms[0][2] if single and terms[0][1] == 1.0 else WeightedSum(terms)


def load_reward(spec: Any, device: torch.device | str = "cpu") -> Reward:
    """:func:`build_reward`, moved to ``device`` and frozen: how trainers, actors and evaluation jobs
    hold a reward (its parameters never train; gradients flow only to the renders)."""
    reward = build_reward(spec)
    if isinstance(reward, torch.nn.Module):
        reward.to(device).requires_grad_(False)
    return reward


NEVER_DOWNLOADS = "(this project never downloads weights)"


def local_weights_dir(weights: Any, reward: str, holding: str) -> Path:
    """The local directory of a pretrained reward's weights; ``None`` or a missing directory raises
    :class:`~r2d3.pretrained.WeightsError` saying what the directory must hold (``holding``)."""
    if weights is None or str(weights) == "":
        raise WeightsError(f"reward {reward!r} needs `weights`: a local directory holding {holding}. Pass it in "
                           f"the spec, e.g. {{'name': '{reward}', 'kwargs': {{'weights': '<dir>'}}}} "
                           f"{NEVER_DOWNLOADS}.")
    path = Path(weights)
    if not path.is_dir():
        raise WeightsError(f"{reward} weights not found: {path} is not a directory. Put {holding} there "
                           f"{NEVER_DOWNLOADS}.")
    return path


def views_as_batch(x: Tensor) -> Tensor:
    """``[B, V, C, H, W]`` -> ``[B * V, C, H, W]`` (a view, no copy when contiguous)."""
    if x.ndim != 5:
        raise ValueError(f"expected a per-view image tensor [B, V, C, H, W], got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def check_prompts(prompts: Sequence[str], batch_size: int, reward: str) -> list[str]:
    """One prompt per asset (a single string is a mistake, not a batch of characters)."""
    if isinstance(prompts, str):
        raise TypeError(f"reward {reward!r}: prompts must be a sequence of strings, not one string")
    prompts = list(prompts)
    if len(prompts) != batch_size:
        raise ValueError(f"reward {reward!r}: got {len(prompts)} prompts for {batch_size} rendered assets")
    return prompts


__all__ = [
    "FunctionReward",
    "Reward",
    "WeightedSum",
    "available_rewards",
    "build_reward",
    "reward_terms",
    "check_prompts",
    "register_reward",
    "views_as_batch",
]
