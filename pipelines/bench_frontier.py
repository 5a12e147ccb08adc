"""Benchmark suite ``frontier``: every method swept over its strength knob, scored by the evaluation job.

    python pipelines/benchmark.py frontier            # writes docs/results.md's frontier section + plots

For each reward, training seed, method and knob level one ordinary alignment run is trained (the same
sampler, LoRA, sample budget and number of optimizer updates for every method). Its final checkpoint is
scored by the evaluation job's per-prompt unit (:class:`r2d3.jobs.evaluate.PromptEvaluator`: the base model
and the checkpoint from identical noise and cameras) on held-out prompts x evaluation seeds. Reward gain,
drift, FID against the base, within-prompt diversity and prompt-following are paired with the base;
:mod:`r2d3.eval.frontier` interpolates each method's frontier and compares methods at matched FID and
matched drift with bootstrap intervals.

Resumable: finished runs (``summary.json``) and scored points (``scores/<run>.safetensors``) under
``--workdir`` are reused, so an interrupted suite continues where it stopped and adding a method or a
level costs only the new runs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from r2d3.config import build_config, reward_label
from r2d3.train.config import AlignConfig
from r2d3.storage import atomic_write_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]

#: method -> (algorithm section overrides, the knob swept, its levels)
METHODS: dict[str, tuple[dict[str, Any], str, list[float]]] = {
    "nabla_gfn": ({"name": "nabla_gfn"}, "algo.beta", [3e4, 1e5, 3e5, 1e6]),
    "refl": ({"name": "refl"}, "train.lr", [1e-4, 3e-4, 1e-3, 3e-3]),
    "draft": ({"name": "draft"}, "train.lr", [1e-4, 3e-4, 1e-3, 3e-3]),
    "ddpo": ({"name": "ddpo"}, "train.lr", [1e-3, 3e-3, 1e-2, 3e-2]),
}
#: levers tried to move Nabla-R2D3's frontier (``--methods`` picks them; each sweeps beta as above)
LEVERS: dict[str, tuple[dict[str, Any], str, list[float]]] = {
    "nabla_gfn+flow": ({"name": "nabla_gfn", "flow_correction": True}, "algo.beta", [3e4, 1e5, 3e5, 1e6]),
    "nabla_gfn+sqrt": ({"name": "nabla_gfn", "reward_weighting": "sqrt"}, "algo.beta", [3e3, 1e4, 3e4, 1e5]),
    "nabla_gfn+t0.2": ({"name": "nabla_gfn", "timestep_fraction": 0.2}, "algo.beta", [3e4, 1e5, 3e5, 1e6]),
    "nabla_gfn+lambda10": ({"name": "nabla_gfn", "reg_scale": 10.0}, "algo.beta", [3e4, 1e5, 3e5, 1e6]),
    "nabla_gfn+on_policy": ({"name": "nabla_gfn", "off_policy_lag": False}, "algo.beta", [3e4, 1e5, 3e5, 1e6]),
    "nabla_gfn+lr3e-3": ({"name": "nabla_gfn", "_lr": 3e-3}, "algo.beta", [1e4, 3e4, 1e5, 3e5]),
    "nabla_gfn+flow+reverse": ({"name": "nabla_gfn", "flow_correction": True, "reverse_loss_scale": 1e-3},
                               "algo.beta", [1e5, 3e5, 1e6]),
    "nabla_gfn+flow_lr1e-2": ({"name": "nabla_gfn", "flow_correction": True, "flow_lr": 1e-2}, "algo.beta",
                              [3e4, 1e5, 3e5, 1e6]),
    "nabla_gfn+precomputed": ({"name": "nabla_gfn", "jacobian_free": True, "precompute_targets": True}, "algo.beta",
                              [3e4, 1e5, 3e5, 1e6]),
}
ALL_METHODS = METHODS | LEVERS


def add_frontier_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rewards", nargs="+", default=["{name: dnc, kwargs: {detach_depth: false}}", "clip_tiny"],
                   help="reward specs (names or YAML flow mappings)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(ALL_METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--updates", type=int, default=20, help="optimizer updates of every method")
    p.add_argument("--prompts", type=int, default=48, help="held-out prompts scored per point")
    p.add_argument("--eval-seeds", type=int, default=4, help="evaluation seeds (samples) per prompt")
    p.add_argument("--draws", type=int, default=200, help="bootstrap draws")
    p.add_argument("--config", action="append", default=[], help="base YAML config(s) (default: align defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the base config")
    p.add_argument("--workdir", type=Path, default=Path("runs") / "frontier")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "results.md")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--no-train", action="store_true",
                   help="report from the points already scored in --workdir (train and score nothing)")


def point_config(base: AlignConfig, method: str, level: float, reward: Any, seed: int, updates: int,
                 name: str) -> AlignConfig:
    """The comparison's config for one method/seed/reward (equal sample budgets), the knob set to ``level``."""
    from r2d3.jobs.compare import method_config

    overrides, knob, _ = ALL_METHODS[method]
    overrides = dict(overrides)
    lr = overrides.pop("_lr", None)
    config = method_config(base, overrides["name"], reward, seed, updates, 10**9, name)
    config = replace(config, algo=replace(config.algo, **overrides),
                     eval=replace(config.eval, num_prompts=1, seeds_per_prompt=1, every=0))
    if lr is not None:
        config = replace(config, train=replace(config.train, lr=lr))
    section, key = knob.split(".")
    return replace(config, **{section: replace(getattr(config, section), **{key: level})})


