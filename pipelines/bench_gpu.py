"""The ``gpu`` benchmark suite (registered in benchmark.py): what only a CUDA machine can show.

- renderer: gsplat's fused kernels vs the tiled torch renderer on the same GPU, same scenes and
  cameras: time per view (forward, forward+backward), peak memory, and how far images and gradients
  of the two backends differ;
- sampling throughput of the embedded model on the GPU;
- the cost of one optimizer update of each alignment method on the GPU, with either rasteriser.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from r2d3.config import build_config
from r2d3.train.config import AlignConfig
from r2d3.render import orbit_cameras, render_gaussians

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS = ("means", "scales", "quats", "opacities", "colors")


def add_gpu_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gaussians", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 256, 512])
    p.add_argument("--views", type=int, default=4, help="views per render call")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats (best kept; fewer for slow calls)")
    p.add_argument("--sample-assets", type=int, nargs="+", default=[4, 64, 256])
    p.add_argument("--skip", nargs="*", default=[], choices=["render", "sampling", "methods"])
    p.add_argument("--rasterisers", nargs="+", default=["gsplat", "torch"], help="for the methods section")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-write", action="store_true")


def _timed(fn, repeats: int) -> float:
    """Best seconds of up to ``repeats`` synchronised calls after one warm-up (fewer when a call is slow)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    best = first
    for _ in range(max(1, min(repeats, int(3.0 / max(first, 1e-4))))):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _render_rows(args: argparse.Namespace) -> list[str]:
    from benchmark import _grad_leaves, _render_loss, surface_scene

    rows = []
    for n in args.gaussians:
        scene = surface_scene(n).to("cuda")
        for res in args.resolutions:
            cams = orbit_cameras(15.0, [i * 360.0 / args.views for i in range(args.views)], distance=2.5,
                                 fov_deg=40.0, width=res, height=res, device="cuda")
            weights = torch.rand(1, args.views, 3, res, res, device="cuda",
                                 generator=torch.Generator("cuda").manual_seed(1))
            cells, outs, grads = {}, {}, {}
            for backend in ("gsplat", "torch"):
                leaves = _grad_leaves(scene)

                def fwd():
                    with torch.no_grad():
                        return render_gaussians(scene, cams, backend=backend)

                def fwd_bwd():
                    _render_loss(render_gaussians(leaves, cams, backend=backend), weights).backward()

                try:
                    cells[backend] = (_timed(fwd, args.repeats) / args.views,
                                      _timed(fwd_bwd, args.repeats) / args.views, _peak_mb(fwd_bwd))
                except torch.cuda.OutOfMemoryError:
                    cells[backend] = None
                    torch.cuda.empty_cache()
                    continue
                outs[backend] = fwd()
                for p in PARAMS:
                    getattr(leaves, p).grad = None
                fwd_bwd()
                grads[backend] = [getattr(leaves, p).grad for p in PARAMS]
            g, t = cells["gsplat"], cells["torch"]
            fmt = lambda c: "OOM" if c is None else f"{c[0] * 1e3:.2f} / {c[1] * 1e3:.2f} / {c[2]:.0f}"  # noqa: E731
            if g and t:
                diff = max((getattr(outs["gsplat"], c) - getattr(outs["torch"], c)).abs().max().item()
                           for c in ("rgb", "alpha"))
                gdiff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                            for a, b in zip(grads["gsplat"], grads["torch"]))
                speed = f"{t[0] / g[0]:.1f}x / **{t[1] / g[1]:.1f}x**"
                parity = f"{diff:.1e} / {gdiff:.1e}"
            else:
                speed, parity = "–", "–"
            row = f"| {n:,} | {res}² | {fmt(g)} | {fmt(t)} | {speed} | {parity} |"
            print(row, flush=True)
            rows.append(row)
    return rows


