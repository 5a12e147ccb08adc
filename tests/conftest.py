"""Shared fixtures: quiet, offline logging and one Ray instance for the whole session."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with oversubscribed logical CPUs (Ray Data + Train would deadlock on 2)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, configure_logging=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
