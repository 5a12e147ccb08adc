"""``clip_tiny``: a small learned image–text reward trained in this repo on procedural renders.

Why: the embedded default needs a prompt-dependent learned reward (like HPSv2 in the paper) that runs
offline on CPU, so that alignment with a learned 2D reward and its reward hacking can be studied
end to end. It is a CLIP-style dual encoder:

- image tower: a 4-layer stride-2 CNN (GroupNorm + SiLU, down to 4x4, mean+max pooling) on 64x64
  RGB views as rendered (composited on white), scaled to [-1, 1];
- text tower: its own :class:`~r2d3.text.TextEncoder` (word vocabulary of the procedural
  grammar), masked mean pooling;
- linear projections to a shared 64-d space; the reward of a view is the **cosine similarity** between
  its image embedding and the prompt's text embedding, in [-1, 1], averaged over views.

Preprocessing is differentiable torch: views of another size are resized with
``F.interpolate(mode="bilinear", antialias=True)``. The model is frozen inside the reward; gradients
flow to the rendered RGB only.

Weights ship in the package at ``r2d3/weights/clip_tiny/`` (``config.json`` +
``diffusion_pytorch_model.safetensors``, 1.6 MB, 394 k parameters, plus ``training_report.json`` with
the measured accuracies and timings). They are rebuilt, seed 0, by::

    python pipelines/train_reward.py --what clip_tiny      # or without --what: also the shape classifier

Training: contrastive InfoNCE in both directions, plus hard-negative prompts that differ only in colour
or only in shape (:mod:`r2d3.rewards.clip_tiny_training`). It runs on cached 64x64 renders of 3,000
procedural TRAIN-split objects x 3 jittered orbit views. Wall time on the 2-core development machine,
which was shared with other jobs: 514 s for the whole pipeline (59 s rendering, 369 s clip_tiny
training); a run with 1,600 objects on a nearly idle machine took 52 s. Held-out pairwise accuracy,
matching vs. mismatched prompt: 99.8 % overall, 99.8 % colour-only, 99.8 % shape-only. See
docs/benchmarks.md, section "Learned reward (clip_tiny)".
"""

from __future__ import annotations

import math
import os
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from r2d3.pretrained import load_pretrained_dir
from r2d3.text import TextEncoder
from r2d3.render.output import RenderOutput
from r2d3.rewards.base import Reward, check_prompts, register_reward, views_as_batch

REBUILD_COMMAND = "python pipelines/train_reward.py --what clip_tiny"


def default_weights_dir() -> Path:
    """Where the package ships the clip_tiny weights."""
    return Path(str(resources.files("r2d3"))) / "weights" / "clip_tiny"


def to_model_resolution(images: Tensor, size: int) -> Tensor:
    """Differentiably resize ``[N, C, H, W]`` images to ``size x size`` (antialiased bilinear); no-op when
    they already have that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class ConvEncoder(nn.Module):
    """Small CNN: ``[N, C, S, S]`` -> ``[N, 2 * widths[-1]]`` (mean- and max-pooled features); every
    layer is a stride-2 3x3 convolution, so 64x64 inputs end at 4x4 after four layers.

    GroupNorm rather than BatchNorm so a sample's features never depend on the rest of its batch.
    """

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(prev, width, 3, stride=2, padding=1),
                nn.GroupNorm(min(8, width), width),
                nn.SiLU(),
            ]
            prev = width
        self.layers = nn.Sequential(*layers)
        self.out_features = 2 * prev

    def forward(self, x: Tensor) -> Tensor:
        h = self.layers(x)
        return torch.cat([h.mean(dim=(-2, -1)), h.amax(dim=(-2, -1))], dim=-1)


class ClipTinyModel(ModelMixin, ConfigMixin):
    """Dual encoder: ``encode_image([N, 3, H, W] in [0, 1])`` and ``encode_text(list[str])`` both return
    unit-norm ``[N, embed_dim]`` embeddings."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        vocab: tuple[str, ...] = (),
        image_size: int = 64,
        image_widths: tuple[int, ...] = (32, 64, 128, 128),
        text_dim: int = 64,
        text_layers: int = 2,
        text_heads: int = 4,
        max_length: int = 16,
        embed_dim: int = 64,
    ):
        super().__init__()
        self.image_encoder = ConvEncoder(3, image_widths)
        self.image_proj = nn.Sequential(
            nn.Linear(self.image_encoder.out_features, 2 * embed_dim),
            nn.SiLU(),
            nn.Linear(2 * embed_dim, embed_dim),
        )
        self.text_encoder = TextEncoder(
            vocab=tuple(vocab), max_length=max_length, dim=text_dim, num_layers=text_layers,
            num_heads=text_heads,
        )
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: Tensor) -> Tensor:
        x = to_model_resolution(images, self.config.image_size)
        x = x.to(self.image_proj[0].weight.dtype) * 2 - 1
        return F.normalize(self.image_proj(self.image_encoder(x)), dim=-1)

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        embeds = self.text_encoder(list(prompts))
        mask = embeds.mask[..., None].to(embeds.tokens.dtype)
        pooled = (embeds.tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(self.text_proj(pooled), dim=-1)


def load_clip_tiny(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> ClipTinyModel:
    """Load the model from ``path`` (default: the shipped weights); missing or corrupt files raise
    :class:`~r2d3.backends.base.WeightsError` naming the path and the command that rebuilds them."""
    path = Path(path) if path is not None else default_weights_dir()
    return load_pretrained_dir(ClipTinyModel, path, "clip_tiny", REBUILD_COMMAND, device)


@register_reward("clip_tiny")
class ClipTinyReward(Reward):
    """Cosine similarity between each rendered view and its asset's prompt under :class:`ClipTinyModel`;
    per-view scores in [-1, 1]. ``weights``: a directory written by the training pipeline (default: the
    weights shipped in the package)."""

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.model = load_clip_tiny(weights, device)

    def train(self, mode: bool = True) -> "ClipTinyReward":
        # the reward model is always in eval mode, whatever the surrounding module does
        super().train(mode)
        self.model.eval()
        return self

    def per_view(self, render: RenderOutput, prompts: Sequence[str]) -> Tensor:
        b, v = render.rgb.shape[:2]
        prompts = check_prompts(prompts, b, "clip_tiny")
        image = self.model.encode_image(views_as_batch(render.rgb)).reshape(b, v, -1)
        text = self.model.encode_text(prompts).to(image.dtype)
        return (image * text[:, None]).sum(dim=-1)
