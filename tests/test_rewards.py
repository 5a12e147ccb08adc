"""Rewards: DNC against analytic scenes and a float64 hand computation, colourfulness, the registry,
gradients through the renderer to every Gaussian parameter, and the shipped clip_tiny weights."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from r2d3.pretrained import WeightsError
from r2d3.data.procedural import ProceduralShapes
from r2d3.render import Cameras, RenderOutput, jittered_orbit_cameras, orbit_cameras, render_gaussians
from r2d3.rewards import available_rewards, build_reward, colorfulness, depth_to_normal
from r2d3.rewards.base import WeightedSum
from r2d3.rewards.clip_tiny import ClipTinyReward, default_weights_dir, load_clip_tiny
from r2d3.rewards.clip_tiny_training import colour_variants, shape_variants, template_of

H = W = 24


def _cameras(num_views: int = 2, dtype=torch.float64, fov: float = 40.0, width: int = W,
             height: int = H) -> Cameras:
    azimuths = [0.0, 90.0, 180.0][:num_views]
    cams = orbit_cameras([15.0], azimuths, fov_deg=fov, width=width, height=height, dtype=dtype)
    return Cameras(cams.viewmats[None], cams.Ks[None].clone(), width, height)


def _pixel_rays(cams: Cameras) -> torch.Tensor:
    """Camera-space rays (z = 1) through the pixel centres of the first view, [3, H, W]."""
    K = cams.Ks[0, 0]
    v, u = torch.meshgrid(torch.arange(cams.height, dtype=K.dtype) + 0.5,
                          torch.arange(cams.width, dtype=K.dtype) + 0.5, indexing="ij")
    return torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)])


def _plane_render(normal=(0.3, -0.2, -1.0), offset=-2.0, cams=None) -> RenderOutput:
    """An analytic plane n·X = offset seen by every view: exact depth and normal maps."""
    cams = cams or _cameras()
    n = F.normalize(torch.tensor(normal, dtype=torch.float64), dim=0)
    rays = _pixel_rays(cams)
    depth = offset / (n[:, None, None] * rays).sum(0)
    v = cams.num_views
    shape = (1, v, 1, cams.height, cams.width)
    return RenderOutput(
        rgb=torch.ones(1, v, 3, cams.height, cams.width, dtype=torch.float64),
        alpha=torch.ones(shape, dtype=torch.float64),
        depth=depth.expand(shape).clone(),
        normal=n[:, None, None].expand(1, v, 3, cams.height, cams.width).clone(),
        cameras=cams,
    )


def _sphere_render(radius=0.8, centre_z=2.5) -> RenderOutput:
    """An analytic sphere in front of the camera: ray–sphere depth, outward (camera-facing) normals."""
    cams = _cameras(1, fov=30.0, width=48, height=48)
    rays = _pixel_rays(cams)  # z = 1
    c = torch.tensor([0.0, 0.0, centre_z], dtype=torch.float64)[:, None, None]
    a = (rays * rays).sum(0)
    b = -2 * (rays * c).sum(0)
    disc = b * b - 4 * a * ((c * c).sum(0) - radius**2)
    hit = disc > 0
    t = torch.where(hit, (-b - disc.clamp(min=0).sqrt()) / (2 * a), torch.zeros_like(a))
    points = rays * t
    normal = torch.where(hit, F.normalize(points - c, dim=0), torch.zeros_like(points))
    return RenderOutput(
        rgb=torch.ones(1, 1, 3, 48, 48, dtype=torch.float64),
        alpha=hit.to(torch.float64)[None, None, None],
        depth=t[None, None, None],  # camera z, since rays have z = 1
        normal=normal[None, None],
        cameras=cams,
    )


# ---- dnc -----------------------------------------------------------------------------------------


def test_depth_normal_of_a_fronto_parallel_plane_faces_the_camera():
    render = _plane_render(normal=(0.0, 0.0, -1.0), offset=-2.0)
    derived = depth_to_normal(render.depth, render.cameras.Ks)
    inner = derived[..., 1:-1, 1:-1]
    torch.testing.assert_close(inner, torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)[:, None, None]
                               .expand_as(inner))
    assert (derived[..., 0, :] == 0).all() and (derived[..., :, -1] == 0).all()  # border excluded


@pytest.mark.parametrize("fov", [25.0, 40.0, 70.0])
def test_dnc_is_one_for_a_consistent_tilted_plane_at_any_fov(fov):
    render = _plane_render(cams=_cameras(fov=fov))
    scores = build_reward("dnc").per_view(render, ["x"])
    torch.testing.assert_close(scores, torch.ones_like(scores), atol=1e-4, rtol=0)


def test_dnc_uses_the_cameras_intrinsics_not_a_fixed_fov():
    """Depth of a tilted plane seen at 70 degrees is consistent only under the 70-degree intrinsics."""
    render = _plane_render(cams=_cameras(fov=70.0))
    wrong = _cameras(fov=40.0)
    mislabelled = RenderOutput(render.rgb, render.alpha, render.depth, render.normal, wrong)
    assert build_reward("dnc")(mislabelled, ["x"]).item() < 0.999


def test_dnc_of_an_analytic_sphere_is_close_to_one_and_drops_when_normals_are_perturbed():
    render = _sphere_render()
    dnc = build_reward({"name": "dnc", "kwargs": {"erode_mask": True}})
    clean = dnc(render, ["x"]).item()
    assert clean > 0.999
    g = torch.Generator().manual_seed(0)
    noisy_normal = render.normal + 0.5 * torch.randn(render.normal.shape, generator=g, dtype=torch.float64)
    noisy = RenderOutput(render.rgb, render.alpha, render.depth, noisy_normal, render.cameras)
    assert dnc(noisy, ["x"]).item() < clean - 0.05
    flipped = RenderOutput(render.rgb, render.alpha, render.depth, -render.normal, render.cameras)
    assert dnc(flipped, ["x"]).item() < -0.999


def _dnc_by_hand(depth, normal, alpha, K):
    """Per-pixel loops in float64, written straight from method notes §6(g)."""
    h, w = depth.shape
    Kinv = torch.linalg.inv(K)

    def point(v, u):
        return depth[v, u] * (Kinv @ torch.tensor([u + 0.5, v + 0.5, 1.0], dtype=torch.float64))

    total, count = 0.0, 0
    for v in range(1, h - 1):
        for u in range(1, w - 1):
            if alpha[v, u] <= 0.5:
                continue
            d_row = point(v + 1, u) - point(v - 1, u)
            d_col = point(v, u + 1) - point(v, u - 1)
            n_d = torch.linalg.cross(d_row, d_col)
            n_d = n_d / n_d.norm()
            n_r = normal[:, v, u] / normal[:, v, u].norm()
            total += float(n_r @ n_d)
            count += 1
    return total / count if count else 0.0


def test_dnc_matches_a_float64_hand_computation():
    g = torch.Generator().manual_seed(3)
    h, w = 6, 7
    cams = _cameras(2, width=w, height=h)
    cams.Ks[0, 1, 0, 2] += 0.7  # off-centre principal point and unequal focal lengths in view 1
    cams.Ks[0, 1, 1, 1] *= 1.3
    depth = 2.0 + 0.3 * torch.rand(1, 2, 1, h, w, generator=g, dtype=torch.float64)
    normal = torch.randn(1, 2, 3, h, w, generator=g, dtype=torch.float64)
    alpha = torch.rand(1, 2, 1, h, w, generator=g, dtype=torch.float64)
    render = RenderOutput(torch.ones(1, 2, 3, h, w, dtype=torch.float64), alpha, depth, normal, cams)
    got = build_reward("dnc").per_view(render, ["x"])
    for view in range(2):
        want = _dnc_by_hand(depth[0, view, 0], normal[0, view], alpha[0, view, 0], cams.Ks[0, view])
        assert got[0, view].item() == pytest.approx(want, abs=1e-10)


def _official_dnc_by_hand(depth, normal, alpha, fov_deg, threshold=0.5):
    """Transcribed in float64 from the reference code: ``rewards_normal.normal_d2n_cons`` (depth_ratio 0)
    over RaDe-GS's alpha-weighted ``raw_depth`` / ``raw_normal``, ``geo_util.depths_double_to_points`` (square
    pixels, f = H / (2 tan(fov / 2)), centre W/2, H/2) and ``point_double_to_normal`` (zero border)."""
    h, w = depth.shape
    raw_depth, raw_normal = depth * alpha, normal * alpha
    f = h / (2 * math.tan(math.radians(fov_deg) / 2))
    inv = torch.tensor([[1 / f, 0.0, -w / (2 * f)], [0.0, 1 / f, -h / (2 * f)], [0.0, 0.0, 1.0]], dtype=torch.float64)

    def point(v, u):
        return raw_depth[v, u] * (inv @ torch.tensor([u + 0.5, v + 0.5, 1.0], dtype=torch.float64))

    total, count = 0.0, 0
    for v in range(h):
        for u in range(w):
            if alpha[v, u] <= threshold:
                continue
            count += 1  # every masked pixel counts, the border's too
            if 0 < v < h - 1 and 0 < u < w - 1:
                n_d = torch.linalg.cross(point(v + 1, u) - point(v - 1, u), point(v, u + 1) - point(v, u - 1))
                total += float(raw_normal[:, v, u] @ (n_d / n_d.norm()))
    return total / count


def test_official_dnc_matches_the_reference_transcription():
    """dnc definition=official: alpha-weighted depth and unnormalised normals, the reference's fixed 40-degree
    pinhole, the border in the denominator; differs from r2d3's definition on the same render."""
    g = torch.Generator().manual_seed(4)
    h, w = 7, 6
    cams = _cameras(2, width=w, height=h, fov=39.6)
    depth = 2.0 + 0.3 * torch.rand(1, 2, 1, h, w, generator=g, dtype=torch.float64)
    normal = F.normalize(torch.randn(1, 2, 3, h, w, generator=g, dtype=torch.float64), dim=2)
    alpha = torch.rand(1, 2, 1, h, w, generator=g, dtype=torch.float64)
    render = RenderOutput(torch.ones(1, 2, 3, h, w, dtype=torch.float64), alpha, depth, normal, cams)
    official = build_reward({"name": "dnc", "kwargs": {"definition": "official", "fov_deg": 40.0}})
    got = official.per_view(render, ["x"])
    for view in range(2):
        want = _official_dnc_by_hand(depth[0, view, 0], normal[0, view], alpha[0, view, 0], 40.0)
        assert got[0, view].item() == pytest.approx(want, abs=1e-10)
    assert (got - build_reward("dnc").per_view(render, ["x"])).abs().max() > 1e-3
    with pytest.raises(ValueError, match="definition"):
        build_reward({"name": "dnc", "kwargs": {"definition": "offical"}})


