"""DRaFT-K (Clark et al. 2024): back-propagate the reward through the last K sampling steps.

The chain is re-run from the stored state K steps before the end with the stored noises, so the
final sample is the one the policy drew, now with a graph through the last K denoiser calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r2d3.algos.base import AlgorithmBase, SampleBatch, as_dict, register_algorithm
from r2d3.config import AlgoConfig, at_least, opt
from r2d3.pipeline import Pipeline


@dataclass
class DRaFTConfig(AlgoConfig):
    name: str = opt("draft", "registered algorithm (see r2d3.algos.available_algorithms())")
    draft_k: int = opt(1, "backpropagate the reward through the last K sampling steps", check=at_least(1))
    reward_scale: float = opt(1.0, "multiplier of the reward in the loss")


@register_algorithm("draft", DRaFTConfig)
class DRaFT(AlgorithmBase):
    name = "draft"

    def __init__(self, config: DRaFTConfig, num_steps: int):
        if not 1 <= config.draft_k <= num_steps:
            raise ValueError(f"algo.draft_k must be in [1, {num_steps}] (the number of sampling steps), "
                             f"got {config.draft_k}")
        self.k = config.draft_k
        self.config = config

    def accumulate(self, ctx: Pipeline, batch: SampleBatch, scale: float,
                   generator: torch.Generator) -> dict[str, float]:
        traj = batch.trajectory
        model_fn = ctx.model_fn(batch.cond)
        start = traj.num_steps - self.k
        x = traj.latents[:, start].detach()
        for j in range(start, traj.num_steps):
            t = traj.timesteps[j].to(x.device).expand(x.shape[0])
            x = ctx.sampler.step(x, model_fn(x, t), j, noise=traj.noises[:, j]).prev_sample
        if getattr(ctx.backend, "final_x0", False):  # the sample such a backend's chain ends with
            t = traj.next_timesteps[-1].to(x.device).expand(x.shape[0])
            x = ctx.sampler.predict_x0(x, model_fn(x, t), traj.num_steps - 1, at="next")
        reward = ctx.reward_of_latents(x, batch.prompts, ctx.cameras(len(batch), generator))
        loss = -self.config.reward_scale * reward.mean()
        (loss * scale).backward()
        return as_dict({"loss": loss, "reward_at_x0hat": reward.mean(), "transitions": self.k})

