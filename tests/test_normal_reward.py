"""The normal-estimator reward: a hand computation, the frame conventions on real renders of a plane and a
sphere of Gaussians, stop-gradient and finite-difference gradients, a tiny locally built Marigold pipeline
loaded through ``marigold:<dir>``, and the errors for missing weights and bad specs."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from r2d3.pretrained import WeightsError
from r2d3.render import Cameras, Gaussians, RenderOutput, look_at, orbit_cameras, render_gaussians
from r2d3.rewards import available_rewards, build_reward, load_reward
from r2d3.rewards.normal_estimator import (
    FRAMES,
    MarigoldNormalEstimator,
    NormalEstimatorReward,
    build_estimator,
    parse_estimator_spec,
    to_renderer_frame,
)

F64 = torch.float64
HERE = __name__  # this module, importable by the ``python:`` spec (pytest puts tests/ on sys.path)


# ---- test-local estimators (``python:<module>:<factory>`` factories) ---------------------------------


def oracle(normals: torch.Tensor, frame_declared: str | None = None, convention=(1.0, 1.0, 1.0)):
    """An estimator that 'predicts' known normals ``[N, 3, H, W]`` and multiplies them by ``convention``
    (per-axis signs); ``frame_declared`` optionally sets its ``frame`` attribute."""

    def estimate(images: torch.Tensor) -> torch.Tensor:
        assert images.shape == normals.shape and images.dtype == torch.float32
        return normals.float() * torch.tensor(convention).reshape(1, 3, 1, 1)

    if frame_declared is not None:
        estimate.frame = frame_declared
    return estimate


def rgb_as_normal():
    """An estimator reading each pixel's colour as a normal, ``normalize(2 rgb - 1)`` (renderer frame); it
    deliberately keeps any autograd graph of its input, which the reward must cut."""
    seen = []

    def estimate(images: torch.Tensor) -> torch.Tensor:
        seen.append(images)
        return F.normalize(images * 2 - 1, dim=1)

    estimate.seen = seen
    return estimate


def not_an_estimator():
    return 3


def _reward(factory: str, frame=None, **kwargs) -> NormalEstimatorReward:
    spec = {"name": "normal_estimator",
            "kwargs": {"estimator": f"python:{HERE}:{factory}", "estimator_kwargs": kwargs}}
    if frame is not None:
        spec["kwargs"]["estimator_frame"] = frame
    reward = build_reward(spec)
    assert isinstance(reward, NormalEstimatorReward)
    return reward


# ---- scenes ------------------------------------------------------------------------------------------


def _camera_rays(cams: Cameras) -> torch.Tensor:
    """Camera-space rays (z = 1) through the pixel centres, ``[V, 3, H, W]``."""
    K = cams.Ks.reshape(-1, 3, 3)
    v, u = torch.meshgrid(torch.arange(cams.height, dtype=K.dtype) + 0.5,
                          torch.arange(cams.width, dtype=K.dtype) + 0.5, indexing="ij")
    x = (u - K[:, 0, 2, None, None]) / K[:, 0, 0, None, None]
    y = (v - K[:, 1, 2, None, None]) / K[:, 1, 1, None, None]
    return torch.stack([x, y, torch.ones_like(x)], dim=1)


def _sheet(n_side: int = 9) -> Gaussians:
    """Flat Gaussians tiling the world plane z = 0 (normal ±z), opaque in the middle."""
    xs = torch.linspace(-0.6, 0.6, n_side, dtype=F64)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    n = len(grid)
    return Gaussians(
        means=torch.cat([grid, torch.zeros(n, 1, dtype=F64)], -1)[None],
        scales=torch.tensor([0.12, 0.12, 0.002], dtype=F64).expand(1, n, 3).clone(),
        quats=torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64).expand(1, n, 4).clone(),
        opacities=torch.full((1, n), 0.95, dtype=F64),
        colors=torch.full((1, n, 3), 0.5, dtype=F64),
    )


def _sphere(radius: float = 0.8, n: int = 500) -> Gaussians:
    """Flat discs tangent to a sphere centred at the origin (Fibonacci points, shortest axis radial)."""
    i = torch.arange(n, dtype=F64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5**0.5) * i
    d = torch.stack([torch.sqrt(1 - z * z) * torch.cos(phi), torch.sqrt(1 - z * z) * torch.sin(phi), z], -1)
    quats = F.normalize(torch.stack([1 + d[:, 2], -d[:, 1], d[:, 0], torch.zeros(n, dtype=F64)], -1), dim=-1)
    return Gaussians(
        means=(radius * d)[None],
        scales=torch.tensor([0.075, 0.075, 0.003], dtype=F64).expand(1, n, 3).clone(),
        quats=quats[None],  # rotates local +z onto d
        opacities=torch.full((1, n), 0.9, dtype=F64),
        colors=torch.full((1, n, 3), 0.5, dtype=F64),
    )


def _sphere_normals(cams: Cameras) -> torch.Tensor:
    """True outward (camera-facing) normals of the sphere at the origin in each view's OpenCV frame,
    ``[V, 3, H, W]``; rays that miss it get the normal at their closest approach (continuous at the rim)."""
    rays = F.normalize(_camera_rays(cams), dim=1)
    centre = cams.viewmats.reshape(-1, 4, 4)[:, :3, 3][:, :, None, None]  # origin in camera coordinates
    along = (rays * centre).sum(1, keepdim=True)
    closest = rays * along - centre
    radius = 0.8
    half_chord = (radius**2 - (closest * closest).sum(1, keepdim=True)).clamp(min=0).sqrt()
    hit = rays * (along - half_chord)  # first intersection (equals the closest point where the ray misses)
    return F.normalize(hit - centre, dim=1)


# ---- (a) values ------------------------------------------------------------------------------------


def test_registered_and_exported():
    assert "normal_estimator" in available_rewards()
    from r2d3 import rewards

    assert "NormalEstimatorReward" in rewards.__all__ and rewards.NormalEstimatorReward is NormalEstimatorReward


def test_reward_matches_a_hand_computation_with_masking_and_an_empty_view():
    g = torch.Generator().manual_seed(0)
    b, v, h, w = 2, 2, 4, 5
    rgb = torch.rand(b, v, 3, h, w, generator=g, dtype=F64)
    normal = torch.randn(b, v, 3, h, w, generator=g, dtype=F64)
    alpha = torch.rand(b, v, 1, h, w, generator=g, dtype=F64)
    alpha[1, 0] = 0.3  # an empty mask: the view scores 0
    cams = orbit_cameras(0.0, [0.0, 90.0], width=w, height=h, dtype=F64).expand(b)
    render = RenderOutput(rgb=rgb, alpha=alpha, depth=torch.ones_like(alpha), normal=normal, cameras=cams)
    reward = _reward("rgb_as_normal")
    expected = torch.zeros(b, v, dtype=F64)
    for i in range(b):
        for j in range(v):
            total, count = 0.0, 0
            for y in range(h):
                for x in range(w):
                    if alpha[i, j, 0, y, x] > 0.5:
                        n_r = normal[i, j, :, y, x] / normal[i, j, :, y, x].norm()
                        est = rgb[i, j, :, y, x].float().double() * 2 - 1  # the estimator sees fp32 images
                        total += float(n_r @ (est / est.norm()))
                        count += 1
            expected[i, j] = total / count if count else 0.0
    assert expected[1, 0] == 0 and (expected != 0).sum() == 3
    scores = reward.per_view(render, ["a", "b"])
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(reward(render, ["a", "b"]), expected.mean(1), atol=1e-6, rtol=0)
    # the threshold is an option; alpha_threshold = 0 counts every pixel with alpha > 0
    loose = build_reward({"name": "normal_estimator",
                          "kwargs": {"estimator": f"python:{HERE}:rgb_as_normal", "alpha_threshold": 0.0}})
    assert loose.per_view(render, ["a", "b"])[1, 0] != 0


def _oblique_plane_render():
    eye = torch.tensor([1.2, 1.5, 2.0], dtype=F64)  # looks at the z = 0 sheet from above and to the right
    K = orbit_cameras(0.0, [0.0], width=24, height=24, dtype=F64).Ks
    cams = Cameras(look_at(eye)[None], K, 24, 24)
    render = render_gaussians(_sheet(), cams)
    true_normal = cams.viewmats[0, :3, :3] @ torch.tensor([0.0, 0.0, 1.0], dtype=F64)  # faces the camera
    return render, true_normal


def test_frame_conventions_on_a_rendered_oblique_plane():
    """An estimator returning the plane's true normal in its own convention scores exactly 1 when the
    convention is stated; misstated conventions give the hand-computed cosines."""
    render, n = _oblique_plane_render()
    mask = render.alpha[0, 0, 0] > 0.5
    assert mask.sum() > 100 and n[0].abs() > 0.2 and n[1].abs() > 0.2 and n[2] < 0  # all three axes matter
    # the renderer's normal is the true normal wherever it is defined
    torch.testing.assert_close(render.normal[0, 0][:, mask], n[:, None].expand(3, int(mask.sum())))
    true_map = n[None, :, None, None].expand(1, 3, 24, 24)
    x, y, z = n.tolist()
    cases = {  # estimator reports the true normal with these signs; the reward is told `frame`
        ("opencv", (1, 1, 1)): 1.0,
        ("opengl", (1, -1, -1)): 1.0,
        ("negated", (-1, -1, -1)): 1.0,
        ("opengl", (1, 1, 1)): x * x - y * y - z * z,  # renderer-frame normals misread as OpenGL ones
        ("negated", (1, -1, -1)): -x * x + y * y + z * z,  # OpenGL normals misread as negated ones
        ("opencv", (1, -1, -1)): x * x - y * y - z * z,
        ((1, -1, 1), (1, -1, 1)): 1.0,  # any stated sign convention
    }
    for (frame, convention), value in cases.items():
        reward = _reward("oracle", frame=list(frame) if isinstance(frame, tuple) else frame,
                         normals=true_map, convention=convention)
        assert reward(render, ["p"]).item() == pytest.approx(value, abs=1e-6), (frame, convention)
    # the paper's literal <-N_r, N_est> is the "negated" convention: equal to -<N_r, N_est> computed by hand
    est = true_map[0] * torch.tensor([-1.0, -1.0, -1.0], dtype=F64)[:, None, None]
    literal = (-(render.normal[0, 0] * est).sum(0))[mask].mean()
    assert literal.item() == pytest.approx(1.0, abs=1e-6)


def test_a_declared_frame_is_used_and_a_contradicting_one_rejected():
    render, n = _oblique_plane_render()
    true_map = n[None, :, None, None].expand(1, 3, 24, 24)
    declared = _reward("oracle", normals=true_map, frame_declared="opengl", convention=FRAMES["opengl"])
    assert declared.signs == FRAMES["opengl"]
    assert declared(render, ["p"]).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="declares frame 'opengl'"):
        _reward("oracle", frame="opencv", normals=true_map, frame_declared="opengl")
    for bad in ("opengles", [1, 1], [1, 0, 1]):
        with pytest.raises(ValueError, match="frame"):
            _reward("oracle", frame=bad, normals=true_map)


def test_true_sphere_normals_score_about_one_only_in_the_right_convention():
    cams = orbit_cameras(0.0, [0.0, 90.0], distance=3.0, fov_deg=40.0, width=32, height=32, dtype=F64)
    render = render_gaussians(_sphere(), cams)
    mask = render.alpha[0, :, 0] > 0.5
    assert 150 < mask[0].sum() < 32 * 32
    truth = _sphere_normals(cams)  # [V, 3, H, W], OpenCV
    assert (truth[:, 2][mask] < 0).all()  # facing the camera
    opengl = truth * torch.tensor([1.0, -1.0, -1.0], dtype=F64)[:, None, None]
    right = _reward("oracle", frame="opengl", normals=opengl)(render, ["s"]).item()
    assert 0.97 < right <= 1.0
    # x and y flips matter on a sphere: a wrong convention scores far lower
    assert _reward("oracle", frame="negated", normals=opengl)(render, ["s"]).item() < 0.8
    assert _reward("oracle", frame="opencv", normals=opengl)(render, ["s"]).item() < -0.3


# ---- (b, c) gradients --------------------------------------------------------------------------------


def test_gradient_flows_only_through_the_rendered_normal():
    g = torch.Generator().manual_seed(1)
    shape = (1, 2, 3, 6, 6)
    rgb = torch.rand(shape, generator=g, dtype=F64).requires_grad_()
    normal = torch.randn(shape, generator=g, dtype=F64).requires_grad_()
    alpha = torch.rand(1, 2, 1, 6, 6, generator=g, dtype=F64).requires_grad_()
    depth = torch.rand(1, 2, 1, 6, 6, generator=g, dtype=F64).requires_grad_()
    cams = orbit_cameras(0.0, [0.0, 90.0], width=6, height=6, dtype=F64).expand(1)
    render = RenderOutput(rgb=rgb * 1.0, alpha=alpha * 1.0, depth=depth * 1.0, normal=normal * 1.0, cameras=cams)
    reward = _reward("rgb_as_normal")
    value = reward(render, ["x"])
    value.sum().backward()
    assert normal.grad is not None and normal.grad.abs().sum() > 0
    assert rgb.grad is None and alpha.grad is None and depth.grad is None
    seen = reward.estimator.seen[-1]
    assert not seen.requires_grad and seen.dtype == torch.float32  # detached fp32 images
    # gradients also reach the Gaussians through the renderer (via their normals, i.e. rotations)
    gauss = _sheet()
    gauss.quats = (gauss.quats + 0.05 * torch.randn(gauss.quats.shape, generator=g, dtype=F64)).requires_grad_()
    render, n = _oblique_plane_render()
    out = render_gaussians(gauss, render.cameras)
    _reward("oracle", normals=n[None, :, None, None].expand(1, 3, 24, 24))(out, ["p"]).sum().backward()
    assert gauss.quats.grad is not None and gauss.quats.grad.abs().sum() > 0


def test_gradient_wrt_the_rendered_normal_matches_finite_differences():
    g = torch.Generator().manual_seed(2)
    shape = (2, 2, 3, 5, 5)
    rgb = torch.rand(shape, generator=g, dtype=F64)
    alpha = torch.rand(2, 2, 1, 5, 5, generator=g, dtype=F64)
    cams = orbit_cameras(0.0, [0.0, 90.0], width=5, height=5, dtype=F64).expand(2)
    reward = _reward("rgb_as_normal")

    def fn(normal):
        return reward(RenderOutput(rgb=rgb, alpha=alpha, depth=alpha, normal=normal, cameras=cams), ["a", "b"])

    normal = torch.randn(shape, generator=g, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(fn, (normal,), eps=1e-6, atol=1e-6, rtol=1e-4)
    # and one entry by an explicit central difference
    (grad,) = torch.autograd.grad(fn(normal).sum(), normal)
    masked = (alpha[:, :, 0] > 0.5).nonzero()
    assert (grad.permute(0, 1, 3, 4, 2)[alpha[:, :, 0] <= 0.5] == 0).all()  # nothing outside the mask
    bi, vi, yi, xi = masked[len(masked) // 2].tolist()
    idx = (bi, vi, 2, yi, xi)
    bump = torch.zeros_like(normal)
    bump[idx] = 1e-6
    with torch.no_grad():
        fd = (fn(normal + bump).sum() - fn(normal - bump).sum()) / 2e-6
    assert grad[idx].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


# ---- (d) Marigold ------------------------------------------------------------------------------------


def _tiny_marigold(path):
    """A randomly initialised MarigoldNormalsPipeline with every component built locally (no hub)."""
    from diffusers import AutoencoderKL, DDIMScheduler, MarigoldNormalsPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(  # image latent (4) + normals latent (4) in, noise (4) out
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(8,),
        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), cross_attention_dim=8,
        norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, timestep_spacing="trailing", prediction_type="v_prediction")
    pipe = MarigoldNormalsPipeline(unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                                   tokenizer=tokenizer, prediction_type="normals", use_full_z_range=True,
                                   default_denoising_steps=2, default_processing_resolution=16)
    pipe.save_pretrained(path / "pipe")
    return path / "pipe"


@pytest.fixture(scope="module")
def marigold_dir(tmp_path_factory):
    return _tiny_marigold(tmp_path_factory.mktemp("marigold") / "build")


def test_marigold_estimator_shapes_unit_norm_determinism_and_frame(marigold_dir):
    est = build_estimator(f"marigold:{marigold_dir}", num_inference_steps=2, processing_resolution=16, seed=3)
    assert isinstance(est, MarigoldNormalEstimator) and est.frame == "opencv"
    assert not any(p.requires_grad for p in est.parameters())
    assert all(p.dtype == torch.float32 for p in est.parameters())
    images = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    out = est(images)
    assert out.shape == (3, 3, 20, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3, 20, 24), atol=1e-5, rtol=0)
    torch.testing.assert_close(est(images), out, atol=0, rtol=0)  # deterministic
    torch.testing.assert_close(est(images[1:2]), out[1:2], atol=1e-5, rtol=0)  # independent of the batch
    # the documented mapping from Marigold's frame (x right, y up, z to the viewer): (x, y, z) -> (x, -y, -z)
    raw = est.pipe(images, num_inference_steps=2, processing_resolution=16, ensemble_size=1, batch_size=3,
                   generator=[torch.Generator().manual_seed(3) for _ in range(3)], output_type="pt").prediction
    torch.testing.assert_close(out, raw * torch.tensor([1.0, -1.0, -1.0])[:, None, None], atol=1e-6, rtol=0)
    torch.testing.assert_close(to_renderer_frame(raw, "opengl", dim=1), out, atol=1e-6, rtol=0)
    other = build_estimator(f"marigold:{marigold_dir}", seed=4)  # checkpoint defaults: 2 steps, 16 px
    assert other.num_inference_steps == 2 and other.processing_resolution == 16
    assert not torch.allclose(other(images), out)


def test_marigold_reward_through_the_spec(marigold_dir):
    reward = load_reward({"name": "normal_estimator",
                          "kwargs": {"estimator": f"marigold:{marigold_dir}",
                                     "estimator_kwargs": {"num_inference_steps": 1, "processing_resolution": 8}}})
    assert reward.signs == FRAMES["opencv"]
    g = torch.Generator().manual_seed(5)
    cams = orbit_cameras(0.0, [0.0, 90.0], width=16, height=16).expand(1)
    normal = torch.randn(1, 2, 3, 16, 16, generator=g).requires_grad_()
    render = RenderOutput(rgb=torch.rand(1, 2, 3, 16, 16, generator=g), alpha=torch.ones(1, 2, 1, 16, 16),
                          depth=torch.ones(1, 2, 1, 16, 16), normal=normal, cameras=cams)
    scores = reward.per_view(render, ["x"])
    assert scores.shape == (1, 2) and (scores.abs() <= 1).all()
    torch.testing.assert_close(reward.per_view(render, ["x"]), scores, atol=0, rtol=0)
    scores.sum().backward()
    assert normal.grad is not None and normal.grad.abs().sum() > 0


# ---- (e) errors --------------------------------------------------------------------------------------


def test_missing_marigold_directory_names_what_to_download(tmp_path):
    with pytest.raises(WeightsError, match=r"not a directory(.|\n)*prs-eth/marigold-normals-v1-1"):
        build_reward({"name": "normal_estimator", "kwargs": {"estimator": f"marigold:{tmp_path / 'nope'}"}})


@pytest.mark.parametrize("remove, named", [
    ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"),
    ("vae/config.json", "vae/config.json"),
    ("scheduler", "scheduler/scheduler_config.json"),
    ("text_encoder/model.safetensors", "text_encoder/model.safetensors"),
    ("tokenizer", "tokenizer/tokenizer.json"),
    ("model_index.json", "model_index.json"),
])
def test_incomplete_marigold_directory_names_the_missing_component(marigold_dir, tmp_path, remove, named):
    broken = tmp_path / "weights"
    shutil.copytree(marigold_dir, broken)
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(WeightsError, match="incomplete") as err:
        build_estimator(f"marigold:{broken}")
    assert named in str(err.value) and "prs-eth/marigold-normals-v1-1" in str(err.value)
    for part in ("model_index.json", "unet/", "vae/", "scheduler/", "text_encoder/", "tokenizer/", "marigold:"):
        assert part in str(err.value)  # the layout to download and where to pass it


def test_wrong_or_corrupt_marigold_weights_raise_weights_error(marigold_dir, tmp_path):
    depth = tmp_path / "depth"
    shutil.copytree(marigold_dir, depth)
    index = json.loads((depth / "model_index.json").read_text())
    index["_class_name"] = "MarigoldDepthPipeline"
    (depth / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="MarigoldDepthPipeline"):
        build_estimator(f"marigold:{depth}")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(marigold_dir, corrupt)
    (corrupt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="could not load"):
        build_estimator(f"marigold:{corrupt}")


@pytest.mark.parametrize("spec", ["", "marigold", "marigold:", "python:", "python:pkg.mod", "python::f",
                                  "python:pkg.mod:", "stablenormal:/w", "dsine", "/weights/marigold", 42])
def test_bad_specs_name_the_valid_forms(spec):
    with pytest.raises(ValueError, match=r"valid forms: 'marigold:<dir>'(.|\n)*'python:<module>:<factory>'"):
        build_reward({"name": "normal_estimator", "kwargs": {"estimator": spec}})


def test_unimportable_or_bad_python_factories():
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_r2d3'.*valid forms"):
        build_estimator("python:no_such_module_r2d3:f")
    assert parse_estimator_spec("python:pkg.mod:make") == ("python", ("pkg.mod", "make"))
    assert parse_estimator_spec("marigold:C:/w/m") == ("marigold", ("C:/w/m",))
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        build_estimator(f"python:{HERE}:missing")
    with pytest.raises(TypeError, match="returned int"):
        build_estimator(f"python:{HERE}:not_an_estimator")
    with pytest.raises(ValueError, match="needs `estimator`"):
        build_reward("normal_estimator")
    with pytest.raises(ValueError, match="alpha_threshold"):
        NormalEstimatorReward(estimator=rgb_as_normal(), alpha_threshold=1.0)


def test_estimator_output_of_the_wrong_shape_is_rejected():
    bad = NormalEstimatorReward(estimator=lambda images: images[:, :2])
    render = RenderOutput(rgb=torch.rand(1, 1, 3, 4, 4), alpha=torch.ones(1, 1, 1, 4, 4),
                          depth=torch.ones(1, 1, 1, 4, 4), normal=torch.randn(1, 1, 3, 4, 4),
                          cameras=orbit_cameras(0.0, [0.0], width=4, height=4).expand(1))
    with pytest.raises(ValueError, match="must return normals of the images' shape"):
        bad(render, ["x"])
    nan = NormalEstimatorReward(estimator=lambda images: images * float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        nan(render, ["x"])
