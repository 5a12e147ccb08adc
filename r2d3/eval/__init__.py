"""Evaluation of the prior: measures that are not the alignment rewards.

- :mod:`r2d3.eval.prompt_following`: colour (analytic) and shape (silhouette CNN) accuracy against
  the prompt;
- :mod:`r2d3.eval.diversity`: diversity across seeds and drift between two models' samples;
- :mod:`r2d3.data.procedural.views`: cached ground-truth renders of procedural objects;
- :mod:`r2d3.eval.fid`: multi-view FID (Fréchet distance of per-asset pooled image features);
- :mod:`r2d3.eval.extractors`: feature extractors / image–text models (clip_tiny, local CLIP, a local vision backbone);
- :mod:`r2d3.eval.image_stats`: saturation, contrast, background coverage, edge density;
- :mod:`r2d3.eval.bootstrap`: intervals by resampling prompts;
- :mod:`r2d3.jobs.evaluate` and :mod:`r2d3.eval.report`: the evaluation job's work unit, summary and report
  (run on Ray Data by :mod:`r2d3.ray.evaluate`, ``pipelines/evaluate.py``).
"""

from r2d3.eval.bootstrap import bootstrap_ci, bootstrap_replicates, bootstrap_statistic
from r2d3.eval.color import dominant_colours, srgb_to_lab
from r2d3.eval.diversity import chamfer_distance, diversity, drift, rms_distance, ssim
from r2d3.eval.extractors import FeatureExtractor, load_extractor, pool_views, prompt_similarity, view_features
from r2d3.eval.fid import feature_stats, fid, fid_bootstrap, frechet_distance, multiview_fid
from r2d3.eval.image_stats import image_stats
from r2d3.eval.prompt_following import colour_accuracy, expected_attributes, prompt_following
from r2d3.eval.shape_classifier import ShapeClassifier, classify_shapes, load_shape_classifier

__all__ = [
    "FeatureExtractor",
    "ShapeClassifier",
    "bootstrap_ci",
    "bootstrap_replicates",
    "bootstrap_statistic",
    "feature_stats",
    "fid",
    "fid_bootstrap",
    "frechet_distance",
    "image_stats",
    "load_extractor",
    "multiview_fid",
    "pool_views",
    "prompt_similarity",
    "view_features",
    "chamfer_distance",
    "classify_shapes",
    "colour_accuracy",
    "diversity",
    "dominant_colours",
    "drift",
    "expected_attributes",
    "load_shape_classifier",
    "prompt_following",
    "rms_distance",
    "srgb_to_lab",
    "ssim",
]