@pytest.mark.parametrize("detach_depth", [True, False])
def test_dnc_of_an_empty_render_is_zero_without_nan_gradients(detach_depth):
    render = _plane_render()
    normal = torch.zeros_like(render.normal, requires_grad=True)
    depth = torch.zeros_like(render.depth, requires_grad=True)
    empty = RenderOutput(render.rgb, torch.zeros_like(render.alpha), depth, normal, render.cameras)
    score = build_reward({"name": "dnc", "kwargs": {"detach_depth": detach_depth}})(empty, ["x"])
    score.sum().backward()
    assert score.item() == 0.0
    assert torch.isfinite(normal.grad).all() and (depth.grad is None or torch.isfinite(depth.grad).all())


def test_dnc_gradient_reaches_depth_only_when_not_detached():
    render = _plane_render()
    for detach, expect_grad in ((True, False), (False, True)):
        depth = (render.depth * (1 + 0.01 * torch.rand_like(render.depth))).requires_grad_(True)
        normal = render.normal.clone().requires_grad_(True)
        out = build_reward({"name": "dnc", "kwargs": {"detach_depth": detach}})(
            RenderOutput(render.rgb, render.alpha, depth, normal, render.cameras), ["x"])
        out.sum().backward()
        assert normal.grad.abs().sum() > 0
        assert (depth.grad is not None and depth.grad.abs().sum() > 0) == expect_grad


