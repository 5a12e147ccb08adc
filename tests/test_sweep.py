"""Hyperparameter sweeps (r2d3.ray.tune, pipelines/sweep.py): space files, the guarded objective, and a
2-trial sweep on Ray Tune end to end, restored on rerun."""

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from r2d3.config import build_config
from r2d3.train.config import AlignConfig
from r2d3.ray.tune import (
    FINAL_METRIC,
    METRIC,
    GuardSettings,
    Param,
    SpaceError,
    apply_params,
    best_result,
    final_result,
    guarded_score,
    heldout_result,
    load_space,
    parse_space,
    result_rows,
    start_baseline,
    trial_config,
    write_best_config,
    write_tables,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))


# ---------------------------------------------------------------------------------------------------------
# space files


def test_shipped_spaces_parse():
    params, settings = load_space(ROOT / "tune_spaces" / "default.yaml")
    dims = {p.key: p for p in params}
    assert {"algo.beta", "algo.reg_scale", "train.lr"} <= set(dims)
    assert dims["algo.beta"].args[0] < 3e4 < dims["algo.beta"].args[1]
    assert dims["algo.reg_scale"].args[0] < 1e2 < dims["algo.reg_scale"].args[1]
    assert dims["train.lr"].args[0] < 1e-3 < dims["train.lr"].args[1] < 5e-3  # lr >= 5e-3 collapses the model
    assert settings.scheduler.name == "asha" and settings.num_samples > 1
    params, settings = load_space(ROOT / "tune_spaces" / "smoke.yaml")
    assert [(p.key, p.kind, len(p.args)) for p in params] == [("train.lr", "grid", 2)]
    assert settings.num_samples == 1


def test_every_distribution_and_numbers_written_without_a_dot():
    params, settings = parse_space({
        "algo.beta": {"loguniform": ["1e3", "1e5"]},  # YAML 1.1 reads these as strings
        "algo.reg_scale": {"uniform": [10, 300]},
        "model.lora_rank": {"randint": [4, 16]},
        "sampler.kind": {"choice": ["ddim", "sde-dpmsolver++"]},
        "train.lr": {"grid": ["5e-4", 1e-3]},
        "reward": {"choice": ["dnc", {"colorfulness": 1.0}]},
        "sweep": {"num_samples": 3, "guard": {"max_drift": 0.1}},
    }, overrides=["sweep.scheduler.grace_period=2"])
    assert params[0] == Param("algo.beta", "loguniform", (1e3, 1e5))
    assert params[2] == Param("model.lora_rank", "randint", (4, 16))
    assert params[4].args == (5e-4, 1e-3)
    assert settings.num_samples == 3 and settings.guard.max_drift == 0.1 and settings.scheduler.grace_period == 2


@pytest.mark.parametrize("space, message", [
    ({"algo.beta": {"lognormal": [1, 2]}}, "algo.beta: unknown distribution 'lognormal'"),
    ({"algo.beta": {"uniform": [5, 1]}}, "algo.beta: uniform needs low < high"),
    ({"algo.beta": {"loguniform": [0, 1e4]}}, "algo.beta: loguniform needs 0 < low"),
    ({"algo.beta": {"uniform": [1]}}, "algo.beta: uniform takes [low, high]"),
    ({"algo.beta": {"uniform": ["a", 2]}}, "algo.beta: uniform bounds must be numbers"),
    ({"algo.beta": 3e4}, "algo.beta: expected a one-key mapping"),
    ({"algo.betta": {"uniform": [1, 2]}}, "algo.betta: not an AlignConfig option; did you mean algo.beta"),
    ({"algo": {"choice": [1]}}, "algo: is a config section"),
    ({"reward.kwargs.x": {"choice": [1]}}, "reward is a free-form option"),
    ({"model.lora_rank": {"uniform": [1, 5]}}, "model.lora_rank: uniform draws floats"),
    ({"model.lora_rank": {"randint": [1.5, 5]}}, "model.lora_rank: randint needs integer bounds"),
    ({"model.lora_rank": {"choice": ["many"]}}, "model.lora_rank: invalid value 'many'"),
    ({"train.lr": {"grid": []}}, "train.lr: grid takes a non-empty list"),
    ({"train.epochs": {"grid": [2, 4]}}, "train.epochs: set by the sweep"),
    ({"eval.every": {"grid": [2, 4]}}, "eval.every: set by the sweep"),
    ({"sweep": {"num_samples": 2}}, "no dimensions"),
    ({"train.lr": {"grid": [1e-3]}, "sweep": {"schedular": {}}}, "invalid sweep settings"),
    ({"train.lr": {"grid": [1e-3]}, "sweep": {"scheduler": {"name": "pbt"}}},
     "scheduler.name must be asha or fifo"),
])
def test_space_errors_name_the_key(space, message):
    with pytest.raises(SpaceError) as err:
        parse_space(space, "space.yaml")
    assert message in str(err.value) and "space.yaml" in str(err.value)


