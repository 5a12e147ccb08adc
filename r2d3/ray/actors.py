"""Ray actors of the r2d3 jobs: :func:`map_with_actors` streams work items through a pool of actors
(the evaluation and regeneration jobs), and :func:`actor_device` is what every actor does first: size
torch's thread pool to the CPUs Ray reserved for it and pick its device (a GPU only when Ray assigned
one, so actors never crowd a GPU they did not reserve)."""

from __future__ import annotations

import os
from typing import Any

import ray
import ray.data
import torch

from r2d3.ray.connect import init_ray


def actor_device(requested: str = "auto") -> str:
    """Set torch threads from ``OMP_NUM_THREADS`` (Ray sets it to the actor's CPUs) and resolve
    ``requested``: ``"auto"`` is ``cuda`` when this actor holds a GPU, else ``cpu``; anything else is kept."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
    if requested != "auto":
        return requested
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def map_with_actors(items: list[dict[str, Any]], actor_cls: type, kwargs: dict[str, Any], actors: int,
                    batch_size: int, cpus_per_actor: float, gpus_per_actor: float) -> ray.data.Dataset:
    """``items`` as a Ray Dataset mapped by a pool of ``actors`` instances of ``actor_cls(**kwargs)``,
    in about 4 blocks per actor so the pool stays busy; starts a local Ray (or joins ``RAY_ADDRESS``)
    when none is running."""
    init_ray()
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * actors)))
    return ds.map_batches(
        actor_cls, fn_constructor_kwargs=kwargs, batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
        **({"num_gpus": gpus_per_actor} if gpus_per_actor > 0 else {}),
    )
