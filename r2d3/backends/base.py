"""The backend protocol: what a 3D-native text-to-3D diffusion model must offer to be aligned.

A backend bundles a frozen text encoder, a LoRA-adaptable denoiser, the diffusers scheduler it was
trained with and a differentiable decoder from clean latents to :class:`~r2d3.render.Gaussians`.
Samplers and alignment losses only talk to this protocol, never to a concrete model.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from r2d3.plugins import load_plugins
from r2d3.render.gaussians import Gaussians
from r2d3.text import PromptEmbeds


@runtime_checkable
class Backend(Protocol):
    """Everything samplers, alignment losses, the training loop and the sample / eval jobs read from a model.

    Every member below is read by some caller, so every backend defines every member explicitly (no
    ``getattr`` fallback is needed; ``tests/test_backend_conformance.py`` checks each backend against this
    protocol). Members that callers read but that cannot be part of the structural check:

    * ``text_encoder`` (an ``nn.Module``) *or* ``encoder_fingerprint() -> str``: read by
      :func:`r2d3.data.embeddings.encoder_fingerprint` to tell precomputed prompt embeddings of different
      encoders apart. Not a protocol member because DiffSplat loads its T5 lazily behind a property and
      ``isinstance(backend, Backend)`` would load (or fail to load) it.
    """

    name: str
    """The registry name (``load_backend(name)``); checkpoints, logs and embedding fingerprints carry it so
    a LoRA or an embedding file is never applied to another model."""

    denoiser: nn.Module
    """The module that LoRA adapts (``denoise`` runs it; its own forward signature is the backend's
    business). Training freezes it, adds the adapter to it and saves only the adapter's weights."""

    lora_target_modules: list[str]
    """Module-name suffixes of ``denoiser`` that LoRA targets by default (peft ``target_modules``); each
    must match at least one peft-adaptable layer, else the adapter silently trains less than intended."""

    scheduler_config: dict[str, Any]
    """The diffusers scheduler config the model was trained with (``prediction_type`` included), from which
    :func:`r2d3.diffusion.scheduler_from_config` builds the sampler's schedule, so sampling uses exactly the
    training noise levels."""

    final_x0: bool
    """``True`` makes samplers end with the model's x̂_0 at the last state (see
    ``StochasticSampler.sample``), for schedules whose cleanest training level is still noisy (Shap-E);
    ``False`` keeps the last stochastic step's latent, as the losses' trajectories do. Read by the training
    loop, ``r2d3.sample`` and the DRaFT algorithm."""

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent, without the batch axis: the sampler draws ``x_T`` of
        ``[B, *latent_shape]`` and ``denoise`` / ``decode`` take that shape."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the denoiser's weights are: callers put noise, cameras and latents there before calling
        ``denoise`` / ``decode`` (the training loop, ``r2d3.sample``, the algorithms' camera sampling)."""
        ...

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Frozen text embeddings of ``prompts`` (``""`` is the unconditional prompt of classifier-free
        guidance); deterministic, row ``i`` depending on prompt ``i`` only, so embeddings can be precomputed
        and batched freely."""
        ...

    def denoise(self, x: Tensor, t: Tensor, cond: PromptEmbeds) -> Tensor:
        """The model output (in ``scheduler_config["prediction_type"]``) for latents ``x`` ``[B, *latent_shape]``
        at training timesteps ``t`` (``[B]`` or a scalar), differentiable in the LoRA parameters; row ``i``
        depends on row ``i`` of each input only."""
        ...

    def decode(self, latents: Tensor) -> Gaussians:
        """Clean latents ``[B, *latent_shape]`` -> valid :class:`~r2d3.render.Gaussians` ``[B, N, ...]``,
        differentiable in the latents (reward gradients flow back through it), per sample."""
        ...


_REGISTRY: dict[str, Callable[..., Backend]] = {}


_SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {}


def register_backend(name: str, sampler_defaults: Mapping[str, Any] | None = None
                     ) -> Callable[[Callable[..., Backend]], Callable[..., Backend]]:
    """Register a backend factory (``factory(weights=..., device=...) -> Backend``) under ``name``.

    ``sampler_defaults`` are the model's own sampling settings (``SamplerConfig`` fields, e.g. DiffSplat's
    20-step SDE-DPM-Solver++ at CFG 5): the inference jobs use them for every sampler option they are not
    given. They are registered with the name, not read from a loaded model, so a job knows (and records)
    its sampler before any weights load."""
    def wrap(factory: Callable[..., Backend]) -> Callable[..., Backend]:
        _REGISTRY[name] = factory
        _SAMPLER_DEFAULTS[name] = dict(sampler_defaults or {})
        return factory

    return wrap


def sampler_defaults(name: str) -> dict[str, Any]:
    """A copy of backend ``name``'s own sampler settings (empty: r2d3's ``SamplerConfig`` defaults apply)."""
    _check_name(name)
    return dict(_SAMPLER_DEFAULTS[name])


def available_backends() -> list[str]:
    load_plugins()
    return sorted(_REGISTRY)


def load_backend(name: str, **kwargs: Any) -> Backend:
    """Build a backend by registry name (``tiny``, ...); unknown names list the valid ones."""
    _check_name(name)
    return _REGISTRY[name](**kwargs)


def _check_name(name: str) -> None:
    if name not in available_backends():
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(available_backends())}")
