"""Reading DiffSplat's released weights strictly (every missing, unexpected or mis-shaped key named) and
laying out the release as :class:`~r2d3.backends.diffsplat.DiffSplatBackend` reads it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from r2d3.backends.diffsplat_modules import DEFAULT_SCHEDULER_CONFIG, GSVAE, MultiViewPixArtTransformer
from r2d3.pretrained import WeightsError

TRANSFORMER_DIR, GSVAE_DIR, TEXT_ENCODER_DIR, TOKENIZER_DIR = "transformer", "gsvae", "text_encoder", "tokenizer"
GSVAE_WEIGHTS, VAE_CONFIG, TINY_CONFIG = "model.safetensors", "vae_config.json", "tiny_decoder_config.json"
BACKEND_FILE = "backend.json"
LAYOUT_HELP = (
    "Expected layout (README, 'Using real models'): transformer/ = DiffSplat's "
    "gsdiff_gobj83k_pas_fp16__render/checkpoints/<iter>/transformer_ema (config.json + safetensors); "
    "gsvae/model.safetensors = gsvae_gobj265k_sdxl_fp16/checkpoints/<iter>/model.safetensors, with "
    "gsvae/vae_config.json = PixArt-Σ's vae/config.json; text_encoder/ and tokenizer/ = "
    "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers's folders of those names."
)


def read_json(file: Path, label: str) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"could not read {label} {file}: {err}") from err


def _require(files: Sequence[Path], what: str) -> None:
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WeightsError(f"DiffSplat {what} is missing: {', '.join(missing)}. {LAYOUT_HELP}")


def load_state_dict_files(directory: Path, stem: str) -> dict[str, Tensor]:
    """A safetensors state dict, single-file (``<stem>.safetensors``) or sharded (``<stem>.safetensors.index.json``)."""
    single, index = directory / f"{stem}.safetensors", directory / f"{stem}.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(read_json(index, "safetensors index")["weight_map"].values()))
        _require([directory / s for s in shards], "weight shard")
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(directory / shard))
        return state
    raise WeightsError(f"DiffSplat weights are missing: neither {single} nor {index} exists. {LAYOUT_HELP}")


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


def load_gsvae(directory: Path) -> GSVAE:
    _require([directory / GSVAE_WEIGHTS, directory / VAE_CONFIG], "GSVAE")
    tiny = read_json(directory / TINY_CONFIG, "tiny decoder config") if (directory / TINY_CONFIG).is_file() else None
    model = GSVAE(read_json(directory / VAE_CONFIG, "VAE config"), tiny)
    load_strict(model, load_file(directory / GSVAE_WEIGHTS), f"DiffSplat GSVAE {directory / GSVAE_WEIGHTS}")
    return model.eval().requires_grad_(False)


def load_text_encoder(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """PixArt-Σ's T5 encoder and tokenizer from ``path/text_encoder`` and ``path/tokenizer``."""
    from transformers import AutoTokenizer, T5EncoderModel

    _require([path / TEXT_ENCODER_DIR / "config.json"], "T5 text encoder")
    if not (path / TOKENIZER_DIR).is_dir():
        raise WeightsError(f"DiffSplat tokenizer is missing: {path / TOKENIZER_DIR}. {LAYOUT_HELP}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path / TOKENIZER_DIR)
        encoder = T5EncoderModel.from_pretrained(path / TEXT_ENCODER_DIR, use_safetensors=True, dtype=dtype)
    except (OSError, ValueError, ImportError) as err:
        raise WeightsError(f"could not load the T5 text encoder/tokenizer under {path} ({err}). A SentencePiece "
                           f"tokenizer needs `pip install sentencepiece`. {LAYOUT_HELP}") from err
    return encoder.eval().requires_grad_(False), tokenizer


def _latest_checkpoint(run_dir: Path, needed: str, iteration: int | None) -> Path:
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
                       + (f" for iteration {iteration:06d}" if iteration is not None else "") + f". {LAYOUT_HELP}")


def assemble_release(diffsplat: str | os.PathLike, pixart: str | os.PathLike, output: str | os.PathLike,
                     transformer_run: str = "gsdiff_gobj83k_pas_fp16__render",
                     gsvae_run: str = "gsvae_gobj265k_sdxl_fp16", iteration: int | None = None,
                     tiny_decoder_config: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """Lay out DiffSplat's release (``chenguolin/DiffSplat``) and PixArt-Σ's
    (``pixart_sigma_sdxlvae_T5_diffusers``) as this backend reads them, with symlinks (no copy of the
    tens of GB), then, with ``verify``, load the transformer and GSVAE once to check every key.

    ``iteration``: the transformer checkpoint (default: the newest; the paper used 013020)."""
    diffsplat, pixart, output = Path(diffsplat), Path(pixart), Path(output)
    transformer = _latest_checkpoint(diffsplat / transformer_run, "transformer_ema", iteration) / "transformer_ema"
    gsvae = _latest_checkpoint(diffsplat / gsvae_run, GSVAE_WEIGHTS, None) / GSVAE_WEIGHTS
    _require([pixart / "vae" / "config.json", pixart / TEXT_ENCODER_DIR / "config.json"], "PixArt-Σ file")
    if not (pixart / TOKENIZER_DIR).is_dir():
        raise WeightsError(f"PixArt-Σ tokenizer is missing: {pixart / TOKENIZER_DIR}. {LAYOUT_HELP}")
    (output / GSVAE_DIR).mkdir(parents=True, exist_ok=True)
    links = {output / TRANSFORMER_DIR: transformer, output / GSVAE_DIR / GSVAE_WEIGHTS: gsvae,
             output / TEXT_ENCODER_DIR: pixart / TEXT_ENCODER_DIR, output / TOKENIZER_DIR: pixart / TOKENIZER_DIR}
    for link, target in links.items():
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=target.is_dir())
    (output / GSVAE_DIR / VAE_CONFIG).write_text((pixart / "vae" / "config.json").read_text())
    if tiny_decoder_config is not None:
        (output / GSVAE_DIR / TINY_CONFIG).write_text(Path(tiny_decoder_config).read_text())
    meta: dict[str, Any] = {"name": "diffsplat", "source": {"transformer": str(transformer), "gsvae": str(gsvae)}}
    scheduler = pixart / "scheduler" / "scheduler_config.json"
    meta["scheduler"] = read_json(scheduler, "scheduler config") if scheduler.is_file() else DEFAULT_SCHEDULER_CONFIG
    (output / BACKEND_FILE).write_text(json.dumps(meta, indent=2))
    if verify:
        load_transformer(output / TRANSFORMER_DIR)
        load_gsvae(output / GSVAE_DIR)
    return output
