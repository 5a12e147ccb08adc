"""The evaluation report: Markdown and HTML with the same tables, plots and image grids.

Written into the job's output directory next to ``samples.parquet`` and ``summary.json``::

    report.md / report.html     tables (headline metrics, image statistics, per-prompt deltas), definitions
    tradeoff.png                reward vs FID against the base model, one point per checkpoint (95 % CIs)
    per_prompt_delta.png        paired reward change vs the base model, per prompt, per checkpoint
    grid_<checkpoint>_best.png  the prompts whose reward rose most / fell most: base views | checkpoint views
    grid_<checkpoint>_worst.png

The report is built as a list of blocks (heading, paragraph, table, image) rendered twice, so the two
formats never disagree.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from r2d3.export import save_preview_grid

DEFINITIONS = [
    ("reward", "the alignment reward of each sample (mean over its rendered views); mean, population std and "
               "per-prompt means over the held-out samples"),
    ("Δ vs base", "paired difference to the base model's sample from the same prompt, initial noise and cameras"),
    ("FID vs base", "Fréchet distance between the checkpoint's and the base model's per-asset features (extractor "
                    "features of each view, averaged over views), float64; 0 for the base itself by construction"),
    ("FID disjoint seeds", "FID between the checkpoint's samples for the first half of the seeds and the base "
                           "model's for the second half (no shared noise, equal sizes); the base's own value is "
                           "the sampling floor to compare the others with"),
    ("similarity", "multi-view prompt–render similarity: cosine between each view's image embedding and the "
                   "prompt's text embedding under the extractor's image–text model, averaged over views"),
    ("diversity", "mean pairwise RMS distance between the pooled features of a prompt's samples across seeds "
                  "(0 for identical samples), averaged over prompts; 'latent': the same with Chamfer distance "
                  "between latent token sets"),
    ("drift", "distance to the base model's sample from the same noise: per-pixel RGB L2, DSSIM = (1 − SSIM)/2, "
              "alpha L1 (renders) and RMS distance of pooled features"),
    ("image statistics", "saturation (alpha-weighted HSV saturation), contrast (RMS of luma), background "
                         "coverage (mean 1 − alpha), edge density (fraction of pixels with Sobel/4 luma "
                         "gradient > 0.1); means over views"),
    ("colour / shape", "prompt-following by the analytic colour check and the silhouette classifier of r2d3.eval "
                       "(grammar prompts only)"),
    ("intervals", "95 % percentile bootstrap over prompts (a prompt's seeds stay together), fixed generator seed; "
                  "FID intervals resample prompts for both sets alike and are shifted by the bootstrap bias "
                  "estimate (resampled FIDs run high because repeated prompts shrink the sample)"),
]


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "checkpoint"


def fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def fmt_ci(res: dict[str, Any], key: str, digits: int = 4, signed: bool = False) -> str:
    """``mean [lo, hi]`` of ``<key>_mean``/``<key>_ci95`` (or ``<key>`` itself), '–' when absent."""
    value = res.get(f"{key}_mean", res.get(key))
    if value is None:
        return "–"
    f = (lambda v: f"{v:+.{digits}f}") if signed else (lambda v: f"{v:.{digits}f}")  # noqa: E731
    ci = res.get(f"{key}_ci95") or res.get(key.replace("_vs_base", "") + "_ci95")
    return f"{f(value)} [{f(ci[0])}, {f(ci[1])}]" if ci else f(value)


def fmt_delta(res: dict[str, Any], metric: str, digits: int = 4) -> str:
    value = res.get(f"{metric}_delta_vs_base")
    if value is None:
        return "–"
    lo, hi = res[f"{metric}_delta_ci95"]
    return f"{value:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


# ---------------------------------------------------------------------------------------------------------
# plots and grids


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(summary: dict[str, Any], path: Path) -> Path:
    """Reward (y) vs FID against the base model (x), one point per checkpoint, 95 % CI bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, res in summary["checkpoints"].items():
        if "reward_mean" not in res:  # no sample of it scored
            continue
        x, y = res.get("fid_vs_base", 0.0), res["reward_mean"]
        xci = res.get("fid_ci95") or [x, x]
        yci = res["reward_ci95"]
        ax.errorbar([x], [y], xerr=[[max(x - xci[0], 0)], [max(xci[1] - x, 0)]],
                    yerr=[[y - yci[0]], [yci[1] - y]], fmt="o", capsize=3, label=name)
    ax.set_xlabel(f"FID vs base ({summary['job']['extractor']} features)")
    ax.set_ylabel(f"held-out reward ({summary['job']['reward_label']})")
    ax.set_title("reward vs prior preservation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_prompt(summary: dict[str, Any], path: Path) -> Path | None:
    """Paired per-prompt reward change vs the base model, prompts sorted by the first checkpoint's change."""
    others = [(n, r) for n, r in summary["checkpoints"].items() if "reward_delta_per_prompt" in r]
    if not others:
        return None
    plt = _pyplot()
    prompts = summary["prompts"]
    order = sorted(range(len(prompts)), key=lambda i: others[0][1]["reward_delta_per_prompt"][i])
    fig, ax = plt.subplots(figsize=(6.5, 0.9 + 0.22 * len(prompts)))
    height = 0.8 / len(others)
    for k, (name, res) in enumerate(others):
        vals = [res["reward_delta_per_prompt"][i] for i in order]
        ax.barh([j + k * height for j in range(len(order))], vals, height=height, label=name)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(order))])
    ax.set_yticklabels([prompts[i][:48] for i in order], fontsize=6)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("reward change vs base (same noise), mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def best_worst(res: dict[str, Any], k: int) -> tuple[list[int], list[int]]:
    """Prompt indices with the largest and smallest paired reward change (``k`` each, disjoint)."""
    deltas = res["reward_delta_per_prompt"]
    order = sorted(range(len(deltas)), key=lambda i: deltas[i])
    k = min(k, len(order) // 2) if len(order) > 1 else len(order)
    return order[::-1][:k], order[:k]


def save_grids(summary: dict[str, Any], previews: dict[tuple[str, int], torch.Tensor], out_dir: Path,
               k: int = 3) -> dict[str, dict[str, Path]]:
    """Per non-base checkpoint: grids of the best and worst prompts, base views | checkpoint views."""
    base = next(iter(summary["checkpoints"]))
    prompts = summary["prompts"]
    written: dict[str, dict[str, Path]] = {}
    for name, res in summary["checkpoints"].items():
        if name == base or "reward_delta_per_prompt" not in res:
            continue
        for label, idx in zip(("best", "worst"), best_worst(res, k)):
            idx = [i for i in idx if (base, i) in previews and (name, i) in previews]
            if not idx:
                continue
            images = torch.stack([torch.stack([previews[(base, i)], previews[(name, i)]]) for i in idx])
            labels = [f"{prompts[i]}  (reward {res['reward_delta_per_prompt'][i]:+.3f})" for i in idx]
            path = out_dir / f"grid_{safe_name(name)}_{label}.png"
            save_preview_grid(images, path, row_labels=labels, col_labels=["base", name],
                              caption=f"{label} prompts by paired reward change, first seed")
            written.setdefault(name, {})[label] = path
    return written


# ---------------------------------------------------------------------------------------------------------
# blocks -> Markdown / HTML


def _blocks(summary: dict[str, Any], images: dict[str, Any]) -> list[tuple[str, Any]]:
    job = summary["job"]
    cks = summary["checkpoints"]
    base = next(iter(cks))
    blocks: list[tuple[str, Any]] = [("h1", "Evaluation report")]
    timing = summary.get("timing", {})
    seeds = job["seeds"]
    consecutive = len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    seed_text = f"{seeds[0]}–{seeds[-1]}" if consecutive else ", ".join(map(str, seeds))
    blocks.append(("p", f"{job['num_prompts']} prompts from `{job['prompts']}` x seeds {seed_text} "
                        f"({len(seeds)} per prompt), {len(cks)} checkpoints; reward `{job['reward_label']}`, "
                        f"extractor `{job['extractor']}`; sampler {job['sampler']['kind']} "
                        f"{job['sampler']['num_steps']} steps, CFG {job['sampler']['guidance_scale']}, eta "
                        f"{job['sampler']['eta']}; {job['render']['num_views']} views at "
                        f"{job['render']['resolution']}px. Every checkpoint saw the same prompts, noise and cameras. "
                        + (f"Wall time {timing['seconds_total']:.0f} s." if "seconds_total" in timing else "")))
    rows = [[name, fmt_ci(r, "reward"), fmt_delta(r, "reward"), fmt_ci(r, "fid_vs_base"),
             fmt(r.get("fid_disjoint_seeds")), fmt_ci(r, "similarity"), fmt_delta(r, "similarity"),
             fmt_ci(r, "diversity"), fmt_ci(r, "drift_rgb_l2"),
             " / ".join(fmt(r.get(f"{m}_ok_mean"), 3) for m in ("color", "shape"))]
            for name, r in cks.items()]
    blocks.append(("h2", "Headline metrics (95 % bootstrap intervals over prompts)"))
    blocks.append(("table", (["checkpoint", "reward", "Δ reward vs base", "FID vs base", "FID disjoint seeds",
                              "similarity", "Δ similarity", "diversity", "drift RGB L2", "colour / shape acc"], rows)))
    if images.get("tradeoff"):
        blocks.append(("img", ("reward vs FID", images["tradeoff"])))
    stats = ("saturation", "contrast", "background_coverage", "edge_density")
    blocks.append(("h2", "Image statistics (hacking indicators)"))

    def stat_cell(name: str, r: dict[str, Any], s: str) -> str:
        return fmt_ci(r, s) + ("" if name == base else f" (Δ {r.get(s + '_delta_vs_base', 0):+.4f})")

    blocks.append(("table", (["checkpoint", *stats, "diversity (latent)", "drift DSSIM", "drift alpha L1",
                              "drift features"],
                             [[name, *[stat_cell(name, r, s) for s in stats], fmt_ci(r, "diversity_latent"),
                               fmt_ci(r, "drift_dssim"), fmt_ci(r, "drift_alpha_l1"), fmt_ci(r, "drift_feature")]
                              for name, r in cks.items()])))
    prompts = summary["prompts"]
    for name, r in cks.items():
        if "reward_delta_per_prompt" not in r:
            continue
        blocks.append(("h2", f"Per-prompt changes: {name} vs {base}"))
        order = sorted(range(len(prompts)), key=lambda i: -r["reward_delta_per_prompt"][i])
        sim = r.get("similarity_delta_per_prompt")
        blocks.append(("table", (["prompt", "base reward", "reward", "Δ reward", "Δ similarity"],
                                 [[prompts[i], fmt(cks[base]["reward_per_prompt"][i]), fmt(r["reward_per_prompt"][i]),
                                   f"{r['reward_delta_per_prompt'][i]:+.4f}",
                                   "–" if sim is None else f"{sim[i]:+.4f}"] for i in order])))
        for label in ("best", "worst"):
            path = images.get("grids", {}).get(name, {}).get(label)
            if path:
                blocks.append(("img", (f"{label} prompts: {name}", path)))
    if images.get("per_prompt"):
        blocks.append(("img", ("per-prompt reward change", images["per_prompt"])))
    blocks.append(("h2", "Definitions"))
    blocks.append(("ul", [f"**{k}**: {v}" for k, v in DEFINITIONS]))
    return blocks


#: characters that Markdown (and the HTML it passes through) would interpret inside a table cell
_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}()#+!|~])")


def _md_cell(text: str) -> str:
    """Table-cell text (prompts are user input) shown literally: HTML escaped, Markdown punctuation
    backslash-escaped, so no prompt can inject markup, links or images into the report."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(str(text), quote=False))


def to_markdown(blocks: list[tuple[str, Any]], out_dir: Path) -> str:
    lines: list[str] = []
    for kind, body in blocks:
        if kind == "h1":
            lines += [f"# {body}", ""]
        elif kind == "h2":
            lines += [f"## {body}", ""]
        elif kind == "p":
            lines += [body, ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in body] + [""]
        elif kind == "table":
            header, rows = body
            lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            alt, path = body
            lines += [f"![{alt}]({Path(path).relative_to(out_dir).as_posix()})", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    text = html.escape(str(text))
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def to_html(blocks: list[tuple[str, Any]], out_dir: Path) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>r2d3 evaluation</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%}", "</style></head><body>"]
    for kind, body in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{_inline(body)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(body)}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in body) + "</ul>")
        elif kind == "table":
            header, rows = body
            parts.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        elif kind == "img":
            alt, path = body
            parts.append(f"<figure><img src='{html.escape(Path(path).relative_to(out_dir).as_posix())}' "
                         f"alt='{html.escape(alt)}'><figcaption>{_inline(alt)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(summary: dict[str, Any], previews: dict[tuple[str, int], torch.Tensor], out_dir: str | Path,
                 grid_prompts: int = 3) -> dict[str, Path]:
    """Plots, grids, ``report.md`` and ``report.html`` in ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, Any] = {"tradeoff": plot_tradeoff(summary, out_dir / "tradeoff.png"),
                              "per_prompt": plot_per_prompt(summary, out_dir / "per_prompt_delta.png"),
                              "grids": save_grids(summary, previews, out_dir, grid_prompts)}
    blocks = _blocks(summary, images)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(to_markdown(blocks, out_dir))
    page.write_text(to_html(blocks, out_dir))
    written = {"report_md": md, "report_html": page, "tradeoff": images["tradeoff"]}
    if images["per_prompt"]:
        written["per_prompt_delta"] = images["per_prompt"]
    for name, grids in images["grids"].items():
        for label, path in grids.items():
            written[f"grid_{safe_name(name)}_{label}"] = path
    return written


def headline_rows(summary: dict[str, Any], keys: Sequence[str] = ("reward", "fid_vs_base", "similarity")) -> list[str]:
    """One console line per checkpoint (used by the CLI)."""
    return [f"  {name:<32} " + "  ".join(f"{k} {fmt_ci(r, k)}" for k in keys)
            for name, r in summary["checkpoints"].items()]


__all__ = ["DEFINITIONS", "best_worst", "headline_rows", "plot_per_prompt", "plot_tradeoff", "save_grids",
           "to_html", "to_markdown", "write_report"]
