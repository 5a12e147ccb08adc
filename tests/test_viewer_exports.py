"""What users open: .glb files that glTF clients show in the right colours, .ply files in the frame and
SH layout other viewers expect, file modes a web server can serve, and the sample CLI's inputs."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData

from r2d3.backends import load_backend
from r2d3.export import encode_glb, gaussians_in_frame, gaussians_to_mesh, read_ply, write_glb, write_ply
from r2d3.render import orbit_cameras, render_gaussians
from r2d3.render.gaussians import Gaussians
from r2d3.render.mesh import render_mesh
from r2d3.render.projection import quat_to_rotmat
from r2d3.sample import generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped_samples():
    """Assets of the shipped model (the embedded default) for a few held-out prompts."""
    backend = load_backend("tiny")
    prompts = ["a red cube", "a blue sphere", "a tall green cylinder", "a small purple torus"]
    gaussians = generate(backend, prompts, [0]).gaussians
    return prompts, gaussians


def _node_modules() -> Path | None:
    for candidate in (os.environ.get("R2D3_NODE_MODULES"), ROOT / ".ci" / "node" / "node_modules"):
        if candidate and (Path(candidate) / "gltf-validator").is_dir():
            return Path(candidate)
    return None


@pytest.mark.skipif(shutil.which("node") is None or _node_modules() is None,
                    reason="needs node and npm's gltf-validator (.ci/run installs them into .ci/node)")
@pytest.mark.parametrize("unlit", [False, True])
def test_khronos_validator_reports_no_errors_or_warnings(unlit, shipped_samples, tmp_path):
    _, gaussians = shipped_samples
    for i in range(gaussians.batch_size):
        path = write_glb(gaussians_to_mesh(gaussians[i], resolution=48), tmp_path / f"{i}.glb", unlit=unlit)
        out = subprocess.run(["node", str(ROOT / "tests" / "validate_gltf.js"), str(path)], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "NODE_PATH": str(_node_modules())})
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["numErrors"] == 0 and report["numWarnings"] == 0, report["messages"]
        assert report["numInfos"] == 0 and report["numHints"] == 0, report["messages"]  # bufferView targets set


def _srgb(linear: np.ndarray) -> np.ndarray:  # an independent transcription of IEC 61966-2-1
    linear = np.clip(linear, 0, 1)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)


def test_glb_read_by_an_independent_reader_renders_the_splat_colours(shipped_samples, tmp_path):
    """trimesh's glTF loader reads the file; its linear COLOR_0 back in sRGB, rendered with the torch mesh
    rasteriser, matches r2d3's splat render within 10/255 in the mean over pixels both cover."""
    import pygltflib
    import trimesh

    prompts, gaussians = shipped_samples
    cams = orbit_cameras(20.0, [30.0, 210.0], distance=2.5, fov_deg=40.0, width=64, height=64)
    for i in range(gaussians.batch_size):
        path = write_glb(gaussians_to_mesh(gaussians[i], resolution=64), tmp_path / f"{i}.glb")
        gltf = pygltflib.GLTF2().load_binary(str(path))
        material = gltf.materials[0].pbrMetallicRoughness
        assert material.metallicFactor == 0.0 and 0.5 <= material.roughnessFactor < 1.0
        scene = trimesh.load(path, file_type="glb", process=False)
        mesh = next(iter(scene.geometry.values())) if isinstance(scene, trimesh.Scene) else scene
        linear = np.asarray(mesh.visual.vertex_attributes["color"], dtype=np.float64)[:, :3]  # COLOR_0 as stored
        srgb = torch.tensor(_srgb(linear), dtype=torch.float32)
        rgb_mesh, alpha_mesh = render_mesh(torch.tensor(mesh.vertices, dtype=torch.float32),
                                           torch.tensor(mesh.faces, dtype=torch.long), srgb, cams,
                                           background=(1, 1, 1), backend="torch")
        splat = render_gaussians(gaussians[i], cams, background=torch.ones(3))
        both = (alpha_mesh[:, 0] > 0.5) & (splat.alpha[0, :, 0] > 0.9)  # [V, H, W]
        assert both.sum() > 200, prompts[i]
        diff = (rgb_mesh - splat.rgb[0]).abs().permute(0, 2, 3, 1)[both].mean().item()
        assert diff <= 10 / 255, (prompts[i], diff * 255)
        # the values in the file are linear: stored sRGB display values would be much lighter
        assert np.mean(linear) < np.mean(_srgb(linear)) - 0.05


