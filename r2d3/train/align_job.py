"""The alignment job around the loop: held-out evaluation before/after, logging (wandb, metrics table,
preview images, plots) and the run's outputs. Shared by in-process and Ray Train runs; rank 0 writes.

Run directory layout::

    config.yaml          resolved config          summary.json   before/after metrics, per-epoch history
    metrics.csv          one row per epoch        reward_curve.png
    previews/            multi-view renders (epochs, held-out before/after)
    samples/             .ply of held-out samples after alignment
    checkpoint_*/        see r2d3.train.checkpoint   wandb/   offline run (sync with `wandb sync`)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from r2d3.algos import AlignContext
from r2d3.config import AlignConfig, reward_label, to_dict, to_yaml
from r2d3.data.procedural import PromptParseError, parse_prompt
from r2d3.data.prompts import load_prompts
from r2d3.eval.bootstrap import bootstrap_ci
from r2d3.train import loop
from r2d3.train.lora import adapters_disabled
from r2d3.train.session import Session

log = logging.getLogger(__name__)
EVAL_CHUNK = 16


def heldout_prompts(config: AlignConfig) -> list[str]:
    """``eval.num_prompts`` prompts spread evenly over the held-out source (deterministic)."""
    from r2d3.eval.job import select_prompts

    prompts = load_prompts(config.data.heldout_prompts, config.data.prompt_column).prompts
    return select_prompts(prompts, config.eval.num_prompts)


#: 95 % interval of the mean by resampling prompts (shared with the evaluation job, r2d3.eval.bootstrap)
_bootstrap_ci = bootstrap_ci


@torch.no_grad()
def sample_and_render(ctx: AlignContext, prompts: list[str], noise: torch.Tensor, base: bool = False,
                      chunk: int | None = None):
    """Final samples, rewards and canonical-camera renders for ``prompts`` from fixed ``noise``, ``chunk``
    samples (default :data:`EVAL_CHUNK`) per model call."""
    from r2d3.render.output import RenderOutput

    size = chunk or EVAL_CHUNK
    latents, rewards, renders = [], [], []
    for i in range(0, len(prompts), size):
        chunk_prompts = prompts[i: i + size]
        if base:
            with adapters_disabled(ctx.backend.denoiser):
                batch = loop.sample_batch(ctx, chunk_prompts, None, noise=noise[i: i + size], jitter_cameras=False)
        else:
            batch = loop.sample_batch(ctx, chunk_prompts, None, noise=noise[i: i + size], jitter_cameras=False)
        latents.append(batch.trajectory.final)
        rewards.append(batch.rewards)
        renders.append(ctx.render_latents(batch.trajectory.final, ctx.cameras(len(chunk_prompts), None, jitter=False)))
    cat = lambda name: torch.cat([getattr(r, name) for r in renders])  # noqa: E731
    render = RenderOutput(cat("rgb"), cat("alpha"), cat("depth"), cat("normal"), renders[0].cameras)
    return torch.cat(latents), torch.cat(rewards), render


class Evaluator:
    """Held-out evaluation with identical prompts, seeds and cameras for every checkpoint."""

    def __init__(self, config: AlignConfig, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        self.prompts = heldout_prompts(config)
        self.repeated = [p for p in self.prompts for _ in range(config.eval.seeds_per_prompt)]
        self.base: tuple | None = None
        try:
            [parse_prompt(p) for p in self.prompts]
            self.gradeable = True
        except PromptParseError:
            self.gradeable = False

    def __call__(self, worker: loop.Worker, tag: str) -> dict[str, Any]:
        from r2d3.eval.diversity import diversity, drift
        from r2d3.eval.prompt_following import prompt_following
        from r2d3.export import save_preview_grid, write_ply

        if not self.prompts:
            return {}
        ctx = worker.ctx
        gen = torch.Generator().manual_seed(self.config.run.seed + 10_007)
        noise = torch.randn(len(self.repeated), 1 + ctx.sampler.num_steps, *ctx.backend.latent_shape, generator=gen)
        if self.base is None:
            self.base = sample_and_render(ctx, self.repeated, noise, base=True)
        latents, rewards, render = sample_and_render(ctx, self.repeated, noise)
        seeds = self.config.eval.seeds_per_prompt
        lo, hi = _bootstrap_ci(rewards.float().cpu(), len(self.prompts))
        out: dict[str, Any] = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
                               "reward_ci95": [lo, hi], "num_prompts": len(self.prompts), "seeds_per_prompt": seeds,
                               "per_prompt_reward": rewards.view(len(self.prompts), -1).mean(1).tolist()}
        base_rewards = self.base[1].float().cpu()
        delta = rewards.float().cpu() - base_rewards  # paired: same prompts, noise and cameras
        out["reward_delta_vs_base"] = float(delta.mean())
        out["reward_delta_ci95"] = list(_bootstrap_ci(delta, len(self.prompts)))
        d = drift(self.base[2], render)
        out.update({f"drift_{k}": float(v.mean()) for k, v in d.items()})
        if seeds > 1:
            per = latents.view(len(self.prompts), seeds, *latents.shape[1:])
            out["diversity"] = float(torch.stack([diversity(per[i]) for i in range(len(self.prompts))]).mean())
        if self.gradeable:
            pf = prompt_following(render, self.repeated)
            out.update({"color_acc": pf["color_acc"], "shape_acc": pf["shape_acc"]})
        show = min(6, len(self.repeated))
        save_preview_grid(render.rgb[:show].cpu(), self.run_dir / "previews" / f"heldout_{tag}.png",
                          row_labels=self.repeated[:show], caption=f"{tag}: held-out prompts")
        if tag == "after":
            gaussians = ctx.backend.decode(latents[:show])
            for i in range(show):
                write_ply(gaussians[i].detach().to("cpu"), self.run_dir / "samples" / f"heldout_{i:02d}.ply")
        return out


class EpochLogger:
    """wandb (offline by default), metrics.csv and preview grids every ``log_images_every`` epochs."""

    def __init__(self, config: AlignConfig, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        self.wandb = None
        if config.run.wandb_mode == "disabled":  # metrics.csv and previews only; wandb is not even imported
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb.init(project=config.run.wandb_project, name=run_dir.name, dir=str(run_dir),
                                mode=config.run.wandb_mode, config=to_dict(config), resume="allow",
                                id=run_dir.name.replace("/", "-")[:120])

    def __call__(self, worker: loop.Worker, epoch: int, samples, metrics: dict[str, float],
                 history: list[dict[str, float]]) -> None:
        if self.wandb is not None:
            self.wandb.log(metrics, step=epoch)
        write_metrics_table(history, self.run_dir / "metrics.csv")
        every = self.config.run.log_images_every
        if every and (epoch % every == 0 or epoch == self.config.train.epochs):
            from r2d3.export import save_preview_grid

            ctx = worker.ctx
            show = min(4, len(samples))
            with torch.no_grad():
                render = ctx.render_latents(samples.trajectory.final[:show], ctx.cameras(show, None, jitter=False))
            labels = [f"{p} | r={r:.3f}" for p, r in zip(samples.prompts[:show], samples.rewards[:show].tolist())]
            png = save_preview_grid(render.rgb.cpu(), self.run_dir / "previews" / f"epoch_{epoch:04d}.png",
                                    row_labels=labels, caption=f"epoch {epoch}")
            if self.wandb is not None:
                import wandb

                self.wandb.log({"samples": wandb.Image(str(png))}, step=epoch)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def write_metrics_table(history: list[dict[str, float]], path: Path) -> None:
    """``metrics.csv`` rewritten whole from the run's history (which resumption restores from the
    checkpoint): one row per epoch, never a re-done epoch twice, and one header naming every metric any
    epoch logged (epochs without a metric, e.g. ``heldout/*`` between evaluations, leave its cell empty),
    so pandas and spreadsheets read every run."""
    from r2d3.export import atomic_write_bytes

    columns = ["epoch"] + sorted({k for row in history for k in row} - {"epoch"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buf.getvalue().encode())


def plot_history(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["epoch"] for h in history], [h["reward_mean"] for h in history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean reward of samples")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_worker(config: AlignConfig, session: Session) -> dict[str, Any]:
    """The whole job on one worker; rank 0 evaluates, logs and writes the summary."""
    run_dir = session.run_dir
    evaluator = logger = None
    if session.rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(config))
        evaluator = Evaluator(config, run_dir)
        logger = EpochLogger(config, run_dir)
    summary_path = run_dir / "summary.json"
    try:
        result = loop.run(config, session, evaluate_fn=evaluator, on_epoch=logger)
    finally:
        if logger is not None:
            logger.finish()
    result.pop("worker", None)
    if session.rank == 0:
        plot_history(result["history"], run_dir / "reward_curve.png",
                     f"{config.algo.name} on {reward_label(config.reward)}")
        summary_path.write_text(json.dumps(result, indent=1))
    return result


def format_summary(summary: dict[str, Any]) -> str:
    before, after = summary.get("before", {}), summary.get("after", {})
    lines = []
    for key in ("reward_mean", "color_acc", "shape_acc", "drift_rgb_l2", "drift_dssim", "diversity"):
        if key in before or key in after:
            b, a = before.get(key), after.get(key)
            fmt = lambda v: "   n/a" if v is None else f"{v:8.4f}"  # noqa: E731
            lines.append(f"  {key:<14} before {fmt(b)}   after {fmt(a)}")
    if "reward_ci95" in after:
        lines.append(f"  held-out reward 95% CI after: [{after['reward_ci95'][0]:.4f}, {after['reward_ci95'][1]:.4f}]")
    if "reward_delta_ci95" in after:
        lo, hi = after["reward_delta_ci95"]
        lines.append(f"  paired reward gain vs base (same noise): {after['reward_delta_vs_base']:+.4f}, "
                     f"95% CI [{lo:+.4f}, {hi:+.4f}]")
    return "\n".join(lines)
