"""Measures of the prior: dominant colour, silhouette shape classifier, prompt-following, diversity, drift."""

import shutil

import pytest
import torch

from r2d3.pretrained import WeightsError
from r2d3.data.procedural import COLORS, ProceduralShapes, ShapeAttributes, build_gaussians
from r2d3.data.procedural import PromptParseError
from r2d3.eval import (
    chamfer_distance,
    diversity,
    dominant_colours,
    drift,
    expected_attributes,
    load_shape_classifier,
    prompt_following,
    srgb_to_lab,
    ssim,
)
from r2d3.eval.shape_classifier import default_weights_dir
from r2d3.render import jittered_orbit_cameras, render_gaussians

GROUND_TRUTH = [
    ShapeAttributes("sphere", "red"),
    ShapeAttributes("cube", "blue", "striped", "white", "large"),
    ShapeAttributes("cylinder", "green", "two-tone", "yellow", aspect="tall"),
    ShapeAttributes("torus", "purple", "striped", "orange"),
    ShapeAttributes("cone", "black", size="large"),
    ShapeAttributes("pyramid", "orange", "striped", "blue", "large"),
    ShapeAttributes("capsule", "pink"),
    ShapeAttributes("cube", "brown", "two-tone", "green", aspect="wide"),
]


@pytest.fixture(scope="module")
def ground_truth_render():
    gaussians = build_gaussians(GROUND_TRUTH, num_gaussians=256, generator=torch.Generator().manual_seed(0))
    cams = jittered_orbit_cameras(2, len(GROUND_TRUTH), generator=torch.Generator().manual_seed(0),
                                  elevation_deg=20.0, elevation_jitter_deg=10.0, azimuth_jitter_deg=180.0,
                                  width=64, height=64)
    with torch.no_grad():
        return render_gaussians(gaussians, cams)


# ---- colour ------------------------------------------------------------------------------------------


