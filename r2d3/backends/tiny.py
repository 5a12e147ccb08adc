"""``tiny``: the embedded text-to-3D Gaussian-splat diffusion model.

A point-cloud diffusion transformer in the style of Point-E, small enough to train and align on two
CPU cores. Each sample is a set of ``N`` Gaussian tokens with 9 latent channels

    [0:3]  position / ``position_scale``          (world units, y up)
    [3:6]  colour * 2 - 1                          (linear RGB in [0, 1])
    [6:9]  surface normal (the Gaussian's shortest axis; any length, normalised on decode)

and the decoder turns them into flat surface Gaussians (disc-shaped: two tangential axes of
``tangent_scale``, a thin axis of ``normal_scale`` along the normal; fixed ``opacity``). The transformer
has no positional encoding, so it is equivariant to the order of the tokens, as a set model should be.
The text encoder (:class:`~r2d3.text.TextEncoder`) is trained jointly and frozen afterwards.
"""

from __future__ import annotations

import math
import os
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from torch import Tensor, nn

from r2d3.pretrained import WeightsError, check_keys_match
from r2d3.backends.base import register_backend
from r2d3.text import PromptEmbeds, TextEncoder
from r2d3.render.gaussians import Gaussians
from r2d3.render.quaternions import quat_from_z_to, rotate_z_by

