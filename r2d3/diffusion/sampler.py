"""A stochastic sampler over any denoiser that exposes each step as an explicit, differentiable Gaussian.

Why not just call ``scheduler.step``: the alignment losses need, for every transition x_t -> x_{t-1},
the step *mean* as a differentiable function of the (new) model output, its std, the log-density and the
score of the stored x_{t-1}, and x̂_0 at x_{t-1}. diffusers' ``step`` returns only the sample and keeps
internal state (DPM's step counter). Both supported kernels are, per step index j,

    x_{t-1} = μ_j + σ_j·z,   μ_j = a_j·x_t + b_j·x̂_0(x_t, model_output),   z ~ N(0, I)

with x̂_0 linear in (x_t, model_output) for every prediction type, so this module precomputes (a_j, b_j,
σ_j) and the x̂_0 coefficients once, from the diffusers scheduler's own numbers:

- DDIM (Song et al., eq. 12/16), ᾱ from ``alphas_cumprod``; ᾱ' is the noise level ``scheduler.step``
  moves to: ``alphas_cumprod[t - N // K]``, or ``final_alpha_cumprod`` past the first training step::

      σ_j = eta·sqrt((1-ᾱ')/(1-ᾱ)·(1-ᾱ/ᾱ')),  a_j = sqrt(1-ᾱ'-σ_j²)/sqrt(1-ᾱ),  b_j = sqrt(ᾱ') - a_j·sqrt(ᾱ)

- first-order SDE-DPM-Solver++ (VP form, α = 1/sqrt(1+σ̃²), s = σ̃·α from ``scheduler.sigmas``;
  e^{-h} = (α_j·s_{j+1})/(s_j·α_{j+1}))::

      a_j = (s_{j+1}/s_j)·e^{-h},  b_j = α_{j+1}·(1 - e^{-2h}),  σ_j = s_{j+1}·sqrt(1 - e^{-2h})

x̂_0 at noise level (α, s) with α² = ᾱ: ε-prediction ``(x - s·m)/α``, v-prediction ``α·x - s·m``,
sample-prediction ``m``.

Conventions for the *next* latent x_{t-1} of step j (used by the forward-looking reward gradient):

- ``alpha_bar_next[j]`` is ᾱ of the noise level x_{t-1} actually has after the step: DDIM's ᾱ' above
  (the last step's is ``alphas_cumprod[0]`` with ``set_alpha_to_one=False``), DPM's ``1/(1+σ̃_{j+1}²)``
  (the last one from ``sigma_min``, i.e. again ``alphas_cumprod[0]``). It scales the reward gradient
  (β·ᾱ or β·sqrt(ᾱ)) and defines x̂_0 at x_{t-1} (``predict_x0(..., at="next")``).
- ``next_timesteps[j]`` is the model-conditioning timestep for x_{t-1}: DDIM ``t_j - N // K``, DPM
  ``timesteps[j+1]``, and **0 for the last step** (x_0 sits at the noise level of training timestep 0).
  For DDIM with ``timestep_spacing="linspace"`` diffusers' step target ``t_j - N // K`` can differ from
  ``timesteps[j+1]`` (diffusers' own behaviour, reproduced); with "leading"/"trailing" they agree.
- Unlike the official Nabla-R2D3 code (method-notes §9 quirk 1), x̂_0 at x_{t-1} uses x_{t-1}'s own noise
  level, with no extra one-step shift.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Union

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from tqdm.auto import tqdm

from r2d3.diffusion.gaussian import gaussian_log_prob, gaussian_score
from r2d3.diffusion.guidance import Conditioning, ConditionalDenoiser, ModelFn, guided_model_fn
from r2d3.diffusion.schedules import scheduler_kind
from r2d3.diffusion.trajectory import Trajectory

StepIndex = Union[int, Tensor]
NoiseLevel = Literal["current", "next"]


@dataclass
class StepOutput:
    """One stochastic step: ``prev_sample = mean + std * noise`` (all ``[B, *S]``; std broadcastable)."""

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    noise: Tensor


def _x0_coefficients(alpha: Tensor, sigma: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(c_x, c_m) with x̂_0 = c_x·x + c_m·model_output at noise level x = alpha·x_0 + sigma·ε."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha.clone(), -sigma
    return torch.zeros_like(alpha), torch.ones_like(alpha)  # "sample" (validated by scheduler_kind)


class StochasticSampler:
    """K-step stochastic sampler (DDIM-eta or 1st-order SDE-DPM-Solver++) with explicit Gaussian steps.

    Args:
        scheduler: a diffusers ``DDIMScheduler`` or ``DPMSolverMultistepScheduler`` configured for the
            sampler (build it with :func:`~r2d3.diffusion.make_scheduler` or
            :func:`~r2d3.diffusion.scheduler_from_config`). It is copied, never mutated.
        num_steps: K, the number of sampling steps, 1 <= K <= num_train_timesteps.
        eta: DDIM noise scale in [0, 1] (1: DDPM-like, 0: deterministic DDIM). SDE-DPM-Solver++ has a
            fixed noise level, so it only accepts eta = 1.

    Per-step tables (index j = 0..K-1, float64 on CPU unless noted): ``timesteps`` / ``next_timesteps``
    (long), ``alpha_bar`` / ``alpha_bar_next``, ``stds``, ``mean_coef_sample`` (a_j), ``mean_coef_x0`` (b_j).
    Methods taking ``step_index`` accept an int or a long tensor ``[B]`` (one step per sample, for
    training on transitions drawn from different steps in one batch).
    """

    def __init__(self, scheduler: SchedulerMixin, num_steps: int, eta: float = 1.0) -> None:
        self.kind = scheduler_kind(scheduler)
        self.prediction_type: str = scheduler.config.prediction_type
        self.num_train_timesteps: int = int(scheduler.config.num_train_timesteps)
        if not isinstance(num_steps, int) or isinstance(num_steps, bool):
            raise ValueError(f"num_steps must be an int, got {num_steps!r}")
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_steps must be in [1, num_train_timesteps={self.num_train_timesteps}], got {num_steps}"
            )
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        if self.kind == "sde-dpmsolver++" and eta != 1.0:
            raise ValueError(
                f"eta={eta} is only meaningful for DDIM; SDE-DPM-Solver++ has a fixed noise level (use eta=1.0)"
            )
        self.num_steps = num_steps
        self.eta = float(eta)
        self.scheduler = copy.deepcopy(scheduler)
        self.scheduler.set_timesteps(num_steps)
        if len(self.scheduler.timesteps) != num_steps:
            raise ValueError(
                f"{type(scheduler).__name__}.set_timesteps({num_steps}) produced {len(self.scheduler.timesteps)} "
                f"timesteps with timestep_spacing={scheduler.config.get('timestep_spacing')!r}; choose another "
                "num_steps or spacing"
            )
        self.timesteps: Tensor = self.scheduler.timesteps.detach().to("cpu", torch.long)
        if bool(((self.timesteps < 0) | (self.timesteps >= self.num_train_timesteps)).any()):
            raise ValueError(
                f"set_timesteps({num_steps}) produced timesteps outside [0, {self.num_train_timesteps}): "
                f"{self.timesteps.tolist()}; check steps_offset={scheduler.config.get('steps_offset')!r}"
            )
        self.step_indices: Tensor = torch.arange(num_steps, dtype=torch.long)
        if self.kind == "ddim":
            alpha, sigma, alpha_next, sigma_next = self._ddim_levels()
            var = (sigma_next.square() / sigma.square()) * (1.0 - alpha.square() / alpha_next.square())
            self.stds: Tensor = self.eta * var.clamp(min=0.0).sqrt()
            direction = (sigma_next.square() - self.stds.square()).clamp(min=0.0).sqrt()
            self.mean_coef_sample: Tensor = direction / sigma
            self.mean_coef_x0: Tensor = alpha_next - self.mean_coef_sample * alpha
        else:
            alpha, sigma, alpha_next, sigma_next = self._dpm_levels()
            exp_neg_h = (alpha * sigma_next) / (sigma * alpha_next)
            self.mean_coef_sample = (sigma_next / sigma) * exp_neg_h
            self.mean_coef_x0 = alpha_next * (1.0 - exp_neg_h.square())
            self.stds = sigma_next * (1.0 - exp_neg_h.square()).clamp(min=0.0).sqrt()
        if self.prediction_type == "epsilon" and bool((alpha == 0).any()):
            raise ValueError(
                "alpha_bar is 0 at a sampled timestep (zero terminal SNR): x_0 cannot be predicted from an "
                "epsilon prediction there; use prediction_type='v_prediction'"
            )
        self.alpha_bar: Tensor = alpha.square()
        self.alpha_bar_next: Tensor = alpha_next.square()
        self._x0_current = _x0_coefficients(alpha, sigma, self.prediction_type)
        self._x0_next = _x0_coefficients(alpha_next, sigma_next, self.prediction_type)
        self._device_tables: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ schedule tables
    def _ddim_levels(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(α, s) of x_t and of x_{t-1} per step, from the DDIM scheduler's ``alphas_cumprod``."""
        alphas_cumprod = self.scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        final = float(self.scheduler.final_alpha_cumprod)
        prev = self.timesteps - self.num_train_timesteps // self.num_steps  # what DDIMScheduler.step uses
        abar = alphas_cumprod[self.timesteps]
        abar_next = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], torch.full_like(abar, final))
        self.next_timesteps: Tensor = prev.clamp(min=0)
        return abar.sqrt(), (1.0 - abar).sqrt(), abar_next.sqrt(), (1.0 - abar_next).sqrt()

    def _dpm_levels(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(α, s) of x_j and x_{j+1} per step, from the DPM scheduler's VE sigmas ``[K+1]``."""
        sigmas_ve = self.scheduler.sigmas.detach().to("cpu", torch.float64)
        alpha = 1.0 / (1.0 + sigmas_ve.square()).sqrt()
        sigma = sigmas_ve * alpha
        self.next_timesteps = torch.cat([self.timesteps[1:], torch.zeros(1, dtype=torch.long)])
        return alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]

    def _tables(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        key = (device, dtype)
        if key not in self._device_tables:
            host = {
                "a": self.mean_coef_sample,
                "b": self.mean_coef_x0,
                "std": self.stds,
                "cx_current": self._x0_current[0],
                "cm_current": self._x0_current[1],
                "cx_next": self._x0_next[0],
                "cm_next": self._x0_next[1],
            }
            self._device_tables[key] = {name: value.to(device=device, dtype=dtype) for name, value in host.items()}
        return self._device_tables[key]

    # ------------------------------------------------------------------ validation helpers
    def _check_step_index(self, step_index: StepIndex, batch: int) -> int | Tensor:
        if isinstance(step_index, Tensor) and step_index.ndim == 0:
            step_index = int(step_index)
        if isinstance(step_index, Tensor):
            if step_index.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
                raise ValueError(f"step_index tensor must be integer, got {step_index.dtype}")
            if tuple(step_index.shape) != (batch,):
                raise ValueError(f"step_index tensor must have shape [{batch}] (one per sample), got "
                                 f"{tuple(step_index.shape)}")
            if bool(((step_index < 0) | (step_index >= self.num_steps)).any()):
                raise ValueError(f"step_index values must be in [0, {self.num_steps}), got {step_index.tolist()}")
            return step_index
        if isinstance(step_index, bool) or not isinstance(step_index, int):
            raise ValueError(f"step_index must be an int or a long tensor, got {step_index!r}")
        if not 0 <= step_index < self.num_steps:
            raise ValueError(f"step_index must be in [0, {self.num_steps}), got {step_index}")
        return step_index

    @staticmethod
    def _check_pair(x: Tensor, model_output: Tensor, what: str) -> None:
        if not isinstance(x, Tensor) or not isinstance(model_output, Tensor):
            raise ValueError(f"{what}: x and model_output must be tensors")
        if x.ndim < 2:
            raise ValueError(f"{what}: x must be [B, *S] with at least one latent dimension, got {tuple(x.shape)}")
        if x.shape != model_output.shape:
            raise ValueError(
                f"{what}: model_output shape {tuple(model_output.shape)} does not match latent shape "
                f"{tuple(x.shape)} (drop learned-variance channels before the sampler)"
            )

    def _gather(self, table: Tensor, step_index: int | Tensor, x: Tensor) -> Tensor:
        """Coefficient(s) for ``step_index``, broadcastable to ``x``: 0-dim for an int, ``[B, 1, ...]`` else."""
        if isinstance(step_index, int):
            return table[step_index]
        return table[step_index.to(table.device)].reshape(-1, *([1] * (x.ndim - 1)))

    @staticmethod
    def _dtype(x: Tensor, model_output: Tensor) -> torch.dtype:
        return torch.promote_types(torch.promote_types(x.dtype, model_output.dtype), torch.float32)

    # ------------------------------------------------------------------ the step as a differentiable function
    def predict_x0(
        self, x: Tensor, model_output: Tensor, step_index: StepIndex, at: NoiseLevel = "current"
    ) -> Tensor:
        """x̂_0 from a latent and the model output evaluated on it; differentiable in both.

        ``at="current"``: ``x`` is x_t of step j and ``model_output`` was computed at ``timesteps[j]``.
        ``at="next"``: ``x`` is x_{t-1} (the step's output) and ``model_output`` was computed at
        ``next_timesteps[j]``; the noise level is ``alpha_bar_next[j]`` (works for the last step too).
        Shapes: ``[B, *S]`` in, ``[B, *S]`` out (at least float32).
        """
        if at not in ("current", "next"):
            raise ValueError(f"at must be 'current' or 'next', got {at!r}")
        self._check_pair(x, model_output, "predict_x0")
        step_index = self._check_step_index(step_index, x.shape[0])
        dtype = self._dtype(x, model_output)
        tables = self._tables(x.device, dtype)
        c_x = self._gather(tables[f"cx_{at}"], step_index, x)
        c_m = self._gather(tables[f"cm_{at}"], step_index, x)
        return c_x * x.to(dtype) + c_m * model_output.to(dtype)

    def step_mean_std(self, x_t: Tensor, model_output: Tensor, step_index: StepIndex) -> tuple[Tensor, Tensor]:
        """(μ, σ) of p(x_{t-1} | x_t) for step j; μ ``[B, *S]`` is differentiable in ``model_output`` and ``x_t``.

        σ is a 0-dim tensor for an int ``step_index`` and ``[B, 1, ...]`` for a per-sample index tensor.
        """
        self._check_pair(x_t, model_output, "step_mean_std")
        step_index = self._check_step_index(step_index, x_t.shape[0])
        dtype = self._dtype(x_t, model_output)
        tables = self._tables(x_t.device, dtype)
        x_t = x_t.to(dtype)
        x0 = self._gather(tables["cx_current"], step_index, x_t) * x_t + self._gather(
            tables["cm_current"], step_index, x_t
        ) * model_output.to(dtype)
        mean = self._gather(tables["a"], step_index, x_t) * x_t + self._gather(tables["b"], step_index, x_t) * x0
        return mean, self._gather(tables["std"], step_index, x_t)

    def step(
        self,
        x_t: Tensor,
        model_output: Tensor,
        step_index: StepIndex,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """Take step j: x_{t-1} = μ + σ·noise (noise drawn with ``generator`` if not given).

        The step-wise API for aligners that drive sampling themselves (e.g. DRaFT/ReFL with gradients
        through chosen steps): it runs under the caller's grad mode, so ``prev_sample`` keeps the graph.
        """
        mean, std = self.step_mean_std(x_t, model_output, step_index)
        if noise is None:
            noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        elif noise.shape != mean.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match latent shape {tuple(mean.shape)}")
        noise = noise.to(mean.dtype)
        return StepOutput(prev_sample=mean + std * noise, mean=mean, std=std, noise=noise)

    @staticmethod
    def log_prob(x_prev: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
        """``[B]`` log N(x_prev; mean, std² I) summed over non-batch dims (raises if std = 0)."""
        return gaussian_log_prob(x_prev, mean, std)

    @staticmethod
    def score(x_prev: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
        """``[B, *S]`` ∇_{x_prev} log p = -(x_prev - mean)/std² (raises if std = 0)."""
        return gaussian_score(x_prev, mean, std)

    def model_timesteps(
        self, step_index: StepIndex, batch_size: int, at: NoiseLevel = "current", device: torch.device | str = "cpu"
    ) -> Tensor:
        """``[B]`` long model-conditioning timesteps for x_t (``at="current"``) or x_{t-1} (``"next"``)."""
        if at not in ("current", "next"):
            raise ValueError(f"at must be 'current' or 'next', got {at!r}")
        step_index = self._check_step_index(step_index, batch_size)
        table = self.timesteps if at == "current" else self.next_timesteps
        if isinstance(step_index, int):
            return table[step_index].expand(batch_size).to(device)
        return table[step_index.cpu()].to(device)

    @property
    def is_stochastic(self) -> bool:
        """True when every step has std > 0, i.e. every transition has a log-density and a score."""
        return bool((self.stds > 0).all())

    # ------------------------------------------------------------------ whole trajectories
    def sample(
        self,
        model_fn: ModelFn | ConditionalDenoiser,
        x_T: Tensor | None = None,
        *,
        shape: tuple[int, ...] | None = None,
        generator: torch.Generator | None = None,
        noises: Tensor | None = None,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
        guidance_scale: float = 1.0,
        record_scores: bool = False,
        grad_last_k: int = 0,
        final_x0: bool = False,
        progress: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Trajectory:
        """Run the K-step chain from x_T and record a :class:`Trajectory`.

        Args:
            model_fn: ``model_fn(x [B,*S], t [B] long) -> [B,*S]``, already guided (see
                :func:`~r2d3.diffusion.guided_model_fn`); or, when ``cond`` is given, a conditional denoiser
                ``model_fn(x, t, cond)`` that is wrapped with classifier-free guidance here.
            x_T: ``[B, *S]`` initial noise; if None it is drawn with ``generator`` for ``shape`` on
                ``device`` in ``dtype`` (schedulers' ``init_noise_sigma`` is 1 for both kinds). The chain and
                the recorded latents/means/noises keep x_T's dtype; model outputs keep the model's dtype.
            noises: optional pre-drawn step noises ``[B, K, *S]``; otherwise drawn with ``generator`` step by
                step (after x_T), so one seeded generator reproduces a whole trajectory.
            cond, uncond, guidance_scale: CFG inputs (``uncond`` may have batch 1).
            record_scores: also store the scores ``[B, K, *S]`` (as large as the latents; off by default).
            grad_last_k: run the last ``grad_last_k`` steps with autograd enabled so that
                ``trajectory.final`` carries gradients through them (DRaFT-K); earlier steps, and all
                steps when 0, run under ``torch.no_grad``.
            progress: show a tqdm progress bar.

        ``log_probs`` is None when some step is deterministic (std 0); ``record_scores`` then raises.
        """
        if cond is not None:
            model_fn = guided_model_fn(model_fn, cond, uncond, guidance_scale)
        elif uncond is not None or guidance_scale != 1.0:
            raise ValueError("uncond / guidance_scale need cond (the conditional embedding) as well")
        steps = self.num_steps
        if isinstance(grad_last_k, bool) or not isinstance(grad_last_k, int) or not 0 <= grad_last_k <= steps:
            raise ValueError(f"grad_last_k must be an int in [0, num_steps={steps}], got {grad_last_k!r}")
        if record_scores and not self.is_stochastic:
            raise ValueError("record_scores needs every step to be stochastic (std > 0); this sampler has "
                             f"deterministic steps (eta={self.eta})")
        if x_T is None:
            if shape is None:
                raise ValueError("sample needs x_T or a shape to draw x_T from")
            x_T = randn_tensor(tuple(shape), generator=generator, device=torch.device(device or "cpu"), dtype=dtype)
        if not isinstance(x_T, Tensor) or x_T.ndim < 2:
            raise ValueError(f"x_T must be a [B, *S] tensor with at least one latent dimension, got {x_T!r:.80}")
        batch, latent_shape = x_T.shape[0], tuple(x_T.shape[1:])
        if noises is not None and tuple(noises.shape) != (batch, steps, *latent_shape):
            raise ValueError(
                f"noises must have shape {[batch, steps, *latent_shape]} ([B, K, *S]), got {list(noises.shape)}"
            )

        x = x_T.detach()
        latents, outputs, means, step_noises, log_probs, scores = [x], [], [], [], [], []
        for j in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
            with torch.set_grad_enabled(j >= steps - grad_last_k):
                t = self.model_timesteps(j, batch, device=x.device)
                output = model_fn(x, t)
                if not isinstance(output, Tensor) or output.shape != x.shape:
                    got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                    raise ValueError(f"model_fn returned {got} at step {j}; expected the latent shape {tuple(x.shape)}")
                noise = None if noises is None else noises[:, j]
                out = self.step(x, output, j, noise=noise, generator=generator)
            if self.is_stochastic:
                log_probs.append(self.log_prob(out.prev_sample.detach(), out.mean.detach(), out.std))
                if record_scores:
                    scores.append(self.score(out.prev_sample.detach(), out.mean.detach(), out.std))
            x = out.prev_sample.to(x_T.dtype)  # the chain stays in x_T's dtype (steps compute in >= float32)
            latents.append(x)
            outputs.append(output.detach())
            means.append(out.mean.detach().to(x_T.dtype))
            step_noises.append(out.noise.detach().to(x_T.dtype))
        clean = None
        if final_x0:
            with torch.set_grad_enabled(grad_last_k > 0):
                t = self.model_timesteps(steps - 1, batch, at="next", device=x.device)
                clean = self.predict_x0(x, model_fn(x, t), steps - 1, at="next").to(x_T.dtype)

        return Trajectory(
            latents=torch.stack(latents, dim=1),
            timesteps=self.timesteps.clone(),
            next_timesteps=self.next_timesteps.clone(),
            step_indices=self.step_indices.clone(),
            model_outputs=torch.stack(outputs, dim=1),
            means=torch.stack(means, dim=1),
            stds=self.stds.clone(),
            noises=torch.stack(step_noises, dim=1),
            log_probs=torch.stack(log_probs, dim=1) if log_probs else None,
            scores=torch.stack(scores, dim=1) if scores else None,
            clean_final=clean,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, num_steps={self.num_steps}, eta={self.eta}, "
            f"prediction_type={self.prediction_type!r}, timesteps={self.timesteps.tolist()})"
        )
