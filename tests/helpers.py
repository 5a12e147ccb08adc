"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from r2d3.render.output import RenderOutput


def random_render(b: int = 2, v: int = 2, size: int = 20, seed: int = 0, dtype: torch.dtype = torch.float32
                  ) -> RenderOutput:
    """``b`` assets x ``v`` views of mid-range random RGB, fully opaque: input for image rewards."""
    g = torch.Generator().manual_seed(seed)
    rgb = (0.2 + 0.6 * torch.rand(b, v, 3, size, size, generator=g)).to(dtype)
    zeros = torch.zeros(b, v, 1, size, size, dtype=dtype)
    return RenderOutput(rgb=rgb, alpha=zeros + 1, depth=zeros, normal=torch.zeros_like(rgb), cameras=None)
