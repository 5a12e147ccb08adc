"""Noise schedules for the stochastic sampler, built on diffusers schedulers.

Why diffusers: the schedule numbers (betas, ``alphas_cumprod``, inference timesteps, DPM sigmas) must be
exactly those the pretrained denoiser was trained and sampled with, and a backend ships them as a diffusers
``scheduler_config.json`` next to its weights. So r2d3 never re-derives a schedule: it builds a diffusers
scheduler from that config and only *overrides the settings that decide how one step is taken*, so that
every step is a Gaussian whose mean is linear in the network output (see :mod:`r2d3.diffusion.sampler`).

Two kinds of sampler are supported (``SCHEDULER_KINDS``):

``"ddim"`` -- :class:`diffusers.DDIMScheduler`; ``eta`` in [0, 1] is chosen by the sampler (eta = 1 is the
    DDPM-like ancestral sampler used by Nabla-GFlowNet). Forced settings:

    - ``clip_sample=False`` and ``thresholding=False``: clipping / dynamic thresholding of x̂_0 would make the
      step mean a non-linear (and, at the clip, non-differentiable) function of the model output;
    - ``set_alpha_to_one=False``: the last step then lands on the noise level of training timestep 0
      (ᾱ = alphas_cumprod[0] < 1) instead of ᾱ = 1, so its std is > 0 and the score of the final transition
      -- which Nabla-GFlowNet always trains -- is finite. This mirrors ``final_sigmas_type="sigma_min"``.

``"sde-dpmsolver++"`` -- :class:`diffusers.DPMSolverMultistepScheduler` as first-order SDE-DPM-Solver++
    (the Nabla-R2D3 sampler). Forced settings: ``algorithm_type="sde-dpmsolver++"``, ``solver_order=1``
    (a one-step Gaussian kernel; higher orders mix previous outputs into the mean),
    ``final_sigmas_type="sigma_min"`` (final noise level = that of timestep 0, not 0, so the last std and
    score are finite), ``lower_order_final=True`` and ``euler_at_final=False`` (no-ops at order 1, set so the
    saved config says what runs), ``thresholding=False``, ``variance_type=None`` (the model output must have
    the latent's shape; a backend with a learned-variance head drops that half itself) and
    ``use_flow_sigmas=False`` (the sampler assumes a variance-preserving schedule).

Prediction types (``PREDICTION_TYPES``): ``"epsilon"``, ``"v_prediction"`` and ``"sample"``; for all three
x̂_0 is linear in (x_t, model output), which keeps the step mean differentiable and Gaussian.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from r2d3.config import SAMPLER_KINDS

SCHEDULER_KINDS: tuple[str, ...] = SAMPLER_KINDS  # the config names the kinds; this module implements them
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")

_SCHEDULER_CLASSES: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "sde-dpmsolver++": DPMSolverMultistepScheduler,
}

# Settings that decide how a step is taken; forced so that every step is a Gaussian with a mean linear in
# the model output and a finite, non-zero std (see the module docstring for the reason behind each).
_SAMPLER_SETTINGS: dict[str, dict[str, Any]] = {
    "ddim": {"clip_sample": False, "thresholding": False, "set_alpha_to_one": False},
    "sde-dpmsolver++": {
        "algorithm_type": "sde-dpmsolver++",
        "solver_order": 1,
        "final_sigmas_type": "sigma_min",
        "lower_order_final": True,
        "euler_at_final": False,
        "thresholding": False,
        "variance_type": None,
        "use_flow_sigmas": False,
    },
}

# Settings without which the sampler's closed-form step would disagree with the scheduler's own ``step``.
# ``set_alpha_to_one`` / ``final_sigmas_type="zero"`` are allowed: they only make the last step deterministic.
_REQUIRED_FOR_SAMPLER: dict[str, dict[str, Any]] = {
    "ddim": {"clip_sample": False, "thresholding": False},
    "sde-dpmsolver++": {
        "algorithm_type": "sde-dpmsolver++",
        "solver_order": 1,
        "thresholding": False,
        "variance_type": None,
        "use_flow_sigmas": False,
    },
}

_CLASS_NAME_TO_KIND: dict[str, str] = {cls.__name__: kind for kind, cls in _SCHEDULER_CLASSES.items()}


def _normalise_kind(kind: str) -> str:
    if not isinstance(kind, str) or kind.strip().lower() not in SCHEDULER_KINDS:
        raise ValueError(f"unknown scheduler kind {kind!r}; valid kinds: {', '.join(SCHEDULER_KINDS)}")
    return kind.strip().lower()


def _check_prediction_type(prediction_type: Any) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; valid prediction types: {', '.join(PREDICTION_TYPES)}"
        )


def scheduler_from_config(
    config: Mapping[str, Any], kind: str | None = None, **overrides: Any
) -> SchedulerMixin:
    """Build a sampler-ready diffusers scheduler from a diffusers scheduler config.

    This is the path a backend takes: its saved ``scheduler_config.json`` (any diffusers scheduler class)
    supplies the schedule (betas, ``num_train_timesteps``, ``timestep_spacing``, ``steps_offset``,
    ``prediction_type``, ...); the step-defining settings of ``kind`` are then forced (module docstring).

    Args:
        config: a diffusers scheduler config (``dict`` or ``scheduler.config``). ``_class_name`` picks the
            kind when ``kind`` is None.
        kind: one of ``SCHEDULER_KINDS``; overrides ``_class_name`` (e.g. sample a model shipped with a
            DPM-Solver config with DDIM).
        **overrides: config keys to replace (e.g. ``prediction_type="v_prediction"``). Overriding a forced
            step setting with another value is an error.

    Raises:
        ValueError: unknown kind / class name, unknown prediction type, beta schedule or timestep spacing,
            or an override that contradicts a forced setting.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"scheduler config must be a mapping (a diffusers config dict), got {type(config)}")
    if kind is None:
        class_name = config.get("_class_name")
        if class_name not in _CLASS_NAME_TO_KIND:
            raise ValueError(
                f"cannot infer the scheduler kind from _class_name={class_name!r}; pass kind= one of "
                f"{', '.join(SCHEDULER_KINDS)} (known classes: {', '.join(_CLASS_NAME_TO_KIND)})"
            )
        kind = _CLASS_NAME_TO_KIND[class_name]
    kind = _normalise_kind(kind)
    forced = _SAMPLER_SETTINGS[kind]
    for key, value in overrides.items():
        if key in forced and value != forced[key]:
            raise ValueError(
                f"scheduler setting {key}={value!r} is not allowed for kind {kind!r}: the stochastic sampler "
                f"needs {key}={forced[key]!r}"
            )
    merged = {**dict(config), **overrides}
    _check_prediction_type(merged.get("prediction_type", "epsilon"))
    if merged.get("trained_betas") is None and merged.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise ValueError(
            f"unknown beta_schedule {merged.get('beta_schedule')!r}; valid: {', '.join(BETA_SCHEDULES)}"
        )
    spacing = merged.get("timestep_spacing")
    if spacing is not None and spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")
    num_train = merged.get("num_train_timesteps", 1000)
    if not isinstance(num_train, int) or isinstance(num_train, bool) or num_train < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train!r}")
    merged.update(forced)
    return _SCHEDULER_CLASSES[kind].from_config(merged)


