"""Benchmarks: each suite measures its contenders side by side in one run and reports ratios.

    python pipelines/benchmark.py render                  # renderer speed, writes docs/benchmarks.md
    python pipelines/benchmark.py render --gaussians 1000 --resolutions 64 --no-write   # a smoke run

Suites live in :data:`SUITES` (name -> (add_arguments, run)); add one by writing those two functions.
Tests never time anything; timings belong here.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from r2d3.render import Cameras, Gaussians, orbit_cameras, render_gaussians

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPORT = REPO_ROOT / "docs" / "benchmarks.md"


# --------------------------------------------------------------------------------------------------
# shared helpers


def machine_description() -> str:
    """CPU model, core count, torch version and threads: what a reader needs to compare numbers."""
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Best wall-clock seconds of ``repeats`` calls after ``warmup`` untimed ones.

    The minimum, not the mean: on a shared machine the fastest run is the one least disturbed by
    other processes, and both contenders of a suite are measured the same way.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_report_section(path: Path, heading: str, body: str) -> None:
    """Replace the ``heading`` section (up to the next ``## `` heading) of ``path``, or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        new = text.rstrip("\n") + "\n\n" + heading + "\n\n" + body.strip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "\n".join(lines[end:])
        new = "\n".join(lines[:start] + [heading, "", body.strip("\n"), ""]) + ("\n" + tail if tail else "")
        new = new.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


# --------------------------------------------------------------------------------------------------
# render suite: tiled torch renderer vs. dense all-pairs reference


def _quat_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def surface_scene(num_gaussians: int, seed: int = 0) -> Gaussians:
    """An object-like asset: flat Gaussians tiling the surface of a bumpy sphere of radius ~0.5.

    Discs are tangent to the surface with random spin and anisotropy, overlap enough to make the
    surface opaque (as splats of a real object do), and are coloured smoothly by position.
    """
    gen = torch.Generator().manual_seed(seed)
    n = num_gaussians
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    bumps = torch.sin(5 * dirs[:, 0]) * torch.sin(4 * dirs[:, 1]) * torch.sin(3 * dirs[:, 2])
    means = dirs * (0.5 * (1 + 0.1 * bumps))[:, None]
    spacing = math.sqrt(4 * math.pi * 0.25 / n)
    tangent = 1.5 * spacing * (0.7 + 0.6 * torch.rand(n, 2, generator=gen))
    scales = torch.cat([tangent, 0.1 * tangent.min(-1, keepdim=True).values], dim=-1)
    z_axis = torch.tensor([0.0, 0.0, 1.0]).expand(n, 3)
    align = torch.nn.functional.normalize(
        torch.cat([1 + (z_axis * dirs).sum(-1, keepdim=True), torch.linalg.cross(z_axis, dirs)], -1), dim=-1
    )
    half_spin = math.pi * torch.rand(n, generator=gen)
    spin = torch.stack([half_spin.cos(), torch.zeros(n), torch.zeros(n), half_spin.sin()], dim=-1)
    quats = _quat_mul(align, spin)
    opacities = 0.85 + 0.15 * torch.rand(n, generator=gen)
    colors = 0.5 + 0.4 * torch.stack([dirs[:, 0], dirs[:, 1] * dirs[:, 2], -dirs[:, 2]], dim=-1)
    return Gaussians(means[None], scales[None], quats[None], opacities[None], colors[None])


def _grad_leaves(g: Gaussians) -> Gaussians:
    return Gaussians(*(t.detach().clone().requires_grad_() for t in (g.means, g.scales, g.quats, g.opacities, g.colors)))


def _render_loss(out, weights: torch.Tensor) -> torch.Tensor:
    """A scalar touching every output (as a reward would), so backward exercises all paths."""
    return (out.rgb * weights).sum() + out.alpha.sum() + 0.1 * out.depth.sum() + out.normal.sum()


def _subset(cameras: Cameras, views: int) -> Cameras:
    return Cameras(cameras.viewmats[:views], cameras.Ks[:views], cameras.width, cameras.height)


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gaussians", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--views", type=int, default=4, help="views per tiled render call (the training batch)")
    p.add_argument(
        "--dense-views", type=int, default=1, help="views rendered by the dense reference (its cost is linear in views)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per tiled measurement (best is kept)")
    p.add_argument("--dense-repeats", type=int, default=1, help="timed repeats per dense measurement")
    p.add_argument(
        "--dense-max-pairs",
        type=float,
        default=7e7,
        help="skip dense configs with more Gaussian-pixel pairs per view (time and memory grow with them)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--output", type=Path, default=DEFAULT_REPORT)
    p.add_argument("--no-write", action="store_true", help="print the table only")


