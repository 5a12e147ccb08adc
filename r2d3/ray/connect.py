"""Connecting to Ray: one function every r2d3 job uses (torch-free, so command lines start fast)."""

from __future__ import annotations

import os

import ray


def init_ray(log_to_driver: bool = True, num_cpus: int | None = None) -> bool:
    """Join ``RAY_ADDRESS``'s cluster (``ray job submit`` sets it) or start a local Ray with ``num_cpus``
    (default: all), unless this process is connected already; True when this call started a local Ray.
    Every r2d3 job connects through here (Ray's logging stays the application's)."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address, num_cpus=None if address else num_cpus, log_to_driver=log_to_driver,
             configure_logging=False)
    return not address
