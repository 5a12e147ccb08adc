"""DDPO (Black et al. 2023): policy gradient with a clipped importance ratio on the same trajectories.

Advantages are the final rewards normalised per prompt (mean/std over that prompt's samples in the
epoch; prompts seen fewer than ``min_count`` times fall back to the batch statistics). The log-ratio
is taken per latent element (log-probs divided by the latent size), as ddpo-pytorch does, so the clip
range means the same thing for any latent size.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from r2d3.algos.base import AlgorithmBase, SampleBatch, TransitionOptions, Transitions, as_dict, register_algorithm
from r2d3.config import opt, positive
from r2d3.pipeline import Pipeline


def per_prompt_advantages(rewards: torch.Tensor, prompts: list[str], min_count: int = 2) -> torch.Tensor:
    """(r - mean_prompt) / std_prompt, with the batch mean/std for prompts with < ``min_count`` samples."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p].append(i)
    adv = torch.empty_like(rewards)
    batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False) + 1e-6
    for idx in groups.values():
        r = rewards[idx]
        mean, std = (r.mean(), r.std(unbiased=False) + 1e-6) if len(idx) >= min_count else (batch_mean, batch_std)
        adv[idx] = (r - mean) / std
    return adv


@dataclass
class DDPOConfig(TransitionOptions):
    name: str = opt("ddpo", "registered algorithm (see r2d3.algos.available_algorithms())")
    clip_range: float = opt(1e-4, "importance-ratio clip range", check=positive())
    adv_clip: float = opt(5.0, "advantage clip", check=positive())


@register_algorithm("ddpo", DDPOConfig)
class DDPO(AlgorithmBase):
    name = "ddpo"

    def __init__(self, config: DDPOConfig, num_steps: int):
        config.check_steps(num_steps)
        self.config = config

    def prepare(self, batch: SampleBatch) -> SampleBatch:
        batch.advantages = per_prompt_advantages(batch.rewards, batch.prompts).clamp(
            -self.config.adv_clip, self.config.adv_clip)
        return batch

    def accumulate(self, ctx: Pipeline, batch: SampleBatch, scale: float,
                   generator: torch.Generator) -> dict[str, float]:
        traj = batch.trajectory
        if traj.log_probs is None:
            raise ValueError("DDPO needs stochastic sampling steps (eta > 0) to have log-probabilities")
        adv = batch.advantages if batch.advantages is not None else per_prompt_advantages(batch.rewards, batch.prompts)
        steps = self.config.transitions(traj.num_steps, generator)
        rows = Transitions.step_major(batch, steps)
        size = traj.latents[0, 0].numel()
        totals = {"loss": 0.0, "approx_kl": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0}
        for part in rows.chunks(self.config.transition_batch):
            share = len(part) / len(rows)
            mean, std = ctx.sampler.step_mean_std(part.x_t, ctx.model_fn(part.cond)(part.x_t, part.t), part.steps)
            log_prob = ctx.sampler.log_prob(part.x_next, mean, std)
            log_ratio = (log_prob - part.take(traj.log_probs)) / size
            ratio = log_ratio.exp()
            adv_rows = adv[part.index]
            unclipped = -adv_rows * ratio
            clipped = -adv_rows * ratio.clamp(1 - self.config.clip_range, 1 + self.config.clip_range)
            loss = torch.maximum(unclipped, clipped).mean()
            (loss * scale * share).backward()
            totals["loss"] += loss.item() * share
            totals["approx_kl"] += 0.5 * log_ratio.detach().square().mean().item() * share
            totals["clip_frac"] += ((ratio.detach() - 1).abs() > self.config.clip_range).float().mean().item() * share
            totals["ratio_mean"] += ratio.detach().mean().item() * share
        return as_dict(totals | {"transitions": len(steps)})

