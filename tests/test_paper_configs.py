"""The paper-setup configs (cluster/configs): the paper's hyperparameters, and one of them run end to end
through pipelines/align.py on a tiny DiffSplat built from the same classes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from r2d3.config import build_config
from r2d3.train.config import AlignConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster" / "configs"
sys.path.insert(0, str(ROOT / "pipelines"))

# reward, beta, lambda, lr, grad accumulation, seed: the Nabla-R2D3 training scripts' values
PAPER = {
    "diffsplat_aesthetic": ("laion_aesthetic", 2e6, 3e3, 3e-4, 4, 1),
    "diffsplat_hpsv2": ("hpsv2", 5e7, 5e3, 1e-4, 8, 1),
    "diffsplat_dnc": ("dnc", 5e5, 1e4, 5e-4, 8, 0),
    "diffsplat_normal": ("normal_estimator", 1e6, 1e4, 5e-4, 8, 0),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_has_the_papers_hyperparameters(name):
    config = build_config(AlignConfig, [str(CONFIGS / f"{name}.yaml")], [])
    reward, beta, reg, lr, accum, seed = PAPER[name]
    assert config.model.backend == "diffsplat" and config.reward["name"] == reward
    assert (config.algo.beta, config.algo.reg_scale, config.train.lr, config.train.grad_accum) == (beta, reg, lr, accum)
    assert config.run.seed == seed and config.algo.timestep_fraction == 0.4 and config.model.lora_rank == 8
    assert (config.sampler.kind, config.sampler.num_steps, config.sampler.guidance_scale) == ("sde-dpmsolver++", 20, 5.0)
    assert (config.render.num_views, config.render.resolution, config.render.distance) == (4, 256, 1.4)
    assert config.train.sample_batch_size * config.train.sample_batches_per_epoch == 16
    assert config.scale.num_workers == 2 and config.train.epochs == 100
    assert set(PAPER) == {p.stem for p in CONFIGS.glob("*.yaml")}


def test_dnc_config_runs_end_to_end_on_a_tiny_diffsplat(tmp_path):
    """The DNC setup (no external reward weights) through align.py with only sizes overridden."""
    import align

    from r2d3.backends.diffsplat import tiny_diffsplat

    words = ["a", "red", "chair", "blue", "lamp", "wooden", "table"]
    tiny_diffsplat(vocab=words).save_pretrained(tmp_path / "w")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red chair\nblue lamp\na wooden table\n")
    summary = align.main([
        "--config", str(CONFIGS / "diffsplat_dnc.yaml"), f"model.weights={tmp_path / 'w'}",
        f"data.prompts={prompts}", f"data.heldout_prompts={prompts}", "train.epochs=1", "train.sample_batch_size=2",
        "train.sample_batches_per_epoch=1", "train.grad_accum=1", "sampler.num_steps=3", "render.resolution=16",
        "render.num_views=2", "eval.num_prompts=2", "eval.seeds_per_prompt=1", "scale.num_workers=1",
        "scale.use_gpu=false", "scale.cpus_per_worker=1", "scale.in_process=true", "run.wandb_mode=disabled",
        "run.progress=false", f"run.output_dir={tmp_path / 'runs'}", "run.name=dnc",
    ])
    assert summary["history"] and "reward_mean" in summary["after"]
    assert (tmp_path / "runs" / "dnc" / "samples" / "heldout_00.ply").is_file()
