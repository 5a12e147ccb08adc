"""Loading learned components from local files, and the image preprocessing they share.

Every learned part of r2d3 (backends, rewards, evaluation models) is read from a directory written
by diffusers' or transformers' ``save_pretrained``, safetensors only (pickled or TorchScript files
can carry code), and nothing is ever downloaded. The errors name the path and what to put there,
so a missing or corrupt checkpoint fails before a job spends compute. This module sits below every
package that loads weights, so rewards and evaluation models share it without importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: CLIP's image normalisation (used when a checkpoint has no preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Missing, unreadable or mismatching model weights; the message says which file and what to do."""


def check_keys_match(module: nn.Module, directory: Path,
                     filename: str = "diffusion_pytorch_model.safetensors") -> None:
    """Strict loading for modules loaded through diffusers' ``from_pretrained``, which only warns about
    unexpected tensors (and may initialise missing ones): both are a ``WeightsError`` naming the file."""
    from safetensors import safe_open

    file = directory / filename
    with safe_open(str(file), framework="pt") as f:
        saved = set(f.keys())
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise WeightsError(f"{file} does not match {type(module).__name__}: missing {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''}")


#: the file name diffusers' ``save_pretrained`` gives a model's safetensors weights
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def load_pretrained_dir(cls: Any, path: Path, label: str, rebuild: str, device: str | Any = "cpu") -> Any:
    """``cls.from_pretrained(path)`` (safetensors only) frozen in eval mode on ``device``; missing or
    corrupt files raise :class:`WeightsError` naming the path and the command that rebuilds them."""
    needed = [path / cls.config_name, path / WEIGHTS_FILE]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise WeightsError(f"{label} weights are missing: {', '.join(missing)}. Rebuild them with `{rebuild}` "
                           "or pass the directory it wrote.")
    try:
        json.loads(needed[0].read_text())
        model = cls.from_pretrained(path, use_safetensors=True, low_cpu_mem_usage=False)
    except Exception as err:  # json, safetensors and diffusers raise several types for bad files
        raise WeightsError(f"could not load {label} weights from {path} ({type(err).__name__}: {err}). The files "
                           f"are corrupt or from an incompatible version; rebuild them with `{rebuild}`.") from err
    return model.to(device).eval().requires_grad_(False)


def require_dir(path: Path, kind: str, what: str, error: type[WeightsError] = WeightsError) -> None:
    if not path.is_dir():
        raise error(f"{kind} weights not found: {path} is not a directory. Put {what} there "
                    "(this project never downloads weights).")


def load_transformers_dir(model_cls: Any, path: Path, kind: str, what: str, device: str | torch.device,
                          error: type[WeightsError] = WeightsError) -> Any:
    """``model_cls.from_pretrained`` from local safetensors only, with errors that name the path."""
    require_dir(path, kind, what, error)
    missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()
               and not (f == "model.safetensors" and (path / "model.safetensors.index.json").is_file())]
    if missing:
        raise error(f"{kind} weights incomplete in {path}: missing {', '.join(missing)}. "
                                    f"Put {what} there.")
    try:
        model, info = model_cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                output_loading_info=True)
    except Exception as err:  # corrupt or mismatching files
        raise error(f"could not load {kind} weights from {path} ({type(err).__name__}: {err})") from err
    # strict: transformers would random-initialise a missing tensor and only print a report
    problems = {label: [str(k) for k in info.get(key) or [] if "position_ids" not in str(k)]
                for label, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                                   ("mis-shaped", "mismatched_keys"))}
    if any(problems.values()):
        listed = "; ".join(f"{label} {keys[:4]}{' ...' if len(keys) > 4 else ''}"
                           for label, keys in problems.items() if keys)
        raise error(f"{kind} weights in {path} do not match {model_cls.__name__}: {listed}. "
                                    f"Put {what} there.")
    return model.to(device).eval().requires_grad_(False)


def normalisation(path: Path, mean: Sequence[float], std: Sequence[float], device: str | torch.device) -> tuple[Tensor, Tensor]:
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def model_input(images: Tensor, size: int, mean: Tensor, std: Tensor, centre_crop: bool = False) -> Tensor:
    """Differentiable preprocessing: bicubic resize to ``size`` and normalisation. ``centre_crop`` first
    takes the centre square, as CLIP-family models' own preprocessing does (resize the shortest side,
    centre crop), so a non-square image is never stretched; without it the image is resized whole, as
    FID-style feature extractors do."""
    h, w = images.shape[-2:]
    if centre_crop and h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        images = images[..., top: top + side, left: left + side]
    x = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return (x - mean) / std
