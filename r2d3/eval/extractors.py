"""Image feature extractors and image–text models for the evaluation metrics, behind one interface.

Every extractor takes channels-first RGB images in [0, 1], ``[N, 3, H, W]`` (renders as they are,
composited on the background), and returns ``[N, D]`` float features on the CPU; image–text models
also embed prompts, ``text_features(prompts) -> [N, D]`` in the same space. Specs accepted by
:func:`load_extractor` (and ``pipelines/evaluate.py --extractor``):

``clip_tiny`` / ``clip_tiny:<dir>``
    The project's own learned image–text model (:mod:`r2d3.rewards.clip_tiny`, weights shipped in the
    package; offline). Features are its unit-norm 64-d image embeddings; the text tower embeds prompts.
    The default on the embedded model. Note that it is also a reward: when the model is aligned to
    ``clip_tiny`` itself, the prompt–render similarity is the reward and not an independent measure.
``clip:<dir>``
    A Hugging Face ``transformers`` CLIP checkpoint saved with ``save_pretrained`` (``config.json``,
    ``model.safetensors``; tokenizer files for the text tower). Images are
    resized (bicubic, antialiased) to the model's input size and normalised with the processor's
    mean/std (``preprocessor_config.json`` if present, else CLIP's). Features: unit-norm projected
    image embeddings.
``vision:<dir>``
    Any ``transformers`` image backbone saved with ``save_pretrained`` (a ViT, DINOv2, ConvNeXt, ...:
    ``config.json`` + ``model.safetensors``): the Inception-style feature network for FID. Images are
    resized to its input size and normalised (``preprocessor_config.json`` if present, else ImageNet's);
    features are its pooled output (or the mean of the last hidden states when it has no pooler).

Weights are read from safetensors only (no pickled or TorchScript files, which can carry code).
Nothing is ever downloaded: a missing directory or file raises :class:`ExtractorWeightsError` naming
the path and what to put there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from r2d3.pretrained import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WeightsError,
    load_transformers_dir,
    model_input,
    normalisation,
    require_dir,
)
from r2d3.rewards.clip_tiny import load_clip_tiny


class ExtractorWeightsError(WeightsError):
    """An evaluation model's weights are missing or unreadable; the message names the path."""


class FeatureExtractor:
    """``image_features([N, 3, H, W] in [0, 1]) -> [N, D]`` (CPU, float32). ``name`` labels reports."""

    name: str = ""
    #: True when ``text_features`` exists (image–text models)
    has_text: bool = False

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64):
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _image_features(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images [N, 3, H, W], got shape {tuple(images.shape)}")
        out = [self._image_features(images[i: i + self.batch_size].to(self.device, torch.float32))
               for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out).float().cpu()

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        raise TypeError(f"extractor {self.name!r} has no text tower; prompt similarity needs an image–text "
                        "model (clip_tiny or clip:<dir>)")


class ClipTinyExtractor(FeatureExtractor):
    """The project's clip_tiny dual encoder (shipped weights by default)."""

    has_text = True

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64):
        super().__init__(device, batch_size)

        self.model = load_clip_tiny(weights, self.device)
        self.name = "clip_tiny" if weights is None else f"clip_tiny:{weights}"

    def _image_features(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> Tensor:
        return self.model.encode_text(list(prompts)).float().cpu()


class HFClipExtractor(FeatureExtractor):
    """A ``transformers`` CLIP model loaded from a local directory (``local_files_only``)."""

    has_text = True
    WHAT = ("a Hugging Face CLIP checkpoint written by CLIPModel.save_pretrained (config.json and "
            "model.safetensors), plus its tokenizer files (tokenizer.json or "
            "vocab.json + merges.txt) for prompt similarity")

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64):
        super().__init__(device, batch_size)
        self.path = Path(path)
        self.name = f"clip:{path}"
        require_dir(self.path, "CLIP", self.WHAT, ExtractorWeightsError)
        from transformers import CLIPModel

        self.model = load_transformers_dir(CLIPModel, self.path, "CLIP", self.WHAT, self.device, ExtractorWeightsError)
        self.mean, self.std = normalisation(self.path, CLIP_MEAN, CLIP_STD, self.device)
        self.size = int(self.model.config.vision_config.image_size)
        self._tokenizer = None

    @staticmethod
    def _pooled(out) -> Tensor:
        # transformers < 5 returns the projected tensor, >= 5 an output object holding it
        return out if isinstance(out, Tensor) else out.pooler_output

    def _image_features(self, images: Tensor) -> Tensor:
        x = model_input(images, self.size, self.mean, self.std, centre_crop=True)
        return F.normalize(self._pooled(self.model.get_image_features(pixel_values=x)), dim=-1)

    def tokenizer(self):
        if self._tokenizer is None:
            files = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
            if not any((self.path / f).is_file() for f in files):
                raise ExtractorWeightsError(f"no CLIP tokenizer files in {self.path} (tokenizer.json or vocab.json "
                                            "+ merges.txt): save the tokenizer next to the model "
                                            "(tokenizer.save_pretrained) to score prompt similarity")
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            except Exception as err:
                raise ExtractorWeightsError(f"could not load the CLIP tokenizer from {self.path} "
                                            f"({type(err).__name__}: {err})") from err
        return self._tokenizer

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> Tensor:
        max_len = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer()(list(prompts), padding=True, truncation=True, max_length=max_len,
                                  return_tensors="pt")
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device))
        return F.normalize(self._pooled(out), dim=-1).float().cpu()


