"""pipelines/regenerate.py: outputs, idempotent reruns, resumption after a kill, bad rows, S3, meshes and
the gallery in headless Chromium, on a tiny random-init backend."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from r2d3.backends import TinySplatBackend
from r2d3.data.procedural import VOCABULARY

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))

PROMPTS = ["a red cube", "a blue sphere", "a small green cone"]
FAST = ["--steps", "3", "--views", "2", "--resolution", "24", "--turntable-frames", "3", "--turntable-size", "24",
        "--mesh-resolution", "16", "--no-progress"]
TIMINGS = {"t_sample_s", "t_export_s", "t_score_s", "t_total_s"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny base weights and one LoRA checkpoint directory (non-zero adapters, so it differs from base)."""
    from safetensors.torch import save_file

    from r2d3.backends.lora import add_lora, lora_state_dict

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    backend = TinySplatBackend.random_init(num_gaussians=24, dim=16, vocab=VOCABULARY)
    torch.nn.init.normal_(backend.denoiser.proj_out.weight, std=0.05)
    backend.save_pretrained(root / "w")
    add_lora(backend.denoiser, 2, None, backend.lora_target_modules)
    for name, p in backend.denoiser.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ckpt = root / "run" / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    save_file(lora_state_dict(backend.denoiser), ckpt / "lora.safetensors")
    return {"weights": str(root / "w"), "checkpoint": str(ckpt)}


def _prompt_file(path: Path, values) -> str:
    pq.write_table(pa.table({"prompt": pa.array(values, pa.string())}), path)
    return str(path)


def _manifest(out) -> list[dict]:
    return pq.read_table(Path(out) / "manifest.parquet").to_pylist()


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def test_outputs_comparison_gallery_and_idempotent_rerun(tmp_path, models):
    import regenerate

    prompts = _prompt_file(tmp_path / "p.parquet", PROMPTS[:2])
    out = tmp_path / "out"
    args = ["--prompts", prompts, "--weights", models["weights"], "--compare", f"aligned={models['checkpoint']}",
            "--seeds", "0", "1", "--out", str(out), "--actors", "0", *FAST]
    first = regenerate.main(args)
    assert first["made"] == 8 and first["manifest_rows"] == 8 and first["errors"] == 0
    rows = _manifest(out)
    assert [(r["checkpoint"], r["prompt"], r["seed"]) for r in rows] == \
        [(c, p, s) for c in ("base", "aligned") for p in PROMPTS[:2] for s in (0, 1)]
    assert rows[0]["checkpoint_id"].startswith("base-") and rows[-1]["checkpoint_id"].startswith("aligned-")
    for r in rows:
        assert r["error"] is None and r["reward"] is not None and r["t_total_s"] > 0
        for kind in ("ply", "glb", "preview", "turntable"):
            assert (out / r[f"{kind}_path"]).is_file() and not os.path.isabs(r[f"{kind}_path"])
    # same prompt, seed and noise -> paired samples; the adapters change them
    by = {(r["checkpoint"], r["prompt"], r["seed"]): r for r in rows}
    assert by[("base", PROMPTS[0], 0)]["noise_seed"] == by[("aligned", PROMPTS[0], 0)]["noise_seed"]
    assert by[("base", PROMPTS[0], 0)]["reward"] != by[("aligned", PROMPTS[0], 0)]["reward"]
    from r2d3.export import read_ply

    assert read_ply(out / rows[0]["ply_path"]).means.shape[-2] == 24
    page = (out / "gallery.html").read_text()
    assert "Δ reward vs base" in page and 'id="filter"' in page and "://" not in page.split("<body>")[1]
    assert rows[0]["preview_path"] in page and (tmp_path / "p.parquet").exists()
    # rerun: nothing new, the same manifest, no duplicate rows
    again = regenerate.main(args)
    assert again["made"] == 0 and again["skipped"] == 8
    assert _stable(_manifest(out)) == _stable(rows)
    # more seeds: only the new ones are made, the old rows kept as they were
    more = regenerate.main(args[:args.index("--seeds")] + ["--seeds", "0", "1", "2"] + args[args.index("--out"):])
    assert more["made"] == 4 and more["manifest_rows"] == 12
    assert _stable([r for r in _manifest(out) if r["seed"] != 2]) == _stable(rows)
    # other generation settings: new assets under new ids, never the old ones taken as finished
    other = regenerate.main(args + ["--turntable-frames", "4"])
    new_ids = {r["checkpoint_id"] for r in _manifest(out)} - {r["checkpoint_id"] for r in rows}
    assert other["made"] == 8 and len(new_ids) == 2


