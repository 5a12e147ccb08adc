"""Rewards on real pretrained CLIP-architecture models, loaded from LOCAL files (nothing is downloaded).

All four are ``transformers`` :class:`~transformers.CLIPModel` checkpoints read from a directory
written by ``save_pretrained`` (``config.json`` + ``model.safetensors``; safetensors only, never pickles),
frozen, in fp32 by default (the paper computes rewards in fp32). Preprocessing is differentiable torch:
each view ``[3, H, W]`` in [0, 1] is resized (bicubic, antialiased) to the model's square input size,
clamped to [0, 1] and normalised with the checkpoint's mean/std (``preprocessor_config.json`` if present,
else OpenAI CLIP's) -- the helpers of :mod:`r2d3.eval.extractors`. Renders are square, so this equals the
reference resize-then-centre-crop (PickScore) and the letterbox resize (HPSv2) exactly; non-square views
are stretched. Optional image noise (``noise_std``; the reference adds N(0, 2e-3^2) to the views before
the reward) is off by default so that rewards are deterministic.

``clip_score``      cosine similarity of image and prompt embeddings, in [-1, 1] (``mode="cosine"``,
                    default) or CLIPScore, ``2.5 * max(cos, 0)`` (Hessel et al. 2021; ``mode="clipscore"``,
                    zero gradient where the cosine is negative). Any CLIP, e.g.
                    ``openai/clip-vit-large-patch14``.
``laion_aesthetic`` LAION improved aesthetic predictor: the unit-norm projected CLIP ViT-L/14 image
                    embedding -> a linear MLP head (768-1024-128-64-16-1, dropout inactive in eval, no
                    nonlinearities) -> a score of about 1..10. Prompt-independent.
``hpsv2``           Human Preference Score v2(.1): an OpenCLIP ViT-H-14 fine-tuned on human preferences,
                    converted to transformers format by ``pipelines/convert_weights.py hpsv2``. Score =
                    cosine similarity of image and prompt embeddings, without logit scale (about 0.2-0.35).
``pickscore``       PickScore v1 (a CLIP-H fine-tuned on Pick-a-Pic, released in transformers format).
                    Score = ``logit_scale.exp() * cosine`` as in its reference usage (about 15-25).

Each reward takes ``weights`` (a local directory; see :data:`DOWNLOADS` for what to put there) and
raises :class:`~r2d3.backends.base.WeightsError` naming exactly what to download and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from r2d3.pretrained import CLIP_MEAN, CLIP_STD, WeightsError, load_transformers_dir, model_input, normalisation
from r2d3.render.output import RenderOutput
from r2d3.rewards.base import (Reward, check_prompts, local_weights_dir, register_reward,
                               views_as_batch)

#: file name of the converted LAION aesthetic head inside the ``laion_aesthetic`` weights directory
AESTHETIC_HEAD_FILE = "aesthetic_mlp.safetensors"

#: what each reward needs on disk (named in every missing-weights error)
_TOKENIZER_FILES = ("tokenizer.json (or vocab.json + merges.txt), tokenizer_config.json, "
                    "special_tokens_map.json")
DOWNLOADS = {
    "clip_score": "a transformers CLIP checkpoint, e.g. the Hugging Face repo "
                  "`openai/clip-vit-large-patch14` "
                  f"(config.json, model.safetensors, preprocessor_config.json, {_TOKENIZER_FILES})",
    "laion_aesthetic": "the Hugging Face repo `openai/clip-vit-large-patch14` (config.json, "
                       "model.safetensors, preprocessor_config.json) plus the LAION head "
                       "`sac+logos+ava1-l14-linearMSE.pth` "
                       "(GitHub christophschuhmann/improved-aesthetic-predictor) converted with "
                       "`python pipelines/convert_weights.py aesthetic --input "
                       f"sac+logos+ava1-l14-linearMSE.pth --output <dir>/{AESTHETIC_HEAD_FILE}`",
    "hpsv2": "the HPS v2.1 checkpoint `HPS_v2.1_compressed.pt` (Hugging Face repo `xswu/HPSv2`) converted "
             "with `python pipelines/convert_weights.py hpsv2 --input HPS_v2.1_compressed.pt "
             "--output <dir>`, "
             f"plus the tokenizer files ({_TOKENIZER_FILES}) of the Hugging Face repo "
             "`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` copied into <dir>",
    "pickscore": "the Hugging Face repo `yuvalkirstain/PickScore_v1` (config.json, model.safetensors; a "
                 "pytorch_model.bin converts with `python pipelines/convert_weights.py bin`) plus the "
                 f"preprocessor_config.json and tokenizer files ({_TOKENIZER_FILES}) of "
                 "`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, all in one directory",
}


def _weights_dir(weights: str | os.PathLike | None, reward: str) -> Path:
    return local_weights_dir(weights, reward, DOWNLOADS[reward])


def _load_tokenizer(path: Path, reward: str):
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise WeightsError(f"{reward} weights incomplete in {path}: no tokenizer files (tokenizer.json or "
                           f"vocab.json + merges.txt). Put {DOWNLOADS[reward]} there.")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise WeightsError(f"could not load the {reward} tokenizer from {path} "
                           f"({type(err).__name__}: {err}). Put {DOWNLOADS[reward]} there.") from err


def _embedding(out) -> Tensor:
    # transformers < 5 returns the projected tensor, >= 5 an output object holding it
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipModelReward(Reward):
    """Base of the CLIP-architecture rewards: loading, differentiable preprocessing and embeddings.

    ``weights``: local directory (see :data:`DOWNLOADS`); ``dtype``: compute dtype of the model and the
    preprocessing (fp32 by default; the result is returned in it); ``noise_std``: std of Gaussian noise
    added to the views before preprocessing (0 = off; the reference uses 2e-3)."""

    #: registry name used in error messages
    reward_name = ""
    #: whether the reward embeds prompts (needs tokenizer files)
    needs_text = True

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, noise_std: float = 0.0):
        super().__init__()
        from transformers import CLIPModel

        name = self.reward_name
        path = _weights_dir(weights, name)
        self.dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"{name}: dtype must be a floating torch dtype such as 'float32', got {dtype!r}")
        self.noise_std = float(noise_std)
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        device = torch.device(device)
        self.tokenizer = _load_tokenizer(path, name) if self.needs_text else None
        self.model = load_transformers_dir(CLIPModel, path, name, DOWNLOADS[name], device).to(self.dtype)
        mean, std = normalisation(path, CLIP_MEAN, CLIP_STD, device)
        self.register_buffer("mean", mean.to(self.dtype), persistent=False)
        self.register_buffer("std", std.to(self.dtype), persistent=False)
        self.size = int(self.model.config.vision_config.image_size)

    def train(self, mode: bool = True) -> "ClipModelReward":
        # the reward model stays in eval mode (dropout off) whatever the surrounding module does
        super().train(mode)
        self.model.eval()
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> the model's normalised ``[N, 3, S, S]`` input (differentiable)."""
        images = images.to(self.dtype)
        if self.noise_std > 0:
            images = images + self.noise_std * torch.randn_like(images)
        return model_input(images, self.size, self.mean, self.std, centre_crop=True)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Unit-norm projected image embeddings ``[N, D]``."""
        out = self.model.get_image_features(pixel_values=self.preprocess(images))
        return F.normalize(_embedding(out), dim=-1)

    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm projected prompt embeddings ``[N, D]`` (no gradient: prompts are constants)."""
        max_len = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len,
                                return_tensors="pt")
        device = self.mean.device
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                               attention_mask=tokens["attention_mask"].to(device))
        return F.normalize(_embedding(out), dim=-1)

    def cosine(self, render: RenderOutput, prompts: Sequence[str]) -> Tensor:
        """Cosine similarity of each view with its asset's prompt, ``[B, V]``."""
        b, v = render.rgb.shape[:2]
        prompts = check_prompts(prompts, b, self.reward_name)
        image = self.image_embeddings(views_as_batch(render.rgb)).reshape(b, v, -1)
        text = self.text_embeddings(prompts).to(image.dtype)
        return (image * text[:, None]).sum(dim=-1)