def _sphere_of_splats(n: int = 3000, radii=(0.5,)) -> Gaussians:
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    radius = torch.tensor(radii)[torch.arange(n) % len(radii)][:, None]
    return Gaussians(means=(dirs * radius)[None], scales=torch.full((1, n, 3), 0.03),
                     quats=torch.tensor([1.0, 0, 0, 0]).expand(1, n, 4).clone(), opacities=torch.ones(1, n),
                     colors=torch.full((1, n, 3), 0.5))


def test_glb_normals_are_smooth_unit_vectors_pointing_out():
    import pygltflib

    mesh = gaussians_to_mesh(_sphere_of_splats(), resolution=48)
    gltf = pygltflib.GLTF2.load_from_bytes(encode_glb(mesh))
    acc = gltf.accessors[gltf.meshes[0].primitives[0].attributes.NORMAL]
    view = gltf.bufferViews[acc.bufferView]
    normals = np.frombuffer(gltf.binary_blob(), np.float32, acc.count * 3, view.byteOffset).reshape(-1, 3)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    outward = np.asarray(mesh.vertices) - np.asarray(mesh.vertices).mean(axis=0)
    assert (np.sum(normals * outward, axis=1) > 0).mean() > 0.95
    faces = np.asarray(mesh.faces)
    assert len(np.unique(normals.round(4), axis=0)) > len(faces) / 4  # per vertex, not one per face


def test_meshes_of_the_shipped_model_are_one_closed_piece(shipped_samples):
    _, gaussians = shipped_samples
    for i in range(gaussians.batch_size):
        mesh = gaussians_to_mesh(gaussians[i], resolution=64)
        assert len(mesh.split(only_watertight=False)) == 1 and mesh.is_watertight


def test_a_thick_shell_meshes_as_one_surface_not_two():
    """Splats on two concentric spheres: without filling the enclosed space marching cubes gives the outer
    surface and a second, inner one; filled, one sphere (Euler characteristic 2)."""
    gaussians = _sphere_of_splats(radii=(0.5, 0.42))
    filled = gaussians_to_mesh(gaussians, resolution=48)
    assert len(filled.split(only_watertight=False)) == 1 and filled.euler_number == 2
    hollow = gaussians_to_mesh(gaussians, resolution=48, fill_cavities=False)
    assert len(hollow.split(only_watertight=False)) == 2


def test_floaters_are_dropped():
    g = torch.Generator().manual_seed(0)
    means = torch.cat([0.4 * torch.nn.functional.normalize(torch.randn(2000, 3, generator=g), dim=-1),
                       torch.tensor([[1.5, 0.0, 0.0]])])
    n = len(means)
    gaussians = Gaussians(means=means[None], scales=torch.full((1, n, 3), 0.03),
                          quats=torch.tensor([1.0, 0, 0, 0]).expand(1, n, 4).clone(), opacities=torch.ones(1, n),
                          colors=torch.full((1, n, 3), 0.5))
    assert len(gaussians_to_mesh(gaussians, resolution=48).split(only_watertight=False)) == 1
    kept = gaussians_to_mesh(gaussians, resolution=48, min_component_fraction=0)
    assert len(kept.split(only_watertight=False)) == 2


# ---------------------------------------------------------------------------------------------------------
# .ply: frame, SH degree, opacity threshold


