"""Nothing lost, nothing silently wrong: bad values are named before any work starts, corrupt
checkpoints fall back to the newest complete one, run records stay readable and whole, run directories
are claimed by one job, regeneration trusts its files over its manifest, and no input runs code."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import save_tiny_weights
from r2d3.backends import load_backend
from r2d3.pretrained import WeightsError
from r2d3.config import ConfigError, build_config
from r2d3.train.config import AlignConfig
from r2d3.data.prompts import PromptSourceError, check_shards, load_prompts
from r2d3.train.checkpoint import CorruptCheckpointError, checkpoints_newest_first, load_checkpoint
from r2d3.train.loop import run
from r2d3.train.run_dir import RunDirError, claim_run_dir
from r2d3.train.session import LocalSession

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_weights(root / "w", seed=0)
    (root / "prompts.txt").write_text("a red cube\na blue sphere\n")
    return root


def tiny_args(tiny: Path, out: Path, name: str = "r") -> list[str]:
    return [f"model.weights={tiny / 'w'}", f"data.prompts={tiny / 'prompts.txt'}", "reward=colorfulness",
            "train.epochs=3", "train.sample_batch_size=4", "train.train_batch_size=2", "sampler.num_steps=4",
            "render.num_views=2", "render.resolution=16", "model.lora_rank=2", "run.progress=false",
            "run.checkpoint_every=1", "run.keep_checkpoints=5", "algo.beta=1e3", "eval.num_prompts=2",
            "eval.seeds_per_prompt=1", "run.log_images_every=0", "run.wandb_mode=disabled",
            f"run.output_dir={out}", f"run.name={name}", "scale.in_process=true"]


# ---------------------------------------------------------------------------------------------------------
# values that would make a run do nothing, hang or fail late: refused before any model loads

BAD_VALUES = [
    ("algo.beta=nan", "algo.beta=nan is not a finite number"),
    ("algo.beta=inf", "algo.beta=inf is not a finite number"),
    ("train.lr=inf", "train.lr=inf is not a finite number"),
    ("reward={colorfulness: .nan}", "reward.colorfulness=nan"),
    ("train.adam_betas=[0.9,.nan]", r"train.adam_betas\[1\]=nan"),
    ("sampler.kind=dddim", "sampler.kind must be one of ddim, sde-dpmsolver"),
    ("sampler.num_steps=0", "sampler.num_steps must be >= 1"),
    ("sampler.guidance_scale=0.5", "sampler.guidance_scale must be >= 1"),
    ("run.wandb_mode=onlin", "run.wandb_mode must be one of offline, online, disabled"),
    ("run.device=banana", "run.device must be auto, cpu, mps, cuda or cuda:N"),
    ("model.lora_rank=0", "model.lora_rank must be >= 1"),
    ("model.lora_alpha=-1", "model.lora_alpha must be > 0"),
    ("model.lora_targets=[]", "model.lora_targets must be null"),
    ("run.name=../../x", "run.name must be a plain directory name"),
    ("run.name=/tmp/elsewhere", "run.name must be a plain directory name"),
    ("run.name=..", "run.name must be a plain directory name"),
    ("run.checkpoint_every=0", "run.checkpoint_every must be >= 1"),
    ("render.num_views=0", "render.num_views must be >= 1"),
    ("render.resolution=1", "render.resolution must be >= 8"),
    ("render.resolution=100000", "render.resolution=100000 .* GiB"),
    ("train.sample_batch_size=1000000", "train.sample_batch_size=1000000 needs at least"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("scale.num_workers=4", "scale.in_process=true runs one worker without Ray: it conflicts"),
    ("scale.reward_actors=2", "scale.in_process=true runs one worker without Ray: it conflicts"),
    ("scale.cpus_per_worker=0", "scale.cpus_per_worker must be > 0"),
    ("scale.resource_wait_s=0", "scale.resource_wait_s must be > 0"),
    ("scale.use_gpu=maybe", "scale.use_gpu: Value 'maybe' is not a valid bool"),
    ("algo.name=nabla", "unknown algorithm 'nabla'; valid algorithms: ddpo, draft, nabla_gfn, refl"),
    ("model.backend=tinyy", "unknown backend 'tinyy'; valid backends"),
    ("reward=dncc", "unknown reward 'dncc'"),
    ("algo.timestep_fraction=0", r"algo.timestep_fraction must be in \(0, 1\]"),
    ("algo.clip_range=0.1", r"algo.clip_range: no such option in NablaGFNConfig \(the options of algo.name=nabla_gfn\)"),
    ("render.background=[1,1]", "render.background must be three values in"),
]


def _choice_fields():
    """Every enum-like field (a ``choices`` list in its metadata) of every config section, and of every
    registered algorithm's option group, with the override that selects that algorithm."""
    for field in dataclasses.fields(AlignConfig):
        variants = field.metadata.get("variants")
        classes = ([(variants.resolve(n), [f"{field.name}.name={n}"]) for n in variants.names()] if variants
                   else [(typing.get_type_hints(AlignConfig)[field.name], [])])
        for cls, select in classes:
            if dataclasses.is_dataclass(cls):
                for f in dataclasses.fields(cls):
                    if f.metadata.get("choices"):
                        yield f"{field.name}.{f.name}", f.metadata["choices"], select