def test_ply_rgb_adds_diffsplats_colour_columns_under_a_new_id(tmp_path, models):
    """--ply-rgb writes the uint8 red/green/blue columns; it is an export setting, so the assets get their
    own ids, while a library made without it keeps the ids it had."""
    import regenerate
    from plyfile import PlyData

    prompts = _prompt_file(tmp_path / "p.parquet", PROMPTS[:1])
    args = ["--prompts", prompts, "--weights", models["weights"], "--seeds", "0", "--out", str(tmp_path / "out"),
            "--actors", "0", "--no-mesh", *FAST]
    regenerate.main(args)
    (plain,) = _manifest(tmp_path / "out")
    regenerate.main(args + ["--ply-rgb"])
    (rgb,) = [r for r in _manifest(tmp_path / "out") if r["checkpoint_id"] != plain["checkpoint_id"]]
    assert plain["checkpoint_id"] != rgb["checkpoint_id"]
    names = lambda r: [p.name for p in PlyData.read(str(tmp_path / "out" / r["ply_path"])).elements[0].properties]  # noqa: E731
    assert names(rgb)[-3:] == ["red", "green", "blue"] and "red" not in names(plain)


def test_bad_rows_land_in_errors_and_the_job_continues(tmp_path, models, monkeypatch):
    import regenerate

    from r2d3.jobs.regenerate import AssetWorker

    make = AssetWorker._make

    def flaky(self, spec, prompt, seed):
        if prompt == PROMPTS[1] and seed == 1:
            raise RuntimeError("simulated decoder failure")
        return make(self, spec, prompt, seed)

    monkeypatch.setattr(AssetWorker, "_make", flaky)
    prompts = _prompt_file(tmp_path / "p.parquet", [PROMPTS[0], None, "  ", PROMPTS[1]])
    out = tmp_path / "out"
    summary = regenerate.main(["--prompts", prompts, "--weights", models["weights"], "--seeds", "0", "1",
                               "--out", str(out), "--actors", "0", "--no-mesh", *FAST])
    assert summary["made"] == 3 and summary["errors"] == 3
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert sorted((e["stage"], e["row"]) for e in errors if e["stage"] == "prompt") == [("prompt", 1), ("prompt", 2)]
    asset = [e for e in errors if e["stage"] == "asset"]
    assert len(asset) == 1 and "simulated decoder failure" in asset[0]["reason"] and asset[0]["seed"] == 1
    assert {(r["prompt"], r["seed"]) for r in _manifest(out)} == {(PROMPTS[0], 0), (PROMPTS[0], 1), (PROMPTS[1], 0)}
    monkeypatch.setattr(AssetWorker, "_make", make)  # the failure is gone: a rerun makes only the missing asset
    again = regenerate.main(["--prompts", prompts, "--weights", models["weights"], "--seeds", "0", "1",
                             "--out", str(out), "--actors", "0", "--no-mesh", *FAST])
    assert again["made"] == 1 and again["manifest_rows"] == 4


