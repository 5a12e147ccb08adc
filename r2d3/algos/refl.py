"""ReFL (Xu et al. 2023): maximise the reward of x0_hat predicted from one random late step.

The late state x_t comes from the stored on-policy trajectory (the same state a fresh no-grad rollout
with the same noise would reach); the current model's x0_hat at that step is decoded, rendered and
rewarded, and the negative reward is back-propagated into the LoRA weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r2d3.algos.base import AlgorithmBase, SampleBatch, as_dict, register_algorithm
from r2d3.config import AlgoConfig, opt
from r2d3.pipeline import Pipeline


@dataclass
class ReFLConfig(AlgoConfig):
    name: str = opt("refl", "registered algorithm (see r2d3.algos.available_algorithms())")
    refl_min_step: int = opt(-5, "earliest step (negative: counted from the end) for the reward")
    reward_scale: float = opt(1.0, "multiplier of the reward in the loss")


@register_algorithm("refl", ReFLConfig)
class ReFL(AlgorithmBase):
    name = "refl"

    def __init__(self, config: ReFLConfig, num_steps: int):
        first = config.refl_min_step if config.refl_min_step >= 0 else num_steps + config.refl_min_step
        if not 0 <= first < num_steps:
            raise ValueError(f"algo.refl_min_step={config.refl_min_step} is outside the {num_steps} sampling steps")
        self.first_step = first
        self.num_steps = num_steps
        self.config = config

    def accumulate(self, ctx: Pipeline, batch: SampleBatch, scale: float,
                   generator: torch.Generator) -> dict[str, float]:
        traj = batch.trajectory
        j = self.first_step + int(torch.randint(self.num_steps - self.first_step, (1,), generator=generator))
        x_t = traj.latents[:, j]
        t = traj.timesteps[j].to(x_t.device).expand(x_t.shape[0])
        x0 = ctx.sampler.predict_x0(x_t, ctx.model_fn(batch.cond)(x_t, t), j, at="current")
        reward = ctx.reward_of_latents(x0, batch.prompts, ctx.cameras(len(batch), generator))
        loss = -self.config.reward_scale * reward.mean()
        (loss * scale).backward()
        return as_dict({"loss": loss, "reward_at_x0hat": reward.mean(), "step": j, "transitions": 1})

