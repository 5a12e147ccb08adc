"""Pretrain the embedded ``tiny`` text-to-3D model on the procedural dataset and write the weights
that ship inside the package (``r2d3/weights/tiny``).

    python pipelines/pretrain.py                       # reproduces the shipped weights
    python pipelines/pretrain.py --steps 200 --out runs/tiny-smoke   # a quick smoke run

Denoising-score-matching (epsilon prediction) on latents of procedural Gaussian assets, text and
denoiser trained jointly, 10 % prompt dropout for classifier-free guidance, EMA weights saved.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from tqdm import tqdm

from r2d3.text import TextEncoder
from r2d3.backends.tiny import DEFAULT_SCHEDULER_CONFIG, TinySplatBackend, TinySplatDenoiser, default_weights_dir
from r2d3.data.procedural import VOCABULARY, ProceduralShapes


class _Stream(torch.utils.data.IterableDataset):
    """Fresh procedural batches generated in a background worker while the model trains."""

    def __init__(self, data: ProceduralShapes, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + 1)
        while True:
            yield self.data.sample(self.batch_size, generator=gen)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=default_weights_dir(), help="weights directory to write")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-gaussians", type=int, default=128)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tangent-scale", type=float, default=0.065, help="decoder: tangential std of each Gaussian")
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    text = TextEncoder(vocab=VOCABULARY, dim=args.dim, num_layers=2, num_heads=4)
    denoiser = TinySplatDenoiser(num_gaussians=args.num_gaussians, dim=args.dim, num_layers=args.layers,
                                 num_heads=4, context_dim=args.dim)
    backend = TinySplatBackend(denoiser, text, tangent_scale=args.tangent_scale)
    text.requires_grad_(True).train()
    scheduler = DDPMScheduler(**DEFAULT_SCHEDULER_CONFIG)
    alphas = scheduler.alphas_cumprod
    data = ProceduralShapes(num_gaussians=args.num_gaussians, split="train", seed=args.seed)
    params = list(denoiser.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    ema = {"denoiser": copy.deepcopy(denoiser).requires_grad_(False), "text": copy.deepcopy(text).requires_grad_(False)}
    gen = torch.Generator().manual_seed(args.seed)
    batches = iter(torch.utils.data.DataLoader(_Stream(data, args.batch_size, args.seed), batch_size=None,
                                               num_workers=1, collate_fn=lambda b: b))

    start, losses = time.time(), []
    bar = tqdm(range(args.steps), desc="pretrain", dynamic_ncols=True)
    for step in bar:
        gaussians, prompts, _ = next(batches)
        x0 = backend.encode_gaussians(gaussians)
        drop = torch.rand(len(prompts), generator=gen) < args.cfg_dropout
        prompts = ["" if d else pr for pr, d in zip(prompts, drop.tolist())]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(prompts),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(denoiser(xt, t, text(prompts)), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for key, model in (("denoiser", denoiser), ("text", text)):
                for pe, pm in zip(ema[key].parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")

    final = TinySplatBackend(ema["denoiser"], ema["text"], tangent_scale=args.tangent_scale)
    final.save_pretrained(args.out)
    record = {
        "command": "python pipelines/pretrain.py " + " ".join(argv if argv is not None else []),
        "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "final_loss_avg100": sum(losses[-100:]) / len(losses[-100:]),
        "wall_seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
    }
    (args.out / "pretrain.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