def test_killed_run_resumes_to_the_uninterrupted_manifest(tmp_path, models):
    prompts = _prompt_file(tmp_path / "p.parquet", PROMPTS)
    cmd = [sys.executable, str(ROOT / "pipelines" / "regenerate.py"), "--prompts", prompts, "--weights",
           models["weights"], "--seeds", "0", "1", "2", "3", "--actors", "0", "--no-mesh", *FAST,
           "--turntable-frames", "8", "--turntable-size", "32"]  # slower assets: room to kill mid-way
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and len(list(killed.rglob("done.json"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(killed.rglob("done.json")))
    assert 2 <= done_before < 12 and not (killed / "manifest.parquet").exists(), "the run was not killed mid-way"
    import regenerate

    resumed = regenerate.main(cmd[2:] + ["--out", str(killed)])  # the rerun (in this process: faster)
    assert resumed["skipped"] >= done_before and resumed["made"] == 12 - resumed["skipped"]
    full = tmp_path / "full"
    regenerate.main(cmd[2:] + ["--out", str(full)])  # the same run, uninterrupted
    assert len(_manifest(killed)) == 12
    assert _stable(_manifest(killed)) == _stable(_manifest(full))
    assert not list(killed.rglob("*.partial*"))  # no temporary file left under a final name


def test_glb_loads_back_and_renders(tmp_path, models):
    import regenerate

    from r2d3.export.mesh import load_glb
    from r2d3.render import orbit_cameras
    from r2d3.render.mesh import render_mesh

    out = tmp_path / "out"
    regenerate.main(["--prompts", _prompt_file(tmp_path / "p.parquet", PROMPTS[:1]), "--weights", models["weights"],
                     "--out", str(out), "--actors", "0", *FAST])
    mesh = load_glb(out / _manifest(out)[0]["glb_path"])
    assert len(mesh.vertices) > 0 and len(mesh.faces) > 0
    colors = torch.as_tensor(mesh.visual.vertex_colors[:, :3], dtype=torch.float32) / 255
    cams = orbit_cameras(20.0, [0, 90], distance=2.5, fov_deg=40.0, width=32, height=32)
    rgb, alpha = render_mesh(torch.as_tensor(mesh.vertices, dtype=torch.float32),
                             torch.as_tensor(mesh.faces, dtype=torch.int64), colors, cams)
    assert alpha.sum() > 0 and (rgb < 0.99).any()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture
def served(tmp_path):
    """A static HTTP server on 127.0.0.1 for a directory (browsers load modules and .ply files over
    HTTP only); yields (start(directory) -> base URL, the request log)."""
    import functools
    import http.server
    import threading

    log: list[str] = []
    servers = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            log.append(self.path)

    def start(directory) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start, log
    for server in servers:
        server.shutdown()


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_gallery_opens_in_headless_chromium_and_draws_an_asset_in_3d(tmp_path, served):
    import numpy as np
    from PIL import Image

    import regenerate
    from r2d3.export import read_ply
    from r2d3.render import orbit_cameras, render_gaussians

    out = tmp_path / "out"  # the shipped model: coherent assets with one clear colour each
    regenerate.main(["--prompts", _prompt_file(tmp_path / "p.parquet", PROMPTS[:2]), "--seeds", "0", "1",
                     "--out", str(out), "--actors", "0", "--no-mesh", *FAST])
    html = (out / "gallery.html").read_text()
    assert "https://" not in html and "http://" not in html  # nothing to fetch from elsewhere
    assert html.count('loading="lazy"') == 2 * 2 * 2 and (out / "viewer" / "gsplat.js").is_file()
    start, requests = served
    base = start(out)
    # --host-resolver-rules: any host but 127.0.0.1 fails to resolve, so nothing can leave the machine
    flags = [_chromium(), "--headless", "--no-sandbox", "--no-first-run", "--use-angle=swiftshader",
             "--enable-unsafe-swiftshader", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]
    dom = subprocess.run(flags + ["--window-size=1400,4000", "--dump-dom", f"{base}/gallery.html"], check=True,
                         capture_output=True, text=True, timeout=90).stdout
    ok, total = map(int, dom.split('data-images-loaded="', 1)[1].split('"', 1)[0].split("/"))
    assert total == 2 * 2 * 2 and ok == total  # preview + turntable per asset, every one decoded
    assert "viewer/gsplat.js" not in requests[-1] and not any("gsplat" in r for r in requests)  # on demand only
    # open the first asset's viewer: it fetches the module and the .ply, and draws the asset
    view = subprocess.run(flags + ["--window-size=1000,800", "--dump-dom", f"{base}/gallery.html#view=0"],
                          check=True, capture_output=True, text=True, timeout=90).stdout
    import html as html_lib

    state = json.loads(html_lib.unescape(view.split('data-viewer="', 1)[1].split('"', 1)[0]))
    assert "error" not in state, state
    assert any(r.endswith("/viewer/gsplat.js") for r in requests) and any(r.endswith("asset.ply") for r in requests)
    first = _manifest(out)[0]
    assert state["splats"] == read_ply(out / first["ply_path"]).num_gaussians and state["drawn"] > 20_000
    # the drawn colour is the asset's: r2d3's own render of the same file, over its covered pixels
    g = read_ply(out / first["ply_path"])
    render = render_gaussians(g, orbit_cameras(20.0, [0.0, 90.0, 180.0, 270.0], width=64, height=64),
                              background=torch.ones(3))
    covered = render.alpha[0, :, 0] > 0.5
    expected = (render.rgb[0].permute(0, 2, 3, 1)[covered].mean(0) * 255).tolist()
    assert np.abs(np.array(state["mean"]) - np.array(expected)).max() < 40, (state["mean"], expected)
    shot = tmp_path / "viewer.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1000,800", f"{base}/gallery.html#view=0"],
                   check=True, capture_output=True, timeout=90)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    canvas = pixels[120:700, 30:650]
    drawn = canvas[canvas.sum(-1) < 3 * 240]  # not the white background
    assert len(drawn) > 20_000 and np.abs(drawn.mean(0) - np.array(expected)).max() < 50


