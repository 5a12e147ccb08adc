"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from r2d3.render.output import RenderOutput


def save_tiny_weights(path, seed: int | None = None):
    """A small random-init tiny backend (the procedural vocabulary, a non-zero output layer so samples
    differ), saved to ``path``; returns ``path``."""
    from r2d3.backends import TinySplatBackend
    from r2d3.data.procedural import VOCABULARY

    if seed is not None:
        torch.manual_seed(seed)
    backend = TinySplatBackend.random_init(num_gaussians=24, dim=16, vocab=VOCABULARY)
    torch.nn.init.normal_(backend.denoiser.proj_out.weight, std=0.05)
    backend.save_pretrained(path)
    return path


def random_render(b: int = 2, v: int = 2, size: int = 20, seed: int = 0, dtype: torch.dtype = torch.float32
                  ) -> RenderOutput:
    """``b`` assets x ``v`` views of mid-range random RGB, fully opaque: input for image rewards."""
    g = torch.Generator().manual_seed(seed)
    rgb = (0.2 + 0.6 * torch.rand(b, v, 3, size, size, generator=g)).to(dtype)
    zeros = torch.zeros(b, v, 1, size, size, dtype=dtype)
    return RenderOutput(rgb=rgb, alpha=zeros + 1, depth=zeros, normal=torch.zeros_like(rgb), cameras=None)


def rows_at(trajectory, step: int, prompts, cond=None, cameras=None):
    """Every trajectory's transition ``step`` as the rows the Nabla-GFlowNet loss takes."""
    from r2d3.algos import SampleBatch
    from r2d3.algos.base import Transitions

    batch = SampleBatch(trajectory, list(prompts), cond, torch.zeros(len(prompts)))
    return Transitions.step_major(batch, [step], cameras)
