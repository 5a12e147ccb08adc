"""Sample 3D assets from a backend: ``python -m r2d3.sample "a red cube" --out DIR``.

Writes ``<slug>_<seed>.ply`` (standard 3DGS layout) and ``<slug>_<seed>.png`` (a multi-view preview)
per prompt and seed, optionally with LoRA weights from an alignment checkpoint.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from r2d3.backends import load_backend
from r2d3.diffusion import StochasticSampler, scheduler_from_config
from r2d3.export import save_preview_grid, write_ply
from r2d3.render import orbit_cameras, render_gaussians


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "prompt"


def load_lora_checkpoint(backend, checkpoint: str | Path) -> None:
    """Apply the LoRA weights of an alignment checkpoint directory (its ``lora.safetensors``)."""
    from safetensors.torch import load_file

    from r2d3.train.lora import add_lora, load_lora_state_dict

    path = Path(checkpoint)
    path = path / "lora.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights at {path}")
    state = load_file(path)
    rank = next(v.shape[0] for k, v in state.items() if "lora_A" in k)
    add_lora(backend.denoiser, rank, None, backend.lora_target_modules)
    load_lora_state_dict(backend.denoiser, state)


@torch.no_grad()
def generate(backend, prompts: list[str], seeds: list[int], num_steps: int = 20, guidance_scale: float = 1.5,
             kind: str = "ddim", eta: float = 1.0):
    """Final latents ``[len(prompts) * len(seeds), *S]`` and their Gaussians; noise seeded per (prompt, seed)."""
    sampler = StochasticSampler(scheduler_from_config(backend.scheduler_config, kind=kind), num_steps, eta=eta)
    rows = [(p, s) for p in prompts for s in seeds]
    noise = torch.stack([torch.randn(1 + num_steps, *backend.latent_shape,
                                     generator=torch.Generator().manual_seed(s)) for _, s in rows]).to(backend.device)
    cond = backend.encode_prompts([p for p, _ in rows])
    uncond = backend.encode_prompts([""])
    from r2d3.backends.text import PromptEmbeds

    both = PromptEmbeds.cat([cond, uncond])
    traj = sampler.sample(lambda x, t, c: backend.denoise(x, t, PromptEmbeds(c["tokens"], c["mask"])),
                          x_T=noise[:, 0], noises=noise[:, 1:],
                          cond={"tokens": both.tokens[: len(rows)], "mask": both.mask[: len(rows)]},
                          uncond={"tokens": both.tokens[len(rows):], "mask": both.mask[len(rows):]},
                          guidance_scale=guidance_scale, final_x0=getattr(backend, "final_x0", False))
    return rows, traj.final, backend.decode(traj.final)


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="+", help="text prompts")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--backend", default="tiny")
    p.add_argument("--weights", default=None, help="backend weights directory (default: shipped)")
    p.add_argument("--lora", default=None, help="alignment checkpoint directory or lora.safetensors")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=1.5)
    p.add_argument("--resolution", type=int, default=128)
    args = p.parse_args(argv)
    backend = load_backend(args.backend, weights=args.weights)
    if args.lora:
        load_lora_checkpoint(backend, args.lora)
    rows, _, gaussians = generate(backend, args.prompts, args.seeds, args.steps, args.guidance_scale)
    cams = orbit_cameras(20.0, [0, 90, 180, 270], distance=2.5, fov_deg=40.0, width=args.resolution,
                         height=args.resolution)
    written = []
    for i, (prompt, seed) in enumerate(rows):
        stem = args.out / f"{slug(prompt)}_{seed}"
        asset = gaussians[i]
        write_ply(asset, stem.with_suffix(".ply"))
        render = render_gaussians(asset, cams)
        save_preview_grid(render.rgb[0], stem.with_suffix(".png"), row_labels=[prompt])
        written += [stem.with_suffix(".ply"), stem.with_suffix(".png")]
        print(f"{prompt!r} seed {seed}: {stem}.ply, {stem}.png")
    return written


if __name__ == "__main__":
    main()
