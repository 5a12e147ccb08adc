"""Exports: .ply in the standard 3DGS layout (checked with plyfile directly), previews and turntables."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from plyfile import PlyData, PlyElement

from r2d3.storage import OutputError, atomic_path
from r2d3.export import (
    PLY_PROPERTIES,
    SH_C0,
    PlyFormatError,
    VideoBackendUnavailableError,
    encode_ply,
    make_grid,
    mp4_available,
    read_ply,
    render_output_images,
    render_turntable,
    save_preview_grid,
    save_turntable,
    to_uint8,
    write_ply,
)
from r2d3.render.cameras import Cameras
from r2d3.render.gaussians import Gaussians, InvalidGaussiansError
from r2d3.render.output import RenderOutput


def random_gaussians(batch: int = 1, n: int = 50, seed: int = 0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=torch.randn(batch, n, 3, generator=g) * 0.3,
        scales=torch.rand(batch, n, 3, generator=g) * 0.1 + 1e-3,
        quats=torch.randn(batch, n, 4, generator=g),  # not unit: write_ply normalises
        opacities=torch.rand(batch, n, generator=g),
        colors=torch.rand(batch, n, 3, generator=g),
    )


def files_in(directory) -> list[str]:
    return sorted(os.listdir(directory))


# ------------------------------------------------------------------------------------------------
# .ply


def test_ply_header_layout_matches_3dgs(tmp_path):
    path = write_ply(random_gaussians(n=7), tmp_path / "asset.ply")
    raw = path.read_bytes()
    header = raw[: raw.index(b"end_header\n") + len(b"end_header\n")].decode()
    lines = header.splitlines()
    assert lines[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 7"]
    assert lines[3:-1] == [f"property float {name}" for name in PLY_PROPERTIES]
    assert lines[-1] == "end_header"
    assert PLY_PROPERTIES == (
        "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
        "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
    )  # fmt: skip
    assert len(raw) - len(header) == 7 * len(PLY_PROPERTIES) * 4  # float32 payload, nothing else
    ply = PlyData.read(str(path))
    assert not ply.text and ply.byte_order == "<"
    assert [p.name for p in ply["vertex"].properties] == list(PLY_PROPERTIES)
    assert all(ply["vertex"].data.dtype[name] == np.dtype("<f4") for name in PLY_PROPERTIES)


def test_ply_values_use_3dgs_conventions(tmp_path):
    g = random_gaussians(n=40)
    vertex = PlyData.read(str(write_ply(g, tmp_path / "a.ply")))["vertex"]
    col = {name: torch.from_numpy(np.asarray(vertex[name], dtype=np.float64)) for name in PLY_PROPERTIES}
    g64 = g.to(torch.float64)
    for i, axis in enumerate("xyz"):
        assert torch.allclose(col[axis], g64.means[0, :, i], atol=1e-6)
        assert torch.equal(col[f"n{axis}"], torch.zeros(40, dtype=torch.float64))
        assert torch.allclose(col[f"f_dc_{i}"], (g64.colors[0, :, i] - 0.5) / SH_C0, atol=1e-5)
        assert torch.allclose(col[f"scale_{i}"], g64.scales[0, :, i].log(), atol=1e-5)  # log scales
    assert torch.allclose(col["opacity"], torch.logit(g64.opacities[0]), atol=1e-4)  # opacity logit
    rot = torch.stack([col[f"rot_{i}"] for i in range(4)], -1)
    unit = g64.quats[0] / g64.quats[0].norm(dim=-1, keepdim=True)
    assert torch.allclose(rot, unit, atol=1e-6)  # (w, x, y, z), normalised
    assert SH_C0 == pytest.approx(1 / (2 * math.sqrt(math.pi)))


def test_ply_round_trip(tmp_path):
    g = random_gaussians(n=300)
    g.opacities[0, :3] = torch.tensor([0.0, 1.0, 0.5])  # infinite logits are clamped, still round-trip
    back = read_ply(write_ply(g, tmp_path / "rt.ply"))
    expected = g.validate()
    assert back.means.shape == (1, 300, 3) and back.means.dtype == torch.float32
    for name in ("means", "scales", "quats", "opacities", "colors"):
        assert torch.allclose(getattr(back, name), getattr(expected, name), atol=1e-6, rtol=0), name


def test_ply_round_trip_of_a_procedural_asset(tmp_path):
    from r2d3.data.procedural import from_prompt

    prompt = "a tall blue cylinder with white stripes"
    asset = from_prompt(prompt, 512, torch.Generator().manual_seed(0)).gaussians
    back = read_ply(write_ply(asset, tmp_path / "cyl.ply"))
    assert torch.allclose(back.means, asset.means, atol=1e-6)
    assert torch.allclose(back.colors, asset.colors, atol=1e-6)
    assert torch.allclose(back.scales, asset.scales, atol=1e-6)


def test_one_asset_per_file(tmp_path):
    batch = random_gaussians(batch=2)
    with pytest.raises(ValueError, match=r"gaussians\[i\]"):
        write_ply(batch, tmp_path / "two.ply")
    assert files_in(tmp_path) == []
    write_ply(batch[1], tmp_path / "second.ply")
    assert torch.allclose(read_ply(tmp_path / "second.ply").means, batch.means[1:], atol=1e-6)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("means", float("nan"), "means contains NaN"),
        ("scales", 0.0, "scales must be > 0"),
        ("colors", float("inf"), "colors contains NaN or inf"),
    ],
)
def test_invalid_gaussians_are_rejected_and_nothing_is_written(tmp_path, field, value, match):
    g = random_gaussians()
    getattr(g, field)[0, 3] = value
    with pytest.raises(InvalidGaussiansError, match=match):
        write_ply(g, tmp_path / "bad.ply")
    assert files_in(tmp_path) == []


def test_wrong_shapes_are_rejected(tmp_path):
    g = random_gaussians()
    g.quats = g.quats[..., :3]
    with pytest.raises(InvalidGaussiansError, match="quats"):
        write_ply(g, tmp_path / "bad.ply")
    with pytest.raises(TypeError, match="Gaussians"):
        write_ply({"means": torch.zeros(1, 1, 3)}, tmp_path / "bad.ply")


def test_unwritable_path_raises_naming_it(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    target = blocker / "sub" / "a.ply"
    with pytest.raises(OutputError, match="not_a_dir/sub/a.ply"):
        write_ply(random_gaussians(), target)
    with pytest.raises(OutputError, match="is an existing directory"):
        write_ply(random_gaussians(), tmp_path)
    assert isinstance(OutputError("x"), OSError)


def test_parent_directories_are_created(tmp_path):
    path = write_ply(random_gaussians(), tmp_path / "a" / "b" / "c.ply")
    assert path.is_file()


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    path = write_ply(random_gaussians(seed=1), tmp_path / "keep.ply")
    before = path.read_bytes()
    bad = random_gaussians(seed=2)
    bad.means[0, 0, 0] = float("nan")
    with pytest.raises(InvalidGaussiansError):
        write_ply(bad, path)
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("simulated crash mid-write")
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["keep.ply"]


def test_read_ply_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ply"):
        read_ply(tmp_path / "missing.ply")
    garbage = tmp_path / "garbage.ply"
    garbage.write_bytes(b"this is not a ply file\n")
    with pytest.raises(PlyFormatError, match="garbage.ply"):
        read_ply(garbage)
    points_only = tmp_path / "points.ply"
    xyz = np.zeros(3, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    PlyData([PlyElement.describe(xyz, "vertex")]).write(str(points_only))
    with pytest.raises(PlyFormatError, match=r"points.ply.*missing vertex properties \['f_dc_0'"):
        read_ply(points_only)
    faces_only = tmp_path / "faces.ply"
    PlyData([PlyElement.describe(np.zeros(1, dtype=[("v", "<i4")]), "face")]).write(str(faces_only))
    with pytest.raises(PlyFormatError, match="no 'vertex' element"):
        read_ply(faces_only)


def test_read_ply_accepts_other_tools_layouts_and_checks_values(tmp_path):
    # Real 3DGS files carry higher-order SH (f_rest_*) and may order properties differently.
    names = list(reversed(PLY_PROPERTIES)) + [f"f_rest_{i}" for i in range(3)]
    data = np.zeros(4, dtype=[(n, "<f4") for n in names])
    data["rot_0"] = 2.0  # non-unit quaternion: normalised on read
    data["f_dc_0"] = 5.0  # colour above 1: clamped on read
    data["scale_1"] = math.log(0.25)
    path = tmp_path / "other.ply"
    PlyData([PlyElement.describe(data, "vertex")]).write(str(path))
    g = read_ply(path)
    assert torch.allclose(g.quats[0], torch.tensor([1.0, 0, 0, 0]).expand(4, 4))
    assert torch.allclose(g.colors[0, :, 0], torch.ones(4))
    assert torch.allclose(g.colors[0, :, 1], torch.full((4,), 0.5))
    assert torch.allclose(g.scales[0, :, 1], torch.full((4,), 0.25))
    assert torch.allclose(g.opacities, torch.full((1, 4), 0.5))
    data["rot_0"] = 0.0  # a zero quaternion is no rotation: an error naming the file
    PlyData([PlyElement.describe(data, "vertex")]).write(str(path))
    with pytest.raises(InvalidGaussiansError, match="other.ply.*zero quaternion"):
        read_ply(path)


def test_encode_ply_matches_the_file(tmp_path):
    g = random_gaussians()
    assert encode_ply(g) == write_ply(g, tmp_path / "x.ply").read_bytes()


# ------------------------------------------------------------------------------------------------
# preview grids


def solid_views(color, views: int = 4, size: int = 16) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.float32)[None, :, None, None].expand(views, 3, size, size).clone()


def test_to_uint8_conventions():
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 5)
    out = to_uint8(x)
    assert out.shape == (1, 5, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="channels-first"):
        to_uint8(torch.zeros(4, 5, 5))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((3, 2, 2), float("nan")))


def test_grid_has_expected_size_and_colours(tmp_path):
    views = solid_views((1.0, 0.0, 0.0), views=4, size=16)
    views[1] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    path = save_preview_grid(views, tmp_path / "grid.png", padding=2)
    image = Image.open(path)
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.size == (4 * 16 + 5 * 2, 16 + 2 * 2)
    assert image.getpixel((2 + 8, 2 + 8)) == (255, 0, 0)  # centre of the first view
    assert image.getpixel((2 + 16 + 2 + 8, 2 + 8)) == (0, 0, 255)  # second view
    assert image.getpixel((0, 0)) == (255, 255, 255)  # padding is the background


def test_grid_rows_labels_and_caption():
    rows = torch.stack([solid_views((1.0, 0.0, 0.0), 3, 32), solid_views((0.0, 1.0, 0.0), 3, 32)])
    plain = make_grid(rows)
    labelled = make_grid(rows, row_labels=["a red cube", "a green sphere"], col_labels=["0", "90", "180"],
                         caption="step 10", font_size=10)
    assert plain.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)
    assert labelled.size[0] == plain.size[0] and labelled.size[1] > plain.size[1] + 3 * 10
    pixels = np.asarray(labelled)
    # text is drawn in dark ink on the white strips above the images
    strip = pixels[: labelled.size[1] - plain.size[1]]
    assert (strip.sum(-1) < 200).any()
    assert tuple(pixels[-2 - 16, 2 + 16]) == (0, 255, 0)  # the last row is the second asset
    long_label = make_grid(rows[:1], row_labels=["word " * 60], font_size=10)
    assert long_label.size[1] > make_grid(rows[:1], row_labels=["short"], font_size=10).size[1]  # wrapped
    with pytest.raises(ValueError, match="row labels"):
        make_grid(rows, row_labels=["only one"])
    with pytest.raises(ValueError, match="column labels"):
        make_grid(rows, col_labels=["a"])
    with pytest.raises(ValueError, match="expected images"):
        make_grid(torch.zeros(2, 2, 2, 3, 4, 4))


def fake_output(batch: int = 2, views: int = 3, size: int = 8) -> RenderOutput:
    alpha = torch.zeros(batch, views, 1, size, size)
    alpha[..., 2:6, 2:6] = 1.0
    depth = torch.where(alpha > 0, torch.linspace(2.0, 3.0, size).view(1, 1, 1, 1, size), torch.zeros(()))
    normal = torch.where(alpha > 0, torch.tensor([0.0, 0.0, -1.0]).view(1, 1, 3, 1, 1), torch.zeros(()))
    rgb = torch.where(alpha > 0, torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 3, 1, 1), torch.ones(()))
    viewmats, Ks = torch.eye(4).expand(batch, views, 4, 4), torch.eye(3).expand(batch, views, 3, 3)
    cams = Cameras(viewmats, Ks, size, size)
    return RenderOutput(rgb=rgb, alpha=alpha, depth=depth, normal=normal, cameras=cams)


def test_grid_from_render_output_channels():
    out = fake_output()
    grid = make_grid(out, padding=0)
    assert grid.size == (3 * 8, 2 * 8)
    assert grid.getpixel((3, 3)) == (255, 0, 0) and grid.getpixel((0, 0)) == (255, 255, 255)
    normal = render_output_images(out, "normal")
    assert torch.allclose(normal[0, 0, :, 3, 3], torch.tensor([0.5, 0.5, 0.0]))
    assert torch.equal(normal[0, 0, :, 0, 0], torch.ones(3))  # empty pixels are white
    depth = render_output_images(out, "depth")
    assert depth[0, 0, 0, 3, 2] < depth[0, 0, 0, 3, 5]  # near is darker
    assert depth.shape == (2, 3, 3, 8, 8) and depth.min() >= 0 and depth.max() <= 1
    alpha = render_output_images(out, "alpha")
    assert alpha.shape == (2, 3, 3, 8, 8) and alpha[0, 0, :, 3, 3].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown channel"):
        render_output_images(out, "specular")


# ------------------------------------------------------------------------------------------------
# turntables


def distinct_frames(count: int = 5, size: int = 12) -> torch.Tensor:
    hues = torch.linspace(0.0, 1.0, count)
    zero = torch.zeros(size, size)
    return torch.stack([torch.stack([h.expand(size, size), (1 - h).expand(size, size), zero]) for h in hues])


def test_gif_has_the_right_frame_count(tmp_path):
    path = save_turntable(distinct_frames(5), tmp_path / "turn.gif", fps=10)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (12, 12)
        assert gif.info["duration"] == 100 and gif.info.get("loop") == 0
        gif.seek(0)
        r, g, _ = gif.convert("RGB").getpixel((6, 6))
        assert r < 30 and g > 220  # first frame is green
    as_uint8 = [to_uint8(f) for f in distinct_frames(3)]
    as_pil = [Image.fromarray(a) for a in as_uint8]
    for frames in (as_uint8, as_pil, np.stack(as_uint8)):
        with Image.open(save_turntable(frames, tmp_path / "other.gif")) as gif:
            assert gif.n_frames == 3


def test_turntable_input_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one frame"):
        save_turntable([], tmp_path / "empty.gif")
    with pytest.raises(ValueError, match=r"expected frames \[F, 3, H, W\]"):
        save_turntable(torch.zeros(3, 8, 8), tmp_path / "one.gif")
    with pytest.raises(ValueError, match="same size"):
        save_turntable([torch.zeros(3, 4, 4), torch.zeros(3, 5, 5)], tmp_path / "mixed.gif")
    with pytest.raises(TypeError, match="frame 0"):
        save_turntable(["not an image"], tmp_path / "bad.gif")
    with pytest.raises(ValueError, match="fps"):
        save_turntable(distinct_frames(2), tmp_path / "slow.gif", fps=0)
    with pytest.raises(ValueError, match="use .gif or .mp4"):
        save_turntable(distinct_frames(2), tmp_path / "turn.avi")
    assert files_in(tmp_path) == []


@pytest.mark.skipif(mp4_available(), reason="an MP4 encoder is installed")
def test_mp4_without_an_encoder_suggests_gif(tmp_path):
    with pytest.raises(VideoBackendUnavailableError, match=r"imageio-ffmpeg.*\.gif"):
        save_turntable(distinct_frames(3), tmp_path / "turn.mp4")
    assert files_in(tmp_path) == []


@pytest.mark.skipif(not mp4_available(), reason="needs imageio-ffmpeg or PyAV")
def test_mp4_is_written_when_an_encoder_is_installed(tmp_path):  # pragma: no cover - optional dependency
    path = save_turntable(distinct_frames(4, size=15), tmp_path / "turn.mp4")  # odd size is padded
    assert path.stat().st_size > 0


def test_render_turntable_with_a_given_render_function():
    calls = []

    def render(gaussians, cameras, background):
        views = cameras.viewmats.shape[-3]
        calls.append((views, cameras.viewmats.shape, background.tolist()))
        centres = cameras.camera_centers()[0]  # [V, 3]
        rgb = torch.zeros(1, views, 3, cameras.height, cameras.width)
        rgb[0, :, 0] = (centres[:, 0] > 0.1).float()[:, None, None]  # red where the camera is at +x
        return RenderOutput(rgb, rgb[:, :, :1], rgb[:, :, :1], rgb, cameras)

    frames = render_turntable(random_gaussians(), render, num_frames=8, size=6, views_per_call=3)
    assert frames.shape == (8, 3, 6, 6)
    assert [c[0] for c in calls] == [3, 3, 2]
    assert calls[0][1] == (1, 3, 4, 4) and calls[0][2] == [1.0, 1.0, 1.0]
    # azimuth is measured from +z towards +x: frames at 45, 90, 135 degrees see from +x
    assert frames[:, 0, 0, 0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="one asset"):
        render_turntable(random_gaussians(batch=2), render)


def test_render_turntable_with_the_library_renderer(tmp_path):
    render = getattr(pytest.importorskip("r2d3.render"), "render_gaussians", None)
    if render is None:
        pytest.skip("r2d3.render.render_gaussians is not available")
    from r2d3.data.procedural import from_prompt

    sphere = from_prompt("a large red sphere", 256, torch.Generator().manual_seed(0), shading=0.0).gaussians
    frames = render_turntable(sphere, num_frames=2, size=32)
    assert frames.shape == (2, 3, 32, 32)
    assert torch.allclose(frames[:, :, 0, 0], torch.ones(2, 3), atol=1e-3)  # white background
    centre = frames[:, :, 16, 16]
    assert (centre[:, 0] > 0.8).all() and (centre[:, 1:] < 0.2).all()  # red object
    with Image.open(save_turntable(frames, tmp_path / "sphere.gif")) as gif:
        assert gif.n_frames == 2


def test_single_image_grid_and_bad_padding():
    image = make_grid(solid_views((0.0, 0.0, 1.0), views=1, size=10)[0], padding=1)
    assert image.size == (12, 12) and image.getpixel((5, 5)) == (0, 0, 255)
    with pytest.raises(ValueError, match="padding"):
        make_grid(solid_views((0.0, 0.0, 1.0)), padding=-1)


def test_render_turntable_needs_a_frame():
    with pytest.raises(ValueError, match="num_frames"):
        render_turntable(random_gaussians(), lambda *a, **k: None, num_frames=0)


def test_mp4_pads_to_even_size_and_writes_atomically(tmp_path, monkeypatch):
    """The encoder itself is optional; check what r2d3 hands it (PyAV and imageio-ffmpeg branches)."""
    import importlib.util

    import imageio.v3 as iio

    from r2d3.export import preview

    written = []

    def fake_imwrite(path, frames, plugin, **kwargs):
        written.append((plugin, frames.shape, kwargs))
        with open(path, "wb") as f:
            f.write(b"mp4")

    monkeypatch.setattr(iio, "imwrite", fake_imwrite)
    for module in ("av", "imageio_ffmpeg"):
        only_this = lambda name, m=module: object() if name == m else None  # noqa: E731
        monkeypatch.setattr(preview.importlib.util, "find_spec", only_this)
        path = save_turntable(distinct_frames(4, size=15), tmp_path / f"{module}.mp4", fps=8)
        assert path.read_bytes() == b"mp4"
    monkeypatch.setattr(preview.importlib.util, "find_spec", importlib.util.find_spec)
    assert [w[0] for w in written] == ["pyav", "FFMPEG"]
    assert all(w[1] == (4, 16, 16, 3) for w in written)  # 15 x 15 padded to 16 x 16
    assert written[0][2]["codec"] == "libx264" and written[1][2]["fps"] == 8
    assert files_in(tmp_path) == ["av.mp4", "imageio_ffmpeg.mp4"]


def test_directory_that_refuses_new_files(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match="locked.png.*Permission denied"):
        save_preview_grid(solid_views((1.0, 0.0, 0.0)), tmp_path / "locked.png")