@pytest.mark.slow
def test_s3_round_trip_on_ray(tmp_path, models, s3_server, ray_local):
    import boto3
    import s3fs

    import regenerate

    boto3.client("s3").create_bucket(Bucket="regen")
    fs = s3fs.S3FileSystem()
    fs.put(_prompt_file(tmp_path / "p.parquet", [PROMPTS[0], None, PROMPTS[1]]), "regen/prompts/part-0.parquet")
    fs.put(models["checkpoint"] + "/lora.safetensors", "regen/runs/x/checkpoint_000001/lora.safetensors")
    args = ["--prompts", "s3://regen/prompts/", "--weights", models["weights"], "--checkpoint",
            "s3://regen/runs/x/checkpoint_000001", "--seeds", "0", "1", "--out", "s3://regen/nightly",
            "--actors", "2", "--batch-size", "2", "--cpus-per-actor", "1", *FAST]
    summary = regenerate.main(args)
    assert summary["made"] == 4 and summary["errors"] == 1
    with fs.open("regen/nightly/manifest.parquet", "rb") as f:
        rows = pq.read_table(f).to_pylist()
    assert len(rows) == 4 and {r["checkpoint"] for r in rows} == {"x/checkpoint_000001"}
    for r in rows:
        for kind in ("ply", "glb", "preview", "turntable"):
            assert fs.exists(f"regen/nightly/{r[f'{kind}_path']}")
    assert fs.exists("regen/nightly/gallery.html") and fs.exists("regen/nightly/errors.parquet")
    assert regenerate.main(args)["made"] == 0
    with fs.open("regen/nightly/manifest.parquet", "rb") as f:
        assert _stable(pq.read_table(f).to_pylist()) == _stable(rows)
    assert json.loads(fs.cat(f"regen/nightly/{Path(rows[0]['ply_path']).parent}/done.json"))["seed"] == rows[0]["seed"]


# ---------------------------------------------------------------------------------------------------------
# library scale: prompts in parts, finished work from part records, errors of every run