def _vertex(path) -> dict[str, np.ndarray]:
    vertex = PlyData.read(str(path))["vertex"]
    return {p.name: np.asarray(vertex[p.name], np.float64) for p in vertex.properties}


def test_y_down_ply_maps_points_by_x_minus_y_minus_z(shipped_samples, tmp_path):
    _, gaussians = shipped_samples
    asset = gaussians[0]
    up = _vertex(write_ply(asset, tmp_path / "up.ply"))
    down = _vertex(write_ply(asset, tmp_path / "down.ply", frame="y-down"))
    np.testing.assert_array_equal(down["x"], up["x"])
    np.testing.assert_array_equal(down["y"], -up["y"])
    np.testing.assert_array_equal(down["z"], -up["z"])
    for key in ("scale_0", "scale_1", "scale_2", "opacity", "f_dc_0"):
        np.testing.assert_array_equal(down[key], up[key])
    # every splat is turned, not mirrored: covariance R S^2 R^T -> Rx Sigma Rx^T with Rx = diag(1, -1, -1)
    def covariances(v):
        q = torch.tensor(np.stack([v[f"rot_{i}"] for i in range(4)], -1))
        r = quat_to_rotmat(torch.nn.functional.normalize(q, dim=-1))
        s = torch.tensor(np.exp(np.stack([v[f"scale_{i}"] for i in range(3)], -1)))
        return r @ torch.diag_embed(s ** 2) @ r.transpose(-1, -2), torch.linalg.det(r)

    cov_up, _ = covariances(up)
    cov_down, det = covariances(down)
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(cov_down, flip @ cov_up @ flip, atol=1e-6, rtol=1e-4)
    assert torch.allclose(det, torch.ones_like(det))  # proper rotations
    back = read_ply(tmp_path / "down.ply", frame="y-down")
    torch.testing.assert_close(back.means, asset.means.float(), atol=1e-6, rtol=0)
    # renders of the turned asset from turned cameras equal the original's
    turned = gaussians_in_frame(gaussians_in_frame(asset, "y-down"), "y-down")
    torch.testing.assert_close(turned.means, asset.means)


def test_sh_degree_3_ply_loads_the_way_inria_3dgs_loads_it(shipped_samples, tmp_path):
    _, gaussians = shipped_samples
    path = write_ply(gaussians[0], tmp_path / "a.ply", sh_degree=3)
    # the INRIA loader (gaussian_model.load_ply) at max_sh_degree 3, transcribed
    plydata = PlyData.read(str(path))
    names = [p.name for p in plydata.elements[0].properties if p.name.startswith("f_rest_")]
    names = sorted(names, key=lambda x: int(x.split("_")[-1]))
    assert len(names) == 3 * (3 + 1) ** 2 - 3
    extra = np.stack([np.asarray(plydata.elements[0][n]) for n in names], axis=1)
    assert extra.shape == (gaussians.num_gaussians, 45) and not extra.any()
    torch.testing.assert_close(read_ply(path).colors, read_ply(write_ply(gaussians[0], tmp_path / "b.ply")).colors)


def test_ply_rgb_columns_are_diffsplats_uint8_colours(shipped_samples, tmp_path):
    """``rgb_columns`` appends DiffSplat's ``red green blue`` (its save_ply: ``(rgb * 255).clip(0, 255)`` cast to
    uint8, truncating) after the float columns, which stay byte-identical; r2d3's reader ignores them."""
    _, gaussians = shipped_samples
    plain = PlyData.read(str(write_ply(gaussians[0], tmp_path / "a.ply")))
    with_rgb = PlyData.read(str(write_ply(gaussians[0], tmp_path / "b.ply", rgb_columns=True)))
    vertex = with_rgb.elements[0]
    assert [p.name for p in vertex.properties][-3:] == ["red", "green", "blue"]
    colors = gaussians.colors[0].double().numpy()
    for i, name in enumerate(("red", "green", "blue")):
        assert vertex[name].dtype == np.uint8
        np.testing.assert_array_equal(vertex[name], (colors[:, i] * 255.0).clip(0.0, 255.0).astype(np.uint8))
    for prop in plain.elements[0].properties:
        np.testing.assert_array_equal(vertex[prop.name], plain.elements[0][prop.name])
    torch.testing.assert_close(read_ply(tmp_path / "b.ply").means, read_ply(tmp_path / "a.ply").means)


