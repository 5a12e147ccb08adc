"""Reading DiffSplat's released weights strictly (every missing, unexpected or mis-shaped key named) and
laying out the release as :class:`~r2d3.backends.diffsplat.DiffSplatBackend` (PixArt-Σ) and
:class:`~r2d3.backends.diffsplat_sd15.DiffSplatSD15Backend` read it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from r2d3.backends.diffsplat_modules import (DEFAULT_SCHEDULER_CONFIG, GSVAE, SD15_SCHEDULER_CONFIG,
                                             MultiViewPixArtTransformer, MultiViewUNet)
from r2d3.pretrained import WeightsError

TRANSFORMER_DIR, UNET_DIR, GSVAE_DIR = "transformer", "unet", "gsvae"
TEXT_ENCODER_DIR, TOKENIZER_DIR = "text_encoder", "tokenizer"
GSVAE_WEIGHTS, VAE_CONFIG, TINY_CONFIG = "model.safetensors", "vae_config.json", "tiny_decoder_config.json"
BACKEND_FILE = "backend.json"
LAYOUT_HELP = (
    "Expected layout (README, 'Using real models'): transformer/ = DiffSplat's "
    "gsdiff_gobj83k_pas_fp16__render/checkpoints/<iter>/transformer_ema (config.json + safetensors); "
    "gsvae/model.safetensors = gsvae_gobj265k_sdxl_fp16/checkpoints/<iter>/model.safetensors, with "
    "gsvae/vae_config.json = PixArt-Σ's vae/config.json; text_encoder/ and tokenizer/ = "
    "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers's folders of those names."
)
SD15_LAYOUT_HELP = (
    "Expected layout (README, 'Using real models'): unet/ = DiffSplat's "
    "gsdiff_gobj83k_sd15__render/checkpoints/<iter>/unet_ema (config.json + safetensors); "
    "gsvae/model.safetensors = gsvae_gobj265k_sd/checkpoints/<iter>/model.safetensors, with "
    "gsvae/vae_config.json = SD1.5's vae/config.json; text_encoder/ and tokenizer/ = "
    "stable-diffusion-v1-5's folders of those names (CLIP ViT-L/14)."
)
#: DiffSplat's multi-view UNet blocks -> the diffusers blocks with the same parameters
_MV_BLOCKS = {"CrossAttnDownBlockMV2D": "CrossAttnDownBlock2D", "UNetMidBlockMV2DCrossAttn": "UNetMidBlock2DCrossAttn",
              "CrossAttnUpBlockMV2D": "CrossAttnUpBlock2D"}


def read_json(file: Path, label: str) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"could not read {label} {file}: {err}") from err


def _require(files: Sequence[Path], what: str, help: str = LAYOUT_HELP) -> None:
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WeightsError(f"DiffSplat {what} is missing: {', '.join(missing)}. {help}")


def load_state_dict_files(directory: Path, stem: str, help: str = LAYOUT_HELP) -> dict[str, Tensor]:
    """A safetensors state dict, single-file (``<stem>.safetensors``) or sharded (``<stem>.safetensors.index.json``)."""
    single, index = directory / f"{stem}.safetensors", directory / f"{stem}.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(read_json(index, "safetensors index")["weight_map"].values()))
        _require([directory / s for s in shards], "weight shard", help)
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(directory / shard))
        return state
    raise WeightsError(f"DiffSplat weights are missing: neither {single} nor {index} exists. {help}")


def load_strict(module: nn.Module, state: dict[str, Tensor], label: str) -> None:
    """``load_state_dict`` that names every missing, unexpected and mis-shaped key (no silent partial load)."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise WeightsError(f"{label} does not match the architecture: {len(missing)} missing keys {missing[:5]}, "
                           f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(shapes)} shape mismatches "
                           f"{shapes[:5]}")
    module.load_state_dict(state, strict=True)


def load_transformer(directory: Path) -> MultiViewPixArtTransformer:
    _require([directory / "config.json"], "transformer config")
    config = read_json(directory / "config.json", "transformer config")
    known = set(MultiViewPixArtTransformer.extract_init_dict(config)[0])
    model = MultiViewPixArtTransformer.from_config({k: v for k, v in config.items() if k in known or k.startswith("_")})
    load_strict(model, load_state_dict_files(directory, "diffusion_pytorch_model"), f"DiffSplat transformer {directory}")
    return model.eval().requires_grad_(False)


