"""ImageReward (Xu et al. 2023, THUDM/ImageReward) on ``transformers``' BLIP modules, from LOCAL files.

ImageReward scores an image–prompt pair with BLIP: a ViT-L/16 (224 px) encodes the image, a BERT-base with
cross-attention in every layer reads the prompt while attending to all image tokens, and a linear MLP head
(768-1024-128-64-16-1, no nonlinearities, dropout inactive in eval) maps the text encoder's first-token
state to a score, normalised as ``(score - 0.16717362830052426) / 1.0333394966054072`` (about -2..2; higher
is better).

The model is held as a ``transformers`` :class:`~transformers.BlipVisionModel` and a
:class:`~transformers.BlipTextModel` (built with cross-attention) plus the MLP head, read from a directory
that ``pipelines/convert_weights.py image_reward`` writes from the original ``ImageReward.pt``:

    <dir>/vision/{config.json, model.safetensors}     BlipVisionConfig + weights
    <dir>/text/{config.json, model.safetensors}       BlipTextConfig + weights
    <dir>/tokenizer.json, tokenizer_config.json, ...  bert-base-uncased + BLIP's [DEC]/[ENC] tokens
    <dir>/head.safetensors                            the MLP head (keys ``layers.{0,2,4,6,7}.*``)
    <dir>/image_reward.json                           score mean/std, image size and mean/std, max_length

Safetensors only, never pickles. The model is frozen, in eval mode and fp32 by default; gradients flow to
the rendered views only.

Preprocessing (differentiable torch, no PIL): ImageReward resizes the short side to 224 (bicubic) and crops
the centre 224 x 224, then normalises with OpenAI CLIP's mean/std. Here each view ``[3, H, W]`` in [0, 1]
has its centre ``min(H, W)`` square cropped, is resized to 224 (bicubic, antialiased, like PIL's resize),
clamped to [0, 1] (PIL images cannot leave the range) and normalised. Rendered views are square, so the crop
is a no-op and this is the reference transform; non-square views are centre-cropped as ImageReward does
(crop-then-resize instead of resize-then-crop differs from it only in boundary filtering).

Prompts are tokenized as ImageReward does: ``padding="max_length"``, ``truncation``, ``max_length=35``; the
first token stays ``[CLS]`` (ImageReward's ``score``, ``inference_rank``, ``score_gard`` and its training
code never replace it with ``[ENC]``, unlike BLIP's image–text matching head). ``enc_first_token=True``
replaces it with ``[ENC]`` for BLIP-ITM-style inputs; that is NOT what the released model was trained with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from r2d3.pretrained import WeightsError, model_input
from r2d3.render.output import RenderOutput
from r2d3.rewards.base import (NEVER_DOWNLOADS, Reward, check_prompts, local_weights_dir, register_reward,
                               views_as_batch)
from r2d3.rewards.clip_models import AestheticHead

#: file names inside the ``image_reward`` weights directory
VISION_DIR, TEXT_DIR = "vision", "text"
HEAD_FILE = "head.safetensors"
SETTINGS_FILE = "image_reward.json"
_MODEL_FILES = ("config.json", "model.safetensors")

#: what to download and how to convert it (named in every missing-weights error)
CONVERT_COMMAND = ("python pipelines/convert_weights.py image_reward --input ImageReward.pt "
                   "--med-config med_config.json --tokenizer <bert-base-uncased dir> --output <dir>")
DOWNLOAD = ("`ImageReward.pt` and `med_config.json` from the Hugging Face model repository "
            "`THUDM/ImageReward`, plus the tokenizer files (vocab.txt, tokenizer.json, "
            "tokenizer_config.json) of the Hugging Face repo `bert-base-uncased` in a directory of their "
            "own, converted with "
            f"`{CONVERT_COMMAND}`")


def _weights_dir(weights: str | os.PathLike | None) -> Path:
    path = local_weights_dir(weights, "image_reward", f"the output of converting {DOWNLOAD}")
    missing = [str(path / sub / f) for sub in (VISION_DIR, TEXT_DIR) for f in _MODEL_FILES
               if not (path / sub / f).is_file()]
    missing += [str(path / f) for f in (HEAD_FILE, SETTINGS_FILE) if not (path / f).is_file()]
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        missing.append(f"{path / 'tokenizer.json'} (or vocab.txt: the tokenizer files)")
    if missing:
        pickles = [p.name for p in path.rglob("*") if p.suffix in (".pt", ".pth", ".bin")]
        note = (f" Pickled files ({', '.join(sorted(pickles)[:4])}) are never loaded: convert them."
                if pickles else "")
        raise WeightsError(f"image_reward weights incomplete in {path}: missing {', '.join(missing)}.{note} "
                           f"Download {DOWNLOAD} {NEVER_DOWNLOADS}.")
    return path


def _load_module(cls, config_cls, folder: Path, device: torch.device, **kwargs):
    """``cls(config, **kwargs)`` with weights from ``folder/model.safetensors``, loaded strictly."""
    from safetensors.torch import load_file

    try:
        config = config_cls.from_json_file(str(folder / "config.json"))
        model = cls(config, **kwargs)
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    except Exception as err:  # json, safetensors and shape/key mismatches raise several types
        raise WeightsError(f"could not load the image_reward {folder.name} model from {folder} "
                           f"({type(err).__name__}: {err}). Re-convert {DOWNLOAD}.") from err
    return model.to(device).eval().requires_grad_(False)


@register_reward("image_reward")
class ImageRewardReward(Reward):
    """ImageReward score of each view with its asset's prompt, ``[B, V]`` per view (about -2..2).

    ``weights``: the converted directory (see the module docstring); ``dtype``: compute dtype of the model and
    the preprocessing (fp32 by default; the result is returned in it); ``noise_std``: std of Gaussian noise
    added to the views before preprocessing (0 = off); ``enc_first_token``: replace the first token by
    ``[ENC]`` (off: ImageReward keeps ``[CLS]``)."""

    reward_name = "image_reward"

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, noise_std: float = 0.0,
                 enc_first_token: bool = False):
        super().__init__()
        from safetensors.torch import load_file
        from transformers import (
            AutoTokenizer,
            BlipTextConfig,
            BlipTextModel,
            BlipVisionConfig,
            BlipVisionModel,
        )

        path = _weights_dir(weights)
        self.dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError("image_reward: dtype must be a floating torch dtype such as 'float32', "
                             f"got {dtype!r}")
        self.noise_std = float(noise_std)
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        device = torch.device(device)
        try:
            settings = json.loads((path / SETTINGS_FILE).read_text())
            self.score_mean, self.score_std = float(settings["score_mean"]), float(settings["score_std"])
            self.size, self.max_length = int(settings["image_size"]), int(settings["max_length"])
            mean = torch.tensor(settings["image_mean"], dtype=self.dtype, device=device).view(1, 3, 1, 1)
            std = torch.tensor(settings["image_std"], dtype=self.dtype, device=device).view(1, 3, 1, 1)
        except Exception as err:
            raise WeightsError(f"could not read {path / SETTINGS_FILE} ({type(err).__name__}: {err}). "
                               f"Re-convert {DOWNLOAD}.") from err
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:
            raise WeightsError(f"could not load the image_reward tokenizer from {path} "
                               f"({type(err).__name__}: {err}). Re-convert {DOWNLOAD}.") from err
        self.enc_first_token = bool(enc_first_token)
        self.enc_token_id = int(settings.get("enc_token_id", self.tokenizer.convert_tokens_to_ids("[ENC]")))
        self.vision = _load_module(BlipVisionModel, BlipVisionConfig, path / VISION_DIR, device)
        self.vision.to(self.dtype)
        self.text = _load_module(BlipTextModel, BlipTextConfig, path / TEXT_DIR, device,
                                 add_pooling_layer=False)
        self.text.to(self.dtype)
        width = self.vision.config.hidden_size
        if not self.text.config.is_decoder or self.text.config.encoder_hidden_size != width:
            raise WeightsError(f"{path / TEXT_DIR / 'config.json'}: the text encoder must cross-attend to "
                               f"the {width}-wide image tokens (is_decoder=true, "
                               f"encoder_hidden_size={width}). Re-convert {DOWNLOAD}.")
        if self.vision.config.image_size != self.size:
            raise WeightsError(f"{path / SETTINGS_FILE}: image_size {self.size} != the ViT's "
                               f"{self.vision.config.image_size}. Re-convert {DOWNLOAD}.")
        self.head = AestheticHead(int(self.text.config.hidden_size))
        try:
            self.head.load_state_dict(load_file(str(path / HEAD_FILE)), strict=True)
        except Exception as err:
            raise WeightsError(f"could not load the image_reward head from {path / HEAD_FILE} "
                               f"({type(err).__name__}: {err}). Re-convert {DOWNLOAD}.") from err
        self.head.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def train(self, mode: bool = True) -> ImageRewardReward:
        # the reward model stays in eval mode (dropout off) whatever the surrounding module does
        super().train(mode)
        for module in (self.vision, self.text, self.head):
            module.eval()
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> the ViT's normalised ``[N, 3, S, S]`` input (differentiable): centre
        square crop, bicubic antialiased resize, clamp, CLIP mean/std."""
        images = images.to(self.dtype)
        if self.noise_std > 0:
            images = images + self.noise_std * torch.randn_like(images)
        h, w = images.shape[-2:]
        side = min(h, w)
        top, left = round((h - side) / 2.0), round((w - side) / 2.0)
        images = images[..., top:top + side, left:left + side]
        return model_input(images, self.size, self.mean, self.std, centre_crop=True)

    def tokens(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` ``[N, max_length]`` as ImageReward tokenizes prompts."""
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids = tok["input_ids"].to(self.mean.device)
        if self.enc_first_token:
            ids = ids.clone()
            ids[:, 0] = self.enc_token_id
        return ids, tok["attention_mask"].to(self.mean.device)

    def score(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Normalised ImageReward scores ``[N]``: images ``[N, 3, H, W]`` in [0, 1], token rows ``[N, L]``."""
        image_embeds = self.vision(pixel_values=self.preprocess(images)).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask,
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                        is_decoder=False)
        raw = self.head(out.last_hidden_state[:, 0])[:, 0]
        return (raw - self.score_mean) / self.score_std

    def per_view(self, render: RenderOutput, prompts: Sequence[str]) -> Tensor:
        b, v = render.rgb.shape[:2]
        prompts = check_prompts(prompts, b, self.reward_name)
        ids, mask = self.tokens(prompts)
        scores = self.score(views_as_batch(render.rgb), ids.repeat_interleave(v, dim=0),
                            mask.repeat_interleave(v, dim=0))
        return scores.reshape(b, v)


__all__ = [
    "CONVERT_COMMAND",
    "DOWNLOAD",
    "HEAD_FILE",
    "SETTINGS_FILE",
    "ImageRewardReward",
]