def test_chunks_cover_every_row_of_every_row_group_once(tmp_path, monkeypatch):
    from r2d3.data import chunks as chunks_mod
    from r2d3.data.chunks import plan_chunks, read_chunk

    root = tmp_path / "shards"
    root.mkdir()
    values = [f"prompt {i}" for i in range(23)]
    values[5] = None
    pq.write_table(pa.table({"prompt": pa.array(values, pa.string())}), root / "a.parquet", row_group_size=10)
    pq.write_table(pa.table({"prompt": ["last one"]}), root / "b.parquet")
    reads = []
    real = chunks_mod._raw_rows.__wrapped__
    chunks_mod._raw_rows.cache_clear()
    monkeypatch.setattr(chunks_mod, "_raw_rows", lambda *a: reads.append(a) or real(*a))
    chunks, skipped = plan_chunks(str(root), size=4)
    assert not reads and not skipped, "planning reads footers, never prompt rows"
    assert [(Path(c.source).name, c.start, c.stop, c.row_group) for c in chunks][:4] == \
        [("a.parquet", 0, 4, 0), ("a.parquet", 4, 8, 0), ("a.parquet", 8, 10, 0), ("a.parquet", 10, 14, 1)]
    cells = [cell for c in chunks for cell in read_chunk(c)]
    assert cells == values + ["last one"]
    limited, _ = plan_chunks(str(root), size=4, limit=9)
    assert sum(len(c) for c in limited) == 9 and limited[-1].stop == 9