def load_unet(directory: Path) -> MultiViewUNet:
    """DiffSplat-SD1.5's ``unet_ema`` (saved by its EMA model as ``UNetMV2DConditionModel``: MV block names and
    its input flags in config.json). Image-conditioned variants (an extra condition view or mask channel)
    are refused: r2d3 aligns the text-conditioned model."""
    _require([directory / "config.json"], "UNet config", SD15_LAYOUT_HELP)
    config = read_json(directory / "config.json", "UNet config")
    conditioned = [k for k in ("view_concat_condition", "input_concat_binary_mask") if config.get(k)]
    if conditioned:
        raise WeightsError(f"DiffSplat UNet {directory} is image-conditioned ({', '.join(conditioned)} set); only the "
                           f"text-conditioned gsdiff_gobj83k_sd15__render model is supported")
    if "input_concat_plucker" in config and not config["input_concat_plucker"]:
        raise WeightsError(f"DiffSplat UNet {directory} does not take Plücker rays (input_concat_plucker=false)")
    for key in ("down_block_types", "up_block_types"):
        if key in config:
            config[key] = [_MV_BLOCKS.get(b, b) for b in config[key]]
    if "mid_block_type" in config:
        config["mid_block_type"] = _MV_BLOCKS.get(config["mid_block_type"], config["mid_block_type"])
    for flag in ("view_concat_condition", "input_concat_plucker", "input_concat_binary_mask"):
        config.pop(flag, None)  # DiffSplat's input flags, checked above; not UNet arguments
    model = MultiViewUNet.from_config(config)
    load_strict(model, load_state_dict_files(directory, "diffusion_pytorch_model", SD15_LAYOUT_HELP),
                f"DiffSplat UNet {directory}")
    return model.eval().requires_grad_(False)


def load_gsvae(directory: Path, help: str = LAYOUT_HELP) -> GSVAE:
    _require([directory / GSVAE_WEIGHTS, directory / VAE_CONFIG], "GSVAE", help)
    tiny = read_json(directory / TINY_CONFIG, "tiny decoder config") if (directory / TINY_CONFIG).is_file() else None
    model = GSVAE(read_json(directory / VAE_CONFIG, "VAE config"), tiny)
    load_strict(model, load_file(directory / GSVAE_WEIGHTS), f"DiffSplat GSVAE {directory / GSVAE_WEIGHTS}")
    return model.eval().requires_grad_(False)