class VisionExtractor(FeatureExtractor):
    """Pooled features of a ``transformers`` image backbone loaded from a local directory."""

    WHAT = ("an image backbone written by save_pretrained (config.json and model.safetensors; e.g. a ViT or "
            "DINOv2 saved on a machine with internet access)")

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64):
        super().__init__(device, batch_size)
        from transformers import AutoModel

        self.path = Path(path)
        self.name = f"vision:{path}"
        self.model = load_transformers_dir(AutoModel, self.path, "vision backbone", self.WHAT, self.device, ExtractorWeightsError)
        self.mean, self.std = normalisation(self.path, IMAGENET_MEAN, IMAGENET_STD, self.device)
        size = getattr(self.model.config, "image_size", 224)
        self.size = int(size[0] if isinstance(size, (list, tuple)) else size)

    def _image_features(self, images: Tensor) -> Tensor:
        out = self.model(pixel_values=model_input(images, self.size, self.mean, self.std))
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state.mean(dim=1)).flatten(1)


def load_extractor(spec: str = "clip_tiny", device: str | torch.device = "cpu") -> FeatureExtractor:
    """Build an extractor from a spec (see the module docstring); unknown kinds list the valid ones."""
    kind, _, arg = spec.partition(":")
    if kind == "clip_tiny":
        return ClipTinyExtractor(arg or None, device)
    if kind in ("clip", "vision"):
        if not arg:
            raise ValueError(f"--extractor {kind} needs a local weights path: {kind}:<dir>")
        return (HFClipExtractor if kind == "clip" else VisionExtractor)(arg, device)
    raise ValueError(f"unknown extractor {spec!r}; valid: clip_tiny, clip_tiny:<dir>, clip:<dir>, vision:<dir>")


# ---------------------------------------------------------------------------------------------------------
# multi-view features and prompt similarity


def view_features(extractor: FeatureExtractor, rgb: Tensor) -> Tensor:
    """Features of every view of every asset: ``[B, V, 3, H, W]`` -> ``[B, V, D]``."""
    if rgb.ndim != 5:
        raise ValueError(f"expected multi-view renders [B, V, 3, H, W], got shape {tuple(rgb.shape)}")
    b, v = rgb.shape[:2]
    return extractor.image_features(rgb.reshape(b * v, *rgb.shape[2:]).detach().float()).reshape(b, v, -1)


def pool_views(features: Tensor) -> Tensor:
    """Per-asset features: the mean over views, ``[B, V, D]`` -> ``[B, D]``."""
    return features.mean(dim=1)


def prompt_similarity(view_feats: Tensor, text_feats: Tensor) -> Tensor:
    """Multi-view prompt–render similarity: the cosine similarity between each view's image embedding
    and its asset's prompt embedding, averaged over views; ``[B, V, D] x [B, D] -> [B]`` in [-1, 1]."""
    img = F.normalize(view_feats.float(), dim=-1)
    txt = F.normalize(text_feats.float(), dim=-1)
    return (img * txt[:, None]).sum(dim=-1).mean(dim=1)


__all__ = [
    "ClipTinyExtractor",
    "ExtractorWeightsError",
    "FeatureExtractor",
    "HFClipExtractor",
    "VisionExtractor",
    "load_extractor",
    "pool_views",
    "prompt_similarity",
    "view_features",
]
