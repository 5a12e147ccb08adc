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
"""

from __future__ import annotations

import torch
from torch import Tensor

from r2d3.algos.base import AlignContext, SampleBatch, as_dict, register_algorithm, stratified_transitions
from r2d3.config import AlgoConfig
from r2d3.train.lora import adapters_disabled


class NablaGFN:
    name = "nabla_gfn"

    def __init__(self, config: AlgoConfig, num_steps: int):
        if config.beta < 0:
            raise ValueError(f"algo.beta must be >= 0, got {config.beta}")
        if config.reg_scale < 0:
            raise ValueError(f"algo.reg_scale must be >= 0, got {config.reg_scale}")
        if config.reward_weighting not in ("squared", "sqrt"):
            raise ValueError(f"algo.reward_weighting must be 'squared' or 'sqrt', got {config.reward_weighting!r}")
        if config.reward_grad_clip is not None and config.reward_grad_clip <= 0:
            raise ValueError(f"algo.reward_grad_clip must be > 0 or null, got {config.reward_grad_clip}")
        if not 0 < config.timestep_fraction <= 1:
            raise ValueError(f"algo.timestep_fraction must be in (0, 1], got {config.timestep_fraction}")
        self.config = config
        self.uses_lag = config.off_policy_lag
        self.num_steps = num_steps

    def reward_weight(self, ctx: AlignContext, step: int) -> float:
        alpha_bar = float(ctx.sampler.alpha_bar_next[step])
        return alpha_bar if self.config.reward_weighting == "squared" else alpha_bar ** 0.5

    def x0_next(self, ctx: AlignContext, model_fn, x_next: Tensor, step: int) -> Tensor:
        """x0_hat at the next latent, through the current (LoRA) model unless Jacobian-free."""
        t_next = ctx.sampler.next_timesteps[step].to(x_next.device).expand(x_next.shape[0])
        out = model_fn(x_next, t_next)
        if self.config.jacobian_free:
            out = out.detach()
        if not self.config.x0_timestep_shift:
            return ctx.sampler.predict_x0(x_next, out, step, at="next")
        # the reference code's quirk (method-notes §9.1): alpha_bar one schedule step further
        if ctx.sampler.prediction_type != "epsilon":
            raise ValueError("algo.x0_timestep_shift is defined for epsilon-prediction models only")
        alpha_bar = float(ctx.sampler.alpha_bar_next[min(step + 1, self.num_steps - 1)])
        return (x_next - (1 - alpha_bar) ** 0.5 * out) / alpha_bar**0.5

    def reward_grad(self, ctx: AlignContext, model_fn, x_next: Tensor, step: int, prompts, cameras) -> tuple[Tensor, Tensor]:
        """``(g [B, *S], reward [B])``: the view-averaged reward's gradient w.r.t. the next latent."""
        x = x_next.detach().requires_grad_(True)
        with torch.enable_grad():
            reward = ctx.reward_of_latents(self.x0_next(ctx, model_fn, x, step), prompts, cameras)
            (grad,) = torch.autograd.grad(reward.sum(), x)
        return grad, reward.detach()

    def transition(self, ctx: AlignContext, model_fn, traj, step: int, prompts, cameras) -> dict[str, Tensor]:
        """All terms of one transition's loss for the whole batch (``loss`` carries the LoRA graph)."""
        x_t, x_next = traj.latents[:, step], traj.latents[:, step + 1]
        t = traj.timesteps[step].to(x_t.device).expand(x_t.shape[0])
        grad, reward = self.reward_grad(ctx, model_fn, x_next, step, prompts, cameras)
        drive = self.config.beta * self.reward_weight(ctx, step) * grad
        if self.config.reward_grad_clip is not None:
            norms = drive.flatten(1).norm(dim=1).clamp(min=1e-12)
            factor = (self.config.reward_grad_clip / norms).clamp(max=1.0)
            drive = drive * factor.view(-1, *[1] * (drive.ndim - 1))
        with torch.no_grad(), adapters_disabled(ctx.backend.denoiser):
            mean_ref, std = ctx.sampler.step_mean_std(x_t, model_fn(x_t, t), step)
            score_ref = -(x_next - mean_ref) / std**2
        out = model_fn(x_t, t)
        mean, std = ctx.sampler.step_mean_std(x_t, out, step)
        score = -(x_next - mean) / std**2
        target = score_ref + drive
        loss_score = (score - target).square().mean()
        loss_reg = (out - traj.model_outputs[:, step]).square().mean()
        return {"loss": loss_score + self.config.reg_scale * loss_reg, "loss_score": loss_score,
                "loss_reg": loss_reg, "score": score, "score_ref": score_ref, "target": target, "drive": drive,
                "reward_grad": grad, "reward": reward}

    def accumulate(self, ctx: AlignContext, batch: SampleBatch, scale: float,
                   generator: torch.Generator) -> dict[str, float]:
        traj = batch.trajectory
        steps = stratified_transitions(traj.num_steps, self.config.timestep_fraction, generator)
        cameras = ctx.cameras(len(batch), generator)
        model_fn = ctx.model_fn(batch.cond)
        totals = {"loss": 0.0, "loss_score": 0.0, "loss_reg": 0.0, "score_residual_norm": 0.0,
                  "target_norm": 0.0, "reward_grad_norm": 0.0, "reward_at_x0hat": 0.0}
        for j in steps:
            terms = self.transition(ctx, model_fn, traj, j, batch.prompts, cameras)
            (terms["loss"] * scale / len(steps)).backward()
            norm = lambda x: x.detach().flatten(1).norm(dim=1).mean().item()  # noqa: E731
            totals["loss"] += terms["loss"].item()
            totals["loss_score"] += terms["loss_score"].item()
            totals["loss_reg"] += terms["loss_reg"].item()
            totals["score_residual_norm"] += norm(terms["score"] - terms["score_ref"])
            totals["target_norm"] += norm(terms["drive"])
            totals["reward_grad_norm"] += norm(terms["reward_grad"])
            totals["reward_at_x0hat"] += terms["reward"].mean().item()
        return as_dict({k: v / len(steps) for k, v in totals.items()} | {"transitions": len(steps)})


@register_algorithm("nabla_gfn")
def _build(config: AlgoConfig, num_steps: int) -> NablaGFN:
    return NablaGFN(config, num_steps)
