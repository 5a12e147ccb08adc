"""The one inference pipeline: backend -> stochastic sampler -> decoder -> renderer -> reward.

Training, the evaluation job, regeneration, ``r2d3.sample`` and the sweep baseline all sample through
:meth:`Pipeline.generate`, so a sample is the same function of its prompt and noise everywhere, and
each final sample is decoded and rendered once (the renders that are scored are the ones returned).

Noise: evaluation, regeneration and ``r2d3.sample`` draw sample ``(prompt, seed)`` from
``torch.Generator().manual_seed(noise_seed(prompt, seed))`` as ``[1 + K, *latent_shape]`` (x_T, then the
K step noises), so ``python -m r2d3.sample PROMPT --seeds S`` redraws any evaluated or regenerated asset
and the training job's held-out numbers equal those of ``pipelines/evaluate.py``. ``noise_seed`` hashes
the prompt with the seed, so different prompts get independent noise (the prompt bootstrap needs that).
Training draws its noise from the run's checkpointed generator (:meth:`Pipeline.noise`).
"""

from __future__ import annotations

import dataclasses

import hashlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from r2d3.backends.base import Backend
from r2d3.backends.lora import adapters_disabled
from r2d3.text import PromptEmbeds
from r2d3.config import RenderConfig, SamplerConfig
from r2d3.diffusion import StochasticSampler, Trajectory, guided_model_fn, scheduler_from_config
from r2d3.render import render_gaussians
from r2d3.render.cameras import Cameras, jittered_orbit_cameras
from r2d3.render.gaussians import Gaussians
from r2d3.render.output import RenderOutput

#: rewards ``[B]`` of rendered views for ``prompts`` (the reward model's call)
RewardFn = Callable[[RenderOutput, Sequence[str]], Tensor]
#: Rewards ``[B]`` (mean over views) of decoded assets seen by ``cameras`` for ``prompts``, differentiable
#: in the Gaussians' tensors: the seam where render + reward can move out of the trainer's process.
Scorer = Callable[[Gaussians, Cameras, Sequence[str]], Tensor]