# ---- colorfulness --------------------------------------------------------------------------------


def test_colorfulness_of_grey_is_zero_and_of_saturated_colours_higher():
    grey = torch.full((2, 3, 3, 8, 8), 0.5, requires_grad=True)
    alpha = torch.ones(2, 3, 1, 8, 8)
    score = colorfulness(grey, alpha)
    assert torch.equal(score, torch.zeros_like(score))
    score.sum().backward()
    assert torch.isfinite(grey.grad).all()
    red = torch.zeros(1, 1, 3, 8, 8)
    red[:, :, 0] = 1.0
    two = red.clone()
    two[..., 4:] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    s_red, s_two = colorfulness(red).item(), colorfulness(two).item()
    assert s_red == pytest.approx(0.3 * math.sqrt(1.25) / (109 / 255), rel=1e-3)
    assert 0 < s_red < s_two


def test_colorfulness_foreground_ignores_the_white_background():
    rgb = torch.ones(1, 1, 3, 8, 8)
    alpha = torch.zeros(1, 1, 1, 8, 8)
    rgb[..., :4, :] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    alpha[..., :4, :] = 1.0
    cams = _cameras(1, width=8, height=8)
    render = RenderOutput(rgb, alpha, torch.zeros_like(alpha), torch.zeros_like(rgb), cams)
    fg = build_reward("colorfulness")(render, ["x"]).item()
    whole = build_reward({"name": "colorfulness", "kwargs": {"foreground": False}})(render, ["x"]).item()
    solid = colorfulness(rgb[..., :4, :]).item()
    assert fg == pytest.approx(solid, rel=1e-5) and whole != pytest.approx(fg, rel=1e-2)


