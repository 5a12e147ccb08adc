"""Render + reward computed elsewhere (another process, a Ray actor), differentiable in the trainer.

The trainer keeps the denoiser and the decoder; whoever holds the renderer and the reward model returns,
for a batch of decoded assets, the rewards ``[B]`` and -- when asked -- the gradient of the *summed*
reward w.r.t. every tensor of the :class:`~r2d3.render.Gaussians`. :class:`RemoteScorer` turns any such
``evaluate`` into a :data:`~r2d3.algos.base.Scorer` whose output sits in the trainer's autograd graph,
so ``reward.backward()`` / ``torch.autograd.grad`` reach the latents and the LoRA weights by the chain
rule, exactly as with in-process rendering.

Why one gradient per tensor is enough: each asset's reward depends only on that asset's Gaussians (the
renderer and every registered reward treat the batch independently), so the gradient of ``sum_b r_b``
w.r.t. asset ``b``'s tensors *is* ``d r_b / d gaussians_b``, and any upstream ``dL/dr`` recombines it as
``dL/dr_b * d r_b / d gaussians_b``.

Limitation: first order only. The saved gradients are constants, so a backward with ``create_graph=True``
(for a second derivative through the reward, e.g. a penalty on the reward gradient) raises instead of
silently dropping the render/reward's second-order terms. None of the algorithms needs it:
Nabla-GFlowNet takes one ``autograd.grad`` of the reward, ReFL/DRaFT one backward into LoRA.

Non-finite rewards and gradients are passed through unchanged; the training loop counts and skips them.

This module is plain torch (no Ray); :mod:`r2d3.ray.reward_actors` runs :func:`score_with_grad` in actors.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from r2d3.render import render_gaussians
from r2d3.render.cameras import Cameras
from r2d3.render.gaussians import Gaussians
from r2d3.render.output import RenderOutput

#: the tensors of a :class:`Gaussians`, in constructor order
GAUSSIAN_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Gaussians))

#: ``evaluate(gaussians, cameras, prompts, need_grad) -> (rewards [B], grads or None)``, where ``grads``
#: is a :class:`Gaussians` of ``d sum(rewards) / d tensor`` (any device; moved back by the scorer)
Evaluate = Callable[[Gaussians, Cameras, Sequence[str], bool], "tuple[Tensor, Gaussians | None]"]


def score_with_grad(gaussians: Gaussians, cameras: Cameras, prompts: Sequence[str],
                    reward_fn: Callable[[RenderOutput, Sequence[str]], Tensor], render_cfg: Any,
                    need_grad: bool) -> tuple[Tensor, Gaussians | None]:
    """Render ``gaussians`` from ``cameras`` and score them: what a render/reward worker computes.

    ``render_cfg`` is a :class:`~r2d3.config.RenderConfig` (its :meth:`~r2d3.config.RenderConfig.raster_options`
    are read). Returns the detached rewards ``[B]`` and, if ``need_grad``, the gradient of their sum w.r.t.
    each Gaussian tensor (zeros for a tensor the reward does not depend on), on the input's device.
    """
    options = render_cfg.raster_options()
    if not need_grad:
        with torch.no_grad():
            render = render_gaussians(gaussians, cameras, **options)
            return reward_fn(render, prompts).detach(), None
    leaves = [getattr(gaussians, name).detach().requires_grad_(True) for name in GAUSSIAN_FIELDS]
    with torch.enable_grad():
        render = render_gaussians(Gaussians(*leaves), cameras, **options)
        rewards = reward_fn(render, prompts)
        grads = torch.autograd.grad(rewards.sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    return rewards.detach(), Gaussians(*grads)


class _ScoreFunction(torch.autograd.Function):
    """``(evaluate, cameras, prompts, *gaussian_tensors) -> rewards [B]``, gradients from ``evaluate``."""

    @staticmethod
    def forward(ctx, evaluate: Evaluate, cameras: Cameras, prompts: Sequence[str],
                *tensors: Tensor) -> Tensor:
        rewards, grads = evaluate(Gaussians(*tensors), cameras, prompts, True)
        if grads is None:
            raise RuntimeError("the remote scorer asked for reward gradients but evaluate returned none")
        ctx.save_for_backward(*(getattr(grads, name).to(t) for name, t in zip(GAUSSIAN_FIELDS, tensors)))
        return rewards.to(tensors[0].device)

    @staticmethod
    def backward(ctx, grad_rewards: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the second derivative would silently miss terms
            raise RuntimeError("RemoteScorer is first order only: the reward gradient is a constant from "
                               "the render/reward worker, so it cannot be differentiated again "
                               "(create_graph=True)")
        out = []
        for needed, grad in zip(ctx.needs_input_grad[3:], ctx.saved_tensors):
            if not needed:
                out.append(None)
                continue
            weight = grad_rewards.to(grad).reshape(-1, *([1] * (grad.ndim - 1)))  # [B, 1, ...]
            out.append(weight * grad)
        return (None, None, None, *out)


class RemoteScorer:
    """A :data:`~r2d3.algos.base.Scorer` backed by ``evaluate`` (see :data:`Evaluate`).

    Gradients are requested only when grad mode is on and some Gaussian tensor requires grad (sampling
    and DDPO run under ``no_grad`` and pay for the forward pass only). Rewards come back on the device of
    the Gaussians; gradients on the device and dtype of each tensor. First order only (see the module
    docstring)::

        scorer = RemoteScorer(functools.partial(score_with_grad, reward_fn=reward, render_cfg=config.render))
    """

    def __init__(self, evaluate: Evaluate):
        self.evaluate = evaluate

    def __call__(self, gaussians: Gaussians, cameras: Cameras, prompts: Sequence[str]) -> Tensor:
        tensors = [getattr(gaussians, name) for name in GAUSSIAN_FIELDS]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _ScoreFunction.apply(self.evaluate, cameras, list(prompts), *tensors)
        rewards, _ = self.evaluate(gaussians.detach(), cameras, list(prompts), False)
        return rewards.to(tensors[0].device)


def in_process_scorer(reward_fn: Callable[[RenderOutput, Sequence[str]], Tensor],
                      render_cfg: Any) -> RemoteScorer:
    """:class:`RemoteScorer` over :func:`score_with_grad` in this process (tests, debugging the seam)."""

    def evaluate(gaussians: Gaussians, cameras: Cameras, prompts: Sequence[str], need_grad: bool):
        return score_with_grad(gaussians, cameras, prompts, reward_fn, render_cfg, need_grad)

    return RemoteScorer(evaluate)


__all__ = ["Evaluate", "GAUSSIAN_FIELDS", "RemoteScorer", "in_process_scorer", "score_with_grad"]