LATENT_CHANNELS = 9
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out", "fc1", "fc2"]
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    # "leading" with offset 1 runs t = 951 ... 1: every step, the last included, is stochastic, and the
    # first step avoids t = 999, where the cosine schedule's alpha_bar (2e-9) turns the smallest error
    # of the epsilon prediction into an exploding x0_hat.
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of (possibly fractional) timesteps ``[B]`` -> ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class Attention(nn.Module):
    """Multi-head attention with peft-targetable projections ``to_q``/``to_k``/``to_v``/``to_out``."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim, dim)
        self.to_v = nn.Linear(context_dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        heads = lambda y: y.view(b, y.shape[1], self.num_heads, d // self.num_heads).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context))
        mask = None if context_mask is None else context_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, mult * dim)
        self.fc2 = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Self-attention over Gaussian tokens, cross-attention to text, MLP; adaLN-zero conditioning on
    timestep + pooled text so an untrained block starts as the identity."""

    def __init__(self, dim: int, num_heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn1 = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, num_heads, context_dim)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ff = FeedForward(dim)
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, cond: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        shift1, scale1, gate1, shift3, scale3, gate3 = self.ada(F.silu(cond))[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn1(self.norm1(x) * (1 + scale1) + shift1)
        x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + gate3 * self.ff(self.norm3(x) * (1 + scale3) + shift3)


class TinySplatDenoiser(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """``forward(x [B, N, 9], t [B], cond) -> epsilon prediction [B, N, 9]``."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        num_gaussians: int = 256,
        latent_channels: int = LATENT_CHANNELS,
        dim: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        context_dim: int = 128,
    ):
        super().__init__()
        self.proj_in = nn.Linear(latent_channels, dim)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_pool = nn.Linear(context_dim, dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads, context_dim) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, latent_channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, t: Tensor, cond: PromptEmbeds) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.config.latent_channels:
            raise ValueError(
                f"tiny denoiser expects latents [B, N, {self.config.latent_channels}], got {tuple(x.shape)}"
            )
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        mask = cond.mask.to(x.device)
        pooled = (cond.tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        c = self.time_mlp(timestep_embedding(t.to(x.device), self.config.dim).to(x.dtype)) + self.text_pool(pooled)
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, c, cond.tokens, mask)
        return self.proj_out(self.norm_out(h))


class TinySplatBackend:
    """The embedded default backend (registry name ``tiny``)."""

    name = "tiny"
    lora_target_modules = LORA_TARGET_MODULES
    #: the cosine schedule's cleanest training level (t = 0) is clean enough to decode the last latent
    final_x0 = False

    def __init__(
        self,
        denoiser: TinySplatDenoiser,
        text_encoder: TextEncoder,
        scheduler_config: dict[str, Any] | None = None,
        position_scale: float = 0.35,
        tangent_scale: float = 0.05,
        normal_scale: float = 0.006,
        opacity: float = 0.95,
    ):
        self.denoiser = denoiser
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config or DEFAULT_SCHEDULER_CONFIG)
        self.position_scale = position_scale
        self.tangent_scale = tangent_scale
        self.normal_scale = normal_scale
        self.opacity = opacity

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.denoiser.config.num_gaussians, self.denoiser.config.latent_channels)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def to(self, device: torch.device | str) -> "TinySplatBackend":
        self.denoiser.to(device)
        self.text_encoder.to(device)
        return self

    def decoder_config(self) -> dict[str, float]:
        return {
            "position_scale": self.position_scale,
            "tangent_scale": self.tangent_scale,
            "normal_scale": self.normal_scale,
            "opacity": self.opacity,
        }

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        return self.text_encoder(list(prompts))

    def denoise(self, x: Tensor, t: Tensor, cond: PromptEmbeds) -> Tensor:
        return self.denoiser(x, t, cond)

    def decode(self, latents: Tensor) -> Gaussians:
        """Differentiable latent ``[B, N, 9]`` -> Gaussians (colour clamps zero the gradient at saturation)."""
        b, n, _ = latents.shape
        normal = F.normalize(latents[..., 6:9], dim=-1, eps=1e-6)
        scales = latents.new_tensor([self.tangent_scale, self.tangent_scale, self.normal_scale]).expand(b, n, 3)
        return Gaussians(
            means=latents[..., 0:3] * self.position_scale,
            scales=scales,
            quats=quat_from_z_to(normal),
            opacities=latents.new_full((b, n), self.opacity),
            colors=((latents[..., 3:6] + 1) / 2).clamp(0, 1),
        )

    def encode_gaussians(self, gaussians: Gaussians) -> Tensor:
        """The training latent of a surface-Gaussian asset (inverse of :meth:`decode` up to the fixed
        scales/opacity): the normal is the Gaussian's local z axis, which must be its shortest axis."""
        normal = rotate_z_by(F.normalize(gaussians.quats, dim=-1))
        return torch.cat([gaussians.means / self.position_scale, gaussians.colors * 2 - 1, normal], dim=-1)

    # ---- weights -------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        import json

        path = Path(path)
        self.denoiser.save_pretrained(path / "denoiser")
        self.text_encoder.save_pretrained(path / "text_encoder")
        (path / "backend.json").write_text(
            json.dumps({"name": self.name, "scheduler": self.scheduler_config, "decoder": self.decoder_config()},
                       indent=2)
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str = "cpu") -> "TinySplatBackend":
        """Load weights from ``path`` (default: the weights shipped in the package)."""
        import json

        path = Path(path) if path is not None else default_weights_dir()
        meta_file = path / "backend.json"
        needed = [meta_file, path / "denoiser" / "config.json", path / "text_encoder" / "config.json"]
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            raise WeightsError(
                f"tiny backend weights are missing under {path}: {', '.join(missing)}. "
                "Rebuild them with `python pipelines/pretrain.py` or pass the directory it wrote."
            )
        try:
            meta = json.loads(meta_file.read_text())
            denoiser = TinySplatDenoiser.from_pretrained(path / "denoiser", use_safetensors=True)
            text_encoder = TextEncoder.from_pretrained(path / "text_encoder", use_safetensors=True)
            check_keys_match(denoiser, path / "denoiser")
            check_keys_match(text_encoder, path / "text_encoder")
        except WeightsError:
            raise
        except Exception as err:  # diffusers/safetensors raise several types for bad files
            raise WeightsError(f"could not load tiny backend weights from {path}: {err}") from err
        backend = cls(denoiser, text_encoder, meta["scheduler"], **meta["decoder"])
        return backend.to(device)

    @classmethod
    def random_init(cls, num_gaussians: int = 64, dim: int = 32, num_layers: int = 2, vocab: Sequence[str] = (),
                    seed: int = 0, **decoder: float) -> "TinySplatBackend":
        """A small randomly initialised model from the same code (tests, pretraining start)."""
        torch.manual_seed(seed)
        text = TextEncoder(vocab=tuple(vocab), dim=dim, num_layers=1, num_heads=2)
        den = TinySplatDenoiser(num_gaussians=num_gaussians, dim=dim, num_layers=num_layers, num_heads=2,
                                context_dim=dim)
        return cls(den, text, **decoder)


def default_weights_dir() -> Path:
    return Path(str(resources.files("r2d3"))) / "weights" / "tiny"


@register_backend("tiny")  # no own sampler settings: r2d3's SamplerConfig defaults are tuned for it
def _load_tiny(weights: str | None = None, device: str = "cpu") -> TinySplatBackend:
    return TinySplatBackend.from_pretrained(weights, device=device)
