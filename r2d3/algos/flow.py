"""The learned residual log-flow correction g_phi of Nabla-GFlowNet (the 2D paper's full objective).

With the forward-looking parameterisation the gradient of the residual log-flow at a state is

    grad log F~_t(x) = beta * w(t) * grad_x r(x0_hat(x)) + g_phi(x, t, c)

The first term is what the reward says about a state given the model's one-step guess of x_0; g_phi
learns what that guess gets wrong (how the flow of the reference sampler differs from the reward at
x0_hat). It must vanish at the terminal state, where log F~_0 = beta * r exactly, which is what the
terminal loss |g_phi(x_0)|^2 asks for, and it starts there: the output layer is zero-initialised, so a
fresh g_phi leaves the loss equal to the "no flow" objective.

The network outputs the gradient itself (as the official code does), not a scalar flow. It is a small
MLP over the flattened latent with a sinusoidal time embedding and the masked mean of the prompt's
text tokens: backend-agnostic (any latent shape), and cheap next to the denoiser.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from r2d3.text import PromptEmbeds


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of (possibly fractional) diffusion timesteps ``[B]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class FlowCorrection(nn.Module):
    """g_phi(x, t, c) ``[B, *S]``: the residual log-flow gradient the forward-looking term misses."""

    def __init__(self, latent_shape: tuple[int, ...], text_dim: int, hidden: int = 128, time_dim: int = 64):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"algo.flow_hidden must be >= 1, got {hidden}")
        self.latent_shape = tuple(latent_shape)
        self.time_dim = time_dim
        size = math.prod(self.latent_shape)
        self.inp = nn.Linear(size, hidden)
        self.time = nn.Linear(time_dim, hidden)
        self.text = nn.Linear(text_dim, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, size)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, cond: PromptEmbeds) -> Tensor:
        mask = cond.mask.to(cond.tokens.dtype)[..., None]
        text = (cond.tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        dtype = self.inp.weight.dtype
        h = self.inp(x.flatten(1).to(dtype)) + self.time(timestep_embedding(t, self.time_dim).to(dtype)) \
            + self.text(text.to(dtype))
        h = self.mid(nn.functional.silu(h))
        return self.out(nn.functional.silu(h)).view(x.shape[0], *self.latent_shape)


__all__ = ["FlowCorrection", "timestep_embedding"]
