"""Nabla-R2D3: the residual nabla-DB loss with the forward-looking reward gradient.

For a stored transition x_t -> x_{t-1} sampled by an earlier policy:

    score_theta = -(x_{t-1} - mu_theta(x_t)) / sigma_t^2
    score_ref   = -(x_{t-1} - mu_ref(x_t))   / sigma_t^2                      (LoRA off, no grad)
    g           = d/dx_{t-1} R(Render(D(x0_hat(x_{t-1}, t-1))), c)            (no parameter grad)
    target      = score_ref + beta * w(t-1) * g,   w = alpha_bar ("squared") or sqrt(alpha_bar)
    loss        = mean |score_theta - target|^2 + lambda * mean |eps_theta(x_t) - eps_old(x_t)|^2

The residual score_theta - score_ref is regressed onto the scaled reward gradient at the *next* state,
so the fine-tuned sampler targets p_ref(x_0) exp(beta * r(x_0)) while the proximal term keeps each update
close to the sampling policy. The trained transitions of a train batch are stacked as rows and go
through the denoiser, decoder, renderer and reward together, ``algo.transition_batch`` rows at a time.

``precompute_targets`` computes ``score_ref`` and the drive right after sampling, in batch and without
any LoRA graph, with the reward gradient in its Jacobian-free form at the *sampling* policy's x0_hat
(stored in the trajectory where the sampler evaluated the network at that state): training then pays one
denoiser forward and one backward per transition, as DDPO does.

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
    Targets,
    TrainedModule,
    TransitionOptions,
    Transitions,
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
    precompute_targets: bool = opt(False, "compute score_ref and the reward drive once, right after sampling, "
                                          "without a LoRA graph, from the sampling policy's x0_hat (needs "
                                          "jacobian_free); training then costs one forward and one backward "
                                          "per transition")
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
        if config.precompute_targets and not config.jacobian_free:
            raise ValueError("algo.precompute_targets takes the reward gradient in its Jacobian-free form at the "
                             "sampling policy's x0_hat: set algo.jacobian_free=true as well")
        if config.precompute_targets and config.reverse_loss_scale > 0:
            raise ValueError("algo.precompute_targets cannot precompute the reverse loss (it differentiates the "
                             "current policy at x_t): set algo.reverse_loss_scale=0")
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

    def _next_tables(self, ctx: Pipeline) -> tuple[Tensor, Tensor | None, Tensor]:
        """:meth:`next_state_timing` of every step: ``[K]`` timesteps, x0 alpha_bars (None: the sampler's
        own levels) and weight alpha_bars (float64)."""
        timings = [self.next_state_timing(ctx, j) for j in range(ctx.sampler.num_steps)]
        x0_abar = None if timings[0][1] is None else torch.tensor([a for _, a, _ in timings], dtype=torch.float64)
        return (torch.tensor([t for t, _, _ in timings], dtype=torch.long), x0_abar,
                torch.tensor([w for _, _, w in timings], dtype=torch.float64))

    @staticmethod
    def _steps(steps: int | Tensor, rows: int) -> Tensor:
        return torch.full((rows,), steps, dtype=torch.long) if isinstance(steps, int) else steps

    def reward_weight(self, ctx: Pipeline, steps: int | Tensor, at: str = "next") -> Tensor:
        """``[N]`` float64 w of the state after (``at="next"``) or before (``"current"``) each row's step."""
        steps = self._steps(steps, 1).cpu()
        table = self._next_tables(ctx)[2] if at == "next" else ctx.sampler.alpha_bar.double()
        alpha_bar = table[steps]
        return alpha_bar if self.config.reward_weighting == "squared" else alpha_bar.sqrt()

    def x0_next(self, ctx: Pipeline, model_fn, x_next: Tensor, steps: int | Tensor) -> Tensor:
        """x0_hat at the next latents (row r after step ``steps[r]``), through the current (LoRA) model
        unless Jacobian-free."""
        steps = self._steps(steps, x_next.shape[0]).to(x_next.device)
        t_table, abar_table, _ = self._next_tables(ctx)
        out = model_fn(x_next, t_table.to(x_next.device)[steps])
        if self.config.jacobian_free:
            out = out.detach()
        if abar_table is None:
            return ctx.sampler.predict_x0(x_next, out, steps, at="next")
        alpha_bar = abar_table.to(x_next.device)[steps].view(-1, *[1] * (x_next.ndim - 1))
        return ((x_next - (1 - alpha_bar) ** 0.5 * out) / alpha_bar**0.5).to(x_next.dtype)

    def reward_grad(self, ctx: Pipeline, model_fn, x_next: Tensor, steps: int | Tensor, prompts, cameras,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(g [N, *S], reward [N])``: the view-averaged reward's gradient w.r.t. the next latents
        (``generator`` draws the reward-image noise, when there is any)."""
        x = x_next.detach().requires_grad_(True)
        with torch.enable_grad():
            reward = ctx.reward_of_latents(self.x0_next(ctx, model_fn, x, steps), prompts, cameras,
                                           self.config.reward_image_noise, generator)
            (grad,) = torch.autograd.grad(reward.sum(), x)
        return grad, reward.detach()

    def scaled(self, weight: Tensor, grad: Tensor) -> Tensor:
        """``beta * w * grad`` per row, clipped per row when ``reward_grad_clip`` is set."""
        drive = (self.config.beta * weight).to(grad).view(-1, *[1] * (grad.ndim - 1)) * grad
        if self.config.reward_grad_clip is None:
            return drive
        norms = drive.flatten(1).norm(dim=1).clamp(min=1e-12)
        factor = (self.config.reward_grad_clip / norms).clamp(max=1.0)
        return drive * factor.view(-1, *[1] * (drive.ndim - 1))

    def reverse_residual(self, ctx: Pipeline, model_fn, x_t: Tensor, x_next: Tensor, steps: int | Tensor) -> Tensor:
        """rev_theta(x_t) - rev_ref(x_t), rev = grad_{x_t} log p(x_next | x_t): no parameter graph."""
        steps = self._steps(steps, x_t.shape[0]).to(x_t.device)
        t = ctx.sampler.timesteps.to(x_t.device)[steps]

        def rev() -> Tensor:
            x = x_t.detach().requires_grad_(True)
            with torch.enable_grad():
                mean, std = ctx.sampler.step_mean_std(x, model_fn(x, t), steps)
                log_p = -((x_next - mean).square() / (2 * std**2)).sum()
                (grad,) = torch.autograd.grad(log_p, x)
            return grad

        residual = rev()
        with adapters_disabled(ctx.backend.denoiser):
            residual = residual - rev()
        return residual

    def reward_grad_current(self, ctx: Pipeline, model_fn, x_t: Tensor, steps: Tensor, prompts, cameras) -> Tensor:
        """grad_{x_t} r(x0_hat(x_t)) with x0_hat at x_t's own timestep (the reverse loss's flow term)."""
        x = x_t.detach().requires_grad_(True)
        t = ctx.sampler.timesteps.to(x.device)[steps]
        with torch.enable_grad():
            out = model_fn(x, t)
            if self.config.jacobian_free:
                out = out.detach()
            reward = ctx.reward_of_latents(ctx.sampler.predict_x0(x, out, steps, at="current"), prompts, cameras)
            (grad,) = torch.autograd.grad(reward.sum(), x)
        return grad

    @staticmethod
    def reference_score(ctx: Pipeline, model_fn, rows: Transitions) -> Tensor:
        """The reference model's (LoRA off) score of each row's x_{t-1}; no graph."""
        x_t = rows.x_t
        with torch.no_grad(), adapters_disabled(ctx.backend.denoiser):
            mean_ref, std = ctx.sampler.step_mean_std(x_t, model_fn(x_t, rows.t), rows.steps)
            return -(rows.x_next - mean_ref) / std**2

    def transition(self, ctx: Pipeline, model_fn, rows: Transitions, generator: torch.Generator | None = None,
                   full_fn=None) -> dict[str, Tensor]:
        """All terms of the loss of a group of transitions (``loss`` carries the LoRA graph, and the flow
        correction's when it is on); ``model_fn`` is the guided model for ``rows.cond``. With precomputed
        ``rows.targets`` only the policy's side is evaluated. ``full_fn`` (``proximal_outputs=full``): the
        guided whole network output, whose proximal term then also covers the channels sampling ignores,
        against the trajectory's ``extra_outputs``."""
        traj = rows.trajectory
        x_t, x_next, t, steps = rows.x_t, rows.x_next, rows.t, rows.steps
        if rows.targets is not None:
            score_ref, drive = rows.targets["score_ref"], rows.targets["drive"]
            reward, grad_norm = rows.targets["reward"], rows.targets["reward_grad_norm"]
        else:
            grad, reward = self.reward_grad(ctx, model_fn, x_next, steps, rows.prompts, rows.cameras, generator)
            drive = self.scaled(self.reward_weight(ctx, steps), grad)
            grad_norm = grad.flatten(1).norm(dim=1)
            score_ref = self.reference_score(ctx, model_fn, rows)
        if full_fn is None:
            out = reg_out = model_fn(x_t, t)
            anchor = rows.take(traj.model_outputs)
        else:
            if traj.extra_outputs is None:
                raise ValueError("proximal_outputs=full needs trajectories sampled with their extra outputs recorded")
            reg_out = full_fn(x_t, t)
            out = reg_out[:, : x_t.shape[1]]
            anchor = torch.cat([rows.take(traj.model_outputs), rows.take(traj.extra_outputs)], dim=1)
        mean, std = ctx.sampler.step_mean_std(x_t, out, steps)
        score = -(x_next - mean) / std**2
        target = score_ref + drive
        terms: dict[str, Tensor] = {}
        if self.flow is not None:
            t_next = ctx.sampler.next_timesteps.to(x_t.device)[steps]
            flow = self.flow(x_next, t_next, rows.cond)
            target = target + flow
            terms["flow_norm"] = flow.detach().flatten(1).norm(dim=1).mean()
        loss_score = (score - target).square().mean()
        loss_reg = (reg_out - anchor).square().mean()
        loss = loss_score + self.config.reg_scale * loss_reg
        if self.config.reverse_loss_scale > 0:
            rev_residual = self.reverse_residual(ctx, model_fn, x_t, x_next, steps)
            rev_drive = self.scaled(self.reward_weight(ctx, steps, at="current"),
                                    self.reward_grad_current(ctx, model_fn, x_t, steps, rows.prompts, rows.cameras))
            loss_reverse = (rev_residual + rev_drive + self.flow(x_t, t, rows.cond)).square().mean()
            loss = loss + self.config.reverse_loss_scale * loss_reverse
            terms["loss_reverse"] = loss_reverse
        return terms | {"loss": loss, "loss_score": loss_score, "loss_reg": loss_reg, "score": score,
                        "score_ref": score_ref, "target": target, "drive": drive, "reward_grad_norm": grad_norm,
                        "reward": reward}

    def sampling_outputs_at_next(self, ctx: Pipeline, rows: Transitions) -> Tensor:
        """The sampling policy's guided output at each row's x_{t-1} and next-state timestep: the one the
        sampler stored for the following step where it evaluated the network there (same state, same
        timestep), else one no-grad forward with the current LoRA (call it before the policy changes)."""
        traj = rows.trajectory
        t_next = self._next_tables(ctx)[0].to(rows.steps.device)[rows.steps]
        following = (rows.steps + 1).clamp(max=traj.num_steps - 1)
        stored = (rows.steps + 1 < traj.num_steps) & (traj.timesteps.to(t_next.device)[following] == t_next)
        out = traj.model_outputs[rows.index, following].clone()
        missing = (~stored).nonzero()[:, 0]
        if len(missing):
            with torch.no_grad():
                x = rows.x_next[missing]
                out[missing] = ctx.model_fn(rows.cond[missing])(x, t_next[missing]).to(out)
        return out

    def precompute(self, ctx: Pipeline, batch: SampleBatch, generator: torch.Generator) -> SampleBatch:
        """Each trajectory's trained transitions (drawn now, per trajectory) with their ``score_ref`` and drive
        (see ``precompute_targets``); identity unless that option is on."""
        if not self.config.precompute_targets:
            return batch
        size, num_steps = len(batch), batch.trajectory.num_steps
        steps = torch.stack([torch.tensor(self.config.transitions(num_steps, generator)) for _ in range(size)])
        index = torch.arange(size).repeat_interleave(steps.shape[1])
        cameras = ctx.cameras(len(index) if self.config.cameras_per_transition else size, generator)
        if cameras is not None and not self.config.cameras_per_transition:
            cameras = cameras[index.to(cameras.viewmats.device)]
        rows = Transitions.of(batch, index, steps.flatten(), cameras)
        parts: dict[str, list[Tensor]] = {"score_ref": [], "drive": [], "reward": [], "reward_grad_norm": []}
        for part in rows.chunks(self.config.transition_batch):
            parts["score_ref"].append(self.reference_score(ctx, ctx.model_fn(part.cond), part))
            out_next = self.sampling_outputs_at_next(ctx, part)
            grad, reward = self.reward_grad(ctx, lambda x, t, out=out_next: out, part.x_next, part.steps,
                                            part.prompts, part.cameras, generator)
            parts["drive"].append(self.scaled(self.reward_weight(ctx, part.steps), grad))
            parts["reward"].append(reward)
            parts["reward_grad_norm"].append(grad.flatten(1).norm(dim=1))
        shaped = {k: torch.cat(v).reshape(size, steps.shape[1], *v[0].shape[1:]) for k, v in parts.items()}
        batch.targets = Targets(steps.to(batch.rewards.device), **shaped)
        return batch

    def terminal_loss(self, ctx: Pipeline, traj, cond) -> Tensor:
        """|g_phi(x_0)|^2 at the trajectories' final states: the flow correction vanishes at the end."""
        x0 = traj.latents[:, -1]
        t0 = ctx.sampler.next_timesteps[-1].to(x0.device).expand(x0.shape[0])
        return self.flow(x0, t0, cond).square().mean()

    def accumulate(self, ctx: Pipeline, batch: SampleBatch, scale: float,
                   generator: torch.Generator) -> dict[str, float]:
        traj = batch.trajectory
        if self.config.precompute_targets:
            if batch.targets is None:
                raise ValueError("algo.precompute_targets needs trajectories annotated right after sampling "
                                 "(NablaGFN.precompute)")
            steps = batch.targets.steps
            rows = Transitions.of(batch, torch.arange(len(batch)).repeat_interleave(steps.shape[1]), steps.flatten())
            rows.targets = {k: getattr(batch.targets, k).flatten(0, 1)
                            for k in ("score_ref", "drive", "reward", "reward_grad_norm")}
            per_trajectory = steps.shape[1]
        else:
            steps = self.config.transitions(traj.num_steps, generator)
            if self.config.cameras_per_transition:
                cameras = [ctx.cameras(len(batch), generator) for _ in steps]
            else:
                cameras = ctx.cameras(len(batch), generator)
            rows = Transitions.step_major(batch, steps, cameras)
            per_trajectory = len(steps)
        totals = {"loss": 0.0, "loss_score": 0.0, "loss_reg": 0.0, "score_residual_norm": 0.0,
                  "target_norm": 0.0, "reward_grad_norm": 0.0, "reward_at_x0hat": 0.0}
        extra: dict[str, float] = {}
        if self.flow is not None:
            terminal = self.terminal_loss(ctx, traj, batch.cond)
            (terminal * scale).backward()
            extra["loss_terminal"] = terminal.item()
        norm = lambda x: x.detach().flatten(1).norm(dim=1).mean().item()
        for part in rows.chunks(self.config.transition_batch):
            share = len(part) / len(rows)
            full_fn = ctx.model_fn(part.cond, full=True) if self.config.proximal_outputs == "full" else None
            terms = self.transition(ctx, ctx.model_fn(part.cond), part, generator, full_fn=full_fn)
            (terms["loss"] * scale * share).backward()
            for key in ("flow_norm", "loss_reverse"):
                if key in terms:
                    totals[key] = totals.get(key, 0.0) + terms[key].item() * share
            for key in ("loss", "loss_score", "loss_reg"):
                totals[key] += terms[key].item() * share
            totals["score_residual_norm"] += norm(terms["score"] - terms["score_ref"]) * share
            totals["target_norm"] += norm(terms["drive"]) * share
            totals["reward_grad_norm"] += terms["reward_grad_norm"].mean().item() * share
            totals["reward_at_x0hat"] += terms["reward"].mean().item() * share
        return as_dict(totals | extra | {"transitions": per_trajectory})