def make_scheduler(
    kind: str,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "trailing",
    steps_offset: int = 0,
    trained_betas: Sequence[float] | None = None,
) -> SchedulerMixin:
    """Build a sampler-ready diffusers scheduler from explicit schedule parameters.

    The defaults are the DDPM / Stable-Diffusion / PixArt linear schedule (beta 1e-4 -> 0.02 over 1000
    steps). ``timestep_spacing="trailing"`` makes the first step start at the noisiest training timestep
    (999) and, for DDIM, keeps each step's target noise level equal to the next inference timestep's.
    Save ``scheduler.config`` with a model; :func:`scheduler_from_config` rebuilds the same scheduler.

    Raises:
        ValueError: unknown kind (the message lists the valid kinds), prediction type, beta schedule,
            timestep spacing, or betas outside (0, 1).
    """
    kind = _normalise_kind(kind)
    if trained_betas is None and not (0.0 < beta_start <= beta_end < 1.0):
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    config: dict[str, Any] = {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": beta_schedule,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "prediction_type": prediction_type,
        "timestep_spacing": timestep_spacing,
        "steps_offset": steps_offset,
        "trained_betas": list(trained_betas) if trained_betas is not None else None,
    }
    return scheduler_from_config(config, kind=kind)


def scheduler_kind(scheduler: SchedulerMixin) -> str:
    """The sampler kind of a diffusers scheduler instance, after checking the sampler can use it.

    Raises:
        ValueError: an unsupported scheduler class, an unknown prediction type, or a step setting that makes
            the step non-Gaussian or non-linear in the model output (e.g. ``clip_sample=True``,
            ``solver_order=2``); the message names the setting and how to fix it.
    """
    kind = next((k for k, cls in _SCHEDULER_CLASSES.items() if isinstance(scheduler, cls)), None)
    if kind is None:
        raise ValueError(
            f"unsupported scheduler {type(scheduler).__name__}; the stochastic sampler supports "
            f"{', '.join(cls.__name__ for cls in _SCHEDULER_CLASSES.values())} (kinds: {', '.join(SCHEDULER_KINDS)})"
        )
    config = scheduler.config
    _check_prediction_type(config.get("prediction_type"))
    for key, value in _REQUIRED_FOR_SAMPLER[kind].items():
        if config.get(key) != value:
            raise ValueError(
                f"{type(scheduler).__name__} has {key}={config.get(key)!r}, but the stochastic sampler needs "
                f"{key}={value!r}; build the scheduler with r2d3.diffusion.make_scheduler or scheduler_from_config"
            )
    return kind
