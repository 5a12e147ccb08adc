"""pipelines/align.py: the documented CLI and a Ray Train run end to end on tiny settings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r2d3.backends import TinySplatBackend
from r2d3.data.procedural import VOCABULARY

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, str(ROOT / "pipelines" / "align.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    for key in ("algo.beta", "algo.reg_scale", "algo.jacobian_free", "train.grad_accum", "render.num_views",
                "scale.num_workers", "run.resume", "data.prompts"):
        assert key in out


def test_bad_values_stop_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "align.py"), "algo.timestep_fraction=2",
                           f"run.output_dir={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode != 0 and "timestep_fraction" in proc.stderr


@pytest.mark.slow
def test_align_on_ray_train_end_to_end(tmp_path, ray_local):
    import align

    backend = TinySplatBackend.random_init(num_gaussians=24, dim=16, vocab=VOCABULARY)
    torch.nn.init.normal_(backend.denoiser.proj_out.weight, std=0.05)
    backend.save_pretrained(tmp_path / "w")
    summary = align.main([
        f"model.weights={tmp_path / 'w'}", "reward=colorfulness", "train.epochs=2", "train.sample_batch_size=4",
        "train.train_batch_size=2", "sampler.num_steps=4", "render.num_views=2", "render.resolution=16",
        "eval.num_prompts=2", "eval.seeds_per_prompt=1", f"run.output_dir={tmp_path / 'runs'}", "run.name=e2e",
        "run.progress=false", "scale.cpus_per_worker=1",
    ])
    run_dir = tmp_path / "runs" / "e2e"
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["before"]["reward_mean"] == pytest.approx(summary["before"]["reward_mean"])
    assert {"reward_mean", "color_ok_mean", "shape_ok_mean", "drift_rgb_l2_mean", "fid_vs_base"} <= set(saved["after"])
    assert [h["epoch"] for h in saved["history"]] == [1, 2]
    assert list(run_dir.glob("checkpoint_*/lora.safetensors"))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "previews" / "heldout_after.png").is_file()
    assert list((run_dir / "samples").glob("*.ply"))


def test_align_in_process_writes_every_output_and_resumes(tmp_path):
    import align

    backend = TinySplatBackend.random_init(num_gaussians=24, dim=16, vocab=VOCABULARY)
    torch.nn.init.normal_(backend.denoiser.proj_out.weight, std=0.05)
    backend.save_pretrained(tmp_path / "w")
    args = [f"model.weights={tmp_path / 'w'}", "reward=colorfulness", "train.sample_batch_size=4",
            "train.train_batch_size=2", "sampler.num_steps=4", "render.num_views=2", "render.resolution=16",
            "eval.num_prompts=2", "eval.seeds_per_prompt=2", "eval.every=1", f"run.output_dir={tmp_path / 'runs'}",
            "run.name=local", "run.progress=false", "run.log_images_every=1", "scale.in_process=true"]
    first = align.main(args + ["train.epochs=1"])
    summary = align.main(args + ["train.epochs=2"])  # resumes: one more epoch, the first evaluation kept
    run_dir = tmp_path / "runs" / "local"
    assert summary["before"] == first["before"]
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert "heldout/reward_mean" in summary["history"][-1]
    after = summary["after"]
    lo, hi = after["reward_delta_ci95"]
    assert lo <= after["reward_delta_vs_base"] <= hi and {"color_ok_mean", "shape_ok_mean", "diversity_mean", "fid_vs_base"} <= set(after)
    for name in ("config.yaml", "metrics.csv", "reward_curve.png", "summary.json", "previews/epoch_0002.png",
                 "previews/heldout_before.png", "previews/heldout_after.png", "samples/heldout_00.ply"):
        assert (run_dir / name).is_file(), name
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_a_runs_before_and_after_numbers_are_the_evaluation_jobs(tmp_path):
    """One sampling path: ``pipelines/evaluate.py`` on the run's final checkpoint, with the run's settings,
    reproduces the before/after numbers the run printed (same prompts, noise, cameras and measures)."""
    import align
    import evaluate

    from r2d3.jobs.align import HEADLINE

    backend = TinySplatBackend.random_init(num_gaussians=24, dim=16, vocab=VOCABULARY)
    torch.nn.init.normal_(backend.denoiser.proj_out.weight, std=0.05)
    backend.save_pretrained(tmp_path / "w")
    summary = align.main([
        f"model.weights={tmp_path / 'w'}", "reward=colorfulness", "train.epochs=2", "train.sample_batch_size=4",
        "train.train_batch_size=2", "train.lr=3e-2", "sampler.num_steps=4", "render.num_views=2",
        "render.resolution=16", "eval.num_prompts=3", "eval.seeds_per_prompt=2", f"run.output_dir={tmp_path / 'runs'}",
        "run.name=r", "run.progress=false", "run.wandb_mode=disabled", "run.log_images_every=0",
        "scale.in_process=true"])
    job = evaluate.main([
        "--checkpoints", "base", f"run={tmp_path / 'runs' / 'r'}", "--weights", str(tmp_path / "w"),
        "--reward", "colorfulness", "--num-prompts", "3", "--seeds", "0", "1", "--steps", "4", "--views", "2",
        "--resolution", "16", "--actors", "0", "--no-report", "--out", str(tmp_path / "eval")])
    base, tuned = job["checkpoints"]["base"], job["checkpoints"]["run"]
    assert summary["after"]["reward_mean"] != pytest.approx(summary["before"]["reward_mean"], abs=1e-6)  # it trained
    for key in HEADLINE:
        if key in summary["before"]:
            assert summary["before"][key] == pytest.approx(base[key], rel=1e-5, abs=1e-7), key
        assert summary["after"][key] == pytest.approx(tuned[key], rel=1e-5, abs=1e-7), key
    assert summary["after"]["reward_delta_vs_base"] == pytest.approx(tuned["reward_delta_vs_base"], rel=1e-5)
