"""The ``regen-scale`` benchmark suite (registered in benchmark.py): the regeneration job's bookkeeping at
library scale, with ``--dry-run`` (everything but the model and the asset files: prompts streamed from
Parquet shards, parts planned and recorded, Ray Data actors, errors, the manifest).

For each library size: a first run and a rerun with nothing left to do, each its own
``python pipelines/regenerate.py`` process, so the driver's peak memory is its own. Reported per run:
wall time, the job's bookkeeping (``plan_s``: finding the work; ``commit_s``: manifest and errors) and
the driver's peak resident memory; then dry-run throughput against the number of actors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def add_regen_scale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--shard-rows", type=int, default=100_000, help="prompts per Parquet shard")
    p.add_argument("--part-size", type=int, default=256)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--throughput-size", type=int, default=100_000)
    p.add_argument("--throughput-actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-write", action="store_true")


def _shards(root: Path, n: int, rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    for k, start in enumerate(range(0, n, rows)):
        prompts = [f"asset {i}: a red cube on a wooden table" for i in range(start, min(start + rows, n))]
        pq.write_table(pa.table({"prompt": prompts}), root / f"shard-{k:05d}.parquet")
    return root


def _run(prompts: Path, out: Path, actors: int, part_size: int) -> dict:
    cmd = [sys.executable, str(REPO_ROOT / "pipelines" / "regenerate.py"), "--prompts", str(prompts), "--out",
           str(out), "--dry-run", "--no-gallery", "--no-progress", "--actors", str(actors),
           "--part-size", str(part_size)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    return {**summary, "wall": wall}


def run_regen_scale(args: argparse.Namespace) -> str:
    """Regeneration bookkeeping at 10k / 100k / 1M prompts (dry run): driver memory, plan and commit time."""
    from benchmark import machine_description

    work = Path(tempfile.mkdtemp(prefix="r2d3-bench-regen-"))
    rows, speed = [], []
    try:
        for n in args.sizes:
            prompts = _shards(work / f"p{n}", n, args.shard_rows)
            first = _run(prompts, work / f"o{n}", args.actors, args.part_size)
            again = _run(prompts, work / f"o{n}", args.actors, args.part_size)
            assert first["made"] == first["manifest_rows"] == n and again["made"] == 0 and again["skipped"] == n
            rows.append((n, first, again))
            print(f"{n}: first {first['wall']:.1f} s, {first['driver_peak_mb']:.0f} MB; rerun {again['wall']:.1f} s",
                  flush=True)
            shutil.rmtree(work / f"o{n}")
            if n != args.throughput_size:
                shutil.rmtree(prompts)
        prompts = work / f"p{args.throughput_size}"
        if not prompts.exists():
            prompts = _shards(prompts, args.throughput_size, args.shard_rows)
        for a in args.throughput_actors:
            r = _run(prompts, work / f"t{a}", a, args.part_size)
            speed.append((a, r))
            shutil.rmtree(work / f"t{a}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base_mb = rows[0][1]["driver_peak_mb"]
    lines = [
        f"Machine: {machine_description()}.",
        f"Command: `python pipelines/benchmark.py regen-scale` (one run). Each row: Parquet shards of "
        f"{args.shard_rows:,} prompts, one checkpoint, one seed, parts of {args.part_size} rows, "
        f"{args.actors} Ray Data actors, `python pipelines/regenerate.py --dry-run --no-gallery`, each run its "
        "own process. *plan*: listing `parts/` and reading shard footers; *commit*: errors and the manifest "
        "streamed from the part records; *work*: the actors' time (prompt rows read, parts recorded); "
        "*peak*: the driver's peak resident memory (torch and Ray imported: most of it).",
        "",
        "| prompts | shards | parts | first run wall s | work s | plan s | commit s | driver peak MB | "
        "rerun wall s | rerun plan s | rerun commit s | rerun peak MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, f, a in rows:
        lines.append(f"| {n:,} | {-(-n // args.shard_rows)} | {f['parts']:,} | {f['wall']:.1f} | {f['seconds']:.1f} | "
                     f"{f['plan_s']:.2f} | {f['commit_s']:.2f} | {f['driver_peak_mb']:.0f} | {a['wall']:.1f} | "
                     f"{a['plan_s']:.2f} | {a['commit_s']:.2f} | {a['driver_peak_mb']:.0f} |")
    top = rows[-1][1]["driver_peak_mb"]
    lines += ["", f"Driver peak memory at {rows[-1][0]:,} prompts: {top:.0f} MB = {top / base_mb:.2f}x the "
                  f"{rows[0][0]:,} figure (target <= 2x: **{'met' if top <= 2 * base_mb else 'missed'}**).", "",
              f"Dry-run throughput at {args.throughput_size:,} prompts (assets recorded per second of work):", "",
              "| actors | work s | assets/s |", "|---:|---:|---:|"]
    for a, r in speed:
        lines.append(f"| {a} | {r['seconds']:.1f} | {args.throughput_size / r['seconds']:,.0f} |")
    return "\n".join(lines)