def _sampling_rows(args: argparse.Namespace) -> list[str]:
    from r2d3.backends import load_backend
    from r2d3.data.procedural import split_prompts
    from r2d3.sample import generate

    backend = load_backend("tiny", device="cuda")
    prompts = split_prompts("heldout")
    cams = orbit_cameras(20.0, [0, 90, 180, 270], distance=2.5, fov_deg=40.0, width=64, height=64, device="cuda")
    rows = []
    for count in args.sample_assets:
        chunk = [prompts[i % len(prompts)] for i in range(count)]

        def sample_and_render():
            gaussians = generate(backend, chunk, [0]).gaussians
            with torch.no_grad():
                render_gaussians(gaussians, cams)

        seconds = _timed(sample_and_render, 3)
        rows.append(f"| {count} | {seconds:.3f} | {count / seconds:.1f} |")
        print(rows[-1], flush=True)
    return rows


def _method_rows(args: argparse.Namespace) -> list[str]:
    from r2d3.jobs.compare import all_methods, update_cost

    base = build_config(AlignConfig, [], ["run.device=cuda", "run.wandb_mode=disabled"])
    rows = []
    for raster in args.rasterisers:
        config = replace(base, render=replace(base.render, backend=raster))
        cost = update_cost(config, methods=all_methods(), repeats=5)
        ddpo = cost["ddpo"]["update_s"]
        for method, c in cost.items():
            rows.append(f"| {raster} | {method} | {c['update_s'] * 1e3:.1f} | {c['update_s'] / ddpo:.2f}x | "
                        f"{c['peak_mem_mb']:.0f} | {c['denoiser_fwd_per_transition']:.1f} / "
                        f"{c['denoiser_bwd_per_transition']:.1f} |")
            print(rows[-1], flush=True)
    return rows


def run_gpu(args: argparse.Namespace) -> str:
    """gsplat vs the torch renderer on CUDA, sampling throughput and per-update cost of each method on the GPU."""
    if not torch.cuda.is_available():
        raise SystemExit("the gpu suite needs a CUDA GPU (torch.cuda.is_available() is False)")
    from benchmark import machine_description

    props = torch.cuda.get_device_properties(0)
    lines = [f"Machine: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
             f"CUDA {torch.version.cuda}; host: {machine_description()}", "",
             "Command: `python pipelines/benchmark.py gpu`", ""]
    if "render" not in args.skip:
        import gsplat

        lines += [f"### Rasterisers on the GPU (gsplat {gsplat.__version__} vs the tiled torch renderer)", "",
                  f"Per view, {args.views} orbit views per call, float32, best of up to {args.repeats} synchronised "
                  "calls; cells are forward ms / forward+backward ms / peak extra MB of forward+backward. Scene: "
                  "`surface_scene` (flat opaque discs on a bumpy sphere). Parity: largest |gsplat - torch| over "
                  "RGB and alpha, and the largest gradient difference relative to the torch gradient's largest "
                  "entry over all Gaussian parameters (loss touching RGB, alpha, depth and normal).", "",
                  "| Gaussians | image | gsplat | torch (CUDA) | gsplat speed-up fwd / fwd+bwd | "
                  "parity image / gradient |", "|---:|---:|---|---|---|---|", *_render_rows(args), ""]
    if "sampling" not in args.skip:
        lines += ["### Sampling the embedded model on the GPU", "",
                  "20 DDIM steps with CFG 1.5, decode, and 4 views at 64² (auto rasteriser), best of 3.", "",
                  "| assets per call | seconds | assets / s |", "|---:|---:|---:|", *_sampling_rows(args), ""]
    if "methods" not in args.skip:
        lines += ["### One optimizer update of each method on the GPU", "",
                  "`update_cost` of `r2d3.jobs.compare` with the default alignment config on `cuda`: one "
                  "update on the same 4 sampled trajectories (8 trained transitions each where the method "
                  "subsamples), median of 5 after one untimed update; memory is peak CUDA memory above the level "
                  "before the update.", "",
                  "| rasteriser | method | ms / update | vs DDPO | peak extra MB | denoiser fwd / bwd per trained "
                  "transition |", "|---|---|---:|---:|---:|---|", *_method_rows(args), ""]
    return "\n".join(lines)
