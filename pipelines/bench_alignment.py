"""Benchmark suites for the embedded model and the alignment methods (registered in benchmark.py).

- ``sampling``: wall time of sampling 4 assets x 20 steps and rendering 4 views at 64^2;
- ``prior``: prompt-following of the shipped model over held-out prompts (independent classifiers);
- ``methods``: Nabla-R2D3 vs DDPO / ReFL / DRaFT-K, rewards x seeds, equal sample budgets, plus the
  cost of one update of each (writes docs/results.md and PNG plots under docs/);
- ``updates``: one optimizer update of every method and mode on the same batch (s, memory, passes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from r2d3.backends import load_backend
from r2d3.config import SamplerConfig, build_config
from r2d3.train.config import AlignConfig
from r2d3.data.procedural import split_prompts
from r2d3.render import orbit_cameras, render_gaussians
from r2d3.sample import generate

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- sampling
def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-write", action="store_true")


def run_sampling(args: argparse.Namespace) -> str:
    """Time sampling 4 assets x 20 steps (CFG) + rendering 4 views at 64x64 with the shipped model."""
    from benchmark import machine_description, time_call

    backend = load_backend("tiny")
    prompts = ["a red cube", "a tall blue cylinder with white stripes", "a small green torus", "a yellow cone"]
    cams = orbit_cameras(20.0, [0, 90, 180, 270], distance=2.5, fov_deg=40.0, width=64, height=64)

    def sample_only():
        return generate(backend, prompts, [0])

    def sample_and_render():
        gaussians = generate(backend, prompts, [0]).gaussians
        with torch.no_grad():
            render_gaussians(gaussians, cams)

    t_sample, _ = time_call(sample_only, args.repeats)
    t_total, _ = time_call(sample_and_render, args.repeats)
    return "\n".join([
        f"Machine: {machine_description()}",
        "",
        "Command: `python pipelines/benchmark.py sampling`",
        "",
        "| work | best of %d (s) | target |" % args.repeats,
        "|---|---|---|",
        f"| sample 4 assets x 20 steps (DDIM eta 1, CFG 1.5) | {t_sample:.2f} | |",
        f"| ... + render 4 views at 64x64 | {t_total:.2f} | < 5 s: {'met' if t_total < 5 else 'missed'} |",
    ])


# ---------------------------------------------------------------------------------------------- prior
def add_prior_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=120, help="held-out prompts")
    p.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 5.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="samples per prompt, one per seed")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-write", action="store_true")


def run_prior(args: argparse.Namespace) -> str:
    """Prompt-following of the shipped model: colour and shape classifiers on renders of held-out prompts."""
    from benchmark import machine_description

    from r2d3.eval.prompt_following import prompt_following

    backend = load_backend("tiny")
    heldout = split_prompts("heldout")
    prompts = [heldout[int(i * len(heldout) / args.prompts)] for i in range(args.prompts)]
    cams = orbit_cameras(20.0, [0, 90, 180, 270], distance=2.5, fov_deg=40.0, width=64, height=64)
    start = time.time()
    rows = []
    for scale in args.guidance_scales:
        color, shape = [], []
        for i in range(0, len(prompts), 20):
            chunk = prompts[i: i + 20]
            made = generate(backend, chunk, args.seeds, SamplerConfig(guidance_scale=scale))
            with torch.no_grad():
                pf = prompt_following(render_gaussians(made.gaussians, cams), made.prompts)
            color += [p["color_ok"] for p in pf["per_sample"]]
            shape += [p["shape_ok"] for p in pf["per_sample"]]
        c, s = sum(color) / len(color), sum(shape) / len(shape)
        rows.append(f"| {scale:g} | {100 * c:.1f} % ({'met' if c >= 0.8 else 'missed'}) | "
                    f"{100 * s:.1f} % ({'met' if s >= 0.6 else 'missed'}) |")
    return "\n".join([
        f"Machine: {machine_description()}",
        "",
        f"Command: `python pipelines/benchmark.py prior` ({time.time() - start:.0f} s)",
        "",
        f"Method: {len(prompts)} prompts spread evenly over the held-out split of the procedural grammar "
        f"(attribute combinations never seen in pretraining), one sample per seed {args.seeds} "
        f"({len(prompts) * len(args.seeds)} samples; 20 DDIM steps, eta 1), rendered from 4 views at 64x64; "
        "the colour check is the "
        "analytic dominant-colour classifier, the shape check the silhouette CNN (r2d3.eval), both "
        "independent of the rewards. One standard error is about "
        f"{100 * (0.25 / (len(prompts) * len(args.seeds))) ** 0.5:.1f} points.",
        "",
        "| CFG scale | colour accuracy (target >= 80 %) | shape accuracy (target >= 60 %) |",
        "|---|---|---|",
        *rows,
        "",
        "Strong guidance distorts the point cloud of this small model: the defaults use CFG 1.5.",
    ])


# ---------------------------------------------------------------------------------------------- methods
def add_methods_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rewards", nargs="+", default=["{name: dnc, kwargs: {detach_depth: false}}", "clip_tiny"],
                   help="reward specs (names or YAML flow mappings)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--updates", type=int, default=20, help="optimizer updates of Nabla-R2D3, ReFL and DRaFT-K")
    p.add_argument("--ddpo-updates", type=int, default=100, help="DDPO's (longer) budget of updates")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--config", action="append", default=[], help="base YAML config(s) (default: align defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the base config")
    p.add_argument("--workdir", type=Path, default=Path("runs") / "comparison")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "results.md")
    p.add_argument("--no-write", action="store_true")


def _curve(summary: dict, lag: int) -> list[tuple[int, float]]:
    """(optimizer updates, held-out reward) points, starting with the base model at 0."""
    points = [(0, summary["before"]["reward_mean"])]
    for h in summary["history"]:
        if "heldout/reward_mean" in h:
            points.append((int(h["optimizer_steps"]), h["heldout/reward_mean"]))
    final = int(summary["history"][-1]["optimizer_steps"]) if summary["history"] else 0
    if points[-1][0] != final:  # the final evaluation, when the last epoch was not an eval epoch
        points.append((final, summary["after"]["reward_mean"]))
    return points


def _plot(curves: dict, reward: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for method, runs in curves.items():
        steps = sorted({s for run in runs for s, _ in run})
        mean = [statistics.mean(dict(run).get(s, float("nan")) for run in runs) for s in steps]
        ax.plot(steps, mean, marker="o", ms=3, label=method)
    ax.set_xlabel("optimizer updates")
    ax.set_ylabel(f"held-out {reward} (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def run_methods(args: argparse.Namespace) -> str:
    """Nabla-R2D3 vs DDPO / ReFL / DRaFT-K on the embedded default: rewards x seeds, equal sample budgets."""
    from benchmark import machine_description

    from r2d3.jobs.compare import all_methods, method_config, run_method, update_cost

    import yaml

    from r2d3.config import reward_label

    base = build_config(AlignConfig, args.config, args.overrides)
    rewards = [yaml.safe_load(r) for r in args.rewards]
    per_update = base.train.sample_batch_size * base.train.sample_batches_per_epoch
    start = time.time()
    lines = ["Learning curves of each method at one strength (its default). They show how fast each method "
             "moves, not which is better: a weaker setting of any method keeps more of the prior. The comparison "
             "is the frontier (`python pipelines/benchmark.py frontier`).", "",
             f"Machine: {machine_description()}", "",
             f"Command: `python pipelines/benchmark.py methods {' '.join(args.overrides)}` "
             f"(rewards {[reward_label(r) for r in rewards]}, seeds {args.seeds})", "",
             f"Every method: the same sampler ({base.sampler.kind}, {base.sampler.num_steps} steps, CFG "
             f"{base.sampler.guidance_scale}), LoRA rank {base.model.lora_rank}, {per_update} sampled "
             f"trajectories per update, held-out reward on {base.eval.num_prompts} held-out prompts x "
             f"{base.eval.seeds_per_prompt} seeds with the same noise for every checkpoint. Nabla-R2D3, "
             f"ReFL and DRaFT-K get {args.updates} updates, DDPO {args.ddpo_updates}.", ""]
    for reward_spec in rewards:
        reward = reward_label(reward_spec)
        curves, finals = {}, {}
        for seed in args.seeds:  # seed-major: an interrupted suite leaves whole seeds finished
            for method in all_methods():
                updates = args.ddpo_updates if method == "ddpo" else args.updates
                every = args.eval_every * (4 if method == "ddpo" else 1)
                name = f"{reward}-{method}-s{seed}"
                summary_file = args.workdir / name / "summary.json"
                if summary_file.exists():  # rerunning the suite reuses finished runs
                    summary = json.loads(summary_file.read_text())
                else:
                    config = method_config(base, method, reward_spec, seed, updates, every, name)
                    summary = run_method(config, args.workdir)
                    summary.pop("worker", None)
                curves.setdefault(method, []).append(_curve(summary, 0))
                finals.setdefault(method, []).append(summary)
                print(f"{name}: {summary['before']['reward_mean']:.4f} -> {summary['after']['reward_mean']:.4f}",
                      flush=True)
        _plot(curves, reward, args.output.parent / f"comparison_{reward}.png")
        lines += [f"### Reward `{reward}`", "", f"![held-out reward vs updates](comparison_{reward}.png)", "",
                  "| method | updates | held-out reward before | after | prompt-following colour / shape after "
                  "| drift (RGB L2) | diversity |", "|---|---|---|---|---|---|---|"]
        for method, runs in finals.items():
            updates = args.ddpo_updates if method == "ddpo" else args.updates
            get = lambda key, tag="after": [r[tag][key] for r in runs if key in r[tag]]  # noqa: E731
            lines.append(f"| {method} | {updates} | {_fmt(get('reward_mean', 'before'))} | "
                         f"{_fmt(get('reward_mean'))} | {_fmt(get('color_ok_mean'))} / {_fmt(get('shape_ok_mean'))} | "
                         f"{_fmt(get('drift_rgb_l2_mean'))} | {_fmt(get('diversity'))} |")
        ddpo_final = statistics.mean(run[-1][1] for run in curves["ddpo"])
        reach = []
        for run in curves["nabla_gfn"]:
            hit = [s for s, r in run if r >= ddpo_final]
            reach.append(hit[0] if hit else None)
        lines += ["", f"Updates Nabla-R2D3 needs to reach DDPO's {args.ddpo_updates}-update held-out reward "
                  f"({ddpo_final:.4f}), per seed: {reach} (target <= 20; None: not reached in {args.updates}).", ""]
    cost = update_cost(replace(base, reward=rewards[0]), methods=all_methods())
    lines += ["### Cost of one update (same batch, same machine, one run)", "", *cost_table(cost),
              "", f"Total wall time of this suite: {time.time() - start:.0f} s."]
    return "\n".join(lines)


def cost_table(cost: dict[str, dict]) -> list[str]:
    """Markdown rows of :func:`r2d3.jobs.compare.update_cost`'s results, with the ratio to DDPO."""
    ddpo_t = cost["ddpo"]["update_s"]
    lines = ["| method | s / update | vs DDPO | precompute s / batch | peak extra memory (MB) | "
             "denoiser fwd / bwd per trained transition |", "|---|---|---|---|---|---|"]
    for method, c in cost.items():
        lines.append(f"| {method} | {c['update_s']:.3f} | {c['update_s'] / ddpo_t:.2f}x | "
                     f"{c['precompute_s']:.3f} | {c['peak_mem_mb']:.0f} | "
                     f"{c['denoiser_fwd_per_transition']:.1f} / {c['denoiser_bwd_per_transition']:.1f} |")
    return lines


