"""Scale-out: Parquet prompt shards (local and S3), multi-worker Ray Train, storage and resume."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from helpers import save_tiny_weights
from r2d3.data.prompts import PromptSourceError, PromptStream, check_shards, load_prompts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))


def write_shards(root: Path) -> None:
    """Two good shards (one with bad rows), one without the prompt column, one corrupt, one non-string."""
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": ["a red cube", "a blue sphere", "a green cone", "a small yellow torus"]}),
                   root / "shard-000.parquet")
    pq.write_table(pa.table({"prompt": ["a tall white cylinder", None, "   ", "a purple cube"]}),
                   root / "shard-001.parquet")
    pq.write_table(pa.table({"text": ["a red cube"]}), root / "shard-002.parquet")
    (root / "shard-003.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"prompt": [1, 2]}), root / "shard-004.parquet")


def test_shard_check_keeps_readable_string_shards_and_names_the_others(tmp_path):
    write_shards(tmp_path / "p")
    check = check_shards(str(tmp_path / "p"))
    assert [Path(f).name for f in check.files] == ["shard-000.parquet", "shard-001.parquet"]
    reasons = {Path(s).name: r for s, r in check.skipped}
    assert "no 'prompt' column" in reasons["shard-002.parquet"]
    assert "unreadable Parquet" in reasons["shard-003.parquet"]
    assert "not string" in reasons["shard-004.parquet"]
    assert [Path(f).name for f in check_shards(str(tmp_path / "p" / "shard-00[01].parquet")).files] == [
        "shard-000.parquet", "shard-001.parquet"]
    prompts = load_prompts(str(tmp_path / "p"))
    assert prompts.prompts == ["a red cube", "a blue sphere", "a green cone", "a small yellow torus",
                               "a tall white cylinder", "a purple cube"] and len(prompts.skipped) == 2
    with pytest.raises(PromptSourceError, match="not found"):
        check_shards(str(tmp_path / "missing"))
    with pytest.raises(PromptSourceError, match="no usable prompt shard .*shard-002"):
        check_shards(str(tmp_path / "p" / "shard-002.parquet"))


def test_prompt_stream_takes_one_batch_per_call_skipping_bad_rows_and_cycling_epochs():
    batches = [["a", None, "c"], ["b", 3], [None, ""]]
    stream = PromptStream(lambda: iter(batches), "mem")
    assert stream.take(3) == ["a", "c", "a"]  # topped up from the batch's good rows
    assert stream.take(3) == ["b", "b", "b"]
    assert stream.take(2) == ["b", "b"]  # an all-bad batch reuses the previous batch's prompts
    assert stream.take(3) == ["a", "c", "a"] and stream.data_epochs == 2 and stream.skipped == 5
    bad = PromptStream(lambda: iter([[None, " "]]), "bad-source")
    with pytest.raises(PromptSourceError, match="no usable prompt in bad-source"):
        bad.take(1)


def tiny_weights(path: Path) -> Path:
    return save_tiny_weights(path)


def tiny_args(weights: Path, output_dir: Path, name: str) -> list[str]:
    return [f"model.weights={weights}", "reward=colorfulness", "train.sample_batch_size=4", "train.train_batch_size=2",
            "sampler.num_steps=4", "render.num_views=2", "render.resolution=16", "eval.num_prompts=2",
            "eval.seeds_per_prompt=1", f"run.output_dir={output_dir}", f"run.name={name}", "run.progress=false",
            "run.log_images_every=0", "run.checkpoint_every=1"]


@pytest.mark.slow
def test_two_workers_stream_s3_shards_stay_in_sync_and_resume_with_one(tmp_path, ray_local, s3_server):
    import align
    import boto3
    import pyarrow.fs as pafs

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="r2d3-test")
    write_shards(tmp_path / "shards")
    s3 = pafs.FileSystem.from_uri("s3://r2d3-test")[0]
    pafs.copy_files(str(tmp_path / "shards"), "r2d3-test/prompts", destination_filesystem=s3)
    weights = tiny_weights(tmp_path / "w")
    args = tiny_args(weights, tmp_path / "runs", "ddp") + [
        "data.prompts=s3://r2d3-test/prompts", "scale.storage_path=s3://r2d3-test/runs", "scale.cpus_per_worker=0.5"]
    summary = align.main(args + ["train.epochs=2", "scale.num_workers=2"])
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["lora_sync_max_diff"] == 0.0 for h in history)  # replicas bitwise equal on both workers
    assert history[-1]["data/skipped_prompts"] > 0  # the None / blank rows of shard-001 were skipped, not fatal
    skipped = json.loads((tmp_path / "runs" / "ddp" / "skipped_shards.json").read_text())
    assert sorted(Path(s["shard"]).name for s in skipped) == ["shard-002.parquet", "shard-003.parquet",
                                                            "shard-004.parquet"]
    # checkpoints and outputs live in S3; the trained LoRA differs from its initialisation (B = 0)
    names = [i.path for i in s3.get_file_info(pafs.FileSelector("r2d3-test/runs/ddp", recursive=True))]
    assert any(n.endswith("outputs/summary.json") for n in names)
    lora_path = max(n for n in names if n.endswith("lora.safetensors"))
    with s3.open_input_stream(lora_path) as f:
        local = tmp_path / "lora.safetensors"
        local.write_bytes(f.read())
    lora = load_file(local)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in lora.items())

    # resume the same run with one worker: continues at epoch 3 from the S3 checkpoint
    resumed = align.main(args + ["train.epochs=3", "scale.num_workers=1"])
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][2]["optimizer_steps"] > history[-1]["optimizer_steps"]


@pytest.mark.slow
def test_ray_job_submit_runs_align_on_a_local_cluster(tmp_path, _ray_session):
    """A client without the cluster's token is refused; then `ray start --head` + the README's `ray job submit --runtime-env cluster/runtime_env.yaml -- python
    pipelines/align.py ...` from the repository root: the recipe's working_dir is shipped (the relative
    script path resolves in it) and its env_vars reach the job."""
    if _ray_session.is_initialized():
        _ray_session.shutdown()  # one Ray per machine here: the in-process one is restarted by ray_local later
    weights = tiny_weights(tmp_path / "w")
    ray_bin = Path(sys.executable).parent / "ray"
    port, dash = 6479, 8365
    import secrets

    # token auth as on a real cluster (the README's recipe): a random token the nodes and clients share
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    start = [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=4", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        cmd = [str(ray_bin), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--runtime-env",
               "cluster/runtime_env.yaml", "--", sys.executable, "-c",
               "import os, runpy, sys; print('WANDB_MODE=' + os.environ['WANDB_MODE'], 'CWD_HAS_README=' + "
               "str(os.path.isfile('README.md'))); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], "
               "run_name='__main__')", "pipelines/align.py", *tiny_args(weights, tmp_path / "runs", "job"),
               "train.epochs=1", "scale.cpus_per_worker=1"]
        stranger = dict(env, RAY_AUTH_TOKEN=secrets.token_hex(32), HOME=str(tmp_path))  # no ~/.ray/auth_token
        refused = subprocess.run(cmd, env=stranger, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert refused.returncode != 0 and "Invalid authentication token" in refused.stdout + refused.stderr
        assert not (tmp_path / "runs" / "job").exists()  # nothing ran
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout + proc.stderr and "reward_mean" in proc.stdout
        assert "WANDB_MODE=offline CWD_HAS_README=True" in proc.stdout  # runtime_env.yaml's env and working_dir
        summary = json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())
        assert [h["epoch"] for h in summary["history"]] == [1], f"took {time.time() - t0:.0f} s"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_last_checkpoint(tmp_path, ray_local):
    """FailureConfig: SIGKILL the Train worker right after it wrote a checkpoint; the new worker group
    resumes from the newest checkpoint in storage (not from epoch 1) and the run finishes with every
    epoch recorded once, its base-model metrics kept, and no scratch directory of the dead worker left."""
    import signal
    import tempfile
    import threading

    import pandas as pd
    from ray.util.state import list_actors

    from r2d3.config import build_config
    from r2d3.train.config import AlignConfig
    from r2d3.ray.train import fit_on_ray
    from r2d3.jobs.align import run_worker  # noqa: F401 - imported by the workers as well

    weights = tiny_weights(tmp_path / "w")
    config = build_config(AlignConfig, overrides=tiny_args(weights, tmp_path / "runs", "crash") + [
        "train.epochs=12", "scale.num_workers=1", "scale.cpus_per_worker=1", "scale.max_failures=1",
        "run.wandb_mode=disabled", "eval.num_prompts=1"])
    run_dir = tmp_path / "runs" / "crash"
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=fit_on_ray(config, run_dir, str(tmp_path / "runs"))))
    thread.start()
    deadline = time.time() + 300
    while len(list(run_dir.glob("checkpoint_2*"))) < 3 and time.time() < deadline:  # Ray Train's checkpoints
        time.sleep(0.1)
    written = len(list(run_dir.glob("checkpoint_2*")))
    workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    assert len(workers) == 1, workers
    os.kill(workers[0].pid, signal.SIGKILL)
    killed_at = time.time()
    thread.join(timeout=600)
    assert result["r"].error is None
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 13))
    assert len(summary["resumes"]) == 1 and summary["resumes"][0] >= written - 1 >= 2, (summary["resumes"], written)
    assert "reward_mean" in summary["before"]  # evaluated once, before training, and kept
    table = pd.read_csv(run_dir / "metrics.csv")
    assert list(table["epoch"]) == list(range(1, 13))
    steps = list(table["optimizer_steps"])
    assert steps == sorted(steps) and steps[-1] > 0  # no restart from optimizer step 0
    dead = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "DEAD")])
    assert any(a.pid == workers[0].pid for a in dead)
    assert not list(Path(tempfile.gettempdir()).glob(f"r2d3-ckpt-{workers[0].pid}-*"))
    print(f"recovered and finished {time.time() - killed_at:.1f} s after the kill; resumed at epoch "
          f"{summary['resumes'][0]} with {written} checkpoints written")


@pytest.mark.slow
def test_a_request_the_cluster_cannot_satisfy_fails_after_the_bounded_wait(tmp_path, ray_local):
    """`scale.use_gpu=true` without a GPU, or more CPUs than the cluster has, used to retry the worker
    group forever; now the job ends after `scale.resource_wait_s` naming what is missing."""
    import align

    weights = tiny_weights(tmp_path / "w")
    for extra, missing in ((["scale.use_gpu=true"], "1 GPU (the cluster has 0)"),
                           (["scale.cpus_per_worker=64"], "64 CPU (the cluster has 4)")):
        t0 = time.time()
        with pytest.raises(SystemExit, match=rf"ClusterResourcesError: the job needs {re.escape(missing)} \(waited 1 s"):
            align.main(tiny_args(weights, tmp_path / "runs", f"r{len(extra[0])}") + extra +
                       ["scale.resource_wait_s=1", "run.wandb_mode=disabled"])
        assert time.time() - t0 < 60


@pytest.mark.slow
def test_a_local_run_listens_on_loopback_only(tmp_path):
    """`ss -ltn` while `pipelines/align.py` runs on its own local Ray: every listening socket of the job's
    processes (GCS, raylet, dashboard and its agent, metrics, the Train controller and worker) is on
    127.0.0.1."""
    import psutil

    weights = tiny_weights(tmp_path / "w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipelines" / "align.py"),
                             *tiny_args(weights, tmp_path / "runs", "bind"), "train.epochs=6",
                             "run.wandb_mode=disabled"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[str, str] = {}
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            tree = {proc.pid} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if "pid=" in line and int(line.split("pid=")[1].split(",")[0]) in tree:
                seen[line.split()[3]] = line.split('(("')[1].split('"')[0]
        time.sleep(0.5)
    assert proc.wait(timeout=60) == 0
    names = set(seen.values())
    assert {"gcs_server", "raylet"} <= names and len(seen) >= 8, seen  # the job's Ray was observed
    loopback = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")
    exposed = {a: n for a, n in seen.items() if not a.startswith(loopback)}
    assert not exposed, exposed


@pytest.mark.slow
def test_the_main_command_prints_one_progress_bar_and_the_summary(tmp_path):
    weights = tiny_weights(tmp_path / "w")
    args = [a for a in tiny_args(weights, tmp_path / "runs", "console") if a != "run.progress=false"]
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "align.py"), *args, "train.epochs=4",
                           "run.wandb_mode=disabled"], capture_output=True, text=True, timeout=400,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    lines = text.splitlines()
    assert len(lines) <= 40, text
    for noise in ("TrainingReport(", "\x1b[A", "PreemptionWatcher", "RayTrainWorker pid", "Traceback"):
        assert noise not in text, noise
    assert "align: 100%" in text and "4/4" in text and "reward=" in text  # the driver's bar reached the end
    assert "paired reward gain vs base" in proc.stdout


def test_worker_cpus_default_to_the_machine_a_job_started_and_to_one_on_a_cluster(ray_local):
    """scale.cpus_per_worker=null: a job that started its own Ray gives its workers the CPUs the reward
    actors (and Ray Data's readers, for streamed prompts) leave, so a workstation trains on every core;
    a job on a running cluster reserves 1 per worker; an explicit value is kept."""
    from r2d3.config import build_config
    from r2d3.ray.train import with_worker_cpus
    from r2d3.train.config import AlignConfig

    cpus = lambda *o, here=True: with_worker_cpus(build_config(AlignConfig, overrides=list(o)), here).scale.cpus_per_worker  # noqa: E731
    assert ray_local.cluster_resources()["CPU"] == 4
    assert cpus() == 4.0
    assert cpus("scale.num_workers=2", "scale.reward_actors=1") == 1.0  # (4 - 1) // 2
    assert cpus("data.prompts=s3://bucket/prompts") == 3.0
    assert cpus(here=False) == 1.0
    assert cpus("scale.cpus_per_worker=0.5") == 0.5


@pytest.mark.slow
def test_an_s3_outage_during_checkpointing_is_ridden_out_or_ends_the_job_with_every_checkpoint_whole(
        tmp_path, _ray_session, monkeypatch):
    """The S3 server stopped while training writes checkpoints to it. Back within the retries: the run
    finishes without a restart. Down for good: the job ends naming the store after the worker group's
    restart; no checkpoint in S3 that resume would take for complete is short of a file; the rerun,
    with S3 back, resumes from the newest complete one and finishes."""
    import threading

    import align
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    from conftest import free_port
    from r2d3.train.checkpoint import CorruptCheckpointError, load_checkpoint

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = {"s": ThreadedMotoServer(ip_address="127.0.0.1", port=port)}
    server["s"].start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("R2D3_STORAGE_ATTEMPTS", "5")  # 0.2 + 0.4 + 0.8 + 1.6 s of waiting per call
    monkeypatch.setenv("R2D3_STORAGE_BACKOFF_S", "0.2")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="ckpt")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, configure_logging=False, log_to_driver=False)  # workers see this server
    weights = tiny_weights(tmp_path / "w")

    def args(name, epochs):
        return tiny_args(weights, tmp_path / "runs", name) + [
            "scale.storage_path=s3://ckpt/runs", "scale.num_workers=1", "scale.cpus_per_worker=1",
            "scale.max_failures=1", f"train.epochs={epochs}", "run.wandb_mode=disabled"]

    def begun_checkpoints(name):  # Ray uploads a checkpoint's files in parallel: state.json may come first
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix=f"runs/{name}/").get("Contents", [])]
        return sorted({k.split("/")[2] for k in keys if k.endswith("/state.json") and "/checkpoint_" in k})

    def outage(name, down_for):  # uploads are sequential: once the second has begun the first is whole
        while len(begun_checkpoints(name)) < 2:
            time.sleep(0.05)
        server["s"].stop()
        stopped[name] = time.time()
        if down_for is not None:
            time.sleep(down_for)
            server["s"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
            server["s"].start()

    stopped = {}
    try:
        t0 = time.time()
        calm = align.main(args("calm", 6))
        calm_s = time.time() - t0
        t0 = time.time()
        blip = threading.Thread(target=outage, args=("blip", 1.5))
        blip.start()
        summary = align.main(args("blip", 6))
        blip.join()
        assert [h["epoch"] for h in summary["history"]] == list(range(1, 7))
        assert summary["resumes"] == []  # ridden out inside the uploads: no restart
        assert [h["epoch"] for h in calm["history"]] == [h["epoch"] for h in summary["history"]]
        print(f"\n1.5 s outage: {time.time() - t0:.1f} s vs {calm_s:.1f} s without (no restart)")

        down = threading.Thread(target=outage, args=("down", None))
        down.start()
        with pytest.raises(SystemExit, match="OutputError: .*storage unavailable after 5 attempts"):
            align.main(args("down", 30))
        down.join()
        print(f"down for good: the job ended {time.time() - stopped['down']:.1f} s after the outage began")
        server["s"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server["s"].start()
        listed = s3.list_objects_v2(Bucket="ckpt", Prefix="runs/down/").get("Contents", [])
        whole = []
        for name in sorted({o["Key"].split("/")[2] for o in listed if "/checkpoint_" in o["Key"]}):
            local = tmp_path / "down" / name
            for o in listed:
                if o["Key"].startswith(f"runs/down/{name}/"):
                    (local / Path(o["Key"]).name).parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file("ckpt", o["Key"], str(local / Path(o["Key"]).name))
            try:
                whole.append(load_checkpoint(local).state.epoch)
            except CorruptCheckpointError as err:  # cut short by the outage: resume must skip it
                assert "incomplete" in str(err), err
        assert len(whole) >= 1 and max(whole) < 30
        t0 = time.time()
        resumed = align.main(args("down", max(whole) + 2))
        print(f"rerun: resumed at epoch {max(whole)} of {len(whole)} whole checkpoints ({len(listed)} objects), "
              f"finished in {time.time() - t0:.1f} s")
        assert resumed["resumes"] == [max(whole)]
        assert [h["epoch"] for h in resumed["history"]] == list(range(1, max(whole) + 3))
    finally:
        server["s"].stop()
        ray.shutdown()  # the next test's Ray sees the shared server again


def test_the_retrying_store_rides_out_an_outage_and_copies_directories_on_arrow_threads(tmp_path, monkeypatch):
    """Ray Train's checkpoint storage on S3: every call retried through a stopped server; ``copy_files``
    (which runs the handler on arrow's IO threads) copies 40 files without deadlocking; the filesystem
    survives pickling (it travels to the Train controller and workers)."""
    import pickle
    import threading

    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from conftest import free_port
    from r2d3.storage import OutputError, retrying_filesystem

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": endpoint, "R2D3_STORAGE_ATTEMPTS": "6", "R2D3_STORAGE_BACKOFF_S": "0.1"}.items():
        monkeypatch.setenv(k, v)
    server = {"s": ThreadedMotoServer(ip_address="127.0.0.1", port=port)}
    server["s"].start()
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="retry")
        fs, root = retrying_filesystem("s3://retry/run")
        fs = pickle.loads(pickle.dumps(fs))
        src = tmp_path / "ckpt"
        src.mkdir()
        for i in range(40):
            (src / f"f{i:02d}.bin").write_bytes(bytes([i]) * 1000)
        pafs.copy_files(str(src), f"{root}/a", destination_filesystem=fs)
        assert len(fs.get_file_info(pafs.FileSelector(f"{root}/a"))) == 40

        server["s"].stop()

        def back():
            time.sleep(0.8)
            server["s"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
            server["s"].start()

        thread = threading.Thread(target=back)
        thread.start()
        with fs.open_output_stream(f"{root}/during.json") as f:  # written while the server is down
            f.write(b'{"epoch": 3}')
        thread.join()
        with fs.open_input_stream(f"{root}/during.json") as f:
            assert f.read() == b'{"epoch": 3}'
        (tmp_path / "back").mkdir()
        pafs.copy_files(f"{root}/a", str(tmp_path / "back"), source_filesystem=fs)
        assert sorted(p.read_bytes() for p in (tmp_path / "back").iterdir()) == \
            sorted(p.read_bytes() for p in src.iterdir())

        server["s"].stop()
        monkeypatch.setenv("R2D3_STORAGE_ATTEMPTS", "2")
        with pytest.raises(OutputError, match=r"during.json: storage unavailable after 2 attempts"):
            fs.get_file_info(f"{root}/during.json")
    finally:
        server["s"].stop()
