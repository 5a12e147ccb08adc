"""The evaluation job (r2d3.jobs.evaluate, r2d3.ray.evaluate, pipelines/evaluate.py) on a tiny random model:
paired samples, outputs, reruns that give identical results in-process and on Ray Data."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from r2d3.backends import TinySplatBackend, load_backend
from r2d3.config import RenderConfig, SamplerConfig
from r2d3.data.procedural import VOCABULARY, split_prompts
from r2d3.eval.summary import load_summary, scalar_metrics
from r2d3.jobs.evaluate import BASE, EvalSettings, PromptEvaluator, resolve_checkpoint, resolve_checkpoints
from r2d3.backends.lora import add_lora, lora_state_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
PROMPTS = [split_prompts("heldout")[i] for i in (0, 40)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random tiny backend and a LoRA checkpoint of it with non-zero adapters (a run directory)."""
    root = tmp_path_factory.mktemp("eval")
    backend = TinySplatBackend.random_init(num_gaussians=24, dim=16, vocab=VOCABULARY)
    torch.nn.init.normal_(backend.denoiser.proj_out.weight, std=0.05)
    backend.save_pretrained(root / "w")
    tuned = load_backend("tiny", weights=str(root / "w"))
    add_lora(tuned.denoiser, 4, None, tuned.lora_target_modules)
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) * 0.2 for k, v in lora_state_dict(tuned.denoiser).items()}
    ckpt = root / "run" / "checkpoint_000002"
    ckpt.mkdir(parents=True)
    save_file(state, ckpt / "lora.safetensors")
    (ckpt / "state.json").write_text("{}")
    (ckpt / "config.yaml").write_text("model:\n  backend: tiny\n  lora_rank: 4\n  lora_alpha: null\n")
    return root


def settings(models, checkpoints=("base", "run"), seeds=(0, 1), **kw):
    specs = resolve_checkpoints([str(models / c) if c != BASE else c for c in checkpoints])
    return EvalSettings(checkpoints=specs, seeds=list(seeds), weights=str(models / "w"), reward="colorfulness",
                        sampler=replace(SamplerConfig(), num_steps=4),
                        render=replace(RenderConfig(), num_views=2, resolution=16), device="cpu", **kw)


def test_checkpoints_resolve_with_the_base_first(models):
    specs = resolve_checkpoints([str(models / "run")])
    assert [s.name for s in specs] == ["base", "run/checkpoint_000002"] and specs[0].is_base
    assert resolve_checkpoint(str(models / "run" / "checkpoint_000002" / "lora.safetensors")).name == specs[1].name
    with pytest.raises(ValueError, match="listed twice"):
        resolve_checkpoints(["base", str(models / "run"), str(models / "run" / "checkpoint_000002")])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        resolve_checkpoint(str(models / "nope"))
    labelled = resolve_checkpoint(f"aligned={models / 'run'}")
    assert labelled.name == "aligned" and labelled.path == specs[1].path
    with pytest.raises(ValueError, match="reserved"):
        resolve_checkpoint(f"base={models / 'run'}")


def test_every_checkpoint_sees_the_same_noise_and_the_base_is_the_frozen_model(models):
    ev = PromptEvaluator(settings(models))
    rows = ev.evaluate_prompts([3], [PROMPTS[0]])
    assert len(rows) == 2 * 2
    base = [r for r in rows if r["checkpoint"] == "base"]
    tuned = [r for r in rows if r["checkpoint"] != "base"]
    assert [r["noise_seed"] for r in base] == [r["noise_seed"] for r in tuned]
    assert all(r["drift_rgb_l2"] == 0.0 and r["drift_feature"] == 0.0 for r in base)
    assert all(r["drift_rgb_l2"] > 0 for r in tuned)  # the adapters change the samples
    assert all(r["prompt_index"] == 3 and r["color_ok"] in (0.0, 1.0) for r in rows)
    assert base[0]["preview_png"] and base[1]["preview_png"] is None and len(base[0]["features"]) == 64
    # the base rows do not depend on which other checkpoints are evaluated (adapters disabled == no LoRA)
    alone = PromptEvaluator(settings(models, checkpoints=("base",))).evaluate_prompts([3], [PROMPTS[0]])
    assert [r["reward"] for r in alone] == [r["reward"] for r in base]
    assert [r["features"] for r in alone] == [r["features"] for r in base]