# ---------------------------------------------------------------------------------------------- updates
def add_updates_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-write", action="store_true")


def run_updates(args: argparse.Namespace) -> str:
    """Time one optimizer update of every method and mode on the same batch (the default alignment config)."""
    from benchmark import machine_description

    from r2d3.jobs.compare import all_methods, update_cost

    base = build_config(AlignConfig, overrides=["run.wandb_mode=disabled", "scale.in_process=true"])
    cost = update_cost(base, methods=all_methods(), repeats=args.repeats)
    t = base.train
    return "\n".join([
        f"Machine: {machine_description()}", "",
        f"Command: `python pipelines/benchmark.py updates` (default alignment config: {t.train_batch_size} "
        f"trajectories per update, {base.sampler.num_steps} steps, {base.algo.timestep_fraction:g} of them "
        f"trained, {base.render.num_views} views at {base.render.resolution}², reward {base.reward['name']}; "
        f"median of {args.repeats} updates on one sampled batch, all methods in one run). *precompute*: the "
        "work `nabla_gfn+precomputed` does once per sampled batch, right after sampling and without a LoRA "
        "graph (reference scores, reward gradients at the sampling policy's x0_hat), timed for one update's "
        "batch.", "",
        *cost_table(cost), "",
        "Targets: Nabla-R2D3 with precomputed targets <= 1.3x a DDPO update; exact mode <= 2x.",
    ])