def test_space_file_errors(tmp_path):
    with pytest.raises(SpaceError, match="not found"):
        load_space(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("algo.beta: {uniform: [1, 2]\n")
    with pytest.raises(SpaceError, match="cannot parse"):
        load_space(tmp_path / "bad.yaml")
    (tmp_path / "ok.yaml").write_text("train.lr: {grid: [1.0e-3]}\n")
    with pytest.raises(SpaceError, match="sweep.key=value"):
        load_space(tmp_path / "ok.yaml", ["train.lr=1"])


def test_trial_config_applies_sampled_values(tmp_path):
    base = build_config(AlignConfig, [], ["train.epochs=8", "eval.every=0"])
    config = trial_config(base, {"algo.beta": 5e4, "reward": {"colorfulness": 1.0}}, "abc_00001", tmp_path, 2)
    assert config.algo.beta == 5e4 and config.reward == {"colorfulness": 1.0}
    assert (config.run.name, config.run.output_dir, config.eval.every) == ("abc_00001", str(tmp_path), 2)
    assert apply_params(base, {"train.lr": "2e-3"}).train.lr == 2e-3


# ---------------------------------------------------------------------------------------------------------
# the guarded objective

BASE = {"reward_mean": 0.78, "color_ok_mean": 0.84, "shape_ok_mean": 0.62}
GUARD = GuardSettings(max_drift=0.04, max_acc_drop=5.0, penalty=1.0)


def test_guard_passes_compliant_trials_through():
    out = guarded_score({"reward_mean": 0.81, "drift_rgb_l2_mean": 0.02, "color_ok_mean": 0.84, "shape_ok_mean": 0.59},
                        BASE, GUARD)
    assert out[METRIC] == pytest.approx(0.81) and out["guard/violated"] == 0
    assert out["guard/acc_drop_points"] == pytest.approx(3.0)


def test_reward_hacking_cannot_win():
    honest = guarded_score({"reward_mean": 0.79, "drift_rgb_l2_mean": 0.03, "color_ok_mean": 0.84, "shape_ok_mean": 0.62},
                           BASE, GUARD)[METRIC]
    drifted = guarded_score({"reward_mean": 0.99, "drift_rgb_l2_mean": 0.05, "color_ok_mean": 0.84, "shape_ok_mean": 0.62},
                            BASE, GUARD)
    # 0.99 held-out reward, but shape accuracy 15.6 points below the base
    forgetful = guarded_score({"reward_mean": 0.99, "drift_rgb_l2_mean": 0.02, "color_ok_mean": 0.84, "shape_ok_mean": 0.464},
                              BASE, GUARD)
    # formula: min(R, R0) - penalty * (1 + excess)
    assert drifted[METRIC] == pytest.approx(0.78 - 1.0 * (1 + 0.25))
    assert forgetful[METRIC] == pytest.approx(0.78 - 1.0 * (1 + (15.6 - 5.0) / 5.0))
    assert drifted["guard/violated"] == forgetful["guard/violated"] == 1
    assert max(drifted[METRIC], forgetful[METRIC]) < 0.78 - 1.0 < honest
    # a trial that lost reward and broke the guard scores below its own reward, too
    worse = guarded_score({"reward_mean": 0.5, "drift_rgb_l2_mean": 0.08}, BASE, GUARD)[METRIC]
    assert worse == pytest.approx(0.5 - 2.0)
    # among guarded trials, the smaller breach ranks first
    assert drifted[METRIC] > forgetful[METRIC]


def test_guard_thresholds_can_be_switched_off_and_nan_is_a_violation():
    off = GuardSettings(max_drift=None, max_acc_drop=None, penalty=1.0)
    assert guarded_score({"reward_mean": 0.99, "drift_rgb_l2_mean": 1.0, "shape_ok_mean": 0.0}, BASE, off)[METRIC] == 0.99
    nan = guarded_score({"reward_mean": float("nan"), "drift_rgb_l2_mean": 0.01}, BASE, GUARD)
    assert nan["guard/violated"] == 1 and nan[METRIC] == pytest.approx(0.78 - 2.0)


def test_only_heldout_reports_reach_tune():
    assert heldout_result({"epoch": 1, "reward_mean": 0.7}, BASE, GUARD) is None
    result = heldout_result({"epoch": 2, "reward_mean": 0.7, "heldout/reward_mean": 0.8,
                             "heldout/drift_rgb_l2_mean": 0.01, "heldout/color_ok_mean": 0.84, "heldout/shape_ok_mean": 0.62},
                            BASE, GUARD)
    assert result[METRIC] == pytest.approx(0.8) and result["epoch"] == 2


def test_a_finished_run_reports_its_final_evaluation_with_the_final_score():
    summary = {"after": {"reward_mean": 0.8, "drift_rgb_l2_mean": 0.01, "color_ok_mean": 0.84, "shape_ok_mean": 0.62},
               "history": [{"epoch": 1, "reward_mean": 0.6}, {"epoch": 2, "reward_mean": 0.7,
                                                              "heldout/reward_mean": 0.75}]}
    final = final_result(summary, 2, BASE, GUARD)
    assert final["heldout/reward_mean"] == 0.8 and final["epoch"] == 2 and final["final"] == 1
    assert final[FINAL_METRIC] == final[METRIC] == pytest.approx(0.8)
    assert final_result(summary, 4, BASE, GUARD) is None  # stopped before train.epochs: no final evaluation
    assert final_result({**summary, "after": {}}, 2, BASE, GUARD) is None


HELD = {"heldout/reward_mean": 0.8, "heldout/drift_rgb_l2_mean": 0.01, "heldout/color_ok_mean": 0.84,
        "heldout/shape_ok_mean": 0.62}


def _result(path: Path, trial: str, config: dict | None, metrics: dict, error: Exception | None = None):
    """A Tune trial's Result as a ResultGrid holds it: the last result (Tune adds trial_id, config, done)."""
    from ray.tune import Result  # after r2d3.ray (it sets how a local Ray binds before Ray is imported)

    if metrics or config is not None:
        metrics = {"trial_id": trial, **({"config": config} if config is not None else {}), **metrics}
    return Result(metrics=metrics, checkpoint=None, error=error, path=str(path / f"trial_{trial}"))


def test_tables_and_best_config_without_ray(tmp_path):
    params = [Param("train.lr", "grid", (2e-4, 2e-3)), Param("algo.beta", "loguniform", (1e4, 1e5))]
    (tmp_path / "trial_t4").mkdir()  # a trial that failed before reporting: its values from Tune's params.json
    (tmp_path / "trial_t4" / "params.json").write_text('{"train.lr": 0.0002, "algo.beta": 30000.0}')
    results = [
        _result(tmp_path, "t1", {"train.lr": 2e-4, "algo.beta": 2e4},
                {"epoch": 2, METRIC: 0.8, "guard/violated": 0.0, "done": True, **HELD}),
        _result(tmp_path, "t2", {"train.lr": 2e-3, "algo.beta": 9e4},
                {"epoch": 1, METRIC: 0.9, "guard/violated": 0.0, "done": True, **HELD}),
        _result(tmp_path, "t3", {"train.lr": 2e-3, "algo.beta": 5e4},
                {"epoch": 2, METRIC: -0.5, "guard/violated": 1.0, "done": True, **HELD}),
        _result(tmp_path, "t4", None, {}, error=RuntimeError("diverged")),
        _result(tmp_path, "t5", {"train.lr": 2e-4, "algo.beta": 4e4},  # running when the sweep was interrupted
                {"epoch": 1, METRIC: 0.95, "done": False, **HELD}),
    ]
    rows = result_rows(results, params, epochs=2)
    assert [r["trial"] for r in rows] == ["t5", "t2", "t1", "t3", "t4"]
    assert [r["status"] for r in rows] == ["unfinished (epoch 1)", "stopped early (epoch 1)", "completed",
                                           "completed", "error"]
    assert [r["guard"] for r in rows] == ["ok", "ok", "ok", "violated", None]
    assert (rows[-1]["train.lr"], rows[-1]["algo.beta"]) == (2e-4, 3e4)
    md = write_tables(rows, params, tmp_path, {"reward_mean": 0.78, "color_ok_mean": 0.84}, GUARD)
    assert "| t1 | 0.0002 | 2e+04 | 0.8 |" in md and "colour 84.0 %" in md and "shape n/a" in md
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == ["t5", "t2", "t1", "t3", "t4"] and table[-1][METRIC] == ""
    base = build_config(AlignConfig, [], ["run.name=base", "train.epochs=2"])
    path = write_best_config(rows[2], params, base, tmp_path, "s")
    best = build_config(AlignConfig, [path])
    assert (best.train.lr, best.algo.beta, best.train.epochs, best.run.name) == (2e-4, 2e4, 2, None)
    assert "best trial of sweep s: t1 (completed)" in path.read_text()
    assert write_best_config(None, params, base, tmp_path / "none", "s") is None


@pytest.mark.slow
def test_the_winner_is_the_best_final_evaluation_in_tunes_result_grid(tmp_path, ray_local):
    """On a real ResultGrid (Tune run, then restored from its saved state): a trial stopped early with a
    higher score does not win over the best trial that ran all epochs; an errored trial keeps its values."""
    from ray import tune

    from r2d3.ray.tune.trial import _trial_dirname

    scripts = {  # train.lr -> the results that trial reports (epochs = 2)
        1e-4: [{"epoch": 1, METRIC: 0.5}, {"epoch": 2, METRIC: 0.8, FINAL_METRIC: 0.8, "final": 1}],
        2e-4: [{"epoch": 1, METRIC: 0.9}],  # returns after epoch 1 (as if ASHA stopped it)
        3e-4: [{"epoch": 2, METRIC: -0.5, FINAL_METRIC: -0.5, "final": 1, "guard/violated": 1.0}],
        4e-4: [],  # fails before its first result
    }

    def scripted(config):
        for report in scripts[config["train.lr"]]:
            tune.report({**HELD, "guard/violated": 0.0, **report})
        if not scripts[config["train.lr"]]:
            raise RuntimeError("diverged")

    params = [Param("train.lr", "grid", tuple(scripts))]
    tuner = tune.Tuner(scripted, param_space={"train.lr": tune.grid_search(list(scripts))},
                       tune_config=tune.TuneConfig(trial_dirname_creator=_trial_dirname),
                       run_config=tune.RunConfig(name="scripted", storage_path=str(tmp_path), verbose=0))
    for grid in (tuner.fit(), tune.Tuner.restore(str(tmp_path / "scripted"), scripted).get_results()):
        rows = {r["train.lr"]: r for r in result_rows(grid, params, epochs=2)}
        assert {lr: r["status"] for lr, r in rows.items()} == {
            1e-4: "completed", 2e-4: "stopped early (epoch 1)", 3e-4: "completed", 4e-4: "error"}
        best = best_result(grid)
        assert best.config["train.lr"] == 1e-4 and best.metrics[FINAL_METRIC] == 0.8
        assert grid.num_terminated + grid.num_errors == 4


@pytest.mark.parametrize("overrides, driver_sees_cuda, gpus", [
    (["scale.use_gpu=true"], False, 1),  # the command line's `true` arrived as "True" and got no GPU
    (["scale.use_gpu=false"], True, 0),
    ([], True, 1),  # auto: a GPU when the driver sees one
    ([], False, 0),
])
def test_the_baseline_task_requests_a_gpu_as_scale_use_gpu_says(overrides, driver_sees_cuda, gpus, tmp_path,
                                                               monkeypatch):
    import ray
    import torch

    built = {}

    class Task:
        def options(self, **options):
            built.update(options)
            return self

        def remote(self, payload):
            return "baseline ref"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: driver_sees_cuda)
    monkeypatch.setattr(ray, "remote", lambda fn: Task())
    config = build_config(AlignConfig, [], [*overrides, "scale.cpus_per_worker=0.5"])
    assert start_baseline(config, tmp_path) == "baseline ref"
    assert built == {"num_cpus": 0.5, "num_gpus": gpus}


