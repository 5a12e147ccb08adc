"""Evaluation metrics: Fréchet distance / FID, prompt bootstrap, image statistics, diversity, extractors."""

import math

import pytest
import torch

from r2d3.pretrained import WeightsError
from r2d3.eval.bootstrap import bootstrap_ci, bootstrap_statistic
from r2d3.eval.diversity import diversity
from r2d3.eval.extractors import (ExtractorWeightsError, load_extractor, pool_views, prompt_similarity,
                                  view_features)
from r2d3.config import RenderConfig, SamplerConfig
from r2d3.text import hf_word_tokenizer
from r2d3.eval.fid import feature_stats, fid, fid_bootstrap, frechet_distance, multiview_fid
from r2d3.eval.image_stats import image_stats
from r2d3.data.prompts import select_prompts
from r2d3.eval.summary import summarize
from r2d3.pipeline import initial_noise, noise_seed


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu_a = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    mu_b = torch.tensor([1.5, 0.0, 2.0], dtype=torch.float64)
    var_a = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    var_b = torch.tensor([9.0, 1.0, 0.25], dtype=torch.float64)
    want = float((mu_a - mu_b).pow(2).sum() + (var_a.sqrt() - var_b.sqrt()).pow(2).sum())  # 2 + 4 + 1 = 7
    assert want == pytest.approx(7.0)
    assert frechet_distance(mu_a, torch.diag(var_a), mu_b, torch.diag(var_b)) == pytest.approx(want, abs=1e-12)


def test_frechet_distance_matches_closed_form_for_non_commuting_covariances():
    # 2x2: tr sqrt(A^1/2 B A^1/2) = sqrt(tr(AB) + 2 sqrt(det A det B))
    a = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.5, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    mu_a, mu_b = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0.3, -0.2], dtype=torch.float64)
    tr_sqrt = math.sqrt(float(torch.trace(a @ b)) + 2 * math.sqrt(float(torch.det(a) * torch.det(b))))
    want = float((mu_a - mu_b).pow(2).sum() + torch.trace(a) + torch.trace(b)) - 2 * tr_sqrt
    assert frechet_distance(mu_a, a, mu_b, b) == pytest.approx(want, abs=1e-12)
    assert frechet_distance(mu_a, a, mu_b, b) == pytest.approx(frechet_distance(mu_b, b, mu_a, a), abs=1e-12)
    assert frechet_distance(mu_a, a, mu_a, a) == pytest.approx(0.0, abs=1e-12)


def test_fid_estimate_approaches_the_closed_form_for_large_samples():
    g = torch.Generator().manual_seed(0)
    n, d = 20000, 3
    la = torch.tensor([[1.0, 0, 0], [0.5, 1.0, 0], [0, -0.3, 0.7]], dtype=torch.float64)
    lb = torch.tensor([[0.8, 0, 0], [0, 1.2, 0], [0.4, 0, 0.5]], dtype=torch.float64)
    mu_b = torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64)
    xa = torch.randn(n, d, generator=g, dtype=torch.float64) @ la.T
    xb = torch.randn(n, d, generator=g, dtype=torch.float64) @ lb.T + mu_b
    want = frechet_distance(torch.zeros(d, dtype=torch.float64), la @ la.T, mu_b, lb @ lb.T)
    assert fid(xa, xb) == pytest.approx(want, rel=0.05)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_perturbation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)  # fewer samples than a full-rank estimate would like
    assert fid(x, x) == pytest.approx(0.0, abs=1e-9)
    direction = torch.randn(64, 16, generator=g)
    values = [fid(x, x + s * direction) for s in (0.0, 0.1, 0.3, 1.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-9)
    assert all(b > a for a, b in zip(values, values[1:])), values
    shifts = [fid(x, x + s) for s in (0.0, 0.5, 1.0)]  # a mean shift adds exactly D * s^2
    assert shifts[1] == pytest.approx(16 * 0.25, rel=1e-6) and shifts[2] == pytest.approx(16.0, rel=1e-6)


def test_feature_stats_use_the_unbiased_covariance():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, cov = feature_stats(x)
    assert torch.allclose(mu, torch.tensor([2.0, 4.0], dtype=torch.float64))
    assert torch.allclose(cov, torch.cov(x.double().T))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(x[:1])


def test_multiview_fid_with_the_embedded_extractor():
    extractor = load_extractor("clip_tiny")
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(12, 2, 3, 32, 32, generator=g)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 3, 1, 1)
    assert multiview_fid(extractor, rgb, rgb) == pytest.approx(0.0, abs=1e-9)
    values = [multiview_fid(extractor, rgb, (1 - s) * rgb + s * red) for s in (0.2, 0.5, 0.9)]
    assert 0 < values[0] < values[1] < values[2], values