def test_min_opacity_leaves_out_faint_splats(tmp_path):
    n = 10
    g = Gaussians(means=torch.randn(1, n, 3), scales=torch.full((1, n, 3), 0.05),
                  quats=torch.tensor([1.0, 0, 0, 0]).expand(1, n, 4).clone(),
                  opacities=torch.linspace(0.0, 0.9, n)[None], colors=torch.full((1, n, 3), 0.5))
    kept = read_ply(write_ply(g, tmp_path / "a.ply", min_opacity=0.45))
    assert kept.num_gaussians == int((torch.linspace(0.0, 0.9, n) >= 0.45).sum())
    with pytest.raises(ValueError, match="drops every splat"):
        write_ply(g, tmp_path / "b.ply", min_opacity=0.95)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_are_written_with_the_process_umask(umask, mode, shipped_samples, tmp_path):
    _, gaussians = shipped_samples
    old = os.umask(umask)
    try:
        ply = write_ply(gaussians[0], tmp_path / "a.ply")
        glb = write_glb(gaussians_to_mesh(gaussians[0], resolution=24), tmp_path / "a.glb")
    finally:
        os.umask(old)
    assert ply.stat().st_mode & 0o777 == mode and glb.stat().st_mode & 0o777 == mode


# ---------------------------------------------------------------------------------------------------------
# the sample CLI


def test_sample_takes_a_run_directory_and_names_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    from r2d3 import sample
    from r2d3.config import build_config
    from r2d3.train.config import AlignConfig
    from r2d3.train.loop import run
    from r2d3.train.session import LocalSession

    config = build_config(AlignConfig, overrides=[
        "train.epochs=2", "train.sample_batch_size=2", "train.train_batch_size=2", "sampler.num_steps=3",
        "render.num_views=1", "render.resolution=16", "model.lora_rank=2", "model.lora_alpha=4",
        "run.progress=false", "run.checkpoint_every=1", "reward=colorfulness"])
    run(config, LocalSession(tmp_path / "run"))
    written = sample.main(["a red cube", "--out", str(tmp_path / "out"), "--lora", str(tmp_path / "run"),
                           "--steps", "3"])
    assert [p.suffix for p in written] == [".ply", ".png"]
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "lora.safetensors").write_text("not safetensors")
    with pytest.raises(SystemExit, match=r"sample: checkpoint file .*fake/lora.safetensors is unreadable"):
        sample.main(["a red cube", "--out", str(tmp_path / "o2"), "--lora", str(tmp_path / "fake")])
    with pytest.raises(SystemExit):
        sample.main(["a red cube", "--out", str(tmp_path / "o3"), "--steps", "0"])
    assert "sampler.num_steps must be >= 1" in capsys.readouterr().err