def run_render(args: argparse.Namespace) -> str:
    """Time the tiled torch renderer and the dense all-pairs reference on the same scenes and cameras."""
    from r2d3.render.dense_reference import render_gaussians_dense

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for n in args.gaussians:
        scene = surface_scene(n)
        for res in args.resolutions:
            cams = orbit_cameras(15.0, [i * 360.0 / args.views for i in range(args.views)], 2.5, 40.0, res, res)
            weights = torch.rand(1, args.views, 3, res, res, generator=torch.Generator().manual_seed(1))
            leaves = _grad_leaves(scene)

            def tiled_fwd():
                with torch.no_grad():
                    return render_gaussians(scene, cams, backend="torch")

            def tiled_fwd_bwd():
                _render_loss(render_gaussians(leaves, cams, backend="torch"), weights).backward()

            tiled = render_gaussians(scene, cams, backend="torch")
            row = {
                "n": n,
                "res": res,
                "tiled_fwd": time_call(tiled_fwd, args.repeats) / args.views,
                "tiled_fb": time_call(tiled_fwd_bwd, args.repeats) / args.views,
            }
            pairs = n * res * res
            if pairs > args.dense_max_pairs:
                gb = pairs * 4 * 12 / 2**30
                row["skip"] = f"{pairs / 1e6:.0f}M pairs/view > {args.dense_max_pairs / 1e6:.0f}M (~{gb:.0f} GB for fwd+bwd)"
            else:
                dv = min(args.dense_views, args.views)
                dense_cams = _subset(cams, dv)
                dense_weights = weights[:, :dv]

                def dense_fwd():
                    with torch.no_grad():
                        return render_gaussians_dense(scene, dense_cams)

                def dense_fwd_bwd():
                    _render_loss(render_gaussians_dense(leaves, dense_cams), dense_weights).backward()

                dense = dense_fwd()
                row["dense_fwd"] = time_call(dense_fwd, args.dense_repeats, warmup=0) / dv
                row["dense_fb"] = time_call(dense_fwd_bwd, args.dense_repeats, warmup=0) / dv
                row["diff_rgb"] = (tiled.rgb[:, :dv] - dense.rgb).abs().max().item()
                row["diff_alpha"] = (tiled.alpha[:, :dv] - dense.alpha).abs().max().item()
            rows.append(row)
            print(_format_row(row), flush=True)
    return _render_report(rows, args)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _format_row(row: dict) -> str:
    cells = [f"{row['n']:,}", f"{row['res']}²", _ms(row["tiled_fwd"]), _ms(row["tiled_fb"])]
    if "skip" in row:
        cells += ["skipped", "skipped", "–", "–", f"skipped: {row['skip']}"]
    else:
        cells += [
            _ms(row["dense_fwd"]),
            _ms(row["dense_fb"]),
            f"{row['dense_fwd'] / row['tiled_fwd']:.1f}×",
            f"**{row['dense_fb'] / row['tiled_fb']:.1f}×**",
            f"{max(row['diff_rgb'], row['diff_alpha']):.1e}",
        ]
    return "| " + " | ".join(cells) + " |"


def _render_report(rows: list[dict], args: argparse.Namespace) -> str:
    command = "python pipelines/benchmark.py " + shlex.join(sys.argv[1:] if sys.argv[1:] else ["render"])
    target = [
        r for r in rows if "skip" not in r and 1000 <= r["n"] <= 4000 and 64 <= r["res"] <= 128
    ]
    met = bool(target) and all(
        r["dense_fb"] / r["tiled_fb"] >= 3 and max(r["diff_rgb"], r["diff_alpha"]) <= 1e-5 for r in target
    )
    header = (
        "| Gaussians | image | tiled fwd | tiled fwd+bwd | dense fwd | dense fwd+bwd | fwd speed-up | "
        "fwd+bwd speed-up | max abs diff |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    return "\n".join(
        [
            f"Machine: {machine_description()}.",
            "",
            f"Command: `{command}`",
            "",
            "Milliseconds per view (best of the timed repeats, wall clock), float32. *tiled*: "
            f"`render_gaussians(..., backend=\"torch\")` rendering {args.views} orbit views per call "
            "(elevation 15°, distance 2.5, FoV 40°). *dense*: `r2d3.render.dense_reference` "
            "(gsplat's pure-torch projection, then every Gaussian at every pixel, depth-sorted `cumprod` "
            f"compositing), {min(args.dense_views, args.views)} view(s) per call, timed in the same run. "
            "fwd+bwd backpropagates a loss on RGB, alpha, depth and normal to all Gaussian parameters. "
            "Scene: flat, opaque Gaussians tiling a bumpy sphere of radius 0.5 (`surface_scene`). "
            "*max abs diff*: largest |tiled - dense| over RGB and alpha of the dense-rendered views.",
            "",
            header,
            *(_format_row(r) for r in rows),
            "",
            "Target (≥ 3× faster forward+backward than dense at 1k–4k Gaussians, 64²–128², same image "
            f"to 1e-5): **{'met' if met else 'not met'}** in this run.",
        ]
    )


# --------------------------------------------------------------------------------------------------
# CLI

#: suite name -> (add its arguments to a sub-parser, run it and return a Markdown report section)
SUITES: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], str]]] = {
    "render": (add_render_arguments, run_render),
}
#: the docs/benchmarks.md heading each suite writes under
REPORT_HEADINGS: dict[str, str] = {"render": "## Renderer (CPU)"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suite", required=True)
    for name, (add_arguments, _) in SUITES.items():
        add_arguments(sub.add_parser(name, help=(SUITES[name][1].__doc__ or "").strip().splitlines()[0]))
    args = parser.parse_args(argv)
    report = SUITES[args.suite][1](args)
    print("\n" + report)
    if not getattr(args, "no_write", False):
        write_report_section(args.output, REPORT_HEADINGS[args.suite], report)
        print(f"\nwrote section {REPORT_HEADINGS[args.suite]!r} of {args.output}")


if __name__ == "__main__":
    main()
