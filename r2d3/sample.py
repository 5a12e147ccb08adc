"""Sample 3D assets from a backend: ``python -m r2d3.sample "a red cube" --out DIR``.

Writes ``<slug>_<seed>.ply`` (standard 3DGS layout) and ``<slug>_<seed>.png`` (a multi-view preview)
per prompt and seed, optionally with LoRA weights from an alignment checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import torch

from r2d3.backends import load_backend
from r2d3.config import RenderConfig
from r2d3.diffusion import StochasticSampler, scheduler_from_config
from r2d3.export import render_turntable, save_preview_grid, write_ply


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "prompt"


def load_lora_checkpoint(backend, checkpoint: str | Path) -> None:
    """Apply the LoRA weights of an alignment run: a run directory (its newest complete checkpoint), a
    checkpoint directory or its ``lora.safetensors``. Rank, alpha and targets come from the checkpoint
    (its ``config.yaml``), so the adapted model is the one that was trained."""
    from r2d3.jobs.evaluate import resolve_checkpoint
    from r2d3.train.checkpoint import CorruptCheckpointError, load_lora_file
    from r2d3.backends.lora import add_lora, load_lora_state_dict

    spec = resolve_checkpoint(str(checkpoint))
    file = Path(spec.path) / "lora.safetensors"
    state = load_lora_file(file)
    ranks = [v.shape[0] for k, v in state.items() if "lora_A" in k]
    if not ranks:
        raise CorruptCheckpointError(f"{file} holds no LoRA weights (no lora_A tensors): not an r2d3 checkpoint")
    add_lora(backend.denoiser, ranks[0], spec.lora_alpha, list(spec.lora_targets or backend.lora_target_modules))
    try:
        load_lora_state_dict(backend.denoiser, state)
    except (RuntimeError, ValueError) as err:
        raise CorruptCheckpointError(f"{file} does not fit backend {backend.name!r}: {str(err).splitlines()[0]}") from err


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
    from r2d3.backends.base import WeightsError, sampler_defaults
    from r2d3.config import SamplerConfig
    from r2d3.export.frame import FRAMES
    from r2d3.train.checkpoint import CorruptCheckpointError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="+", help="text prompts")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--backend", default="tiny")
    p.add_argument("--weights", default=None, help="backend weights directory (default: shipped)")
    p.add_argument("--lora", default=None, help="alignment run directory (its newest checkpoint), checkpoint "
                                                "directory or lora.safetensors")
    p.add_argument("--sampler", default=None, help="ddim | sde-dpmsolver++ (default: the backend's own)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the backend's own)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the backend's own)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the backend's own)")
    p.add_argument("--resolution", type=int, default=128, help="preview size per view")
    p.add_argument("--frame", choices=FRAMES, default="y-up", help="frame of the .ply (see r2d3.export.frame)")
    p.add_argument("--sh-degree", type=int, choices=(0, 3), default=0, help="3: zero-filled f_rest_* in the .ply")
    args = p.parse_args(argv)
    try:
        backend = load_backend(args.backend, weights=args.weights)
        chosen = {"kind": args.sampler, "num_steps": args.steps, "eta": args.eta,
                  "guidance_scale": args.guidance_scale}
        settings = {**dataclasses.asdict(SamplerConfig()), **sampler_defaults(backend),
                    **{k: v for k, v in chosen.items() if v is not None}}
        sampler = SamplerConfig(**settings)
        from r2d3.train.loop import check_sampler_and_render

        check_sampler_and_render(sampler, RenderConfig(resolution=args.resolution), prefix=("", ""))
        if args.lora:
            load_lora_checkpoint(backend, args.lora)
    except (WeightsError, CorruptCheckpointError, FileNotFoundError, ValueError) as err:
        sys.exit(f"sample: {err}")
    rows, _, gaussians = generate(backend, args.prompts, args.seeds, sampler.num_steps, sampler.guidance_scale,
                                  kind=sampler.kind, eta=sampler.eta)
    written = []
    for i, (prompt, seed) in enumerate(rows):
        stem = args.out / f"{slug(prompt)}_{seed}"
        asset = gaussians[i]
        write_ply(asset, stem.with_suffix(".ply"), frame=args.frame, sh_degree=args.sh_degree)
        views = render_turntable(asset, num_frames=4, size=args.resolution)  # framed to fit the asset
        save_preview_grid(views, stem.with_suffix(".png"), row_labels=[prompt])
        written += [stem.with_suffix(".ply"), stem.with_suffix(".png")]
        print(f"{prompt!r} seed {seed}: {stem}.ply, {stem}.png")
    return written


if __name__ == "__main__":
    main()
