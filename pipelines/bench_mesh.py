"""Benchmark suite ``mesh``: topology of the meshes made from the shipped model's assets (how many pieces,
how many tunnels), with the meshing defaults and with the settings they replaced.

    python pipelines/benchmark.py mesh --prompts 24
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from r2d3.backends import load_backend
from r2d3.data.prompts import load_prompts
from r2d3.export.mesh import gaussians_to_mesh
from r2d3.sample import generate

REPO_ROOT = Path(__file__).resolve().parents[1]

#: (label, gaussians_to_mesh keyword arguments)
SETTINGS = (
    ("before (1-voxel dilation, no cavity fill, all pieces)",
     {"min_sigma_voxels": 1.0, "fill_cavities": False, "min_component_fraction": 0.0}),
    ("now (defaults: 2-voxel dilation, cavities filled, pieces < 5 % dropped)", {}),
)


def add_mesh_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=24, help="held-out grammar prompts, spread evenly")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-write", action="store_true")


def run_mesh(args: argparse.Namespace) -> str:
    """Mesh topology (pieces, genus) of the shipped model's assets before/after the meshing defaults."""
    from benchmark import machine_description

    every = load_prompts("procedural:heldout").prompts
    prompts = every[:: max(1, len(every) // args.prompts)][: args.prompts]
    gaussians = generate(load_backend("tiny"), prompts, [0]).gaussians
    rows = []
    for label, kwargs in SETTINGS:
        pieces, chis = [], []
        for i in range(len(prompts)):
            mesh = gaussians_to_mesh(gaussians[i], resolution=args.resolution, **kwargs)
            pieces.append(len(mesh.split(only_watertight=False)))
            chis.append(mesh.euler_number)
        genus = [(2 * c - x) / 2 for c, x in zip(pieces, chis)]
        n = len(prompts)
        rows.append(f"| {label} | {np.mean(pieces):.2f} | {sum(c > 1 for c in pieces)}/{n} | {np.mean(genus):.2f} | "
                    f"{sum(g == 0 for g in genus)}/{n} | {min(chis)} |")
    tori = sum("torus" in p for p in prompts)
    return "\n".join([
        f"Machine: {machine_description()}", "",
        f"Command: `python pipelines/benchmark.py mesh --prompts {args.prompts} --resolution {args.resolution}`: "
        f"{len(prompts)} held-out prompts of the procedural grammar (evenly spread; {tori} of them a torus, "
        f"genus 1), seed 0, 20 DDIM steps of the shipped `tiny` model. Genus per asset from the Euler "
        "characteristic chi: (2 * pieces - chi) / 2.", "",
        "| meshing | pieces per asset | assets in >1 piece | mean genus | genus-0 assets | lowest chi |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ])
