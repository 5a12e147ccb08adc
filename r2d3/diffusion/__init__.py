"""Stochastic diffusion sampling with everything the alignment losses need, on diffusers schedulers.

- :mod:`~r2d3.diffusion.schedules` -- build sampler-ready diffusers schedulers (DDIM, 1st-order
  SDE-DPM-Solver++) from explicit parameters or from a backend's saved scheduler config;
- :mod:`~r2d3.diffusion.sampler` -- :class:`StochasticSampler`: per-step Gaussian mean/std differentiable in
  the model output, x̂_0 at the current and the next latent, log-prob, score, whole-trajectory sampling;
- :mod:`~r2d3.diffusion.trajectory` -- :class:`Trajectory`, what a sampling run records (shapes there);
- :mod:`~r2d3.diffusion.guidance` -- classifier-free guidance wrapper;
- :mod:`~r2d3.diffusion.gaussian` -- Gaussian log-density and score of a step.
"""

from r2d3.diffusion.gaussian import gaussian_log_prob, gaussian_score
from r2d3.diffusion.guidance import ConditionalDenoiser, Conditioning, ModelFn, cfg_combine, guided_model_fn
from r2d3.diffusion.sampler import StepOutput, StochasticSampler
from r2d3.diffusion.schedules import (
    PREDICTION_TYPES,
    SCHEDULER_KINDS,
    make_scheduler,
    scheduler_from_config,
    scheduler_kind,
)
from r2d3.diffusion.trajectory import Trajectory

__all__ = [
    "PREDICTION_TYPES",
    "SCHEDULER_KINDS",
    "ConditionalDenoiser",
    "Conditioning",
    "ModelFn",
    "StepOutput",
    "StochasticSampler",
    "Trajectory",
    "cfg_combine",
    "gaussian_log_prob",
    "gaussian_score",
    "guided_model_fn",
    "make_scheduler",
    "scheduler_from_config",
    "scheduler_kind",
]