CHOICE_FIELDS = list(_choice_fields())


def test_the_enum_like_fields_are_all_known():
    assert {k for k, _, _ in CHOICE_FIELDS} == {"run.wandb_mode", "sampler.kind", "render.backend",
                                                "algo.reward_weighting", "algo.subsampling", "algo.proximal_outputs",
                                                "render.quaternions"}


@pytest.mark.parametrize("key,choices,select", CHOICE_FIELDS, ids=[k for k, _, _ in CHOICE_FIELDS])
def test_every_enum_like_field_rejects_a_near_miss_naming_the_key_and_the_choices(key, choices, select, tiny,
                                                                                tmp_path, monkeypatch, capsys):
    import align

    near_miss = f"{choices[0]}x"
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} must be one of {re.escape(', '.join(choices))}"):
        build_config(AlignConfig, overrides=[*select, f"{key}={near_miss}"])
    monkeypatch.setattr("r2d3.train.loop.load_backend", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit):
        base = [a for a in tiny_args(tiny, tmp_path) if not (select and a.startswith("algo."))]  # other algorithms
        align.main(base + [*select, f"{key}={near_miss}"])
    assert key in capsys.readouterr().err
    for value in choices:  # and takes every listed value
        assert build_config(AlignConfig, overrides=[*select, f"{key}={value}"]) is not None


def test_dataclasses_replace_is_checked_too():
    from r2d3.config import SamplerConfig

    with pytest.raises(ConfigError, match="sampler.eta must be in"):
        dataclasses.replace(SamplerConfig(), eta=1.5)


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_named_before_any_model_loads(override, message, tiny, tmp_path, monkeypatch, capsys):
    import align

    monkeypatch.setattr("r2d3.train.loop.load_backend", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        align.main(tiny_args(tiny, tmp_path) + [override])
    # argparse's one-line error (exit 2, on stderr) or align's own (the exit message)
    text = capsys.readouterr().err if exit_info.value.code == 2 else str(exit_info.value)
    assert exit_info.value.code != 0 and "Traceback" not in text
    assert re.search(message, text), text
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # nothing written


@pytest.mark.parametrize("override", ["algo.beta=nan", "train.lr=inf", "train.adam_betas=[0.9,.nan]"])
def test_non_finite_values_fail_config_parsing_with_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        build_config(AlignConfig, overrides=[override])


def test_sweep_grid_with_nan_is_refused():
    from r2d3.ray.tune import SpaceError, parse_space

    with pytest.raises(SpaceError, match="algo.beta.*not a finite number"):
        parse_space({"algo.beta": {"grid": [1e3, float("nan")]}})


def test_bogus_lora_targets_are_a_config_error_naming_the_option(tiny, tmp_path):
    config = build_config(AlignConfig, overrides=tiny_args(tiny, tmp_path) + ["model.lora_targets=[no_such_layer]"])
    with pytest.raises(ConfigError, match="model.lora_targets: .*no_such_layer.* not found.*the backend's own list"):
        run(config, LocalSession(tmp_path / "r"))


def test_unsatisfiable_resources_fail_after_the_bounded_wait(monkeypatch):
    import ray

    from r2d3.ray.train import ClusterResourcesError, wait_for_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ClusterResourcesError, match=r"needs 1 GPU \(the cluster has 0\).*waited 0 s.*use_gpu=false"):
        wait_for_resources({"CPU": 1, "GPU": 1}, timeout_s=0.2, poll_s=0.05)
    with pytest.raises(ClusterResourcesError, match=r"needs 64 CPU \(the cluster has 2\)"):
        wait_for_resources({"CPU": 64, "GPU": 0}, timeout_s=0)
    wait_for_resources({"CPU": 2, "GPU": 0}, timeout_s=0)  # enough: returns at once


