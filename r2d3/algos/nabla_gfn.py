"""Nabla-R2D3: the residual nabla-DB loss with the forward-looking reward gradient.

For a stored transition x_t -> x_{t-1} sampled by an earlier policy:

    score_theta = -(x_{t-1} - mu_theta(x_t)) / sigma_t^2
    score_ref   = -(x_{t-1} - mu_ref(x_t))   / sigma_t^2                      (LoRA off, no grad)
    g           = d/dx_{t-1} R(Render(D(x0_hat(x_{t-1}, t-1))), c)            (no parameter grad)
    target      = score_ref + beta * w(t-1) * g,   w = alpha_bar ("squared") or sqrt(alpha_bar)
    loss        = mean |score_theta - target|^2 + lambda * mean |eps_theta(x_t) - eps_old(x_t)|^2

The residual score_theta - score_ref is regressed onto the scaled reward gradient at the *next* state,
so the fine-tuned sampler targets p_ref(x_0) exp(beta * r(x_0)) while the proximal term keeps each update
close to the sampling policy. Gradients are accumulated per transition (one graph alive at a time).

``flow_correction`` adds the 2D paper's learned residual log-flow gradient g_phi (:mod:`r2d3.algos.flow`)
to the target, ``target += g_phi(x_{t-1}, t-1, c)``, with the terminal loss |g_phi(x_0)|^2; and
``reverse_loss_scale`` the residual condition with respect to x_t,

    rev_theta(x_t) - rev_ref(x_t) = -(beta * w(t) * grad_{x_t} r(x0_hat(x_t)) + g_phi(x_t, t, c)),
    rev(x_t) = grad_{x_t} log p(x_{t-1} | x_t)   (a vector-Jacobian product through the denoiser)

whose left side carries no parameter gradient, as in the official code: it trains g_phi only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from r2d3.algos.base import (
    AlgorithmBase,
    SampleBatch,
    TrainedModule,
    TransitionOptions,
    as_dict,
    register_algorithm,
)
from r2d3.algos.flow import FlowCorrection
from r2d3.backends.lora import adapters_disabled
from r2d3.config import at_least, opt, positive
from r2d3.pipeline import Pipeline


@dataclass
class NablaGFNConfig(TransitionOptions):
    name: str = opt("nabla_gfn", "registered algorithm (see r2d3.algos.available_algorithms())")
    off_policy_lag: bool = opt(True, "train on the previous epoch's samples (as the reference code)")
    beta: float = opt(1e5, "reward scale beta (target = score_ref + beta * w(t) * grad r)", check=at_least(0))
    reward_weighting: str = opt("squared", "w(t) = alpha_bar ('squared') or sqrt(alpha_bar) ('sqrt')",
                                choices=("squared", "sqrt"))
    reg_scale: float = opt(1e2, "lambda, weight of the proximal term |eps_theta - eps_old|^2", check=at_least(0))
    proximal_outputs: str = opt("model", "what the proximal term compares: the model output the sampler uses "
                                         "('model', epsilon) or the network's whole output ('full': with "
                                         "DiffSplat-PixArt-Σ's learned-variance half, the reference code)",
                                choices=("model", "full"))
    reward_grad_clip: Optional[float] = opt(None, "clip |beta * w * grad r| per sample (None: off)", check=positive())
    jacobian_free: bool = opt(False, "treat eps as constant in the reward gradient (cheaper)")
    reward_image_noise: float = opt(0.0, "std of Gaussian noise added to the rendered colours the training reward "
                                         "sees (the reference code: 2e-3; needs scale.reward_actors=0)",
                                    check=at_least(0))
    cameras_per_transition: bool = opt(False, "draw the reward cameras for every trained transition (the reference "
                                               "code) instead of once per train batch")
    x0_timestep_shift: bool = opt(False, "the reference code's next-state timing (its DPM quirk): the network at "
                                         "x_{t-1} sees t_j - D, x0_hat uses alpha_bar(max(t_j - 2D, 1)) and the "
                                         "reward weight alpha_bar(t_j - D), D = t_0 - t_1")
    flow_correction: bool = opt(False, "learn the residual log-flow correction g_phi (full Nabla-GFlowNet)")
    flow_hidden: int = opt(128, "hidden width of the g_phi network", check=at_least(1))
    flow_lr: float = opt(1e-3, "AdamW learning rate of g_phi (its own parameter group)", check=positive())
    flow_weight_decay: float = opt(1e-2, "AdamW weight decay of g_phi", check=at_least(0))
    reverse_loss_scale: float = opt(0.0, "weight of the reverse (x_t) residual loss; trains g_phi only, so it needs "
                                         "flow_correction", check=at_least(0))


@register_algorithm("nabla_gfn", NablaGFNConfig)
class NablaGFN(AlgorithmBase):
    name = "nabla_gfn"

    def __init__(self, config: NablaGFNConfig, num_steps: int):
        # single values were checked by NablaGFNConfig; what combines options is checked here
        if config.reverse_loss_scale > 0 and not config.flow_correction:
            raise ValueError("algo.reverse_loss_scale > 0 needs algo.flow_correction=true (the reverse loss trains "
                             "only the flow correction g_phi)")
        config.check_steps(num_steps)
        self.config = config
        self.uses_lag = config.off_policy_lag
        self.num_steps = num_steps
        self.flow: FlowCorrection | None = None

    def build_modules(self, ctx: Pipeline) -> dict[str, TrainedModule]:
        if self.config.proximal_outputs == "full":
            if not getattr(ctx.backend, "extra_output_channels", 0):
                raise ValueError(f"algo.proximal_outputs=full needs a backend whose network has outputs beyond the "
                                 f"model output (extra_output_channels, denoise_full); {ctx.backend.name!r} has none: use 'model'")
            ctx.record_full_outputs = True  # the sampling pass keeps the anchor's extra half
        if not self.config.flow_correction:
            return {}
        text_dim = ctx.uncond.tokens.shape[-1]
        self.flow = FlowCorrection(tuple(ctx.backend.latent_shape), text_dim, self.config.flow_hidden)
        self.flow.to(ctx.uncond.tokens.device)
        return {"flow": TrainedModule(self.flow, self.config.flow_lr, self.config.flow_weight_decay)}

    def next_state_timing(self, ctx: Pipeline, step: int) -> tuple[int, float | None, float]:
        """``(timestep, x0_alpha_bar, weight_alpha_bar)`` at the state after step ``step``: the timestep the
        network sees there, the alpha_bar its x0_hat uses (None: the sampler's own level) and the alpha_bar
        of the reward weight.

        Without ``x0_timestep_shift``: t_{j+1} and the noise level x_{t-1} has. With it, the reference code's
        timing (method-notes 4 and 9.1, for its DPM schedule): the network at t_j - D (D = t_0 - t_1, clamped
        at 0), x0_hat with alpha_bar(max(t_j - 2D, 1)) and the weight alpha_bar(t_j - D); on the 20-step PixArt
        schedule these differ from t_{j+1} at j = 9 (499, not 500) and clip to alpha_bar_1 at j = 18, 19."""
        if not self.config.x0_timestep_shift:
            return int(ctx.sampler.next_timesteps[step]), None, float(ctx.sampler.alpha_bar_next[step])
        if ctx.sampler.prediction_type != "epsilon":
            raise ValueError("algo.x0_timestep_shift is defined for epsilon-prediction models only")
        timesteps = ctx.sampler.timesteps
        delta = int(timesteps[0] - timesteps[1])
        t_next = max(int(timesteps[step]) - delta, 0)
        alphas_cumprod = ctx.sampler.scheduler.alphas_cumprod.double()
        return t_next, float(alphas_cumprod[max(t_next - delta, 1)]), float(alphas_cumprod[t_next])

    def reward_weight(self, ctx: Pipeline, step: int, at: str = "next") -> float:
        """w of the state after step ``step`` (``at="next"``) or before it (``"current"``)."""
        alpha_bar = self.next_state_timing(ctx, step)[2] if at == "next" else float(ctx.sampler.alpha_bar[step])
        return alpha_bar if self.config.reward_weighting == "squared" else alpha_bar ** 0.5

    def x0_next(self, ctx: Pipeline, model_fn, x_next: Tensor, step: int) -> Tensor:
        """x0_hat at the next latent, through the current (LoRA) model unless Jacobian-free."""
        t, alpha_bar, _ = self.next_state_timing(ctx, step)
        out = model_fn(x_next, torch.full((x_next.shape[0],), t, dtype=torch.long, device=x_next.device))
        if self.config.jacobian_free:
            out = out.detach()
        if alpha_bar is None:
            return ctx.sampler.predict_x0(x_next, out, step, at="next")
        return (x_next - (1 - alpha_bar) ** 0.5 * out) / alpha_bar**0.5

    def reward_grad(self, ctx: Pipeline, model_fn, x_next: Tensor, step: int, prompts, cameras,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(g [B, *S], reward [B])``: the view-averaged reward's gradient w.r.t. the next latent
        (``generator`` draws the reward-image noise, when there is any)."""
        x = x_next.detach().requires_grad_(True)
        with torch.enable_grad():
            reward = ctx.reward_of_latents(self.x0_next(ctx, model_fn, x, step), prompts, cameras,
                                           self.config.reward_image_noise, generator)
            (grad,) = torch.autograd.grad(reward.sum(), x)
        return grad, reward.detach()

    def clipped(self, drive: Tensor) -> Tensor:
        if self.config.reward_grad_clip is None:
            return drive
        norms = drive.flatten(1).norm(dim=1).clamp(min=1e-12)
        factor = (self.config.reward_grad_clip / norms).clamp(max=1.0)
        return drive * factor.view(-1, *[1] * (drive.ndim - 1))

    def reverse_residual(self, ctx: Pipeline, model_fn, x_t: Tensor, x_next: Tensor, step: int) -> Tensor:
        """rev_theta(x_t) - rev_ref(x_t), rev = grad_{x_t} log p(x_next | x_t): no parameter graph."""
        t = ctx.sampler.timesteps[step].to(x_t.device).expand(x_t.shape[0])

        def rev() -> Tensor:
            x = x_t.detach().requires_grad_(True)
            with torch.enable_grad():
                mean, std = ctx.sampler.step_mean_std(x, model_fn(x, t), step)
                log_p = -(x_next - mean).square().sum() / (2 * std**2)
                (grad,) = torch.autograd.grad(log_p, x)
            return grad

        residual = rev()
        with adapters_disabled(ctx.backend.denoiser):
            residual = residual - rev()
        return residual

    def reward_grad_current(self, ctx: Pipeline, model_fn, x_t: Tensor, step: int, prompts, cameras) -> Tensor:
        """grad_{x_t} r(x0_hat(x_t)) with x0_hat at x_t's own timestep (the reverse loss's flow term)."""
        x = x_t.detach().requires_grad_(True)
        t = ctx.sampler.timesteps[step].to(x.device).expand(x.shape[0])
        with torch.enable_grad():
            out = model_fn(x, t)
            if self.config.jacobian_free:
                out = out.detach()
            reward = ctx.reward_of_latents(ctx.sampler.predict_x0(x, out, step, at="current"), prompts, cameras)
            (grad,) = torch.autograd.grad(reward.sum(), x)
        return grad

    def transition(self, ctx: Pipeline, model_fn, traj, step: int, prompts, cameras,
                   cond=None, generator: torch.Generator | None = None, full_fn=None) -> dict[str, Tensor]:
        """All terms of one transition's loss for the whole batch (``loss`` carries the LoRA graph, and the
        flow correction's when it is on; ``cond`` are the prompts' embeddings, needed by g_phi). ``full_fn``
        (``proximal_outputs=full``): the guided whole network output, whose proximal term then also covers
        the channels sampling ignores, against the trajectory's ``extra_outputs``."""
        x_t, x_next = traj.latents[:, step], traj.latents[:, step + 1]
        t = traj.timesteps[step].to(x_t.device).expand(x_t.shape[0])
        grad, reward = self.reward_grad(ctx, model_fn, x_next, step, prompts, cameras, generator)
        drive = self.clipped(self.config.beta * self.reward_weight(ctx, step) * grad)
        with torch.no_grad(), adapters_disabled(ctx.backend.denoiser):
            mean_ref, std = ctx.sampler.step_mean_std(x_t, model_fn(x_t, t), step)
            score_ref = -(x_next - mean_ref) / std**2
        if full_fn is None:
            out = reg_out = model_fn(x_t, t)
            anchor = traj.model_outputs[:, step]
        else:
            if traj.extra_outputs is None:
                raise ValueError("proximal_outputs=full needs trajectories sampled with their extra outputs recorded")
            reg_out = full_fn(x_t, t)
            out = reg_out[:, : x_t.shape[1]]
            anchor = torch.cat([traj.model_outputs[:, step], traj.extra_outputs[:, step]], dim=1)
        mean, std = ctx.sampler.step_mean_std(x_t, out, step)
        score = -(x_next - mean) / std**2
        target = score_ref + drive
        terms: dict[str, Tensor] = {}
        if self.flow is not None:
            t_next = ctx.sampler.next_timesteps[step].to(x_t.device).expand(x_t.shape[0])
            flow = self.flow(x_next, t_next, cond)
            target = target + flow
            terms["flow_norm"] = flow.detach().flatten(1).norm(dim=1).mean()
        loss_score = (score - target).square().mean()
        loss_reg = (reg_out - anchor).square().mean()
        loss = loss_score + self.config.reg_scale * loss_reg
        if self.config.reverse_loss_scale > 0:
            rev_residual = self.reverse_residual(ctx, model_fn, x_t, x_next, step)
            rev_drive = self.clipped(self.config.beta * self.reward_weight(ctx, step, at="current")
                                     * self.reward_grad_current(ctx, model_fn, x_t, step, prompts, cameras))
            loss_reverse = (rev_residual + rev_drive + self.flow(x_t, t, cond)).square().mean()
            loss = loss + self.config.reverse_loss_scale * loss_reverse
            terms["loss_reverse"] = loss_reverse
        return terms | {"loss": loss, "loss_score": loss_score, "loss_reg": loss_reg, "score": score,
                        "score_ref": score_ref, "target": target, "drive": drive, "reward_grad": grad, "reward": reward}

    def terminal_loss(self, ctx: Pipeline, traj, cond) -> Tensor:
        """|g_phi(x_0)|^2 at the trajectories' final states: the flow correction vanishes at the end."""
        x0 = traj.latents[:, -1]
        t0 = ctx.sampler.next_timesteps[-1].to(x0.device).expand(x0.shape[0])
        return self.flow(x0, t0, cond).square().mean()

    def accumulate(self, ctx: Pipeline, batch: SampleBatch, scale: float,
                   generator: torch.Generator) -> dict[str, float]:
        traj = batch.trajectory
        steps = self.config.transitions(traj.num_steps, generator)
        per_transition = self.config.cameras_per_transition
        cameras = None if per_transition else ctx.cameras(len(batch), generator)
        model_fn = ctx.model_fn(batch.cond)
        full_fn = ctx.model_fn(batch.cond, full=True) if self.config.proximal_outputs == "full" else None
        totals = {"loss": 0.0, "loss_score": 0.0, "loss_reg": 0.0, "score_residual_norm": 0.0,
                  "target_norm": 0.0, "reward_grad_norm": 0.0, "reward_at_x0hat": 0.0}
        extra: dict[str, float] = {}
        if self.flow is not None:
            terminal = self.terminal_loss(ctx, traj, batch.cond)
            (terminal * scale).backward()
            extra["loss_terminal"] = terminal.item()
        for j in steps:
            if per_transition:
                cameras = ctx.cameras(len(batch), generator)
            terms = self.transition(ctx, model_fn, traj, j, batch.prompts, cameras, batch.cond, generator, full_fn=full_fn)
            (terms["loss"] * scale / len(steps)).backward()
            for key in ("flow_norm", "loss_reverse"):
                if key in terms:
                    totals[key] = totals.get(key, 0.0) + terms[key].item()
            norm = lambda x: x.detach().flatten(1).norm(dim=1).mean().item()
            totals["loss"] += terms["loss"].item()
            totals["loss_score"] += terms["loss_score"].item()
            totals["loss_reg"] += terms["loss_reg"].item()
            totals["score_residual_norm"] += norm(terms["score"] - terms["score_ref"])
            totals["target_norm"] += norm(terms["drive"])
            totals["reward_grad_norm"] += norm(terms["reward_grad"])
            totals["reward_at_x0hat"] += terms["reward"].mean().item()
        return as_dict({k: v / len(steps) for k, v in totals.items()} | extra | {"transitions": len(steps)})