#: the caption template of CLIPScore (Hessel et al. 2021), prepended in ``mode="clipscore"``
CLIPSCORE_PREFIX = "A photo depicts "


@register_reward("clip_score")
class ClipScoreReward(ClipModelReward):
    """Prompt–view CLIP similarity: ``mode="cosine"`` (default, in [-1, 1]) or ``"clipscore"``
    (``2.5 * max(cos, 0)`` of the caption "A photo depicts <prompt>", as Hessel et al.'s CLIPScore)."""

    reward_name = "clip_score"

    def __init__(self, weights: str | os.PathLike | None = None, mode: str = "cosine", **kwargs):
        if mode not in ("cosine", "clipscore"):
            raise ValueError(f"clip_score mode must be 'cosine' or 'clipscore', got {mode!r}")
        super().__init__(weights, **kwargs)
        self.mode = mode

    def per_view(self, render: RenderOutput, prompts: Sequence[str]) -> Tensor:
        if self.mode == "cosine":
            return self.cosine(render, prompts)
        prompts = check_prompts(prompts, render.rgb.shape[0], self.reward_name)
        return 2.5 * self.cosine(render, [CLIPSCORE_PREFIX + p for p in prompts]).clamp(min=0)


@register_reward("hpsv2")
class HPSv2Reward(ClipModelReward):
    """HPS v2.1: cosine similarity (no logit scale) under the converted HPS OpenCLIP ViT-H-14."""

    reward_name = "hpsv2"

    def per_view(self, render: RenderOutput, prompts: Sequence[str]) -> Tensor:
        return self.cosine(render, prompts)