def test_bootstrap_intervals_keep_seeds_together_and_contain_the_mean():
    values = torch.tensor([[1.0, 1.2], [2.0, 2.2], [3.0, 3.2], [4.0, 4.2]]).flatten()
    lo, hi = bootstrap_ci(values, groups=4)
    assert lo <= float(values.mean()) <= hi and lo >= 1.1 and hi <= 4.1
    assert bootstrap_ci(torch.full((6,), 0.5), groups=3) == (0.5, 0.5)
    assert bootstrap_ci(values, 4) == bootstrap_ci(values, 4)  # fixed generator: reproducible
    lo, hi = bootstrap_statistic(lambda idx: float(idx.float().mean()), groups=5, draws=100)
    assert 0 <= lo <= 2 <= hi <= 4


def test_fid_bootstrap_is_paired_over_prompts():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(8 * 3, 4, generator=g)
    lo, hi = fid_bootstrap(a, a, groups=8, draws=50)
    assert lo == pytest.approx(0.0, abs=1e-9) and hi == pytest.approx(0.0, abs=1e-9)  # same prompts both sides
    lo, hi = fid_bootstrap(a, a + 1.0, groups=8, draws=50)  # a pure mean shift: 4 * 1^2 in every resample
    assert lo == pytest.approx(4.0) and hi == pytest.approx(4.0)
    b = a + 0.3 * torch.randn(8 * 3, 4, generator=g)
    point = fid(a, b)
    lo, hi = fid_bootstrap(a, b, groups=8, draws=100)  # bias-corrected: around the point estimate
    assert lo < point < hi


def test_diversity_is_zero_for_identical_samples_and_positive_otherwise():
    same = torch.randn(1, 8).expand(4, 8)
    assert float(diversity(same, metric="rms")) == 0.0
    assert float(diversity([same, same])) == 0.0
    assert float(diversity(torch.randn(4, 8), metric="rms")) > 0


def _render(rgb, alpha):
    return rgb[None, None], alpha[None, None]