def _measures(rows: list[dict], base: dict, num_p: int, num_s: int) -> dict[str, torch.Tensor]:
    """Per-(prompt, seed) paired measures of one checkpoint's rows against the base's."""
    def grid(rs, key):
        out = torch.full((num_p, num_s), math.nan, dtype=torch.float64)
        for r in rs:
            if r.get(key) is not None:
                out[r["prompt_index"], r["seed_index"]] = r[key]
        return out

    values = {"gain": grid(rows, "reward") - base["reward"], "drift": grid(rows, "drift_rgb_l2"),
              "diversity_change": grid(rows, "diversity") - base["diversity"],
              "color_change": grid(rows, "color_ok") - base["color_ok"],
              "shape_change": grid(rows, "shape_ok") - base["shape_ok"]}
    feats = torch.zeros(num_p, num_s, len(rows[0]["features"]), dtype=torch.float64)
    for r in rows:
        feats[r["prompt_index"], r["seed_index"]] = torch.tensor(r["features"], dtype=torch.float64)
    return values | {"features": feats}


def _base_grids(rows: list[dict], num_p: int, num_s: int) -> dict[str, torch.Tensor]:
    out = {}
    for key in ("reward", "diversity", "color_ok", "shape_ok"):
        g = torch.full((num_p, num_s), math.nan, dtype=torch.float64)
        for r in rows:
            if r.get(key) is not None:
                g[r["prompt_index"], r["seed_index"]] = r[key]
        out[key] = g
    feats = torch.zeros(num_p, num_s, len(rows[0]["features"]), dtype=torch.float64)
    for r in rows:
        feats[r["prompt_index"], r["seed_index"]] = torch.tensor(r["features"], dtype=torch.float64)
    out["features"] = feats
    return out


def score_points(base_config: AlignConfig, reward: Any, runs: dict[str, Path], prompts: list[str],
                 seeds: list[int], scores_dir: Path) -> None:
    """Score every run in ``runs`` that has no score file yet, together with the base (one pass per prompt)."""
    from r2d3.jobs.evaluate import BASE, CheckpointSpec, EvalSettings, PromptEvaluator, resolve_checkpoint

    todo = {n: d for n, d in runs.items() if not (scores_dir / f"{n}.safetensors").exists()}
    base_file = scores_dir / "base.safetensors"
    if not todo and base_file.exists():
        return
    specs = [CheckpointSpec(BASE)] + [replace(resolve_checkpoint(str(d)), name=n) for n, d in todo.items()]
    settings = EvalSettings(checkpoints=specs, seeds=seeds, backend=base_config.model.backend,
                            weights=base_config.model.weights, reward=reward, sampler=base_config.sampler,
                            render=base_config.render, device=base_config.run.device, previews=False)
    evaluator = PromptEvaluator(settings)
    rows: dict[str, list[dict]] = {s.name: [] for s in specs}
    group = 8  # prompts sampled together: the unit's values up to round-off, several times faster here
    for i in tqdm(range(0, len(prompts), group), desc=f"score {len(todo)} points", leave=False):
        chunk = prompts[i: i + group]
        for r in evaluator.evaluate_prompts(range(i, i + len(chunk)), chunk, chunk=len(chunk) * len(seeds)):
            rows[r["checkpoint"]].append(r)
    scores_dir.mkdir(parents=True, exist_ok=True)
    base = _base_grids(rows[BASE], len(prompts), len(seeds))
    if not base_file.exists():
        atomic_write_bytes(base_file, save({k: v.contiguous() for k, v in base.items()}))
    for name in todo:
        tensors = _measures(rows[name], base, len(prompts), len(seeds))
        atomic_write_bytes(scores_dir / f"{name}.safetensors", save({k: v.contiguous() for k, v in tensors.items()}))