def test_a_rerun_finds_finished_work_without_listing_the_library(tmp_path, models, monkeypatch):
    """Finished parts come from one listing of parts/; prompts repeated across parts are one asset and
    one manifest row; a rerun with nothing to do leaves the manifest as it was."""
    import regenerate

    from r2d3.storage import Store

    prompts = _prompt_file(tmp_path / "p.parquet", [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]])
    out = tmp_path / "out"
    args = ["--prompts", prompts, "--weights", models["weights"], "--seeds", "0", "--out", str(out), "--actors",
            "0", "--no-mesh", "--part-size", "2", *FAST]
    first = regenerate.main(args)
    assert first["parts"] == 2 and first["made"] == 3 and first["skipped"] == 1  # the repeat is found done
    assert [r["prompt"] for r in _manifest(out)] == [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    listed = []
    real = Store.listing
    monkeypatch.setattr(Store, "listing", lambda self, under="": listed.append(under) or real(self, under))
    stamp = (out / "manifest.parquet").stat().st_mtime_ns
    again = regenerate.main(args)
    assert again["made"] == 0 and again["skipped"] == 4 and again["parts_worked"] == 0
    assert listed == ["parts"] * 2, f"listed {listed}"  # planning, then the manifest's check of the records
    assert (out / "manifest.parquet").stat().st_mtime_ns == stamp


def test_errors_accumulate_across_runs_and_a_failed_part_is_retried(tmp_path, models, monkeypatch):
    import regenerate

    from r2d3.jobs.regenerate import AssetWorker

    make = AssetWorker._make

    def flaky(self, spec, prompt, seed):
        if prompt == PROMPTS[1]:
            raise RuntimeError("simulated decoder failure")
        return make(self, spec, prompt, seed)

    monkeypatch.setattr(AssetWorker, "_make", flaky)
    prompts = _prompt_file(tmp_path / "p.parquet", [PROMPTS[0], "", PROMPTS[1]])
    out = tmp_path / "out"
    args = ["--prompts", prompts, "--weights", models["weights"], "--seeds", "0", "--out", str(out), "--actors", "0",
            "--no-mesh", *FAST]
    assert regenerate.main(args)["failed"] == 1
    assert [p.name.split(".")[-2] for p in (out / "parts").iterdir()] == ["partial"]
    regenerate.main(args)  # the same failure again, seen by a second run
    monkeypatch.setattr(AssetWorker, "_make", make)
    fixed = regenerate.main(args)
    assert fixed["made"] == 1 and fixed["skipped"] == 1 and fixed["manifest_rows"] == 2
    assert [p.name.split(".")[-2] for p in (out / "parts").iterdir()] == ["2"], "the partial record is superseded"
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    runs = list(dict.fromkeys(e["run"] for e in errors))
    assert len(runs) == 3 and all(e["time"] for e in errors)
    by_run = [sorted(e["stage"] for e in errors if e["run"] == r) for r in runs]
    assert by_run == [["asset", "prompt"], ["asset", "prompt"], ["prompt"]]


def test_dry_run_makes_no_files_and_keeps_its_own_ids(tmp_path, models):
    import regenerate

    prompts = _prompt_file(tmp_path / "p.parquet", PROMPTS)
    out = tmp_path / "out"
    args = ["--prompts", prompts, "--weights", models["weights"], "--seeds", "0", "1", "--out", str(out),
            "--actors", "0", *FAST]
    dry = regenerate.main(args + ["--dry-run"])
    assert dry["made"] == 6 and dry["manifest_rows"] == 6
    assert not list(out.rglob("done.json")) and not list(out.rglob("*.ply"))
    real = regenerate.main(args + ["--no-mesh"])
    assert real["made"] == 6, "dry-run records are never taken for real assets"
    ids = {r["checkpoint_id"] for r in _manifest(out)}
    assert len(ids) == 2


@pytest.mark.slow
def test_an_s3_outage_is_ridden_out_and_one_that_lasts_fails_cleanly_then_resumes(tmp_path, models, s3_server,
                                                                                monkeypatch):
    """The S3 server stopped mid-regeneration and back 1.5 s later: the run waits and finishes with the
    uninterrupted manifest. Stopped for good: the job ends naming the store, no manifest appears, and the
    rerun completes."""
    import threading

    import boto3
    from moto.server import ThreadedMotoServer

    import regenerate
    from conftest import free_port

    from r2d3.jobs.regenerate import AssetWorker

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("R2D3_STORAGE_ATTEMPTS", "8")
    monkeypatch.setenv("R2D3_STORAGE_BACKOFF_S", "0.2")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="outage")
    prompts = _prompt_file(tmp_path / "p.parquet", PROMPTS)
    args = ["--prompts", prompts, "--weights", models["weights"], "--seeds", "0", "1", "--actors", "0", "--no-mesh",
            *FAST]
    make, made = AssetWorker._make, []
    state = {"server": server, "down_for": 1.5}

    def restart():
        time.sleep(state["down_for"])
        state["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        state["server"].start()

    def outage_after_two(self, spec, prompt, seed):
        made.append(prompt)
        if len(made) == 3:
            state["server"].stop()
            if state["down_for"] is not None:
                threading.Thread(target=restart, daemon=True).start()
        return make(self, spec, prompt, seed)

    def manifest(prefix):
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing")
        with fs.open_input_file(f"outage/{prefix}/manifest.parquet") as f:
            return pq.read_table(f).to_pylist()

    monkeypatch.setattr(AssetWorker, "_make", outage_after_two)
    try:
        ridden = regenerate.main(args + ["--out", "s3://outage/ridden"])
        assert ridden["made"] == 6 and ridden["errors"] == 0
        monkeypatch.setattr(AssetWorker, "_make", make)
        regenerate.main(args + ["--out", "s3://outage/calm"])
        assert _stable(manifest("ridden")) == _stable(manifest("calm"))

        made.clear()
        state["down_for"] = None  # this time it stays down
        monkeypatch.setattr(AssetWorker, "_make", outage_after_two)
        monkeypatch.setenv("R2D3_STORAGE_ATTEMPTS", "2")
        with pytest.raises(SystemExit, match="storage unavailable after 2 attempts"):
            regenerate.main(args + ["--out", "s3://outage/down"])
        restart_now = threading.Thread(target=restart)
        state["down_for"] = 0
        restart_now.start()
        restart_now.join()
        client = boto3.client("s3", endpoint_url=endpoint)
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="outage", Prefix="down/").get("Contents", [])]
        assert "down/manifest.parquet" not in keys and not [k for k in keys if "/parts/" in k]
        monkeypatch.setattr(AssetWorker, "_make", make)
        resumed = regenerate.main(args + ["--out", "s3://outage/down"])
        assert resumed["made"] + resumed["skipped"] == 6 and resumed["skipped"] >= 2
        assert _stable(manifest("down")) == _stable(manifest("calm"))
    finally:
        state["server"].stop()