def test_image_stats_on_known_images():
    h = w = 16
    grey = torch.full((3, h, w), 0.5)
    full = torch.ones(1, h, w)
    s = image_stats(_render(grey, full))
    assert float(s["saturation"]) == 0.0 and float(s["contrast"]) == 0.0 and float(s["edge_density"]) == 0.0
    assert float(s["background_coverage"]) == 0.0
    red = torch.zeros(3, h, w)
    red[0] = 0.8
    assert float(image_stats(_render(red, full))["saturation"]) == pytest.approx(1.0)
    empty = image_stats(_render(torch.ones(3, h, w), torch.zeros(1, h, w)))
    assert float(empty["background_coverage"]) == 1.0 and float(empty["saturation"]) == 0.0
    half = torch.zeros(3, h, w)
    half[:, :, w // 2:] = 1.0  # one vertical step edge: the two columns next to it respond
    s = image_stats(_render(half, full))
    assert float(s["edge_density"]) == pytest.approx(2 / w)
    assert float(s["contrast"]) == pytest.approx(0.5)


def test_prompt_similarity_is_the_view_mean_of_cosines():
    views = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one asset, two views
    text = torch.tensor([[1.0, 0.0]])
    assert float(prompt_similarity(views, text)) == pytest.approx(0.5)


def test_clip_tiny_extractor_similarity_equals_the_clip_tiny_reward():
    from r2d3.render.output import RenderOutput
    from r2d3.rewards import build_reward

    extractor = load_extractor("clip_tiny")
    rgb = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = ["a red cube", "a blue sphere"]
    vf = view_features(extractor, rgb)
    assert vf.shape == (2, 3, 64) and pool_views(vf).shape == (2, 64)
    sim = prompt_similarity(vf, extractor.text_features(prompts))
    render = RenderOutput(rgb, torch.ones(2, 3, 1, 32, 32), torch.zeros(2, 3, 1, 32, 32),
                          torch.zeros(2, 3, 3, 32, 32), None)
    assert torch.allclose(sim, build_reward("clip_tiny")(render, prompts), atol=1e-5)


def test_missing_weights_raise_clear_errors(tmp_path):
    missing = tmp_path / "nothing-here"
    with pytest.raises(ExtractorWeightsError, match="nothing-here.*CLIPModel.save_pretrained"):
        load_extractor(f"clip:{missing}")
    with pytest.raises(ExtractorWeightsError, match="nothing-here.*image backbone"):
        load_extractor(f"vision:{missing}")
    with pytest.raises(WeightsError, match="nothing-here"):
        load_extractor(f"clip_tiny:{missing}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExtractorWeightsError, match="config.json"):
        load_extractor(f"clip:{tmp_path / 'empty'}")
    with pytest.raises(ExtractorWeightsError, match="missing config.json, model.safetensors"):
        load_extractor(f"vision:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="needs a local weights path"):
        load_extractor("clip")
    with pytest.raises(ValueError, match="unknown extractor"):
        load_extractor("dinov2:/x")


def _tiny_clip(path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config={"vocab_size": 16, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 12},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(path)
    return hf_word_tokenizer(["a", "red", "blue", "cube", "sphere"], lowercase=False)


def test_local_clip_extractor_loads_a_saved_model(tmp_path):
    path = tmp_path / "clip"
    tokenizer = _tiny_clip(path)
    extractor = load_extractor(f"clip:{path}")
    rgb = torch.rand(3, 3, 40, 24)  # any size: resized to the model's input
    feats = extractor.image_features(rgb)
    assert feats.shape == (3, 8) and torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(ExtractorWeightsError, match="tokenizer"):
        extractor.text_features(["a red cube"])
    tokenizer.save_pretrained(path)
    text = load_extractor(f"clip:{path}").text_features(["a red cube", "a blue sphere"])
    assert text.shape == (2, 8) and torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_vision_extractor_loads_a_saved_backbone_from_safetensors_only(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.ViTModel(config)
    model.save_pretrained(tmp_path / "vit")
    extractor = load_extractor(f"vision:{tmp_path / 'vit'}")
    images = torch.rand(4, 3, 20, 28)  # any size: resized to the backbone's input
    feats = extractor.image_features(images)
    x = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", antialias=True,
                                        align_corners=False).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.eval()(pixel_values=(x - mean) / std).pooler_output
    assert feats.shape == (4, 16) and torch.allclose(feats, expected, atol=1e-5) and not extractor.has_text
    with pytest.raises(TypeError, match="no text tower"):
        extractor.text_features(["a red cube"])
    (tmp_path / "vit" / "model.safetensors").rename(tmp_path / "vit" / "pytorch_model.bin")
    with pytest.raises(ExtractorWeightsError, match="missing model.safetensors"):  # no pickled weights
        load_extractor(f"vision:{tmp_path / 'vit'}")


def test_prompt_selection_and_noise_are_deterministic():
    prompts = [f"p{i}" for i in range(10)]
    assert select_prompts(prompts, 4) == ["p0", "p2", "p5", "p7"] and select_prompts(prompts, 50) == prompts
    assert noise_seed("a red cube", 0) == noise_seed("a red cube", 0) != noise_seed("a red cube", 1)
    assert noise_seed("a red cube", 0) != noise_seed("a blue cube", 0)
    noise = initial_noise([7, 8], num_steps=3, latent_shape=(5, 2))
    assert noise.shape == (2, 4, 5, 2)
    assert torch.equal(noise[1], torch.randn(4, 5, 2, generator=torch.Generator().manual_seed(8)))


def _rows(checkpoint, rewards, features, drift=0.0):
    rows = []
    for p, per_seed in enumerate(rewards):
        for s, r in enumerate(per_seed):
            rows.append({"checkpoint": checkpoint, "prompt_index": p, "seed_index": s, "reward": r,
                         "similarity": None, "drift_rgb_l2": drift, "diversity": 0.1,
                         "features": features[p * len(per_seed) + s].tolist()})
    return rows


def test_summary_pairs_checkpoints_and_measures_fid_against_the_base():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(6 * 2, 3, generator=g)
    base = _rows("base", [[0.1, 0.2]] * 6, feats)
    tuned = _rows("x/ckpt", [[0.3, 0.4]] * 6, feats + 0.5, drift=0.2)
    out = summarize(base + tuned, [f"p{i}" for i in range(6)], [0, 1], ["base", "x/ckpt"], draws=200, fid_draws=20)
    b, t = out["base"], out["x/ckpt"]
    assert b["fid_vs_base"] == pytest.approx(0.0, abs=1e-9) and b["reward_mean"] == pytest.approx(0.15)
    assert t["reward_delta_vs_base"] == pytest.approx(0.2) and t["reward_delta_ci95"] == pytest.approx([0.2, 0.2])
    assert t["fid_vs_base"] == pytest.approx(3 * 0.25, rel=1e-6) and t["drift_rgb_l2_mean"] == pytest.approx(0.2)
    assert "similarity_mean" not in t and "drift_rgb_l2_delta_vs_base" not in t
    assert t["diversity_delta_vs_base"] == pytest.approx(0.0) and "fid_disjoint_seeds" in b
    assert t["reward_delta_per_prompt"] == pytest.approx([0.2] * 6)
    with pytest.raises(ValueError, match="lacks 1 of the 12"):
        summarize(base + tuned[:-1], [f"p{i}" for i in range(6)], [0, 1], ["base", "x/ckpt"])


def test_frechet_reference_gives_the_same_distance_as_fid():
    from r2d3.eval.fid import FrechetReference, fid

    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(40, 6, generator=gen), torch.randn(50, 6, generator=gen) @ torch.randn(6, 6, generator=gen)
    ref = FrechetReference(b)
    assert ref.distance(a) == pytest.approx(fid(a, b), rel=1e-9)
    assert ref.distance(b) == pytest.approx(0.0, abs=1e-9)


def test_prompts_evaluated_together_equal_the_one_prompt_unit(tmp_path):
    from r2d3.jobs.evaluate import CheckpointSpec, EvalSettings, PromptEvaluator

    settings = EvalSettings(checkpoints=[CheckpointSpec("base")], seeds=[0, 1], previews=False,
                            sampler=SamplerConfig(num_steps=4), render=RenderConfig(num_views=2, resolution=16))
    ev = PromptEvaluator(settings)
    prompts = ["a red cube", "a small blue torus", "not a grammar prompt at all"]
    alone = [r for i, p in enumerate(prompts) for r in ev.evaluate_prompts([i], [p])]
    together = ev.evaluate_prompts(range(3), prompts, chunk=6)
    assert len(alone) == len(together) == 6
    for a, b in zip(alone, together):
        assert (a["prompt"], a["seed"], a["noise_seed"]) == (b["prompt"], b["seed"], b["noise_seed"])
        for m in ("reward", "similarity", "drift_rgb_l2", "diversity", "diversity_latent", "color_ok", "shape_ok"):
            if a[m] is None:
                assert b[m] is None, m
            else:
                assert b[m] == pytest.approx(a[m], rel=1e-4, abs=1e-5), m
        assert torch.allclose(torch.tensor(a["features"]), torch.tensor(b["features"]), atol=1e-5)
    assert together[-1]["color_ok"] is None and together[0]["color_ok"] is not None