def load_text_encoder(path: Path, dtype: torch.dtype, kind: str = "t5") -> tuple[Any, Any]:
    """The text encoder and tokenizer from ``path/text_encoder`` and ``path/tokenizer``: PixArt-Σ's T5
    (``kind="t5"``) or SD1.5's CLIP text model (``kind="clip"``)."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    encoder_cls, label, help = {"t5": (T5EncoderModel, "T5", LAYOUT_HELP),
                                "clip": (CLIPTextModel, "CLIP", SD15_LAYOUT_HELP)}[kind]
    _require([path / TEXT_ENCODER_DIR / "config.json"], f"{label} text encoder", help)
    if not (path / TOKENIZER_DIR).is_dir():
        raise WeightsError(f"DiffSplat tokenizer is missing: {path / TOKENIZER_DIR}. {help}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path / TOKENIZER_DIR)
        encoder = encoder_cls.from_pretrained(path / TEXT_ENCODER_DIR, use_safetensors=True, dtype=dtype)
    except (OSError, ValueError, ImportError) as err:
        raise WeightsError(f"could not load the {label} text encoder/tokenizer under {path} ({err}). A SentencePiece "
                           f"tokenizer needs `pip install sentencepiece`. {help}") from err
    return encoder.eval().requires_grad_(False), tokenizer


@dataclass(frozen=True)
class ReleaseVariant:
    """Where one DiffSplat model sits in the release, and what of its base model it needs."""

    backend: str  # the r2d3 registry name
    denoiser_run: str  # release run directory of the text-conditioned denoiser
    denoiser_ema: str  # the EMA weights' folder in each checkpoint
    denoiser_dir: str  # where the backend reads it
    gsvae_run: str
    base: str  # the base model's name, for messages
    default_scheduler: dict[str, Any]
    help: str
    load_denoiser: Callable[[Path], nn.Module]
    #: set over the base model's scheduler config: how DiffSplat trained and samples this denoiser
    scheduler_overrides: tuple[tuple[str, Any], ...] = ()


VARIANTS: dict[str, ReleaseVariant] = {
    "pas": ReleaseVariant("diffsplat", "gsdiff_gobj83k_pas_fp16__render", "transformer_ema", TRANSFORMER_DIR,
                          "gsvae_gobj265k_sdxl_fp16", "PixArt-Σ", DEFAULT_SCHEDULER_CONFIG, LAYOUT_HELP,
                          load_transformer),
    "sd15": ReleaseVariant("diffsplat_sd15", "gsdiff_gobj83k_sd15__render", "unet_ema", UNET_DIR,
                           "gsvae_gobj265k_sd", "SD1.5", SD15_SCHEDULER_CONFIG, SD15_LAYOUT_HELP, load_unet,
                           # DiffSplat's "common tricks" for SD: trailing spacing, zero terminal SNR
                           (("timestep_spacing", "trailing"), ("rescale_betas_zero_snr", True))),
}


def _latest_checkpoint(run_dir: Path, needed: str, iteration: int | None, help: str) -> Path:
    """``run_dir/checkpoints/<iteration>`` holding ``needed`` (the newest one unless ``iteration`` is given)."""
    root = run_dir / "checkpoints"
    if iteration is not None:
        found = [root / f"{iteration:06d}"]
    else:
        found = sorted((d for d in root.glob("*") if d.name.isdigit()), key=lambda d: int(d.name), reverse=True)
    for ckpt in found:
        if (ckpt / needed).exists():
            return ckpt
    raise WeightsError(f"no DiffSplat checkpoint with {needed} under {root}"
                       + (f" for iteration {iteration:06d}" if iteration is not None else "") + f". {help}")


def assemble_release(diffsplat: str | os.PathLike, base: str | os.PathLike, output: str | os.PathLike,
                     variant: str = "pas", iteration: int | None = None,
                     tiny_decoder_config: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """Lay out DiffSplat's release (``chenguolin/DiffSplat``) and its base model's folders as the backend
    of ``variant`` reads them, with symlinks (no copy of the tens of GB), then, with ``verify``, load the
    denoiser and GSVAE once to check every key.

    ``variant``: ``"pas"`` (base: PixArt-Σ's ``pixart_sigma_sdxlvae_T5_diffusers``; backend ``diffsplat``) or
    ``"sd15"`` (base: ``stable-diffusion-v1-5``; backend ``diffsplat_sd15``). ``iteration``: the denoiser
    checkpoint (default: the newest; the paper's PixArt-Σ model is 013020). ``tiny_decoder_config``: the
    distilled decoder's config (TAESDXL's / TAESD's), needed only to decode with it."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown DiffSplat variant {variant!r}; valid: {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    diffsplat, base, output = Path(diffsplat), Path(base), Path(output)
    denoiser = _latest_checkpoint(diffsplat / v.denoiser_run, v.denoiser_ema, iteration, v.help) / v.denoiser_ema
    gsvae = _latest_checkpoint(diffsplat / v.gsvae_run, GSVAE_WEIGHTS, None, v.help) / GSVAE_WEIGHTS
    _require([base / "vae" / "config.json", base / TEXT_ENCODER_DIR / "config.json"], f"{v.base} file", v.help)
    if not (base / TOKENIZER_DIR).is_dir():
        raise WeightsError(f"{v.base} tokenizer is missing: {base / TOKENIZER_DIR}. {v.help}")
    (output / GSVAE_DIR).mkdir(parents=True, exist_ok=True)
    links = {output / v.denoiser_dir: denoiser, output / GSVAE_DIR / GSVAE_WEIGHTS: gsvae,
             output / TEXT_ENCODER_DIR: base / TEXT_ENCODER_DIR, output / TOKENIZER_DIR: base / TOKENIZER_DIR}
    for link, target in links.items():
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=target.is_dir())
    (output / GSVAE_DIR / VAE_CONFIG).write_text((base / "vae" / "config.json").read_text())
    if tiny_decoder_config is not None:
        (output / GSVAE_DIR / TINY_CONFIG).write_text(Path(tiny_decoder_config).read_text())
    meta: dict[str, Any] = {"name": v.backend, "source": {v.denoiser_dir: str(denoiser), "gsvae": str(gsvae)}}
    scheduler = base / "scheduler" / "scheduler_config.json"
    config = read_json(scheduler, "scheduler config") if scheduler.is_file() else v.default_scheduler
    meta["scheduler"] = {**config, **dict(v.scheduler_overrides)}
    (output / BACKEND_FILE).write_text(json.dumps(meta, indent=2))
    if verify:
        v.load_denoiser(output / v.denoiser_dir)
        load_gsvae(output / GSVAE_DIR, v.help)
    return output