def test_lab_conversion_of_reference_colours():
    lab = srgb_to_lab(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(lab[0], torch.tensor([100.0, 0.0, 0.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(lab[1], torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(lab[2], torch.tensor([53.24, 80.09, 67.20]), atol=0.05, rtol=0)


def test_dominant_colour_of_ground_truth_renders(ground_truth_render):
    top = dominant_colours(ground_truth_render.rgb, ground_truth_render.alpha, COLORS, top_k=2)
    for attributes, colours in zip(GROUND_TRUTH, top):
        assert colours[0] in (attributes.color, attributes.color2), (attributes, colours)
        if attributes.pattern == "solid":
            assert colours[0] == attributes.color
        else:  # the second colour is found too, even for thin stripes that blend at 64 px
            assert set(colours) == {attributes.color, attributes.color2}, (attributes, colours)


def test_blended_stripe_pixels_are_not_counted_as_a_third_colour():
    rgb = torch.empty(1, 1, 3, 8, 8)
    blue, orange = torch.tensor(COLORS["blue"]), torch.tensor(COLORS["orange"])
    rgb[..., :, :] = (0.5 * blue + 0.5 * orange)[:, None, None]  # every pixel a blend
    rgb[..., :2, :] = orange[:, None, None]
    top = dominant_colours(rgb, torch.ones(1, 1, 1, 8, 8), COLORS, top_k=2)[0]
    assert top == ["orange", "blue"]


def test_empty_render_has_no_dominant_colour():
    assert dominant_colours(torch.ones(2, 1, 3, 4, 4), torch.zeros(2, 1, 1, 4, 4), COLORS) == [[], []]


# ---- shape classifier and prompt-following -----------------------------------------------------------


def test_prompt_following_of_ground_truth_renders(ground_truth_render):
    prompts = [a.prompt(i % 2) for i, a in enumerate(GROUND_TRUTH)]
    result = prompt_following(ground_truth_render, prompts)
    assert result["color_acc"] == 1.0
    assert result["color_strict_acc"] >= 0.75
    assert result["shape_acc"] >= 0.75
    assert len(result["per_sample"]) == len(GROUND_TRUTH)
    first = result["per_sample"][0]
    assert first["expected_shape"] == "sphere" and first["expected_color"] == "red" and first["color_ok"]
    same = prompt_following(ground_truth_render, GROUND_TRUTH)  # attributes instead of prompts
    assert same["color_acc"] == result["color_acc"] and same["shape_acc"] == result["shape_acc"]


def test_prompt_following_checks_its_labels(ground_truth_render):
    with pytest.raises(ValueError, match="got 1 prompts/attributes for 8"):
        prompt_following(ground_truth_render, ["a red sphere"])
    with pytest.raises(PromptParseError, match="a fluffy cat"):
        expected_attributes(["a fluffy cat"])


def test_shape_classifier_on_heldout_ground_truth():
    data = ProceduralShapes(num_gaussians=256, split="heldout", seed=21, length=12)
    batch = data.batch(range(12))
    cams = jittered_orbit_cameras(2, 12, generator=torch.Generator().manual_seed(2), elevation_deg=20.0,
                                  elevation_jitter_deg=10.0, azimuth_jitter_deg=180.0, width=64, height=64)
    with torch.no_grad():
        render = render_gaussians(batch.gaussians, cams)
    predicted = load_shape_classifier().predict(render.alpha, render.depth)
    accuracy = sum(p == a.shape for p, a in zip(predicted, batch.attributes)) / 12
    assert accuracy >= 0.75


def test_shape_classifier_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match=r"(?s)missing.*--what shape_classifier"):
        load_shape_classifier(tmp_path / "none")
    target = tmp_path / "shape_classifier"
    shutil.copytree(default_weights_dir(), target)
    (target / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors" * 7)
    with pytest.raises(WeightsError, match="could not load shape classifier weights"):
        load_shape_classifier(target)


# ---- diversity and drift ------------------------------------------------------------------------------


def test_diversity_of_identical_samples_is_zero_and_grows_with_spread():
    g = torch.Generator().manual_seed(0)
    one = torch.randn(1, 3, 8, 8, generator=g)  # one prompt's sample, e.g. a render [3, H, W]
    identical = one.expand(4, 3, 8, 8)
    assert diversity(identical).item() == 0.0
    spread = one + 0.1 * torch.randn(4, 3, 8, 8, generator=g)
    wider = one + 1.0 * torch.randn(4, 3, 8, 8, generator=g)
    assert 0 < diversity(spread).item() < diversity(wider).item()
    per_prompt = diversity([identical, spread, wider], reduce=False)
    assert per_prompt.shape == (3,) and per_prompt[0] == 0
    ragged = [torch.zeros(2, 3), torch.ones(3, 3)]  # prompts may have different numbers of seeds
    assert diversity(ragged).item() == 0.0
    with pytest.raises(ValueError, match="at least 2 seeds"):
        diversity(torch.zeros(1, 3))


def test_diversity_of_token_sets_ignores_token_order():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(16, 9, generator=g)  # a set model's latent [N, 9]
    same_set = torch.stack([tokens, tokens[torch.randperm(16, generator=g)]])
    assert diversity(same_set).item() == 0.0  # auto: Chamfer for [S, N, D]
    assert diversity(same_set, metric="rms").item() > 0
    assert diversity(torch.stack([tokens, tokens + 0.5])).item() > 0


def test_chamfer_distance_ignores_point_order():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 10, 3, generator=g)
    assert chamfer_distance(a, a[:, torch.randperm(10)]).abs().max() < 1e-6
    assert (chamfer_distance(a, a + torch.tensor([0.5, 0.0, 0.0])) > 0).all()


def test_drift_is_zero_for_the_same_samples_and_positive_for_different_ones(ground_truth_render):
    r = ground_truth_render
    same = drift(r, r)
    assert set(same) == {"rgb_l2", "dssim", "alpha_l1"}
    for value in same.values():
        assert value.shape == (len(GROUND_TRUTH),) and value.abs().max() < 1e-6
    other = type(r)(r.rgb.roll(1, dims=0), r.alpha.roll(1, dims=0), r.depth, r.normal, r.cameras)
    moved = drift(r, other)
    assert (moved["rgb_l2"] > 0).all() and (moved["dssim"] > 0).all()

    gen = torch.Generator().manual_seed(0)
    gaussians = build_gaussians(GROUND_TRUTH[:2], num_gaussians=64, generator=gen)
    g_same = drift(gaussians, gaussians)
    assert g_same["chamfer"].abs().max() < 1e-6 and g_same["color"].abs().max() < 1e-6
    shifted = type(gaussians)(gaussians.means + 0.1, gaussians.scales, gaussians.quats, gaussians.opacities,
                              gaussians.colors.flip(0))
    g_moved = drift(gaussians, shifted)
    assert (g_moved["chamfer"] > 0).all() and (g_moved["color"] > 0).all()
    with pytest.raises(TypeError, match="two RenderOutput or two Gaussians"):
        drift(r, gaussians)


def test_ssim_of_identical_images_is_one():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    assert (ssim(x, 1 - x) < 0.5).all()
