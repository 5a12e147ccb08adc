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

from r2d3.config import reward_label, to_dict, to_yaml
from r2d3.train.config import AlignConfig
from r2d3.data.prompts import load_prompts, select_prompts
from r2d3.eval.extractors import load_extractor
from r2d3.eval.samples import Measurer
from r2d3.eval.summary import summarize
from r2d3.export import save_preview_grid, write_ply
from r2d3.pipeline import Generation
from r2d3.train import loop
from r2d3.storage import atomic_write_bytes
from r2d3.train.session import Session

log = logging.getLogger(__name__)
BASE = "base"
#: the held-out numbers the console shows before/after (the evaluation job's names)
HEADLINE = ("reward_mean", "color_ok_mean", "shape_ok_mean", "drift_rgb_l2_mean", "drift_dssim_mean",
            "diversity_latent_mean", "fid_vs_base")


def heldout_prompts(config: AlignConfig) -> list[str]:
    """``eval.num_prompts`` prompts spread evenly over the held-out source (deterministic)."""
    prompts = load_prompts(config.data.heldout_prompts, config.data.prompt_column).prompts
    return select_prompts(prompts, config.eval.num_prompts)


def heldout_seeds(config: AlignConfig) -> list[int]:
    """Seeds ``0 .. eval.seeds_per_prompt - 1``: ``pipelines/evaluate.py``'s default seeds, so its numbers
    for a run's checkpoints equal the run's own before/after numbers."""
    return list(range(config.eval.seeds_per_prompt))


class Evaluator:
    """Held-out evaluation of the worker's current model against the base model: the evaluation job's
    measures (:func:`r2d3.eval.samples.measure`) and summary (:func:`r2d3.eval.summary.summarize`), on
    the same prompts, noise and cameras as ``pipelines/evaluate.py``."""

    def __init__(self, config: AlignConfig, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        self.prompts = heldout_prompts(config)
        self.seeds = heldout_seeds(config)
        self.meter: Measurer | None = None
        self.base_rows: list[dict[str, Any]] = []

    def __call__(self, worker: loop.Worker, tag: str) -> dict[str, Any]:
        """The summary of the current model (``tag``) against the base model (measured once, first)."""
        if not self.prompts:
            return {}
        kept: list[Generation] = []
        if self.meter is None:
            extractor = load_extractor(self.config.eval.extractor, worker.device)
            self.meter = Measurer(extractor, range(len(self.prompts)), self.prompts, self.seeds)
            self.base_rows = self.meter.rows(BASE, worker.ctx, base=True, on_generation=kept.append)
        if tag in (BASE, "before"):  # before any update the model is the base model (zero-initialised LoRA)
            self._write_samples(tag, kept[-1])
            return summarize(self.base_rows, self.prompts, self.seeds, [BASE])[BASE]
        rows = self.meter.rows(tag, worker.ctx, on_generation=kept.append)
        self._write_samples(tag, kept[-1])
        return summarize(self.base_rows + rows, self.prompts, self.seeds, [BASE, tag])[tag]

    def _write_samples(self, tag: str, g: Generation) -> None:
        show = min(6, len(g.prompts))
        save_preview_grid(g.renders.rgb[:show].cpu(), self.run_dir / "previews" / f"heldout_{tag}.png",
                          row_labels=g.prompts[:show], caption=f"{tag}: held-out prompts")
        if tag == "after":
            for i in range(show):
                write_ply(g.gaussians[i].detach().to("cpu"), self.run_dir / "samples" / f"heldout_{i:02d}.ply")


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
            ctx = worker.ctx
            show = min(4, len(samples))
            with torch.no_grad():
                x0 = samples.trajectory.final[:show]
                render = ctx.render_views(ctx.backend.decode(x0), ctx.cameras(show, None, jitter=False))
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
    for key in HEADLINE:
        if key in before or key in after:
            b, a = before.get(key), after.get(key)
            fmt = lambda v: "   n/a" if v is None else f"{v:8.4f}"  # noqa: E731
            lines.append(f"  {key:<21} before {fmt(b)}   after {fmt(a)}")
    if "reward_ci95" in after:
        lines.append(f"  held-out reward 95% CI after: [{after['reward_ci95'][0]:.4f}, {after['reward_ci95'][1]:.4f}]")
    if "reward_delta_ci95" in after:
        lo, hi = after["reward_delta_ci95"]
        lines.append(f"  paired reward gain vs base (same noise): {after['reward_delta_vs_base']:+.4f}, "
                     f"95% CI [{lo:+.4f}, {hi:+.4f}]")
    return "\n".join(lines)
