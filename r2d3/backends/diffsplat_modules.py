"""DiffSplat's networks and camera conventions: the multi-view PixArt-Σ transformer and SD1.5 UNet, the
GSVAE and the Plücker / depth geometry of its fixed input cameras (see :mod:`r2d3.backends.diffsplat`).

Kept apart from the backends so that both DiffSplat denoisers (PixArt-Σ, SD1.5) share the GSVAE, the
cameras, the cross-view attention and the weight loaders."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import BasicTransformerBlock
from torch import Tensor, nn

from r2d3.render.cameras import orbit_cameras

GS_CHANNELS = 12  # rgb 3, scale 3, rotation 4, opacity 1, depth 1
LATENT_CHANNELS = 4
PLUCKER_CHANNELS = 6
#: PixArt-Σ's training schedule with the step settings of the paper's sampler (DiffSplat-PixArt-Σ)
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DPMSolverMultistepScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 1,
}
#: SD1.5's training schedule as DiffSplat trains and samples it: its "common tricks" (Lin et al. 2023) set
#: trailing timestep spacing and rescale the betas to zero terminal SNR (diffusers then keeps the last
#: alpha_bar at 2**-24, so the first sigma and the epsilon model's x_0 stay finite)
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DPMSolverMultistepScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": True,
    "steps_offset": 1,
}


class MultiViewAttnProcessor:
    """Self-attention over the tokens of all ``num_views`` views of an object (batch ``(b v) n d``).

    Why: DiffSplat's views are one object; joint attention lets each view's Gaussians agree with the
    others. The self-attention of PixArt's and of SD1.5's transformer blocks has no mask, norms or
    residual inside the processor, which this checks rather than silently ignoring.

    A half-precision model (``backend.json`` ``dtype: bfloat16``) computes the attention itself in float32
    (queries, keys and values upcast, the result cast back), as the reference code's ``Transformer_FP32_Softmax``
    trick, which its HPSv2 and normal training scripts turn on: over 4 views x 256 tokens the bf16 logits
    would lose the small differences the softmax turns into weights."""

    def __init__(self, num_views: int):
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        self.num_views = num_views

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, **_: Any) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("multi-view self-attention takes no context or mask")
        if (attn.norm_q is not None or attn.residual_connection or attn.spatial_norm is not None
                or attn.group_norm is not None):
            raise ValueError("multi-view attention processor supports plain (PixArt / SD1.5) self-attention only")
        bv, n, dim = hidden_states.shape
        if bv % self.num_views:
            raise ValueError(f"batch {bv} is not a multiple of num_views={self.num_views}")
        b, heads = bv // self.num_views, attn.heads
        x = hidden_states.reshape(b, self.num_views * n, dim)
        split = lambda y: y.view(b, -1, heads, y.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        q, k, v = (split(proj(x)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if q.dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, self.num_views * n, -1).to(x.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.reshape(bv, n, -1) / attn.rescale_output_factor


class MultiViewPixArtTransformer(PixArtTransformer2DModel, PeftAdapterMixin):
    """PixArt-Σ transformer with cross-view self-attention (parameters identical to the 2D model's)."""

    def set_num_views(self, num_views: int) -> None:
        for block in self.transformer_blocks:
            block.attn1.set_processor(MultiViewAttnProcessor(num_views))


class MultiViewUNet(UNet2DConditionModel):
    """SD1.5's UNet with cross-view self-attention in every transformer block (DiffSplat's
    ``UNetMV2DConditionModel``: its MV blocks keep the parameter names of diffusers' blocks, so this is the
    2D model with the ``attn1`` processors swapped). Cross-attention to the CLIP prompt stays per view."""

    def set_num_views(self, num_views: int) -> None:
        blocks = [m for m in self.modules() if isinstance(m, BasicTransformerBlock)]
        if not blocks:
            raise ValueError("this UNet has no transformer blocks to attend across views")
        for block in blocks:
            block.attn1.set_processor(MultiViewAttnProcessor(num_views))


class GSVAE(nn.Module):
    """DiffSplat's GSAutoencoderKL, decoding side: ``vae`` (12-channel SDXL VAE) and ``tiny_decoder``.

    Attribute names match the released checkpoint's keys (``vae.*``, ``tiny_decoder.*``)."""

    def __init__(self, vae_config: dict[str, Any], tiny_config: dict[str, Any] | None = None):
        super().__init__()
        vae_config = {k: v for k, v in vae_config.items() if not k.startswith("_")}
        self.vae = AutoencoderKL(**{**vae_config, "in_channels": GS_CHANNELS, "out_channels": GS_CHANNELS})
        tiny_config = {k: v for k, v in (tiny_config or {}).items() if not k.startswith("_")}
        self.tiny_decoder = AutoencoderTiny(**{**tiny_config, "in_channels": 3, "out_channels": GS_CHANNELS}).decoder
        self.scaling_factor = float(self.vae.config.scaling_factor or 1.0)
        self.shift_factor = float(self.vae.config.shift_factor or 0.0)
        self.vae_config, self.tiny_config = dict(self.vae.config), tiny_config

    def decode(self, latents: Tensor, tiny: bool = False) -> Tensor:
        """Diffusion latents (scaled, ``[N, 4, h, w]``) -> splatter images ``[N, 12, H, W]`` in [-1, 1]."""
        if tiny:  # the tiny decoder reads the scaled latents directly
            x = self.tiny_decoder(self.vae.post_quant_conv(latents))
        else:
            z = latents / self.scaling_factor + self.shift_factor
            x = self.vae.decoder(self.vae.post_quant_conv(z))
        return x.clamp(-1.0, 1.0)


def input_c2w(geometry: dict[str, Any], dtype: torch.dtype = torch.float32) -> Tensor:
    """Camera-to-world (OpenCV) matrices of the fixed input cameras, ``[V, 4, 4]``.

    DiffSplat's orbit (y up, azimuth from +z towards +x, its elevation sign flipped) is the same placement
    as :func:`r2d3.render.orbit_cameras`, so its C2W is the inverse of our view matrices."""
    cams = orbit_cameras(geometry["elevation_deg"], geometry["azimuths_deg"], distance=geometry["distance"],
                         dtype=torch.float64)
    return torch.linalg.inv(cams.viewmats).to(dtype)


def plucker_rays(c2w: Tensor, fxfy: float, res: int) -> Tensor:
    """Plücker embeddings ``[V, 6, res, res]`` (o x d, d) in DiffSplat's pixel convention (see module doc)."""
    coords = torch.arange(res, dtype=torch.float64) / (res - 1)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dirs = torch.stack([x / fxfy, y / fxfy, torch.ones_like(x)], dim=-1).reshape(-1, 3)  # (x + .5 - .5) / f
    rot = c2w[:, :3, :3].double()
    d = F.normalize(dirs[None] @ rot.transpose(1, 2), dim=-1)  # [V, res*res, 3]
    o = c2w[:, None, :3, 3].double().expand_as(d)
    plucker = torch.cat([torch.linalg.cross(o, d, dim=-1), d], dim=-1)
    return plucker.reshape(len(c2w), res, res, 6).permute(0, 3, 1, 2).float()


def unproject_depth(depth: Tensor, c2w: Tensor, fxfy: float) -> Tensor:
    """World positions ``[B, V, H, W, 3]`` of depth maps ``[B, V, H, W]`` seen by cameras ``c2w`` ``[V, 4, 4]``
    (normalised pinhole, principal point 0.5, pixel coordinate ``j / (W - 1)`` as DiffSplat)."""
    h, w = depth.shape[-2:]
    ys = torch.arange(h, device=depth.device, dtype=depth.dtype) / (h - 1)
    xs = torch.arange(w, device=depth.device, dtype=depth.dtype) / (w - 1)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    cam = torch.stack([(x - 0.5) / fxfy, (y - 0.5) / fxfy, torch.ones_like(x)], dim=-1) * depth[..., None]
    c2w = c2w.to(depth)
    return torch.einsum("vij,bvhwj->bvhwi", c2w[:, :3, :3], cam) + c2w[None, :, None, None, :3, 3]