@register_reward("pickscore")
class PickScoreReward(ClipModelReward):
    """PickScore v1: ``logit_scale.exp() * cosine``."""

    reward_name = "pickscore"

    def per_view(self, render: RenderOutput, prompts: Sequence[str]) -> Tensor:
        return self.model.logit_scale.exp().to(self.dtype) * self.cosine(render, prompts)


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP head. Layer sizes, dropout rates and the absence of
    nonlinearities follow the public description of ``christophschuhmann/improved-aesthetic-predictor``
    (an ``nn.Sequential`` named ``layers``: Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
    Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1)), so the original state-dict keys
    ``layers.{0,2,4,6,7}.{weight,bias}`` load unchanged."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def load_aesthetic_head(path: Path, input_size: int, device: torch.device,
                        dtype: torch.dtype) -> AestheticHead:
    """The head from a safetensors file (strict keys and shapes); problems raise :class:`WeightsError`."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightsError(f"laion_aesthetic head not found: {path}. "
                           f"Put {DOWNLOADS['laion_aesthetic']} there.")
    head = AestheticHead(input_size)
    try:
        head.load_state_dict(load_file(str(path)), strict=True)
    except Exception as err:
        raise WeightsError(f"could not load the laion_aesthetic head from {path} "
                           f"({type(err).__name__}: {err}); expected {DOWNLOADS['laion_aesthetic']}") from err
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False)


@register_reward("laion_aesthetic")
class LaionAestheticReward(ClipModelReward):
    """LAION aesthetic score of each view (prompt-independent). ``weights``: a directory with the CLIP
    ViT-L/14 checkpoint and ``aesthetic_mlp.safetensors``; ``head``: another path for the head file."""

    reward_name = "laion_aesthetic"
    needs_text = False

    def __init__(self, weights: str | os.PathLike | None = None, head: str | os.PathLike | None = None,
                 **kwargs):
        super().__init__(weights, **kwargs)
        head_path = Path(head) if head is not None else Path(weights) / AESTHETIC_HEAD_FILE
        self.head = load_aesthetic_head(head_path, int(self.model.config.projection_dim), self.mean.device,
                                        self.dtype)

    def train(self, mode: bool = True) -> "LaionAestheticReward":
        super().train(mode)
        self.head.eval()
        return self

    def per_view(self, render: RenderOutput, prompts: Sequence[str]) -> Tensor:
        b, v = render.rgb.shape[:2]
        check_prompts(prompts, b, self.reward_name)
        return self.head(self.image_embeddings(views_as_batch(render.rgb)))[:, 0].reshape(b, v)


__all__ = [
    "AESTHETIC_HEAD_FILE",
    "DOWNLOADS",
    "AestheticHead",
    "ClipModelReward",
    "ClipScoreReward",
    "HPSv2Reward",
    "LaionAestheticReward",
    "PickScoreReward",
    "load_aesthetic_head",
]
