"""Where torch work runs: the one place ``auto`` device and GPU settings are resolved, so the trainer,
the evaluation and regeneration jobs, the sweep baseline and the Ray scale-out agree."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` is ``cuda`` when this process sees a GPU, else ``cpu``; any other name is taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_gpu(setting: bool | None, available: bool | None = None) -> bool:
    """``scale.use_gpu``: True/False as given; None (auto) follows ``available`` (default: whether this
    process sees a CUDA GPU)."""
    if setting is not None:
        return bool(setting)
    return torch.cuda.is_available() if available is None else bool(available)