# ---------------------------------------------------------------------------------------------------------
# checkpoints: corrupt files are named, resume falls back to the newest complete one


def _three_checkpoints(tiny, tmp_path) -> Path:
    config = build_config(AlignConfig, overrides=tiny_args(tiny, tmp_path))
    run(config, LocalSession(tmp_path / "r", keep_checkpoints=5))
    return tmp_path / "r"


CORRUPTIONS = {
    "truncated lora": lambda d: (d / "lora.safetensors").write_bytes((d / "lora.safetensors").read_bytes()[:100]),
    "empty lora": lambda d: (d / "lora.safetensors").write_bytes(b""),
    "corrupt state.json": lambda d: (d / "state.json").write_text("{not json"),
    "state.json without epoch": lambda d: (d / "state.json").write_text(json.dumps({"fingerprint": {}})),
    "truncated optimizer": lambda d: (d / "optimizer.pt").write_bytes((d / "optimizer.pt").read_bytes()[:64]),
    "missing rng": lambda d: (d / "rng.safetensors").unlink(),
    # an upload cut short: an optional file missing used to be read as "no buffer" and resume went on
    "upload without the buffer": lambda d: (d / "buffer.safetensors").unlink(),
    "config.yaml cut short": lambda d: (d / "config.yaml").write_text("algo:"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_is_named_and_resume_falls_back(kind, tiny, tmp_path, caplog):
    run_dir = _three_checkpoints(tiny, tmp_path)
    newest = checkpoints_newest_first(run_dir)[0]
    CORRUPTIONS[kind](newest)
    with pytest.raises(CorruptCheckpointError, match=str(newest)):
        load_checkpoint(newest)
    config = build_config(AlignConfig, overrides=tiny_args(tiny, tmp_path) + ["train.epochs=4"])
    out = run(config, LocalSession(run_dir, keep_checkpoints=5))
    assert out["resumes"] == [2]  # from checkpoint_000002, the newest complete one
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3, 4]
    assert any(str(newest) in r.getMessage() for r in caplog.records)


def test_nan_and_wrong_shape_lora_weights_are_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    run_dir = _three_checkpoints(tiny, tmp_path)
    newest = checkpoints_newest_first(run_dir)[0]
    lora = load_file(newest / "lora.safetensors")
    key = next(iter(lora))
    save_file({**lora, key: torch.full_like(lora[key], float("nan"))}, newest / "lora.safetensors")
    with pytest.raises(CorruptCheckpointError, match="non-finite weights"):
        load_checkpoint(newest)
    save_file({**lora, key: torch.zeros(3, 3)}, newest / "lora.safetensors")
    state = json.loads((newest / "state.json").read_text())  # as if it had been saved so (sizes agree)
    state["files"]["lora.safetensors"] = (newest / "lora.safetensors").stat().st_size
    (newest / "state.json").write_text(json.dumps(state))
    for older in checkpoints_newest_first(run_dir)[1:]:
        shutil.rmtree(older)  # no fallback left: the error names the file
    config = build_config(AlignConfig, overrides=tiny_args(tiny, tmp_path) + ["train.epochs=4"])
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {newest} does not fit this model"):
        run(config, LocalSession(run_dir, keep_checkpoints=5))


def test_full_disk_while_checkpointing_names_the_path_and_keeps_the_previous(tiny, tmp_path, monkeypatch):
    import r2d3.train.checkpoint as ckpt

    calls = {"n": 0}
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second checkpoint hits a full disk, as torch reports it
            raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    config = build_config(AlignConfig, overrides=tiny_args(tiny, tmp_path))
    with pytest.raises(OSError, match="cannot write checkpoint .*checkpoint_000002: no space left on the device"):
        run(config, LocalSession(tmp_path / "r", keep_checkpoints=5))
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == ["checkpoint_000001"]  # the previous one intact, no .tmp left


# ---------------------------------------------------------------------------------------------------------
# run records and run directories


def test_metrics_csv_has_one_schema_and_no_duplicate_epochs_after_a_resume(tiny, tmp_path):
    import align
    import pandas as pd

    args = tiny_args(tiny, tmp_path) + ["eval.every=2", "train.epochs=4"]
    align.main(args[:-1] + ["train.epochs=3", "scale.in_process=true"])  # stopped after 3 epochs
    full = align.main(args)  # resumed to 4
    table = pd.read_csv(tmp_path / "r" / "metrics.csv")
    assert list(table["epoch"]) == [1, 2, 3, 4] and table.columns[0] == "epoch"
    assert "train/loss" in table.columns and "heldout/reward_mean" in table.columns
    held = {h["epoch"]: h["heldout/reward_mean"] for h in full["history"] if "heldout/reward_mean" in h}
    assert sorted(held) == [2, 4]
    for epoch, value in held.items():  # under its own header, not shifted into another column
        assert table.loc[table["epoch"] == epoch, "heldout/reward_mean"].item() == pytest.approx(value)
    assert table.loc[table["epoch"] == 1, "heldout/reward_mean"].isna().all()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["before"]["reward_mean"] == pytest.approx(full["before"]["reward_mean"])  # base metrics kept
    assert summary["resumes"] == [3]


def test_resume_false_on_an_existing_run_refuses_then_restart_moves_it_aside(tiny, tmp_path):
    import align

    args = tiny_args(tiny, tmp_path) + ["train.epochs=1"]
    align.main(args)
    before = (tmp_path / "r" / "summary.json").read_text()
    with pytest.raises(SystemExit, match="already holds a run and run.resume=false: add run.restart=true"):
        align.main(args + ["run.resume=false", "run.seed=1"])
    assert (tmp_path / "r" / "summary.json").read_text() == before  # untouched
    align.main(args + ["run.resume=false", "run.restart=true", "run.seed=1"])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert len(aside) == 1 and (aside[0] / "summary.json").read_text() == before
    assert "seed: 1" in (tmp_path / "r" / "config.yaml").read_text()
    assert sorted(p.name for p in (tmp_path / "r").glob("checkpoint_*")) == ["checkpoint_000001"]


def test_a_run_directory_is_locked_while_a_job_writes_it(tiny, tmp_path):
    config = build_config(AlignConfig, overrides=tiny_args(tiny, tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from r2d3.train.config import AlignConfig; "
        "from r2d3.train.run_dir import claim_run_dir; "
        f"lock = claim_run_dir(AlignConfig(), Path({str(tmp_path / 'r')!r})); print('locked', flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"in use by another job .*pid.*{holder.pid}"):
            claim_run_dir(config, tmp_path / "r")
    finally:
        holder.kill()
        holder.wait()
    with claim_run_dir(config, tmp_path / "r"):  # the kernel released the dead holder's lock
        pass


# ---------------------------------------------------------------------------------------------------------
# data refused or altered


def test_prompt_columns_of_every_text_encoding_are_read(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    words = ["a red cube", "a blue sphere", "a red cube"]
    pq.write_table(pa.table({"prompt": pa.array(words).dictionary_encode()}), root / "dict.parquet")
    pq.write_table(pa.table({"prompt": pa.array(words, pa.large_string())}), root / "large.parquet")
    import pandas as pd

    pd.DataFrame({"prompt": pd.Categorical(words)}).to_parquet(root / "categorical.parquet")
    check = check_shards(str(root))
    assert len(check.files) == 3 and not check.skipped
    assert load_prompts(str(root)).prompts == words * 3
    view = pa.table({"prompt": pa.array(words, pa.string_view())})
    from r2d3.data.prompts import is_text_type

    assert is_text_type(view.schema.field("prompt").type)


def test_a_shard_with_corrupt_data_pages_is_skipped_and_recorded(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    pq.write_table(pa.table({"prompt": ["a red cube", "a blue sphere"]}), root / "good.parquet")
    pq.write_table(pa.table({"prompt": [f"prompt number {i} " * 20 for i in range(200)]}), root / "bad.parquet",
                   compression="snappy")
    data = bytearray((root / "bad.parquet").read_bytes())
    data[8:400] = b"\xff" * 392  # the data pages; the footer stays intact
    (root / "bad.parquet").write_bytes(bytes(data))
    pq.read_schema(root / "bad.parquet")  # the footer still reads
    loaded = load_prompts(str(root))
    assert loaded.prompts == ["a red cube", "a blue sphere"]
    assert [Path(s).name for s, _ in loaded.skipped_shards] == ["bad.parquet"]
    assert "unreadable Parquet data" in loaded.skipped_shards[0][1]


def test_text_prompt_files_latin1_is_named_and_a_bom_is_dropped(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa red cube\na blue sphere\n".encode("utf-8"))
    assert load_prompts(str(bom)).prompts == ["a red cube", "a blue sphere"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("a red cube\na cr\u00e8me sphere\n".encode("latin-1"))
    with pytest.raises(PromptSourceError, match=f"{latin} is not UTF-8 \\(line 2.*re-save it as UTF-8"):
        load_prompts(str(latin))


def test_a_denoiser_checkpoint_with_an_extra_tensor_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny / "w", tmp_path / "w")
    file = tmp_path / "w" / "denoiser" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(file), "extra.weight": torch.zeros(2)}, file)
    with pytest.raises(WeightsError, match=r"does not match TinySplatDenoiser: missing \[\], unexpected \['extra"):
        load_backend("tiny", weights=str(tmp_path / "w"))


# ---------------------------------------------------------------------------------------------------------
# evaluation, regeneration and sweep inputs

FAST = ["--steps", "3", "--views", "2", "--resolution", "16", "--turntable-frames", "2", "--turntable-size", "16",
        "--mesh-resolution", "16", "--no-progress", "--no-mesh", "--actors", "0"]

REGEN_BAD = [
    (["--steps", "0"], "sampler.num_steps must be >= 1"),
    (["--views", "0"], "render.num_views must be >= 1"),
    (["--resolution", "1"], "render.resolution must be >= 8"),
    (["--sampler", "bogus"], "sampler.kind must be one of ddim, sde-dpmsolver"),
    (["--guidance-scale", "nan"], "guidance_scale=nan is not a finite number"),
    (["--max-prompts", "0"], "regenerate.max_prompts must be >= 1"),
    (["--max-prompts", "-1"], "regenerate.max_prompts must be >= 1"),
    (["--max-assets", "0"], "regenerate.max_assets must be >= 1"),
    (["--turntable-size", "1"], "regenerate.turntable_size must be >= 8"),
    (["--min-opacity", "1"], r"regenerate.min_opacity must be in \[0, 1\)"),
    (["--seeds", "1", "1"], "regenerate.seeds must be at least one value, none repeated"),
    (["--frame", "z-up"], "regenerate.frame must be one of y-up, y-down"),
    (["regenerate.sh_degree=2"], "regenerate.sh_degree must be one of 0, 3"),
    (["--actors", "-1"], "actors.num must be >= 0"),
    (["--device", "gpu"], "actors.device must be auto, cpu, mps, cuda or cuda:N"),
    (["regenerate.preview_sise=64"], "regenerate.preview_sise: no such option in RegenerateOptions"),
]


@pytest.mark.parametrize("extra,message", REGEN_BAD, ids=[" ".join(e) for e, _ in REGEN_BAD])
def test_regeneration_refuses_values_that_would_fail_every_asset(extra, message, tiny, tmp_path, monkeypatch,
                                                                 capsys):
    import regenerate

    monkeypatch.setattr("r2d3.ray.regenerate.run_regeneration", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr("r2d3.jobs.evaluate.load_backend", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit):
        regenerate.main(["--prompts", str(tiny / "prompts.txt"), "--weights", str(tiny / "w"), "--out",
                         str(tmp_path / "out"), *FAST, *extra])
    assert re.search(message, capsys.readouterr().err)


def test_evaluation_flags_are_views_of_its_config(tiny, tmp_path, monkeypatch, capsys):
    """A flag, a key=value override and a YAML file set the same option; an alignment config's shared
    sections apply (its others are read past); bad values are named by key before anything loads."""
    import evaluate

    class Started(Exception):
        pass

    seen = {}

    def started(settings, prompts, out, **kw):
        seen.update(settings=settings, prompts=prompts, kw=kw)
        raise Started

    monkeypatch.setattr("r2d3.ray.evaluate.run_evaluation", started)
    (tmp_path / "align.yaml").write_text("sampler: {num_steps: 7, guidance_scale: 2.0}\nalgo: {name: ddpo}\n"
                                         "train: {epochs: 1}\nrender: {num_views: 3}\nreward: colorfulness\n")
    base = ["--weights", str(tiny / "w"), "--out", str(tmp_path / "o"), "--num-prompts", "2"]
    with pytest.raises(Started):
        evaluate.main([*base, "--config", str(tmp_path / "align.yaml"), "--steps", "5", "--actors", "0",
                       "evaluate.seeds=[3,4]", "render.resolution=16"])
    s = seen["settings"]
    assert (s.sampler.num_steps, s.sampler.guidance_scale, s.render.num_views, s.render.resolution) == (5, 2.0, 3, 16)
    assert s.reward == "colorfulness" and s.seeds == [3, 4] and len(seen["prompts"]) == 2 and seen["kw"]["actors"] == 0
    monkeypatch.setattr("r2d3.jobs.evaluate.load_backend", lambda *a, **k: pytest.fail("a model was loaded"))
    for extra, message in ((["--bootstrap", "0"], "evaluate.bootstrap must be >= 1"),
                           (["--seeds", "0", "0"], "evaluate.seeds must be at least one value"),
                           (["evaluate.num_prompt=3"], "evaluate.num_prompt: no such option in EvaluateOptions"),
                           (["--eta", "2"], r"sampler.eta must be in \[0, 1\]")):
        with pytest.raises(SystemExit):
            evaluate.main([*base, *extra])
        assert re.search(message, capsys.readouterr().err), extra


@pytest.mark.parametrize("job", ["regenerate", "evaluate"])
def test_an_output_that_is_a_file_fails_before_any_sample(job, tiny, tmp_path, monkeypatch):
    import evaluate
    import regenerate

    (tmp_path / "taken").write_text("a file")
    monkeypatch.setattr("r2d3.jobs.regenerate.AssetWorker.process", lambda *a: pytest.fail("an asset was computed"))
    monkeypatch.setattr("r2d3.ray.evaluate.run_evaluation", lambda *a, **k: pytest.fail("evaluation started"))
    for out in (tmp_path / "taken", tmp_path / "taken" / "below"):
        if job == "regenerate":
            args = ["--prompts", str(tiny / "prompts.txt"), "--weights", str(tiny / "w"), "--out", str(out), *FAST]
            module = regenerate
        else:
            args = ["--weights", str(tiny / "w"), "--out", str(out), "--actors", "0", "--steps", "3",
                    "--num-prompts", "2", "--seeds", "0", "1"]
            module = evaluate
        with pytest.raises(SystemExit, match=f"output {out} is not writable"):
            module.main(args)


def test_sweep_baseline_evaluation_that_is_not_json_fails_before_ray(tmp_path, monkeypatch, capsys):
    import sweep

    (tmp_path / "s.json").write_text("not json at all")
    monkeypatch.setattr("r2d3.ray.tune.run_sweep", lambda *a, **k: pytest.fail("the sweep started"))
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--space", str(ROOT / "tune_spaces" / "smoke.yaml"), "--baseline-evaluation", str(tmp_path / "s.json")])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 's.json'} is not an evaluation summary.json" in capsys.readouterr().err


def test_nan_rewards_in_the_evaluation_are_counted_not_a_key_error():
    from r2d3.eval.summary import summarize

    rows = []
    for ck in ("base", "x"):
        for p in range(3):
            for s in range(2):
                reward = float("nan") if (ck == "x" and p == 1 and s == 0) else 0.5 + 0.1 * p + (ck == "x") * 0.05
                rows.append({"checkpoint": ck, "prompt_index": p, "seed_index": s, "reward": reward,
                             "features": [float(p), float(s), 1.0]})
    out = summarize(rows, ["a", "b", "c"], [0, 1], ["base", "x"], draws=50, fid_draws=10)
    x = out["x"]
    assert x["reward_nonfinite"] == 1
    assert x["reward_mean"] == pytest.approx((0.55 * 2 + 0.75 * 2) / 4)  # prompts 0 and 2
    assert x["reward_delta_vs_base"] == pytest.approx(0.05)
    assert "reward_nonfinite" not in out["base"]


def test_regeneration_remakes_deleted_assets_and_a_narrower_rerun_keeps_the_library(tiny, tmp_path):
    import regenerate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue sphere\na small green cone\n")
    out = tmp_path / "out"
    base = ["--prompts", str(prompts), "--weights", str(tiny / "w"), "--out", str(out), *FAST]
    first = regenerate.main(base + ["--seeds", "0", "1"])
    assert first["made"] == 6 and first["manifest_rows"] == 6
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    shutil.rmtree(out / Path(rows[0]["ply_path"]).parent)  # a whole asset directory
    (out / rows[1]["ply_path"]).unlink()  # only one file of another
    trusting = regenerate.main(base + ["--seeds", "0", "1"])  # part records are trusted: nothing is listed
    assert trusting["made"] == 0 and trusting["skipped"] == 6
    again = regenerate.main(base + ["--seeds", "0", "1", "--verify"])
    assert again["made"] == 2 and again["remade_incomplete"] == 2 and again["manifest_rows"] == 6
    for r in pq.read_table(out / "manifest.parquet").to_pylist():
        assert (out / r["ply_path"]).is_file() and (out / r["preview_path"]).is_file()
    narrow = regenerate.main(base + ["--max-prompts", "1", "--seeds", "0"])
    assert narrow["made"] == 0 and narrow["manifest_rows"] == 6  # nothing dropped from the library
    page = (out / "gallery.html").read_text()
    assert "a small green cone" in page


def test_skipped_shards_are_recorded_in_errors_parquet(tiny, tmp_path):
    import regenerate

    root = tmp_path / "shards"
    root.mkdir()
    pq.write_table(pa.table({"prompt": ["a red cube"]}), root / "a.parquet")
    pq.write_table(pa.table({"text": ["a red cube"]}), root / "b.parquet")
    (root / "c.parquet").write_bytes(b"PAR1 not parquet")
    out = tmp_path / "out"
    summary = regenerate.main(["--prompts", str(root), "--weights", str(tiny / "w"), "--out", str(out), *FAST])
    assert summary["made"] == 1
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    shards = sorted((Path(e["source"]).name, e["stage"]) for e in errors)
    assert shards == [("b.parquet", "shard"), ("c.parquet", "shard")]
    assert all("shard skipped" in e["reason"] for e in errors)


# ---------------------------------------------------------------------------------------------------------
# security


def test_no_pickle_loading_anywhere():
    hits = subprocess.run(["grep", "-rn", "weights_only=False", "r2d3", "pipelines"], cwd=ROOT,
                          capture_output=True, text=True).stdout
    assert hits == ""


def test_the_render_cache_is_safetensors_and_a_planted_pickle_is_not_run(tmp_path):
    from r2d3.data.procedural.views import RenderedViews, render_procedural_views

    views = render_procedural_views("train", 2, 2, size=16, num_gaussians=32)
    views.save(tmp_path / "v.safetensors")
    back = RenderedViews.load(tmp_path / "v.safetensors")
    assert torch.equal(back.rgb, views.rgb) and back.attributes == views.attributes and back.prompts == views.prompts

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"rgb": Boom()}, tmp_path / "planted.safetensors")
    with pytest.raises(Exception):
        RenderedViews.load(tmp_path / "planted.safetensors")
    assert not (tmp_path / "pwned").exists()


def test_report_md_escapes_prompts():
    from r2d3.eval.report import _md_cell, to_markdown

    evil = "a cube <script>alert(1)</script> ![x](http://evil.example/p.png) | [link](http://e)"
    md = to_markdown([("table", (["prompt"], [[evil]]))], Path("."))
    assert "<script>" not in md and "](http" not in md and "![" not in md
    assert _md_cell("a | b").count("|") == 1 and "\\|" in _md_cell("a | b")


EVIL_PROMPTS = ["a cube <script>alert(1)</script>", "../../../../../tmp/r2d3-evil", 'a "quoted" <img src=x onerror=alert(1)>',
                "/etc/passwd", "a cone & 'apostrophes' \\ backslash"]


def test_hostile_prompts_and_labels_stay_inside_the_output_and_are_escaped(tiny, tmp_path):
    """File names come from prompt hashes and slugged labels, never from the text; every HTML page the
    jobs write (gallery, evaluation report) escapes prompts."""
    import regenerate

    from r2d3.eval.report import to_html

    pq.write_table(pa.table({"prompt": EVIL_PROMPTS}), tmp_path / "p.parquet")
    out = tmp_path / "lib" / "out"
    summary = regenerate.main(["--prompts", str(tmp_path / "p.parquet"), "--weights", str(tiny / "w"), "--out",
                               str(out), "--no-mesh", *FAST])
    assert summary["made"] == len(EVIL_PROMPTS)
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == ["out"]
    root = out.resolve()
    for path in out.rglob("*"):
        assert path.resolve().is_relative_to(root), path
    assert not Path("/tmp/r2d3-evil").exists()
    for row in pq.read_table(out / "manifest.parquet").to_pylist():
        for key in ("ply_path", "preview_path", "turntable_path"):
            assert ".." not in row[key] and not row[key].startswith("/")
    page = (out / "gallery.html").read_text()
    report = to_html([("h1", EVIL_PROMPTS[0]), ("table", (["prompt"], [[p] for p in EVIL_PROMPTS])),
                      ("ul", EVIL_PROMPTS)], tmp_path)
    for text in (page, report):
        assert "<script>alert" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report
    from r2d3.storage import slug  # checkpoint labels become ids through slug: no separators, no dot-dot walk

    assert all("/" not in slug(x) and not slug(x).startswith(".") for x in ("../../x", "/etc", "<b>x</b>..", "..", "."))


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (a tmpfs mounted ``ro``): permission bits would not stop root."""
    path = tmp_path / "ro"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    yield path
    subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.parametrize("job", ["regenerate", "evaluate"])
def test_a_read_only_output_fails_before_any_sample(job, tiny, read_only_dir, monkeypatch):
    import evaluate
    import regenerate

    monkeypatch.setattr("r2d3.jobs.regenerate.AssetWorker.process", lambda *a: pytest.fail("an asset was computed"))
    monkeypatch.setattr("r2d3.ray.evaluate.run_evaluation", lambda *a, **k: pytest.fail("evaluation started"))
    for out in (read_only_dir, read_only_dir / "nightly"):
        if job == "regenerate":
            args = ["--prompts", str(tiny / "prompts.txt"), "--weights", str(tiny / "w"), "--out", str(out), *FAST]
        else:
            args = ["--weights", str(tiny / "w"), "--out", str(out), "--actors", "0", "--steps", "3",
                    "--num-prompts", "2", "--seeds", "0", "1"]
        with pytest.raises(SystemExit, match=f"output {out} is not writable: .*Read-only file system"):
            (regenerate if job == "regenerate" else evaluate).main(args)


def test_align_names_a_read_only_run_directory(tiny, read_only_dir):
    import align

    with pytest.raises(SystemExit, match=f"run directory {read_only_dir / 'r'} is not writable: .*Read-only"):
        align.main(tiny_args(tiny, read_only_dir))


def _job_choice_fields():
    from r2d3.jobs.configs import EvaluateConfig, RegenerateConfig, SampleConfig

    for job in (EvaluateConfig, RegenerateConfig, SampleConfig):
        hints = typing.get_type_hints(job)
        for field in dataclasses.fields(job):
            if dataclasses.is_dataclass(hints[field.name]):
                for f in dataclasses.fields(hints[field.name]):
                    if f.metadata.get("choices"):
                        yield job, f"{field.name}.{f.name}", f.metadata["choices"]


JOB_CHOICE_FIELDS = list(_job_choice_fields())


@pytest.mark.parametrize("job,key,choices", JOB_CHOICE_FIELDS,
                         ids=[f"{j.__name__}-{k}" for j, k, _ in JOB_CHOICE_FIELDS])
def test_the_inference_jobs_enum_like_fields_reject_a_near_miss(job, key, choices):
    """evaluate/regenerate/sample: the same choices, checked by the same sections (the sampler's options
    may also be left null: the backend's own)."""
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} must be one of {re.escape(', '.join(map(str, choices)))}"):
        build_config(job, overrides=[f"{key}={max(choices) + 1 if isinstance(choices[0], int) else choices[0] + 'x'}"])
    for value in choices:
        assert build_config(job, overrides=[f"{key}={value}"]) is not None
    assert {k for j, k, _ in JOB_CHOICE_FIELDS if j is job} >= {"sampler.kind"}