def noise_seed(prompt: str, seed: int) -> int:
    """The generator seed of sample ``(prompt, seed)``: a 63-bit hash of both."""
    digest = hashlib.sha256(f"{seed}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_noise(noise_seeds: Sequence[int], num_steps: int, latent_shape: Sequence[int]) -> Tensor:
    """``[N, 1 + K, *S]`` noise, row ``i`` drawn from ``torch.Generator().manual_seed(noise_seeds[i])``."""
    return torch.stack([torch.randn(1 + num_steps, *latent_shape, generator=torch.Generator().manual_seed(s))
                        for s in noise_seeds])


@dataclass
class Generation:
    """What one call of :meth:`Pipeline.generate` made, row ``i`` from ``prompts[i]`` and its noise.

    ``trajectory`` and ``cond`` are kept for training (the losses read them); ``renders`` are the
    scored views (None when a remote scorer rendered them); ``rewards`` is None when not scored."""

    prompts: list[str]
    latents: Tensor  # [B, *S] final samples x_0
    gaussians: Gaussians
    cameras: Cameras
    renders: RenderOutput | None
    rewards: Tensor | None
    trajectory: Trajectory | None = None
    cond: PromptEmbeds | None = None

    @staticmethod
    def cat(items: Sequence[Generation]) -> Generation:
        """Chunks of one generation joined (renders, rewards, latents and Gaussians; not trajectories)."""
        renders = None
        if all(g.renders is not None for g in items):
            renders = RenderOutput(*(torch.cat([getattr(g.renders, k) for g in items])
                                     for k in ("rgb", "alpha", "depth", "normal")), items[0].renders.cameras)
        rewards = torch.cat([g.rewards for g in items]) if all(g.rewards is not None for g in items) else None
        return Generation(sum((g.prompts for g in items), []), torch.cat([g.latents for g in items]),
                          Gaussians.cat([g.gaussians for g in items]), items[0].cameras, renders, rewards)


@dataclass
class Pipeline:
    """The frozen pieces every job samples with (the trained LoRA lives inside ``backend.denoiser``).

    ``reward_fn`` scores renders in this process; ``scorer``, when set, replaces render + reward after
    decoding (a pool of remote render/reward actors, say), and then the trainer needs no reward model.
    Decoding and the denoiser's chain rule stay here either way."""

    backend: Backend
    sampler: StochasticSampler
    render: RenderConfig
    guidance_scale: float
    uncond: PromptEmbeds  # the empty prompt, one row
    reward_fn: RewardFn | None = None
    scorer: Scorer | None = None
    #: record the network's whole output in training trajectories (``Trajectory.extra_outputs``), for an
    #: algorithm that regularises it (``nabla_gfn`` with ``proximal_outputs=full``); needs ``backend.denoise_full``
    record_full_outputs: bool = False

    @classmethod
    def build(cls, backend: Backend, sampler: SamplerConfig, render: RenderConfig, reward_fn: RewardFn | None = None,
              scorer: Scorer | None = None) -> Pipeline:
        """The configured stochastic sampler over ``backend``'s scheduler, with its reward."""
        stochastic = StochasticSampler(scheduler_from_config(backend.scheduler_config, kind=sampler.kind),
                                       sampler.num_steps, eta=sampler.eta)
        return cls(backend, stochastic, render, sampler.guidance_scale, backend.encode_prompts([""]), reward_fn,
                   scorer)

    # ---- pieces the losses differentiate through

    def model_fn(self, cond: PromptEmbeds, full: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
        """The guided network output ``f(x, t)`` for these prompts (differentiable). ``full``: the network's
        whole output, the model output followed by the channels sampling ignores (``backend.denoise_full``),
        guidance applied to all of it as the reference pipeline does."""
        both = PromptEmbeds.cat([cond, self.uncond])
        cond, uncond = both[: len(cond)], both[len(cond):]
        network = self.backend.denoise_full if full else self.backend.denoise

        def denoise(x: Tensor, t: Tensor, c: dict[str, Tensor]) -> Tensor:
            return network(x, t, PromptEmbeds(c["tokens"], c["mask"]))

        return guided_model_fn(denoise, {"tokens": cond.tokens, "mask": cond.mask},
                               {"tokens": uncond.tokens, "mask": uncond.mask}, self.guidance_scale)

    def cameras(self, batch_size: int, generator: torch.Generator | None, jitter: bool = True) -> Cameras:
        """The reward cameras: ``render.num_views`` orbit views, jittered per asset for training, the
        canonical ones (no jitter, no generator) for evaluation and regeneration."""
        r = self.render
        cams = jittered_orbit_cameras(
            r.num_views, batch_size, generator=generator, elevation_deg=r.elevation_deg,
            elevation_jitter_deg=r.elevation_jitter_deg if jitter else 0.0,
            azimuth_jitter_deg=r.azimuth_jitter_deg if jitter else 0.0,
            distance=r.distance, fov_deg=r.fov_deg, width=r.resolution, height=r.resolution,
        )
        return cams.to(self.backend.device)

    def render_views(self, gaussians: Gaussians, cameras: Cameras) -> RenderOutput:
        return render_gaussians(gaussians, cameras, **self.render.raster_options())

    def score(self, gaussians: Gaussians, cameras: Cameras, prompts: Sequence[str], image_noise: float = 0.0,
              generator: torch.Generator | None = None) -> tuple[RenderOutput | None, Tensor]:
        """(renders, rewards ``[B]``) of decoded assets; differentiable in the Gaussians. With a scorer the
        renders are made (and discarded) where the reward runs. ``image_noise``: std of Gaussian noise
        (drawn from ``generator`` on the CPU) added to the rendered colours the reward sees, as the reference
        training code does (2e-3); the returned renders are the clean ones."""
        if self.scorer is not None:
            if image_noise:
                raise ValueError("reward image noise needs the reward in the trainer (scale.reward_actors=0)")
            return None, self.scorer(gaussians, cameras, prompts)
        if self.reward_fn is None:
            raise RuntimeError("this pipeline was built without a reward (reward_fn or scorer)")
        renders = self.render_views(gaussians, cameras)
        seen = renders
        if image_noise:
            noise = torch.randn(renders.rgb.shape, generator=generator, dtype=torch.float32)
            seen = dataclasses.replace(renders, rgb=renders.rgb + image_noise * noise.to(renders.rgb))
        return renders, self.reward_fn(seen, prompts)

    def reward_of_latents(self, x0: Tensor, prompts: Sequence[str], cameras: Cameras, image_noise: float = 0.0,
                          generator: torch.Generator | None = None) -> Tensor:
        """Decode -> render -> reward averaged over views, ``[B]``; differentiable in ``x0``."""
        return self.score(self.backend.decode(x0), cameras, prompts, image_noise, generator)[1]

    # ---- sampling

    def noise(self, batch_size: int, generator: torch.Generator | None) -> Tensor:
        """``[B, 1 + K, *S]`` noise from ``generator`` on the CPU (the same numbers on any device)."""
        return torch.randn(batch_size, 1 + self.sampler.num_steps, *self.backend.latent_shape, generator=generator)

    def seeded_noise(self, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        """The noise of samples ``(prompts[i], seeds[i])`` (the module's noise scheme)."""
        return initial_noise([noise_seed(p, s) for p, s in zip(prompts, seeds)], self.sampler.num_steps,
                             self.backend.latent_shape)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], noise: Tensor, *, generator: torch.Generator | None = None,
                 jitter: bool = False, score: bool = True, render: bool = True, base: bool = False,
                 keep_trajectory: bool = True, chunk: int | None = None) -> Generation:
        """Sample ``prompts`` from ``noise`` (``[B, 1 + K, *S]``: x_T, then the K step noises), decode, render
        with the reward cameras (jittered from ``generator`` when ``jitter``) and score.

        ``base`` samples the frozen network (LoRA adapters disabled); ``score=False`` skips the reward,
        ``render=False`` the renders too (``r2d3.sample``); ``chunk`` samples at most that many per model
        call and keeps no trajectories (evaluation sets larger than a batch)."""
        prompts = list(prompts)
        if chunk is not None and len(prompts) > chunk:
            return Generation.cat([self.generate(prompts[i: i + chunk], noise[i: i + chunk], score=score,
                                                 render=render, base=base, keep_trajectory=False)
                                   for i in range(0, len(prompts), chunk)])
        with adapters_disabled(self.backend.denoiser) if base else nullcontext():
            noise = noise.to(self.backend.device)
            cond = self.backend.encode_prompts(prompts)
            extras: list[Tensor] = []
            model_fn = self.model_fn(cond)
            if self.record_full_outputs and keep_trajectory:
                model_fn = _recording_extra(self.model_fn(cond, full=True), extras)
            traj = self.sampler.sample(model_fn, x_T=noise[:, 0], noises=noise[:, 1:], final_x0=self.backend.final_x0)
            if extras:  # one per step (a final x0 prediction adds one more, not a step's)
                traj = dataclasses.replace(traj, extra_outputs=torch.stack(extras[: traj.num_steps], dim=1))
        gaussians = self.backend.decode(traj.final)
        cameras = self.cameras(len(prompts), generator if jitter else None, jitter=jitter)
        renders, rewards = None, None
        if score:
            renders, rewards = self.score(gaussians, cameras, prompts)
        if render and renders is None:
            renders = self.render_views(gaussians, cameras)
        return Generation(prompts, traj.final, gaussians, cameras, renders, rewards,
                          traj if keep_trajectory else None, cond if keep_trajectory else None)


def _recording_extra(full_fn: Callable[[Tensor, Tensor], Tensor], extras: list[Tensor]
                     ) -> Callable[[Tensor, Tensor], Tensor]:
    """A model function for the sampler that evaluates the network's whole output once per call, returns the
    model output (the first ``x.shape[1]`` channels) and keeps the rest in ``extras``."""
    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        out = full_fn(x, t)
        extras.append(out[:, x.shape[1]:].detach())
        return out[:, : x.shape[1]]

    return model_fn


__all__ = ["Generation", "Pipeline", "RewardFn", "Scorer", "initial_noise", "noise_seed"]