# ---- registry ------------------------------------------------------------------------------------


def test_registry_lists_the_shipped_rewards_and_rejects_unknown_names():
    assert {"dnc", "colorfulness", "clip_tiny"} <= set(available_rewards())
    with pytest.raises(ValueError, match="valid rewards: .*clip_tiny.*colorfulness.*dnc"):
        build_reward("hpsv9")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        build_reward({"dnc": 1.0, "nope": 2.0})


@pytest.mark.parametrize("weight, message", [(-1.0, ">= 0"), (float("nan"), "finite"), ("a", "number")])
def test_bad_weights_are_rejected_with_the_reward_named(weight, message):
    with pytest.raises(ValueError, match=f"reward 'dnc'.*{message}"):
        build_reward({"dnc": weight})
    with pytest.raises(ValueError, match=f"reward 'dnc'.*{message}"):
        build_reward([{"name": "dnc", "weight": weight}])


def test_weighted_sum_spec_equals_the_weighted_sum_of_its_parts():
    render = _plane_render()
    render.rgb = torch.rand(render.rgb.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spec_dict = build_reward({"dnc": 1.0, "colorfulness": 0.5})
    spec_list = build_reward([{"name": "dnc", "weight": 1.0},
                              {"name": "colorfulness", "weight": 0.5, "kwargs": {"foreground": True}}])
    assert isinstance(spec_dict, WeightedSum)
    want = build_reward("dnc")(render, ["x"]) + 0.5 * build_reward("colorfulness")(render, ["x"])
    torch.testing.assert_close(spec_dict(render, ["x"]), want)
    torch.testing.assert_close(spec_list(render, ["x"]), want)
    parts = spec_dict.components(render, ["x"])
    assert set(parts) == {"dnc", "colorfulness"} and parts["dnc"].shape == (1, 2)


def test_plain_callable_factories_are_adapted():
    from r2d3.rewards import register_reward

    @register_reward("test_mean_rgb")
    def _mean_rgb(**kwargs):
        return lambda render, prompts: render.rgb.mean(dim=(1, 2, 3, 4))

    render = _plane_render()
    alone = build_reward("test_mean_rgb")
    assert alone.per_view(render, ["x"]).shape == (1, 1)
    torch.testing.assert_close(alone(render, ["x"]), torch.ones(1, dtype=torch.float64))
    mixed = build_reward({"test_mean_rgb": 2.0, "dnc": 1.0})
    torch.testing.assert_close(mixed(render, ["x"]), 2.0 + build_reward("dnc")(render, ["x"]))


def test_omegaconf_specs_work():
    from omegaconf import OmegaConf

    reward = build_reward(OmegaConf.create({"dnc": 1.0, "colorfulness": 0.25}))
    assert reward.weights == [1.0, 0.25]
    reward = build_reward(OmegaConf.create([{"name": "dnc", "kwargs": {"detach_depth": False}}]))
    assert reward.rewards[0].detach_depth is False


# ---- gradients through the renderer ---------------------------------------------------------------


@pytest.fixture(scope="module")
def procedural_object():
    batch = ProceduralShapes(num_gaussians=128, split="train", seed=5, length=4).batch([0])
    return batch.gaussians, batch.prompts


@pytest.fixture(scope="module")
def clip_tiny():
    return ClipTinyReward()


@pytest.mark.parametrize("spec", ["dnc", "colorfulness", "clip_tiny", {"dnc": 1.0, "colorfulness": 0.5}])
def test_reward_gradients_reach_every_gaussian_parameter(spec, procedural_object, request):
    gaussians, prompts = procedural_object
    params = {name: getattr(gaussians, name).clone().requires_grad_(True)
              for name in ("means", "scales", "quats", "opacities", "colors")}
    g = type(gaussians)(**params)
    cams = jittered_orbit_cameras(2, 1, generator=torch.Generator().manual_seed(0), width=32, height=32)
    reward = request.getfixturevalue("clip_tiny") if spec == "clip_tiny" else build_reward(spec)
    value = reward(render_gaussians(g, cams), prompts)
    assert value.shape == (1,) and torch.isfinite(value).all()
    value.sum().backward()
    for name in ("means", "scales", "quats", "colors"):
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all(), name
        if spec == "dnc" and name == "colors":
            assert grad.abs().sum() == 0  # dnc is a function of geometry only
        else:
            assert grad.abs().sum() > 0, name


# ---- clip_tiny -------------------------------------------------------------------------------------


def test_clip_tiny_prefers_the_matching_prompt_on_heldout_objects(clip_tiny):
    data = ProceduralShapes(num_gaussians=256, split="heldout", seed=11, length=6)
    batch = data.batch(range(6))
    cams = jittered_orbit_cameras(2, 6, generator=torch.Generator().manual_seed(1), elevation_deg=20.0,
                                  elevation_jitter_deg=10.0, azimuth_jitter_deg=180.0, width=64, height=64)
    with torch.no_grad():
        render = render_gaussians(batch.gaussians, cams)
        wins = []
        for i, (attributes, prompt) in enumerate(zip(batch.attributes, batch.prompts)):
            t = template_of(attributes, prompt)
            others = [a.prompt(t) for a in colour_variants(attributes)[:3] + shape_variants(attributes)[:3]]
            one = RenderOutput(render.rgb[i : i + 1].expand(1 + len(others), -1, -1, -1, -1), render.alpha,
                               render.depth, render.normal, render.cameras)
            scores = clip_tiny(one, [prompt, *others])
            assert scores.shape == (1 + len(others),) and (scores.abs() <= 1 + 1e-5).all()
            wins += (scores[0] > scores[1:]).tolist()
    assert sum(wins) / len(wins) >= 0.8


def test_clip_tiny_rejects_a_prompt_count_mismatch(clip_tiny):
    render = _plane_render()
    with pytest.raises(ValueError, match="2 prompts for 1 rendered assets"):
        clip_tiny(render, ["a red cube", "a blue cube"])
    with pytest.raises(TypeError, match="not one string"):
        clip_tiny(render, "a red cube")


def test_missing_clip_tiny_weights_name_the_path_and_the_rebuild_command(tmp_path):
    with pytest.raises(WeightsError, match=r"(?s)missing.*config.json.*python pipelines/train_reward.py"):
        load_clip_tiny(tmp_path / "nowhere")


@pytest.mark.parametrize("garbage_file", ["diffusion_pytorch_model.safetensors", "config.json"])
def test_corrupt_clip_tiny_weights_raise_weights_error(tmp_path, garbage_file):
    target = tmp_path / "clip_tiny"
    shutil.copytree(default_weights_dir(), target)
    (target / garbage_file).write_bytes(b"\x00garbage, not a weights file\xff" * 10)
    with pytest.raises(WeightsError, match=rf"(?s){target.name}.*python pipelines/train_reward.py"):
        build_reward({"name": "clip_tiny", "kwargs": {"weights": str(target)}})