def test_sample_uses_the_backends_own_sampler_settings(monkeypatch, tmp_path):
    """Options not given are the backend's registered ones (DiffSplat's are the paper's), then r2d3's; a flag,
    an override or a run's config.yaml wins over both."""
    from r2d3 import sample
    from r2d3.backends import base as backends_base
    from r2d3.backends.diffsplat import SAMPLER_DEFAULTS

    seen = {}

    def fake_generate(backend, prompts, seeds, sampler, base):
        seen.clear()
        seen.update(dataclasses.asdict(sampler), prompts=list(prompts), seeds=list(seeds))
        raise SystemExit(0)

    monkeypatch.setitem(backends_base._SAMPLER_DEFAULTS, "tiny",
                        {"kind": "sde-dpmsolver++", "num_steps": 7, "guidance_scale": 5.0})
    monkeypatch.setattr(sample, "generate", fake_generate)

    def run(*argv):
        with pytest.raises(SystemExit):
            sample.main(["a red cube", "--out", str(tmp_path), *argv])
        return seen

    assert run() == {"num_steps": 7, "guidance_scale": 5.0, "kind": "sde-dpmsolver++", "eta": 1.0,
                     "prompts": ["a red cube"], "seeds": [0]}
    got = run("--steps", "3", "--sampler", "ddim", "a blue ball", "sampler.eta=0.5", "--seeds", "1", "2")
    assert (got["num_steps"], got["kind"], got["guidance_scale"], got["eta"]) == (3, "ddim", 5.0, 0.5)
    assert got["prompts"] == ["a red cube", "a blue ball"] and got["seeds"] == [1, 2]
    run_config = tmp_path / "config.yaml"  # a run's saved config: its own sampler, its other sections read past
    run_config.write_text("run: {seed: 3}\nalgo: {name: nabla_gfn}\nsampler: {kind: ddim, num_steps: 4, eta: 1.0, "
                          "guidance_scale: 2.0}\nrender: {num_views: 2}\n")
    got = run("--config", str(run_config))
    assert (got["num_steps"], got["kind"], got["guidance_scale"]) == (4, "ddim", 2.0)
    assert SAMPLER_DEFAULTS == {"kind": "sde-dpmsolver++", "num_steps": 20, "eta": 1.0, "guidance_scale": 5.0}
    from r2d3.jobs.configs import InferenceSamplerConfig

    assert dataclasses.asdict(InferenceSamplerConfig().resolve("diffsplat")) == SAMPLER_DEFAULTS


def test_sample_names_bad_sampler_values_before_loading(tmp_path, capsys):
    from r2d3 import sample

    for argv, named in ((["--sampler", "dddim"], "sampler.kind"), (["sampler.num_steps=0"], "sampler.num_steps"),
                        (["--backend", "nope"], "unknown backend 'nope'")):
        with pytest.raises(SystemExit) as exit_:
            sample.main(["a red cube", "--out", str(tmp_path / "o"), *argv])
        assert named in capsys.readouterr().err + str(exit_.value.code)
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit, match="sample.prompts"):
        sample.main(["--out", str(tmp_path / "o")])


def test_manifest_records_how_assets_were_made_and_checks_are_booleans(tmp_path):
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT / "pipelines"))
    import regenerate

    out = tmp_path / "out"
    regenerate.main(["--prompts", "procedural:heldout", "--max-prompts", "2", "--out", str(out), "--actors", "0",
                     "--steps", "3", "--views", "2", "--resolution", "16", "--turntable-frames", "2",
                     "--turntable-size", "16", "--mesh-resolution", "16", "--no-progress", "--frame", "y-down",
                     "--sh-degree", "3"])
    table = pq.read_table(out / "manifest.parquet")
    assert str(table.schema.field("color_ok").type) == "bool" and str(table.schema.field("shape_ok").type) == "bool"
    meta = json.loads(table.schema.metadata[b"r2d3"])
    assert meta["backend"] == "tiny" and meta["sampler"]["num_steps"] == 3 and meta["render"]["num_views"] == 2
    assert meta["rewards"] == [{"name": "dnc", "kwargs": {"detach_depth": False}}]
    assert meta["frame"] == "y-down" and meta["sh_degree"] == 3
    assert meta["checkpoints"]["base"]["id"] == table.column("checkpoint_id")[0].as_py()
    row = table.to_pylist()[0]
    vertex = PlyData.read(str(out / row["ply_path"]))["vertex"]
    assert "f_rest_44" in [p.name for p in vertex.properties]
