"""Evaluation of the prior: measures that are not the alignment rewards.

- :mod:`r2d3.eval.prompt_following`: colour (analytic) and shape (silhouette CNN) accuracy against
  the prompt;
- :mod:`r2d3.eval.diversity`: diversity across seeds and drift between two models' samples;
- :mod:`r2d3.eval.procedural_views`: cached ground-truth renders of procedural objects.
"""

from r2d3.eval.color import dominant_colours, srgb_to_lab
from r2d3.eval.diversity import chamfer_distance, diversity, drift, rms_distance, ssim
from r2d3.eval.prompt_following import colour_accuracy, expected_attributes, prompt_following
from r2d3.eval.shape_classifier import ShapeClassifier, classify_shapes, load_shape_classifier

__all__ = [
    "ShapeClassifier",
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