def _plot(result, reward: str, path: Path, labels: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fid", "FID vs base (clip_tiny features)"), ("drift", "drift (RGB L2 vs base, same noise)"),
              ("diversity_change", "within-prompt diversity change vs base")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (x, xlabel) in zip(axes, panels):
        for method, levels in result.levels.items():
            lv = sorted(levels)
            xs = [levels[l][x] for l in lv]
            ys = [levels[l]["gain"] for l in lv]
            ci = [result.level_ci[method][l]["gain"] for l in lv]
            xci = [result.level_ci[method][l][x] for l in lv]
            order = sorted(range(len(lv)), key=lambda i: xs[i])
            line, = ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", ms=4, label=labels[method])
            # a bootstrap interval of a biased statistic (FID) need not contain the estimate: bars clipped at it
            err = lambda vals, cis: [[max(v - c[0], 0) for v, c in zip(vals, cis)],  # noqa: E731
                                     [max(c[1] - v, 0) for v, c in zip(vals, cis)]]
            ax.errorbar(xs, ys, yerr=err(ys, ci), xerr=err(xs, xci), fmt="none", ecolor=line.get_color(), alpha=0.35)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"held-out {reward} gain (paired)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Reward–prior frontier, reward {reward} (mean over training seeds, 95 % bootstrap CI)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ci(v: float, ci: tuple[float, float], fmt: str = "+.4f") -> str:
    return f"{v:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def run_frontier(args: argparse.Namespace) -> str:
    """Reward–prior frontiers of every method (knob sweeps, seeds, rewards) and gains at matched prior loss."""
    from benchmark import machine_description

    from r2d3.data.prompts import load_prompts
    from r2d3.jobs.compare import run_method
    from r2d3.eval.frontier import Point, analyse
    from r2d3.data.prompts import select_prompts

    base = build_config(AlignConfig, args.config, args.overrides)
    rewards = [yaml.safe_load(r) for r in args.rewards]
    prompts = select_prompts(load_prompts(base.data.heldout_prompts, base.data.prompt_column).prompts, args.prompts)
    eval_seeds = list(range(args.eval_seeds))
    start = time.time()
    names: dict[tuple[str, str, float, int], str] = {}
    for seed in args.seeds:  # seed-major: an interrupted suite leaves whole seeds finished
        for spec in rewards:
            reward = reward_label(spec)
            workdir = args.workdir / reward
            runs: dict[str, Path] = {}
            for method in args.methods:
                _, knob, levels = ALL_METHODS[method]
                for level in levels:
                    name = f"{method}-{knob.split('.')[1]}{level:g}-s{seed}"
                    if args.no_train:
                        if (workdir / "scores" / f"{name}.safetensors").exists():
                            names[(reward, method, level, seed)] = name
                        continue
                    names[(reward, method, level, seed)] = name
                    if not (workdir / name / "summary.json").exists():
                        t0 = time.time()
                        run_method(point_config(base, method, level, spec, seed, args.updates, name), workdir)
                        print(f"trained {reward}/{name} in {time.time() - t0:.0f} s", flush=True)
                    runs[name] = workdir / name
            if runs:
                t0 = time.time()
                score_points(base, spec, runs, prompts, eval_seeds, workdir / "scores")
                print(f"scored {reward} seed {seed} in {time.time() - t0:.0f} s", flush=True)
    trained = time.time() - start
    lines = [f"Machine: {machine_description()}", "",
             f"Command: `python pipelines/benchmark.py frontier {' '.join(args.overrides)}` (methods "
             f"{', '.join(args.methods)}; training seeds {args.seeds}; {time.time() - start:.0f} s for the runs "
             "not already in the work directory)", "",
             f"Protocol: every method gets the same sampler ({base.sampler.kind}, {base.sampler.num_steps} steps, "
             f"CFG {base.sampler.guidance_scale}), LoRA rank {base.model.lora_rank}, "
             f"{base.train.sample_batch_size * base.train.sample_batches_per_epoch} sampled trajectories per epoch "
             f"and {args.updates} optimizer updates. Each point is one training seed's final checkpoint, scored with "
             f"the base model from identical noise and cameras on {len(prompts)} held-out prompts x "
             f"{len(eval_seeds)} evaluation seeds ({len(prompts) * len(eval_seeds)} samples). Gain, drift, "
             "diversity and prompt-following are paired differences against the base; FID is against the base "
             "model's renders of the same prompts and noise, in the `clip_tiny` image features. Intervals: 95 % "
             f"bootstrap over prompts, evaluation seeds and training seeds ({args.draws} draws).", ""]
    for spec in rewards:
        reward = reward_label(spec)
        scores = args.workdir / reward / "scores"
        base_t = load_file(scores / "base.safetensors")
        points = []
        for (r, method, level, seed), name in names.items():
            if r != reward:
                continue
            t = load_file(scores / f"{name}.safetensors")
            points.append(Point(method, level, seed, {k: v for k, v in t.items() if k != "features"},
                                t["features"]))
        present = sorted({p.method for p in points}, key=list(ALL_METHODS).index)
        ours = [m for m in present if m.startswith("nabla_gfn")]
        baselines = [m for m in present if m not in ours]
        pairs = [(m, b) for m in ours for b in baselines] + [(m, "nabla_gfn") for m in ours if m != "nabla_gfn"]
        result = analyse(points, base_t["features"], [], draws=args.draws)
        seeds_of = {m: {p.seed for p in points if p.method == m} for m in present}
        by_seeds: dict[frozenset, list[tuple[str, str]]] = {}
        for pair in pairs:  # methods are compared on the training seeds both have
            by_seeds.setdefault(frozenset(seeds_of[pair[0]] & seeds_of[pair[1]]), []).append(pair)
        for common, group in by_seeds.items():
            sub = analyse([p for p in points if p.seed in common], base_t["features"], group, draws=args.draws)
            result.gaps |= sub.gaps
            result.gap_ci |= sub.gap_ci
            result.gap_valid |= sub.gap_valid
        labels = {m: f"{m} ({ALL_METHODS[m][1]}, {len({p.seed for p in points if p.method == m})} seeds)"
                  for m in result.levels}
        _plot(result, reward, args.output.parent / f"frontier_{reward}.png", labels)
        lines += [f"### Reward `{reward}`", "", f"![frontier]({f'frontier_{reward}.png'})", "",
                  f"Base model: held-out {reward} {float(base_t['reward'].nanmean()):.4f}, colour accuracy "
                  f"{100 * float(base_t['color_ok'].nanmean()):.1f} %, shape accuracy "
                  f"{100 * float(base_t['shape_ok'].nanmean()):.1f} %, diversity "
                  f"{float(base_t['diversity'].nanmean()):.4f}.", "",
                  "| method | knob | gain | FID vs base | drift | diversity change | colour / shape change (points) |",
                  "|---|---|---|---|---|---|---|"]
        for method, levels in result.levels.items():
            for level, s in levels.items():
                c = result.level_ci[method][level]
                lines.append(f"| {method} | {ALL_METHODS[method][1]}={level:g} | {_ci(s['gain'], c['gain'])} | "
                             f"{_ci(s['fid'], c['fid'], '.3f')} | {_ci(s['drift'], c['drift'])} | "
                             f"{_ci(s['diversity_change'], c['diversity_change'])} | "
                             f"{100 * s['color_change']:+.1f} / {100 * s['shape_change']:+.1f} |")
        lines += ["", "Gain at matched prior loss, each Nabla-R2D3 variant (beta swept) minus another method: the mean "
                  "gap over the prior-loss range both frontiers cover, 95 % CI; `n/a`: the frontiers do not overlap. "
                  "Ahead/behind: the interval excludes 0. Two methods are compared on the training seeds both have.", "",
                  "| Nabla-R2D3 variant | vs | training seeds | at matched FID | at matched drift |",
                  "|---|---|---|---|---|"]
        for ours_m, other in pairs:
            cells = []
            for axis in ("fid", "drift"):
                key = (ours_m, other, axis)
                gap, ci = result.gaps.get(key, math.nan), result.gap_ci.get(key, (math.nan, math.nan))
                if not math.isfinite(gap):
                    cells.append("n/a")
                    continue
                verdict = "ahead" if ci[0] > 0 else "behind" if ci[1] < 0 else "level"
                cells.append(f"{_ci(gap, ci)} ({verdict})")
            common = sorted(seeds_of[ours_m] & seeds_of[other])
            lines.append(f"| {ours_m} | {other} | {len(common)} | {cells[0]} | {cells[1]} |")
        lines.append("")
        (args.workdir / reward / "frontier.json").write_text(json.dumps({
            "levels": {m: {str(k): v for k, v in lv.items()} for m, lv in result.levels.items()},
            "level_ci": {m: {str(k): v for k, v in lv.items()} for m, lv in result.level_ci.items()},
            "gaps": {"|".join(k): v for k, v in result.gaps.items()},
            "gap_ci": {"|".join(k): v for k, v in result.gap_ci.items()}}, indent=1))
    lines.append(f"Wall time: {time.time() - start:.0f} s ({trained:.0f} s training and scoring).")
    return "\n".join(lines)
