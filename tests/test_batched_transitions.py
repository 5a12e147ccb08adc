"""Stacked transitions and precomputed targets: the same loss as one transition of one trajectory at a
time, and precomputed targets equal to the ones the loop computes under the same approximation."""

import pytest
import torch
from torch import nn

from r2d3.algos import SampleBatch, build_algorithm
from r2d3.algos.base import Transitions, algorithm_options
from r2d3.algos.nabla_gfn import NablaGFNConfig
from r2d3.backends import TinySplatBackend
from r2d3.config import RenderConfig, SamplerConfig
from r2d3.pipeline import Pipeline
from r2d3.rewards import build_reward

STEPS = 6
PROMPTS = ["a red cube", "a blue cube", "a red cube"]


@pytest.fixture()
def ctx():
    torch.manual_seed(0)
    backend = TinySplatBackend.random_init(num_gaussians=16, dim=16, vocab=("a", "red", "blue", "cube"))
    nn.init.normal_(backend.denoiser.proj_out.weight, std=0.05)
    from r2d3.backends.lora import add_lora

    add_lora(backend.denoiser, 2, None, backend.lora_target_modules)
    with torch.no_grad():  # a trained adapter: the sampling policy differs from the reference model
        g = torch.Generator().manual_seed(2)
        for name, p in backend.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=g)
    render = RenderConfig(num_views=2, resolution=16)
    return Pipeline.build(backend, SamplerConfig(num_steps=STEPS, guidance_scale=1.5), render, build_reward("dnc"))


def sampled(ctx) -> SampleBatch:
    g = ctx.generate(PROMPTS, ctx.noise(len(PROMPTS), torch.Generator().manual_seed(1)),
                     generator=torch.Generator().manual_seed(2), jitter=True, render=False)
    return SampleBatch.from_generation(g)


def lora_grads(ctx) -> torch.Tensor:
    params = [p for n, p in ctx.backend.denoiser.named_parameters() if "lora_" in n]
    grads = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return grads


def one_row(batch: SampleBatch, b: int, step: int, cameras) -> Transitions:
    return Transitions.of(batch, torch.tensor([b]), torch.tensor([step]), None if cameras is None else cameras[[b]])


@pytest.mark.parametrize("name", ["nabla_gfn", "ddpo"])
@pytest.mark.parametrize("chunk", [0, 4])
def test_stacked_transitions_give_the_gradient_of_one_transition_at_a_time(ctx, name, chunk):
    """accumulate over all selected transitions stacked (in one pass, or in uneven chunks of 4 rows) equals
    the mean of the losses of every (trajectory, step) computed alone."""
    batch = sampled(ctx)
    options = {"timestep_fraction": 0.5, "transition_batch": chunk}
    if name == "nabla_gfn":
        options |= {"beta": 3e2, "off_policy_lag": False}
    algo = build_algorithm(algorithm_options(name)(**options), STEPS)
    batch = algo.prepare(batch)
    metrics = algo.accumulate(ctx, batch, 1.0, torch.Generator().manual_seed(5))
    stacked = lora_grads(ctx)

    gen = torch.Generator().manual_seed(5)  # the same draws: the steps, then the batch's reward cameras
    steps = algo.config.transitions(STEPS, gen)
    cameras = ctx.cameras(len(batch), gen) if name == "nabla_gfn" else None
    count = len(steps) * len(batch)
    losses = []
    for j in steps:
        for b in range(len(batch)):
            rows = one_row(batch, b, j, cameras)
            if name == "nabla_gfn":
                loss = algo.transition(ctx, ctx.model_fn(rows.cond), rows)["loss"]
            else:  # DDPO's clipped surrogate, written out for one row
                traj = batch.trajectory
                x_t, x_next = traj.latents[b:b + 1, j], traj.latents[b:b + 1, j + 1]
                mean, std = ctx.sampler.step_mean_std(x_t, ctx.model_fn(rows.cond)(x_t, traj.timesteps[j:j + 1]), j)
                ratio = ((ctx.sampler.log_prob(x_next, mean, std) - traj.log_probs[b, j]) / x_t[0].numel()).exp()
                clip = algo.config.clip_range
                adv = batch.advantages[b]
                loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
            (loss / count).backward()
            losses.append(loss.item())
    alone = lora_grads(ctx)
    assert stacked.abs().max() > 0
    torch.testing.assert_close(stacked, alone, rtol=1e-4, atol=1e-7)
    assert metrics["loss"] == pytest.approx(sum(losses) / count, rel=1e-5)


