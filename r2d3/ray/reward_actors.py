"""Render + reward in a pool of Ray actors shared by the trainers (``scale.reward_actors > 0``).

Each :class:`RewardActor` builds the reward model once (``config.reward``, on CUDA when the actor was
given GPUs) and answers ``score(gaussians, cameras, prompts, need_grad)`` with the rewards and the
gradient of their sum w.r.t. the Gaussian tensors (:func:`r2d3.rewards.remote.score_with_grad`). The
trainer keeps the denoiser and the decoder and applies the chain rule through
:class:`~r2d3.rewards.remote.RemoteScorer` (first order only, see :mod:`r2d3.rewards.remote`).

The actors are *named* (``r2d3-reward-<hash of reward spec, render config, resources>-<i>``) and created
with ``get_if_exists=True``: every trainer that asks for the same pool gets the same actors, so a large
reward model is loaded ``scale.reward_actors`` times, not once per trainer. A call splits its batch into
contiguous chunks, one per actor (rotating the first actor between calls), and gathers the results.

Lifetime: Ray kills a (non-detached) actor with the process that created it. Create the pool in the
driver with :func:`start_reward_actors` and keep it until ``fit()`` returns, so the actors outlive any one
trainer (a restarted worker group, rank 0's final evaluation); trainers then only look the actors up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from torch import Tensor

from r2d3.config import RenderConfig, reward_label
from r2d3.train.config import AlignConfig
from r2d3.ray.actors import actor_device
from r2d3.render.cameras import Cameras
from r2d3.render.gaussians import Gaussians
from r2d3.rewards import load_reward
from r2d3.rewards.remote import RemoteScorer, score_with_grad


@ray.remote
class RewardActor:
    """Holds one reward model and the render settings; scores batches of decoded assets."""

    def __init__(self, reward_spec: Any, render: RenderConfig):
        self.device = torch.device(actor_device())
        self.reward_fn = load_reward(reward_spec, self.device)
        self.render = render
        self.label = reward_label(reward_spec)

    def info(self) -> dict[str, Any]:
        return {"actor_id": ray.get_runtime_context().get_actor_id(), "pid": os.getpid(),
                "device": str(self.device), "reward": self.label}

    def score(self, gaussians: Gaussians, cameras: Cameras, prompts: Sequence[str],
              need_grad: bool) -> tuple[Tensor, Gaussians | None]:
        rewards, grads = score_with_grad(gaussians.to(self.device), cameras.to(self.device), prompts,
                                         self.reward_fn, self.render, need_grad)
        return rewards.cpu(), None if grads is None else grads.to("cpu")


def pool_key(config: AlignConfig) -> str:
    """Short hash naming the pool: same reward spec, render settings and actor resources -> same actors."""
    scale = config.scale
    spec = {"reward": config.reward, "render": dataclasses.asdict(config.render),
            "gpus": float(scale.reward_actor_gpus), "cpus": float(scale.reward_actor_cpus)}
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


#: a reward actor whose process dies (OOM killer, a lost node) is restarted and its call retried this many
#: times before the trainer sees an error; scoring is a pure function of its inputs, so a retry is exact
RESTARTS = 3


class RewardActorPool:
    """Handles to the ``scale.reward_actors`` named actors (created if missing); callable as an
    :data:`~r2d3.rewards.remote.Evaluate`."""

    def __init__(self, config: AlignConfig):
        scale = config.scale
        if scale.reward_actors < 1:
            raise ValueError(f"scale.reward_actors must be >= 1 for a reward actor pool, "
                             f"got {scale.reward_actors}")
        self.label = reward_label(config.reward)
        key = pool_key(config)
        self.names = [f"r2d3-reward-{key}-{i}" for i in range(scale.reward_actors)]
        self.actors = [
            RewardActor.options(name=name, get_if_exists=True, num_gpus=scale.reward_actor_gpus,
                                num_cpus=scale.reward_actor_cpus, max_restarts=RESTARTS,
                                max_task_retries=RESTARTS).remote(config.reward, config.render)
            for name in self.names
        ]
        self._next = 0

    def _get(self, ref: ray.ObjectRef, index: int) -> Any:
        try:
            return ray.get(ref)
        except RayActorError as err:
            raise RuntimeError(f"render/reward actor {self.names[index]!r} (reward {self.label!r}) died: "
                               f"{err}. Check its log (ray logs / the dashboard); lower the batch size or "
                               "give it more memory (scale.reward_actor_gpus / scale.reward_actor_cpus)"
                               ) from err

    def info(self) -> list[dict[str, Any]]:
        return [self._get(actor.info.remote(), i) for i, actor in enumerate(self.actors)]

    def __call__(self, gaussians: Gaussians, cameras: Cameras, prompts: Sequence[str],
                 need_grad: bool) -> tuple[Tensor, Gaussians | None]:
        batch = gaussians.batch_size
        gaussians = gaussians.detach().to("cpu")
        cameras = cameras.expand(batch).to("cpu")
        prompts = list(prompts)
        chunks = [c for c in torch.arange(batch).tensor_split(min(batch, len(self.actors))) if len(c)]
        refs, used = [], []
        for j, chunk in enumerate(chunks):
            i = (self._next + j) % len(self.actors)
            lo, hi = int(chunk[0]), int(chunk[-1]) + 1
            part = Cameras(cameras.viewmats[lo:hi], cameras.Ks[lo:hi], cameras.width, cameras.height)
            refs.append(self.actors[i].score.remote(gaussians[lo:hi], part, prompts[lo:hi], need_grad))
            used.append(i)
        self._next = (self._next + len(chunks)) % len(self.actors)
        results = [self._get(ref, i) for ref, i in zip(refs, used)]
        rewards = torch.cat([r for r, _ in results])
        grads = Gaussians.cat([g for _, g in results]) if need_grad else None
        return rewards, grads


def start_reward_actors(config: AlignConfig, timeout_s: float = 600.0) -> RewardActorPool:
    """Create (or look up) the pool and wait until every actor has built its reward model (in the driver,
    which then owns the actors; keep the returned pool until training ends)."""
    pool = RewardActorPool(config)
    try:
        ray.get([actor.info.remote() for actor in pool.actors], timeout=timeout_s)
    except GetTimeoutError:
        raise RuntimeError(f"{len(pool.actors)} render/reward actors ({config.scale.reward_actor_gpus} GPUs, "
                           f"{config.scale.reward_actor_cpus} CPUs each) not ready after {timeout_s:.0f} s: "
                           "does the cluster have room for them besides the trainers?") from None
    return pool


def make_remote_scorer(config: AlignConfig) -> RemoteScorer:
    """A :data:`~r2d3.algos.base.Scorer` backed by the shared pool of ``scale.reward_actors`` actors."""
    return RemoteScorer(RewardActorPool(config))


__all__ = ["RewardActor", "RewardActorPool", "make_remote_scorer", "pool_key", "start_reward_actors"]