def test_in_process_job_writes_every_output_and_reruns_identically(models, tmp_path):
    from r2d3.ray.evaluate import run_evaluation

    s = settings(models)
    first = run_evaluation(s, PROMPTS, tmp_path / "a", prompts_source="test", actors=0, draws=100, fid_draws=20)
    second = run_evaluation(s, PROMPTS, tmp_path / "b", prompts_source="test", actors=0, draws=100, fid_draws=20,
                            report=False)
    for name in ("samples.parquet", "summary.json", "report.md", "report.html", "tradeoff.png",
                 "per_prompt_delta.png", "grid_run_checkpoint_000002_best.png"):
        assert (tmp_path / "a" / name).is_file(), name
    assert pq.read_table(tmp_path / "a" / "samples.parquet").equals(pq.read_table(tmp_path / "b" / "samples.parquet"))
    assert first["checkpoints"] == second["checkpoints"]
    table = pq.read_table(tmp_path / "a" / "samples.parquet").to_pylist()
    assert len(table) == 2 * 2 * 2 and {r["seed"] for r in table} == {0, 1}
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())
    base, tuned = saved["checkpoints"]["base"], saved["checkpoints"]["run/checkpoint_000002"]
    assert base["fid_vs_base"] == 0.0 and tuned["fid_vs_base"] > 0
    lo, hi = tuned["reward_delta_ci95"]
    assert lo <= tuned["reward_delta_vs_base"] <= hi
    assert saved["job"]["seeds"] == [0, 1] and saved["prompts"] == PROMPTS
    flat = scalar_metrics(load_summary(tmp_path / "a"))  # what sweeps and benchmarks record
    assert flat["fid_vs_base"] == tuned["fid_vs_base"] and flat["reward_lo"] == tuned["reward_ci95"][0]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "FID vs base" in report and "![reward vs FID](tradeoff.png)" in report


def test_cli_help_and_errors(models, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "pipelines" / "evaluate.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--checkpoints", "--prompts", "--num-prompts", "--seeds", "--reward", "--out", "--actors",
                 "--extractor"):
        assert flag in out
    import evaluate

    with pytest.raises(SystemExit, match="checkpoint not found"):
        evaluate.main(["--checkpoints", "base", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="CLIP weights not found"):
        evaluate.main(["--extractor", f"clip:{tmp_path / 'none'}", "--out", str(tmp_path / "o"), "--actors", "0"])


@pytest.mark.slow
def test_ray_data_job_is_identical_across_reruns(models, tmp_path, ray_local):
    import evaluate

    args = ["--checkpoints", "base", str(models / "run"), "--weights", str(models / "w"), "--reward", "colorfulness",
            "--num-prompts", "3", "--seeds", "0", "1", "--steps", "4", "--views", "2", "--resolution", "16",
            "--actors", "2", "--device", "cpu", "--bootstrap", "100", "--fid-bootstrap", "20"]
    first = evaluate.main(args + ["--out", str(tmp_path / "a")])
    second = evaluate.main(args + ["--out", str(tmp_path / "b"), "--no-report"])
    a, b = (pq.read_table(tmp_path / d / "samples.parquet") for d in ("a", "b"))
    assert a.num_rows == 3 * 2 * 2 and a.equals(b)
    assert first["checkpoints"] == second["checkpoints"]
    assert (tmp_path / "a" / "report.html").is_file() and not (tmp_path / "b" / "report.html").exists()