@pytest.mark.parametrize("shift", [False, True], ids=["own-timing", "x0-shift"])
def test_precomputed_targets_equal_the_loop_ones_under_the_same_approximation(ctx, shift):
    """score_ref and the drive stored right after sampling equal what the loop computes for the same
    transition and cameras with the Jacobian-free reward gradient at the sampling policy; the sampling
    policy's x0_hat comes from the stored outputs where the sampler evaluated the network at that state
    (every step but the last here), from a forward pass elsewhere."""
    batch = sampled(ctx)
    common = {"beta": 3e2, "jacobian_free": True, "timestep_fraction": 0.5, "x0_timestep_shift": shift}
    pre = build_algorithm(NablaGFNConfig(precompute_targets=True, transition_batch=4, **common), STEPS)
    loop = build_algorithm(NablaGFNConfig(**common), STEPS)
    batch = pre.precompute(ctx, batch, torch.Generator().manual_seed(7))
    targets = batch.targets
    gen = torch.Generator().manual_seed(7)  # the same draws: each trajectory's steps, then its cameras
    steps = torch.stack([torch.tensor(pre.config.transitions(STEPS, gen)) for _ in range(len(batch))])
    torch.testing.assert_close(targets.steps.cpu(), steps)
    assert (steps == STEPS - 1).any(dim=1).all()  # the last step, whose output the sampler never stored
    cameras = ctx.cameras(len(batch), gen)
    for b in range(len(batch)):
        for i, j in enumerate(steps[b].tolist()):
            rows = one_row(batch, b, j, cameras)
            with torch.no_grad():
                terms = loop.transition(ctx, ctx.model_fn(rows.cond), rows)
            torch.testing.assert_close(targets.score_ref[b, i], terms["score_ref"][0], rtol=1e-5, atol=1e-5)
            scale = float(terms["drive"].abs().max())  # float32 renders: agreement relative to the drive's size
            torch.testing.assert_close(targets.drive[b, i], terms["drive"][0], rtol=1e-4, atol=1e-5 * scale)
            assert float(targets.reward[b, i]) == pytest.approx(float(terms["reward"][0]), abs=1e-6)
    assert targets.drive.abs().max() > 0


def test_training_on_precomputed_targets_is_the_jacobian_free_loss_at_the_sampling_policy(ctx):
    """Right after sampling (the policy has not moved), the precomputed mode's gradient is the
    Jacobian-free loss's, on the same transitions and cameras; it runs one denoiser forward per row."""
    batch = sampled(ctx)
    common = {"beta": 3e2, "jacobian_free": True, "timestep_fraction": 0.5, "off_policy_lag": False}
    pre = build_algorithm(NablaGFNConfig(precompute_targets=True, **common), STEPS)
    batch = pre.precompute(ctx, batch, torch.Generator().manual_seed(7))
    calls = []
    hook = ctx.backend.denoiser.register_forward_pre_hook(lambda _, inputs: calls.append(inputs[0].shape[0]))
    pre.accumulate(ctx, batch, 1.0, torch.Generator().manual_seed(0))
    hook.remove()
    assert sum(calls) == 2 * batch.targets.steps.numel()  # one CFG-doubled pass over the rows
    got = lora_grads(ctx)
    loop = build_algorithm(NablaGFNConfig(**common), STEPS)
    gen = torch.Generator().manual_seed(7)
    [loop.config.transitions(STEPS, gen) for _ in range(len(batch))]
    cameras = ctx.cameras(len(batch), gen)
    steps = batch.targets.steps
    for b in range(len(batch)):
        for j in steps[b].tolist():
            rows = one_row(batch, b, j, cameras)
            (loop.transition(ctx, ctx.model_fn(rows.cond), rows)["loss"] / steps.numel()).backward()
    ref = lora_grads(ctx)
    # float32: the targets were rendered in other batches than the loop's, and the loss subtracts two large
    # nearly equal scores, so elements agree to float32 rounding relative to the whole gradient
    assert float((got - ref).norm() / ref.norm()) < 2e-5
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=2e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("overrides, message", [
    ({"precompute_targets": True}, "jacobian_free=true"),
    ({"precompute_targets": True, "jacobian_free": True, "flow_correction": True, "reverse_loss_scale": 1.0},
     "reverse_loss_scale=0"),
    ({"transition_batch": -1}, "transition_batch"),
])
def test_precompute_options_that_cannot_hold_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_algorithm(NablaGFNConfig(**overrides), STEPS)


def test_a_batch_without_its_targets_is_refused_in_precomputed_mode(ctx):
    algo = build_algorithm(NablaGFNConfig(precompute_targets=True, jacobian_free=True), STEPS)
    with pytest.raises(ValueError, match="annotated right after sampling"):
        algo.accumulate(ctx, sampled(ctx), 1.0, torch.Generator())


def test_precomputed_targets_through_the_render_reward_seam_equal_in_process_ones(ctx):
    """With scale.reward_actors > 0 the precompute's renders and reward gradients run behind the
    RemoteScorer seam (here in this process, as the actors do): the same targets."""
    from r2d3.rewards.remote import in_process_scorer

    algo = build_algorithm(NablaGFNConfig(beta=3e2, jacobian_free=True, precompute_targets=True), STEPS)
    local = algo.precompute(ctx, sampled(ctx), torch.Generator().manual_seed(7)).targets
    ctx.scorer = in_process_scorer(ctx.reward_fn, ctx.render)
    remote = algo.precompute(ctx, sampled(ctx), torch.Generator().manual_seed(7)).targets
    for name in ("steps", "score_ref", "drive", "reward"):
        torch.testing.assert_close(getattr(remote, name), getattr(local, name), rtol=1e-5, atol=1e-6)