def test_help_documents_space_format_and_settings():
    out = subprocess.run([sys.executable, str(ROOT / "pipelines" / "sweep.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    for text in ("--space", "--num-samples", "--name", "--storage", "loguniform", "grid", "min(R, R0) - penalty",
                 "sweep.guard.max_drift", "sweep.scheduler.grace_period", "sweep.eval_every"):
        assert text in out, text


# ---------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_sweep_end_to_end_and_restore(tmp_path, ray_local):
    import sweep
    import torch

    from r2d3.backends import TinySplatBackend
    from r2d3.data.procedural import VOCABULARY

    backend = TinySplatBackend.random_init(num_gaussians=24, dim=16, vocab=VOCABULARY)
    torch.nn.init.normal_(backend.denoiser.proj_out.weight, std=0.05)
    backend.save_pretrained(tmp_path / "w")
    args = [
        "--space", str(ROOT / "tune_spaces" / "smoke.yaml"), "--name", "smoke",
        "--storage", str(tmp_path / "sweeps"),
        f"model.weights={tmp_path / 'w'}", "reward=colorfulness", "train.epochs=2", "train.sample_batch_size=2",
        "train.train_batch_size=2", "sampler.num_steps=4", "render.num_views=2", "render.resolution=16",
        "eval.num_prompts=2", "eval.seeds_per_prompt=1", f"run.output_dir={tmp_path / 'runs'}",
        "run.progress=false", "run.wandb_mode=disabled", "run.log_images_every=0", "scale.cpus_per_worker=0.5",
        "sweep.guard.max_drift=10", "sweep.guard.max_acc_drop=100",
    ]
    first = sweep.main(args)
    sweep_dir = tmp_path / "sweeps" / "smoke"
    assert first.sweep_dir == sweep_dir and not first.restored
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and sorted(float(r["train.lr"]) for r in rows) == [2e-4, 2e-3]
    assert all(r[METRIC] and r["reward"] and r["drift_rgb_l2_mean"] for r in rows)
    assert {r["status"] for r in rows} <= {"completed", "stopped early (epoch 1)"}
    assert "completed" in {r["status"] for r in rows}
    assert (sweep_dir / "results.md").read_text().count("\n| ") == 3  # header + 2 trials
    best = build_config(AlignConfig, [first.best_config])
    winner = next(r for r in rows if r["status"] == "completed")  # rows are sorted best first
    assert best.train.lr == float(winner["train.lr"]) and best.run.name is None
    assert best.train.epochs == 2 and best.reward == "colorfulness" and best.eval.every == 0
    summaries = {p: p.stat().st_mtime for p in (sweep_dir / "runs").glob("*/summary.json")}
    assert summaries

    start = time.time()
    again = sweep.main(args)  # the same name: restored, nothing re-run
    assert again.restored and time.time() - start < 30
    with open(sweep_dir / "results.csv") as f:
        assert list(csv.DictReader(f)) == rows
    assert {p: p.stat().st_mtime for p in (sweep_dir / "runs").glob("*/summary.json")} == summaries
    assert yaml.safe_load(again.best_config.read_text()) == yaml.safe_load(first.best_config.read_text())


def test_guard_baseline_from_an_evaluation_summary_must_match_the_trials_prompts_and_reward():
    from r2d3.jobs.align import heldout_prompts
    from r2d3.ray.tune import baseline_from_evaluation

    config = build_config(AlignConfig, overrides=["eval.num_prompts=4"])
    summary = {"job": {"reward": config.reward}, "prompts": heldout_prompts(config),
               "checkpoints": {"base": {"reward_mean": 0.78, "color_ok_mean": 0.9, "shape_ok_mean": 0.6,
                                        "reward_ci95": [0.7, 0.8]}}}
    assert baseline_from_evaluation(summary, config) == {"reward_mean": 0.78, "drift_rgb_l2_mean": 0.0,
                                                         "color_ok_mean": 0.9, "shape_ok_mean": 0.6}
    with pytest.raises(ValueError, match="other held-out prompts.*--num-prompts 4"):
        baseline_from_evaluation({**summary, "prompts": summary["prompts"][:3]}, config)
    with pytest.raises(ValueError, match="scored reward 'clip_tiny'"):
        baseline_from_evaluation({**summary, "job": {"reward": "clip_tiny"}}, config)
    with pytest.raises(ValueError, match="no 'base' checkpoint"):
        baseline_from_evaluation({**summary, "checkpoints": {}}, config)
