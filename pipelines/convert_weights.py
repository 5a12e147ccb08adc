"""Convert original checkpoints to the safetensors layouts r2d3's real models load.

    # DiffSplat-PixArt-Σ: lay out the DiffSplat release and PixArt-Σ's folders as the diffsplat backend
    # reads them (symlinks, no copies) and check every key
    python pipelines/convert_weights.py diffsplat --input downloads/DiffSplat \
        --pixart downloads/pixart_sigma_sdxlvae_T5_diffusers --output weights/diffsplat-pas

    # DiffSplat-SD1.5: the same release with stable-diffusion-v1-5's folders, for the diffsplat_sd15 backend
    python pipelines/convert_weights.py diffsplat_sd15 --input downloads/DiffSplat \
        --sd15 downloads/stable-diffusion-v1-5 --output weights/diffsplat-sd15

    # LAION aesthetic head (.pth state dict) -> one safetensors file, next to the CLIP ViT-L/14 checkpoint
    python pipelines/convert_weights.py aesthetic --input sac+logos+ava1-l14-linearMSE.pth \
        --output weights/laion_aesthetic/aesthetic_mlp.safetensors

    # HPS v2.1 (OpenCLIP ViT-H-14 checkpoint) -> a transformers CLIP directory (config.json,
    # model.safetensors, preprocessor_config.json); then copy the CLIP tokenizer files into it
    python pipelines/convert_weights.py hpsv2 --input HPS_v2.1_compressed.pt --output weights/hpsv2

    # ImageReward (THUDM/ImageReward: ImageReward.pt + med_config.json) + the bert-base-uncased tokenizer
    # files -> the image_reward directory (vision/, text/, tokenizer, head.safetensors, image_reward.json)
    python pipelines/convert_weights.py image_reward --input ImageReward.pt --med-config med_config.json \
        --tokenizer weights/bert-base-uncased --output weights/image_reward

    # an official Nabla-R2D3 LoRA (diffusers' pytorch_lora_weights.safetensors) -> an r2d3 checkpoint
    # directory (lora.safetensors + config.yaml with its rank, alpha and adapted modules) that
    # r2d3.sample, pipelines/evaluate.py and pipelines/regenerate.py take like any other
    python pipelines/convert_weights.py lora --input checkpoint_epoch99_end/pytorch_lora_weights.safetensors \
        --output weights/official-lora-hpsv2

    # a transformers checkpoint published only as pytorch_model.bin -> model.safetensors next to it
    python pipelines/convert_weights.py bin --input weights/pickscore/pytorch_model.bin \
        --output weights/pickscore/model.safetensors

Inputs are read with ``torch.load(weights_only=True)``: tensors only, no code. See README, "Using real
models", for where each original file comes from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from r2d3.rewards.convert import (
    convert_aesthetic_head,
    imagereward_to_blip,
    load_torch_checkpoint,
    openclip_to_transformers,
    plain_tensors,
    save_image_reward,
    save_transformers_clip,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["aesthetic", "hpsv2", "image_reward", "bin", "diffsplat", "diffsplat_sd15", "lora"],
                        help="which checkpoint to convert")
    parser.add_argument("--input", required=True,
                        help="the original .pth/.pt file; diffsplat, diffsplat_sd15: the DiffSplat release directory")
    parser.add_argument("--output", required=True,
                        help="aesthetic, bin: the .safetensors file to write; hpsv2, image_reward: the "
                             "directory to write")
    parser.add_argument("--vision-heads", type=int, default=None,
                        help="attention heads of the image tower (default: from the architecture the shapes "
                             "identify, e.g. 16 for ViT-H-14; required for other architectures)")
    parser.add_argument("--text-heads", type=int, default=None, help="attention heads of the text tower (same)")
    parser.add_argument("--hidden-act", default="gelu", choices=["gelu", "quick_gelu"],
                        help="hpsv2/OpenCLIP only: the MLP activation (gelu for OpenCLIP-trained ViT-H-14)")
    parser.add_argument("--med-config", help="image_reward only: ImageReward's med_config.json")
    parser.add_argument("--tokenizer",
                        help="image_reward only: a directory with the bert-base-uncased tokenizer files")
    parser.add_argument("--pixart", help="diffsplat only: the PixArt-Σ directory (vae/, text_encoder/, tokenizer/)")
    parser.add_argument("--sd15", help="diffsplat_sd15 only: the stable-diffusion-v1-5 directory (vae/, text_encoder/, "
                                       "tokenizer/, scheduler/)")
    parser.add_argument("--tiny-decoder-config",
                        help="diffsplat, diffsplat_sd15: the distilled decoder's config.json (TAESDXL's / TAESD's), "
                             "only to decode with it (default: diffusers' AutoencoderTiny defaults, TAESD's)")
    parser.add_argument("--iteration", type=int,
                        help="diffsplat, diffsplat_sd15: the denoiser checkpoint iteration (default: the newest)")
    parser.add_argument("--lora-alpha", type=float, default=8.0,
                        help="lora only: the adapter's alpha (default 8: peft's default, which the official "
                             "training keeps; with its rank 8 the scale is 1)")
    parser.add_argument("--backend", default="diffsplat", help="lora only: the backend the adapter belongs to")
    args = parser.parse_args(argv)
    if args.what == "lora":
        convert_lora(Path(args.input), Path(args.output), args.lora_alpha, args.backend)
        return
    if args.what in ("diffsplat", "diffsplat_sd15"):
        base, variant = (args.pixart, "pas") if args.what == "diffsplat" else (args.sd15, "sd15")
        if not base:
            parser.error("diffsplat needs --pixart <pixart_sigma_sdxlvae_T5_diffusers dir>" if variant == "pas"
                         else "diffsplat_sd15 needs --sd15 <stable-diffusion-v1-5 dir>")
        from r2d3.backends.diffsplat_weights import assemble_release

        out = assemble_release(args.input, base, args.output, variant=variant, iteration=args.iteration,
                               tiny_decoder_config=args.tiny_decoder_config)
        print(f"wrote {out}")
        return
    if args.what == "image_reward" and not (args.med_config and args.tokenizer):
        parser.error("image_reward needs --med-config med_config.json and "
                     "--tokenizer <bert-base-uncased dir>")
    state = load_torch_checkpoint(args.input)
    output = Path(args.output)
    if args.what in ("aesthetic", "bin"):
        output.parent.mkdir(parents=True, exist_ok=True)
        tensors = convert_aesthetic_head(state) if args.what == "aesthetic" else plain_tensors(state)
        save_file(tensors, str(output))
    elif args.what == "image_reward":
        med_config = json.loads(Path(args.med_config).read_text())
        save_image_reward(*imagereward_to_blip(state, med_config), args.tokenizer, output)
    else:
        try:
            converted, config = openclip_to_transformers(state, vision_heads=args.vision_heads,
                                                         text_heads=args.text_heads, hidden_act=args.hidden_act)
        except (KeyError, ValueError) as err:
            sys.exit(f"convert_weights: {args.input} is not a convertible OpenCLIP checkpoint: {err}")
        save_transformers_clip(converted, config, output)
    print(f"wrote {output}")


def convert_lora(source: Path, output: Path, alpha: float, backend: str) -> None:
    import yaml
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from r2d3.backends.lora import from_diffusers_lora

    try:
        state, rank, modules = from_diffusers_lora(load_file(str(source)))
    except (OSError, ValueError, SafetensorError) as err:
        sys.exit(f"convert_weights: {source} is not a convertible LoRA file: {err}")
    output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(output / "lora.safetensors"))
    config = {"model": {"backend": backend, "lora_rank": rank, "lora_alpha": alpha, "lora_targets": modules}}
    (output / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {output} (rank {rank}, alpha {alpha:g}, {len(modules)} adapted modules)")


if __name__ == "__main__":
    main()
