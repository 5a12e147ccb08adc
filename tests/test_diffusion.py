"""Tests for r2d3.diffusion: parity with diffusers' own schedulers, Gaussian bookkeeping, gradients, errors.

Everything runs on tiny latents ([B, 2, 3, 3]) with a fixed random linear denoiser in float64, so the
comparisons with diffusers can be tight (diffusers' DPM step upcasts to float32 internally: 1e-6).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from r2d3.diffusion import (
    PREDICTION_TYPES,
    SCHEDULER_KINDS,
    StochasticSampler,
    Trajectory,
    cfg_combine,
    gaussian_log_prob,
    guided_model_fn,
    make_scheduler,
    scheduler_from_config,
    scheduler_kind,
)

# diffusers' own DPM set_timesteps trips a numpy-2 deprecation warning; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DTYPE = torch.float64
LATENT = (2, 3, 3)
BATCH = 3
STEPS = 8
# (kind, eta) pairs the sampler must reproduce exactly
STOCHASTIC_CASES = [("ddim", 0.5), ("ddim", 1.0), ("sde-dpmsolver++", 1.0)]


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, :, None] * b[None]).sum(dim=1)


class TinyDenoiser(torch.nn.Module):
    """A fixed random linear map of the latent plus a sinusoidal timestep embedding (and optional cond).

    ``skip=1`` adds x itself (a crude ε-predictor: x_T is mostly noise), which keeps x̂_0 and hence the
    latents O(1-10) for epsilon prediction, so absolute tolerances stay meaningful.
    """

    def __init__(self, cond_dim: int = 4, seed: int = 0, skip: float = 0.0) -> None:
        super().__init__()
        self.skip = skip
        gen = torch.Generator().manual_seed(seed)
        dim = math.prod(LATENT)
        self.weight = torch.nn.Parameter(torch.randn(dim, dim, generator=gen, dtype=DTYPE) * 0.5 / math.sqrt(dim))
        self.time_proj = torch.nn.Parameter(torch.randn(8, dim, generator=gen, dtype=DTYPE) * 0.3)
        self.cond_proj = torch.nn.Parameter(torch.randn(cond_dim, dim, generator=gen, dtype=DTYPE) * 0.3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        angles = t.to(DTYPE)[:, None] / 1000.0 * (2.0 ** torch.arange(4, dtype=DTYPE))
        embedding = torch.cat([angles.sin(), angles.cos()], dim=-1)
        # products written as broadcast-and-sum: tiny BLAS calls stall on busy 2-core machines
        hidden = _matmul(x.flatten(1), self.weight) + _matmul(embedding, self.time_proj)
        if cond is not None:
            hidden = hidden + _matmul(cond, self.cond_proj)
        return self.skip * x + hidden.view_as(x)


def _model(prediction_type: str = "epsilon") -> TinyDenoiser:
    return TinyDenoiser(skip=1.0 if prediction_type == "epsilon" else 0.0)


def _reference_scheduler(kind: str, prediction_type: str, steps: int = STEPS):
    """A fresh diffusers scheduler with its schedule numbers in float64, for tight comparisons."""
    scheduler = make_scheduler(kind, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    if kind == "ddim":
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(DTYPE)
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.to(DTYPE)
    else:
        scheduler.sigmas = scheduler.sigmas.to(DTYPE)
    return scheduler


def _diffusers_step(scheduler, kind: str, eta: float, output, t, x, noise):
    if kind == "ddim":
        return scheduler.step(output, t, x, eta=eta, variance_noise=noise).prev_sample
    return scheduler.step(output, t, x, variance_noise=noise).prev_sample


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _sampler(kind: str = "ddim", eta: float = 1.0, prediction_type: str = "epsilon", steps: int = STEPS):
    return StochasticSampler(make_scheduler(kind, prediction_type=prediction_type), steps, eta=eta)


# --------------------------------------------------------------------------- parity with diffusers' step
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("kind,eta", STOCHASTIC_CASES)
def test_step_mean_std_match_diffusers_step(kind: str, eta: float, prediction_type: str) -> None:
    sampler = _sampler(kind, eta, prediction_type)
    model = _model(prediction_type)
    with_noise = _reference_scheduler(kind, prediction_type)
    without_noise = _reference_scheduler(kind, prediction_type)
    x = _randn(BATCH, *LATENT, seed=1)
    with torch.no_grad():
        for j, t in enumerate(with_noise.timesteps):
            output = model(x, t.expand(BATCH))
            noise = _randn(BATCH, *LATENT, seed=100 + j)
            mean, std = sampler.step_mean_std(x, output, j)
            ref = _diffusers_step(with_noise, kind, eta, output, t, x, noise)
            ref_mean = _diffusers_step(without_noise, kind, eta, output, t, x, torch.zeros_like(noise))
            torch.testing.assert_close(mean + std * noise, ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-6)
            torch.testing.assert_close(std * noise, ref - ref_mean, rtol=0, atol=1e-6)
            assert std.ndim == 0 and float(std) > 0
            x = ref


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("kind,eta", STOCHASTIC_CASES)
def test_trajectory_reproduces_plain_diffusers_loop(kind: str, eta: float, prediction_type: str) -> None:
    sampler = _sampler(kind, eta, prediction_type)
    model = _model(prediction_type)
    traj = sampler.sample(model, shape=(BATCH, *LATENT), dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    scheduler = _reference_scheduler(kind, prediction_type)
    x = traj.latents[:, 0]
    with torch.no_grad():
        for j, t in enumerate(scheduler.timesteps):
            output = model(x, t.expand(BATCH))
            torch.testing.assert_close(output, traj.model_outputs[:, j], rtol=0, atol=1e-5)
            x = _diffusers_step(scheduler, kind, eta, output, t, x, traj.noises[:, j])
            torch.testing.assert_close(x, traj.latents[:, j + 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(x, traj.final, rtol=0, atol=1e-5)
    # internal consistency of the record
    torch.testing.assert_close(traj.next_states, traj.means + traj.stds.view(1, -1, 1, 1, 1) * traj.noises)
    assert traj.log_probs is not None and traj.log_probs.shape == (BATCH, STEPS)
    expected_lp = sampler.log_prob(traj.latents[:, -1], traj.means[:, -1], traj.stds[-1])
    torch.testing.assert_close(traj.log_probs[:, -1], expected_lp)
    assert traj.scores is None


def test_float32_chain_with_float64_model_keeps_latent_dtype() -> None:
    sampler = _sampler("ddim", 1.0)
    traj = sampler.sample(_model(), shape=(2, *LATENT), generator=torch.Generator().manual_seed(4))
    assert traj.latents.dtype == traj.means.dtype == traj.noises.dtype == torch.float32
    assert traj.model_outputs.dtype == DTYPE and traj.log_probs.dtype == DTYPE
    torch.testing.assert_close(traj.next_states, traj.means + traj.stds.float().view(1, -1, 1, 1, 1) * traj.noises)


def test_same_generator_same_trajectory_and_pre_drawn_noises() -> None:
    sampler = _sampler("sde-dpmsolver++")
    model = TinyDenoiser()
    first = sampler.sample(model, shape=(BATCH, *LATENT), dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    again = sampler.sample(model, shape=(BATCH, *LATENT), dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first.latents, again.latents, rtol=0, atol=0)
    replay = sampler.sample(model, first.latents[:, 0], noises=first.noises, progress=True)
    torch.testing.assert_close(replay.latents, first.latents, rtol=0, atol=0)



@pytest.mark.parametrize("kind", ["ddim", "sde-dpmsolver++"])
def test_final_x0_ends_with_the_models_clean_prediction(kind: str) -> None:
    """``final_x0`` leaves every transition as it was and makes ``final`` the x_0 prediction of one more
    model call at the last state, at the last step's next noise level (an independent recomputation)."""
    sampler = _sampler(kind, prediction_type="sample")
    model = TinyDenoiser()
    plain = sampler.sample(model, shape=(BATCH, *LATENT), dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    clean = sampler.sample(model, plain.latents[:, 0], noises=plain.noises, final_x0=True)
    torch.testing.assert_close(clean.latents, plain.latents, rtol=0, atol=0)
    x_k = plain.latents[:, -1]
    t0 = torch.full((BATCH,), int(sampler.next_timesteps[-1]))
    torch.testing.assert_close(clean.final, model(x_k, t0).to(DTYPE))  # "sample" prediction: x0_hat = output
    assert not torch.equal(clean.final, plain.final)
    both = Trajectory.concat([clean.select([0]), clean.select([1])])
    torch.testing.assert_close(both.final, clean.final[[0, 1]])
    with pytest.raises(ValueError, match="with and without clean_final"):
        Trajectory.concat([clean, plain])
    with pytest.raises(ValueError, match="clean_final must have shape"):
        Trajectory(**{**clean.__dict__, "clean_final": clean.clean_final[:, :1]})

# --------------------------------------------------------------------------- Gaussian bookkeeping
@pytest.mark.parametrize("kind,eta", STOCHASTIC_CASES)
def test_log_prob_matches_float64_normal(kind: str, eta: float) -> None:
    sampler = _sampler(kind, eta)
    x = _randn(BATCH, *LATENT, seed=2)
    output = _randn(BATCH, *LATENT, seed=3)
    for step_index in (0, STEPS - 1, torch.tensor([0, 3, STEPS - 1])):
        mean, std = sampler.step_mean_std(x, output, step_index)
        x_prev = mean + std * _randn(BATCH, *LATENT, seed=4)
        expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_prev).flatten(1).sum(1)
        log_prob = sampler.log_prob(x_prev, mean, std)
        assert log_prob.shape == (BATCH,) and log_prob.dtype == DTYPE
        torch.testing.assert_close(log_prob, expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kind,eta", STOCHASTIC_CASES)
def test_score_is_autograd_of_log_prob(kind: str, eta: float) -> None:
    sampler = _sampler(kind, eta)
    x = _randn(BATCH, *LATENT, seed=5)
    output = _randn(BATCH, *LATENT, seed=6)
    for step_index in (1, STEPS - 1, torch.tensor([STEPS - 1, 2, 0])):
        mean, std = sampler.step_mean_std(x, output, step_index)
        x_prev = (mean + std * _randn(BATCH, *LATENT, seed=7)).requires_grad_(True)
        (grad,) = torch.autograd.grad(sampler.log_prob(x_prev, mean, std).sum(), x_prev)
        torch.testing.assert_close(sampler.score(x_prev.detach(), mean, std), grad, rtol=1e-10, atol=1e-10)


def test_recorded_scores_and_log_probs() -> None:
    sampler = _sampler("ddim", 1.0)
    traj = sampler.sample(TinyDenoiser(), shape=(2, *LATENT), dtype=DTYPE, record_scores=True,
                          generator=torch.Generator().manual_seed(1))
    assert traj.scores is not None and traj.scores.shape == (2, STEPS, *LATENT)
    # the recorded score is -noise/std at the sampled point
    torch.testing.assert_close(traj.scores, -traj.noises / traj.stds.view(1, -1, 1, 1, 1))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(traj.noises).flatten(2).sum(2) - (
        math.prod(LATENT) * traj.stds.log()
    )
    torch.testing.assert_close(traj.log_probs, expected)


def test_gaussian_functions_reject_zero_std_and_mismatched_shapes() -> None:
    x = _randn(2, *LATENT, seed=8)
    with pytest.raises(ValueError, match="std must be > 0"):
        gaussian_log_prob(x, x, 0.0)
    with pytest.raises(ValueError, match="deterministic"):
        StochasticSampler.score(x, x, torch.tensor([0.0, 1.0]).view(2, 1, 1, 1))
    with pytest.raises(ValueError, match="does not match mean shape"):
        gaussian_log_prob(x, x[:1], 1.0)
    with pytest.raises(ValueError, match="leading batch dimension"):
        gaussian_log_prob(x[0, 0, 0, 0], x[0, 0, 0, 0], 1.0)
    assert gaussian_log_prob(x, x, 2.0).shape == (2,)
    assert gaussian_log_prob(x[:, 0, 0, 0], x[:, 0, 0, 0], 2.0).shape == (2,)  # [B] latents: nothing to sum


# --------------------------------------------------------------------------- x̂_0
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("kind", SCHEDULER_KINDS)
def test_predict_x0_inverts_forward_noising(kind: str, prediction_type: str) -> None:
    sampler = _sampler(kind, 1.0, prediction_type)
    scheduler = _reference_scheduler(kind, prediction_type)
    x0 = _randn(BATCH, *LATENT, seed=9)
    eps = _randn(BATCH, *LATENT, seed=10)

    def true_output(alpha_bar: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[prediction_type]

    for j in range(STEPS):
        # current level: diffusers' own forward noising at timesteps[j]
        t = sampler.timesteps[j].expand(BATCH)
        x_t = scheduler.add_noise(x0, eps, t)
        recovered = sampler.predict_x0(x_t, true_output(sampler.alpha_bar[j]), j)
        torch.testing.assert_close(recovered, x0, rtol=0, atol=1e-9)
        # next level: noise to the level x_{t-1} has after step j
        abar_next = sampler.alpha_bar_next[j]
        if kind == "ddim":
            x_next = scheduler.add_noise(x0, eps, sampler.next_timesteps[j].expand(BATCH))
            if prediction_type == "v_prediction":
                velocity = scheduler.get_velocity(x0, eps, sampler.next_timesteps[j].expand(BATCH))
                torch.testing.assert_close(velocity, true_output(abar_next))
        elif j < STEPS - 1:
            x_next = scheduler.add_noise(x0, eps, sampler.timesteps[j + 1].expand(BATCH))
        else:  # the final sigma_min level is not a schedule timestep; noise by hand
            x_next = abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps
        recovered_next = sampler.predict_x0(x_next, true_output(abar_next), j, at="next")
        torch.testing.assert_close(recovered_next, x0, rtol=0, atol=1e-9)
        per_sample = sampler.predict_x0(x_next, true_output(abar_next), torch.full((BATCH,), j), at="next")
        torch.testing.assert_close(per_sample, recovered_next)


@pytest.mark.parametrize("kind", SCHEDULER_KINDS)
def test_last_step_conventions(kind: str) -> None:
    sampler = _sampler(kind, 1.0)
    scheduler = make_scheduler(kind)
    assert sampler.next_timesteps[-1] == 0
    torch.testing.assert_close(sampler.next_timesteps[:-1], sampler.timesteps[1:])
    # x_0 sits at the noise level of training timestep 0: finite, non-zero std for the last transition
    torch.testing.assert_close(sampler.alpha_bar_next[-1], scheduler.alphas_cumprod[0].to(DTYPE), rtol=1e-6, atol=0)
    torch.testing.assert_close(sampler.alpha_bar_next[:-1], sampler.alpha_bar[1:])
    assert sampler.is_stochastic and 0 < float(sampler.stds[-1]) < 0.05
    assert torch.all(sampler.alpha_bar_next > sampler.alpha_bar)
    t_next = sampler.model_timesteps(STEPS - 1, 2, at="next")
    assert t_next.tolist() == [0, 0]
    assert sampler.model_timesteps(torch.tensor([0, STEPS - 1]), 2).tolist() == [
        int(sampler.timesteps[0]), int(sampler.timesteps[-1])]


def test_ddim_eta1_and_sde_dpm_give_the_same_kernel() -> None:
    ddim, dpm = _sampler("ddim", 1.0), _sampler("sde-dpmsolver++")
    torch.testing.assert_close(ddim.stds, dpm.stds, rtol=1e-5, atol=0)
    torch.testing.assert_close(ddim.mean_coef_sample, dpm.mean_coef_sample, rtol=1e-5, atol=0)
    torch.testing.assert_close(ddim.mean_coef_x0, dpm.mean_coef_x0, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- differentiability
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("kind,eta", STOCHASTIC_CASES)
def test_step_mean_std_gradcheck(kind: str, eta: float, prediction_type: str) -> None:
    sampler = _sampler(kind, eta, prediction_type)
    x = _randn(2, *LATENT, seed=11).requires_grad_(True)
    output = _randn(2, *LATENT, seed=12).requires_grad_(True)
    for step_index in (0, STEPS - 1, torch.tensor([STEPS - 1, 1])):
        assert torch.autograd.gradcheck(lambda m, xt: sampler.step_mean_std(xt, m, step_index)[0], (output, x))
        assert torch.autograd.gradcheck(lambda m, xt: sampler.predict_x0(xt, m, step_index, at="next"), (output, x))
    # the Nabla-GFlowNet score is differentiable in the model output through the mean
    x_prev = _randn(2, *LATENT, seed=13)
    assert torch.autograd.gradcheck(
        lambda m: sampler.score(x_prev, *sampler.step_mean_std(x.detach(), m, STEPS - 1)), (output,)
    )


def test_grad_last_k_keeps_graph_through_last_steps_only() -> None:
    sampler = _sampler("ddim", 1.0)
    model = TinyDenoiser()
    grad_modes: list[bool] = []

    def recording_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        grad_modes.append(torch.is_grad_enabled())
        return model(x, t)

    traj = sampler.sample(recording_model, shape=(2, *LATENT), dtype=DTYPE, grad_last_k=2,
                          generator=torch.Generator().manual_seed(0))
    assert grad_modes == [False] * (STEPS - 2) + [True] * 2
    assert traj.final.requires_grad
    assert not traj.model_outputs.requires_grad and not traj.means.requires_grad
    assert not traj.log_probs.requires_grad
    (grad,) = torch.autograd.grad(traj.final.square().sum(), model.weight)
    # the same gradient by hand: no-grad chain to x_{K-2}, then two differentiable steps
    x = traj.latents[:, STEPS - 2].detach()
    for j in (STEPS - 2, STEPS - 1):
        x = sampler.step(x, model(x, sampler.model_timesteps(j, 2)), j, noise=traj.noises[:, j]).prev_sample
    (expected,) = torch.autograd.grad(x.square().sum(), model.weight)
    torch.testing.assert_close(grad, expected)
    assert grad.abs().sum() > 0
    grad_modes.clear()
    no_grad = sampler.sample(recording_model, traj.latents[:, 0].detach(), noises=traj.noises)
    assert grad_modes == [False] * STEPS and not no_grad.final.requires_grad
    torch.testing.assert_close(no_grad.final, traj.final.detach())


def test_step_api_drives_the_same_chain() -> None:
    sampler = _sampler("sde-dpmsolver++", prediction_type="v_prediction")
    model = TinyDenoiser()
    traj = sampler.sample(model, shape=(2, *LATENT), dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    x = traj.latents[:, 0]
    for j in range(STEPS):
        out = sampler.step(x, model(x, sampler.model_timesteps(j, 2)), j, noise=traj.noises[:, j])
        x = out.prev_sample
    torch.testing.assert_close(x, traj.final.detach())
    drawn = sampler.step(x, x, 0, generator=torch.Generator().manual_seed(0))
    assert drawn.noise.shape == x.shape


# --------------------------------------------------------------------------- classifier-free guidance
def test_cfg_wrapper_and_built_in_guidance_agree() -> None:
    sampler = _sampler("ddim", 1.0)
    model = TinyDenoiser()
    cond, uncond = _randn(2, 4, seed=14), torch.zeros(1, 4, dtype=DTYPE)
    x = _randn(2, *LATENT, seed=15)
    t = torch.tensor([999, 500])
    guided = guided_model_fn(model, cond, uncond, guidance_scale=5.0)
    expected = cfg_combine(model(x, t, uncond.expand(2, 4)), model(x, t, cond), 5.0)
    torch.testing.assert_close(guided(x, t), expected)
    torch.testing.assert_close(guided(x, torch.tensor(10)), guided(x, torch.tensor([10, 10])))
    torch.testing.assert_close(guided_model_fn(model, cond)(x, t), model(x, t, cond))

    gen = torch.Generator().manual_seed(2)
    built_in = sampler.sample(model, shape=(2, *LATENT), dtype=DTYPE, generator=gen,
                              cond=cond, uncond=uncond, guidance_scale=5.0)
    wrapped = sampler.sample(guided, built_in.latents[:, 0], noises=built_in.noises)
    torch.testing.assert_close(built_in.latents, wrapped.latents)
    torch.testing.assert_close(built_in.model_outputs, wrapped.model_outputs)

    dict_model = lambda x, t, c: model(x, t, c["emb"] * c["mask"])  # noqa: E731
    dict_guided = guided_model_fn(dict_model, {"emb": cond, "mask": torch.ones(2, 1, dtype=DTYPE)},
                                  {"emb": uncond, "mask": torch.ones(1, 1, dtype=DTYPE)}, 5.0)
    torch.testing.assert_close(dict_guided(x, t), expected)


def test_cfg_errors() -> None:
    model = TinyDenoiser()
    x, t = _randn(2, *LATENT, seed=16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="needs an unconditional"):
        guided_model_fn(model, _randn(2, 4, seed=0), None, 3.0)
    with pytest.raises(ValueError, match="uncond has batch size 3"):
        guided_model_fn(model, _randn(2, 4, seed=0), _randn(3, 4, seed=1), 3.0)(x, t)
    with pytest.raises(ValueError, match="both be tensors or mappings"):
        guided_model_fn(model, _randn(2, 4, seed=0), {"emb": _randn(2, 4, seed=1)}, 3.0)(x, t)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        guided_model_fn(model, {"a": _randn(2, 4, seed=0), "b": _randn(1, 4, seed=0)})(x, t)
    with pytest.raises(ValueError, match="uncond shape"):
        cfg_combine(x, x[:1], 2.0)
    with pytest.raises(ValueError, match="need cond"):
        _sampler().sample(model, x, guidance_scale=2.0)


# --------------------------------------------------------------------------- deterministic steps
def test_eta_zero_is_deterministic_and_has_no_density() -> None:
    sampler = _sampler("ddim", 0.0)
    assert not sampler.is_stochastic and torch.all(sampler.stds == 0)
    model = TinyDenoiser()
    traj = sampler.sample(model, shape=(2, *LATENT), dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    assert traj.log_probs is None
    scheduler = _reference_scheduler("ddim", "epsilon")
    x = traj.latents[:, 0]
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.expand(2)), t, x, eta=0.0).prev_sample
    torch.testing.assert_close(x, traj.final, rtol=0, atol=1e-9)
    mean, std = sampler.step_mean_std(x, x, 0)
    with pytest.raises(ValueError, match="deterministic"):
        sampler.log_prob(mean, mean, std)
    with pytest.raises(ValueError, match="deterministic"):
        sampler.score(mean, mean, std)
    with pytest.raises(ValueError, match="record_scores"):
        sampler.sample(model, x, record_scores=True)


def test_set_alpha_to_one_makes_only_the_last_step_deterministic() -> None:
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    sampler = StochasticSampler(scheduler, 4)
    assert float(sampler.alpha_bar_next[-1]) == 1.0 and float(sampler.stds[-1]) == 0.0
    assert torch.all(sampler.stds[:-1] > 0)
    x = _randn(2, *LATENT, seed=17)
    torch.testing.assert_close(sampler.predict_x0(x, _randn(2, *LATENT, seed=18), 3, at="next"), x)


# --------------------------------------------------------------------------- schedules
def test_make_scheduler_forces_sampler_settings() -> None:
    ddim = make_scheduler("ddim", prediction_type="v_prediction", beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    assert isinstance(ddim, DDIMScheduler)
    assert (ddim.config.clip_sample, ddim.config.thresholding, ddim.config.set_alpha_to_one) == (False, False, False)
    assert ddim.config.prediction_type == "v_prediction"
    dpm = make_scheduler(" SDE-DPMSolver++ ", timestep_spacing="linspace", steps_offset=1)
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.algorithm_type == "sde-dpmsolver++" and dpm.config.solver_order == 1
    assert dpm.config.final_sigmas_type == "sigma_min" and dpm.config.lower_order_final
    assert scheduler_kind(dpm) == "sde-dpmsolver++"
    custom = make_scheduler("ddim", num_train_timesteps=10, trained_betas=[0.01] * 10)
    assert StochasticSampler(custom, 10).timesteps.tolist() == list(range(9, -1, -1))


def test_scheduler_from_config_round_trip_and_kind_override() -> None:
    original = make_scheduler("sde-dpmsolver++", prediction_type="sample", timestep_spacing="linspace")
    saved = json.loads(original.to_json_string())  # what save_pretrained writes, with _class_name
    rebuilt = scheduler_from_config(saved)
    a, b = StochasticSampler(original, 5), StochasticSampler(rebuilt, 5)
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.stds, b.stds)
    # a PixArt-Σ-like saved config (2nd-order deterministic DPM-Solver++) becomes the 1st-order SDE sampler
    pixart = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "solver_order": 2,
              "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "timestep_spacing": "linspace",
              "steps_offset": 1, "prediction_type": "epsilon"}
    sde = scheduler_from_config(pixart)
    assert sde.config.algorithm_type == "sde-dpmsolver++" and sde.config.solver_order == 1
    ddim = scheduler_from_config(pixart, kind="ddim", prediction_type="v_prediction")
    assert isinstance(ddim, DDIMScheduler) and ddim.config.prediction_type == "v_prediction"
    linspace = StochasticSampler(scheduler_from_config(pixart, kind="ddim"), 20)
    # diffusers' DDIM steps to t - N // K, which for "linspace" spacing is not always timesteps[j+1]
    assert torch.equal(linspace.next_timesteps[:-1], linspace.timesteps[:-1] - 50)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: make_scheduler("euler"), "valid kinds: ddim, sde-dpmsolver\\+\\+"),
        (lambda: make_scheduler("ddim", prediction_type="flow_prediction"), "valid prediction types"),
        (lambda: make_scheduler("ddim", beta_schedule="cosine"), "unknown beta_schedule"),
        (lambda: make_scheduler("ddim", timestep_spacing="even"), "unknown timestep_spacing"),
        (lambda: make_scheduler("ddim", beta_start=0.1, beta_end=0.01), "beta_start <= beta_end"),
        (lambda: make_scheduler("ddim", num_train_timesteps=0), "num_train_timesteps"),
        (lambda: scheduler_from_config({"_class_name": "PNDMScheduler"}), "cannot infer the scheduler kind"),
        (lambda: scheduler_from_config(["not", "a", "dict"]), "must be a mapping"),
        (lambda: scheduler_from_config({}, kind="ddim", clip_sample=True), "clip_sample=True is not allowed"),
        (lambda: scheduler_kind(DDPMScheduler()), "unsupported scheduler DDPMScheduler"),
        (lambda: scheduler_kind(DDIMScheduler()), "clip_sample=True"),
        (lambda: scheduler_kind(DPMSolverMultistepScheduler()), "algorithm_type='dpmsolver\\+\\+'"),
    ],
)
def test_schedule_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_steps": 0}, "num_steps must be in \\[1, num_train_timesteps=1000\\]"),
        ({"num_steps": 1001}, "num_steps must be in"),
        ({"num_steps": 2.5}, "num_steps must be an int"),
        ({"eta": -0.1}, "eta must be a number in \\[0, 1\\]"),
        ({"eta": 1.5}, "eta must be"),
        ({"eta": True}, "eta must be"),
    ],
)
def test_sampler_constructor_errors(kwargs: dict, match: str) -> None:
    args = {"num_steps": 4, "eta": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        StochasticSampler(make_scheduler("ddim"), args["num_steps"], eta=args["eta"])


def test_sampler_constructor_rejects_bad_schedulers() -> None:
    with pytest.raises(ValueError, match="only meaningful for DDIM"):
        StochasticSampler(make_scheduler("sde-dpmsolver++"), 4, eta=0.5)
    zero_snr = DDIMScheduler(clip_sample=False, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="zero terminal SNR"):
        StochasticSampler(zero_snr, 4)
    v_zero_snr = DDIMScheduler(clip_sample=False, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                               prediction_type="v_prediction")
    assert StochasticSampler(v_zero_snr, 4).alpha_bar[0] == 0
    bad = DDIMScheduler(clip_sample=False, prediction_type="epsilon")
    bad.register_to_config(prediction_type="x0")
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        StochasticSampler(bad, 4)
    # diffusers' "trailing" spacing yields 62 timesteps for 61 steps out of 1000
    with pytest.raises(ValueError, match="produced 62 timesteps"):
        StochasticSampler(make_scheduler("ddim"), 61)
    with pytest.raises(ValueError, match="outside \\[0, 1000\\).*steps_offset=1"):
        StochasticSampler(make_scheduler("ddim", timestep_spacing="leading", steps_offset=1), 1000)


def test_step_input_errors() -> None:
    sampler = _sampler()
    x = _randn(2, *LATENT, seed=19)
    with pytest.raises(ValueError, match="does not match latent shape"):
        sampler.step_mean_std(x, x[:, :1], 0)
    with pytest.raises(ValueError, match="at least one latent dimension"):
        sampler.step_mean_std(x[:, 0, 0, 0], x[:, 0, 0, 0], 0)
    with pytest.raises(ValueError, match="must be tensors"):
        sampler.predict_x0(x, 1.0, 0)
    with pytest.raises(ValueError, match="step_index must be in \\[0, 8\\)"):
        sampler.step_mean_std(x, x, STEPS)
    with pytest.raises(ValueError, match="step_index must be an int"):
        sampler.step_mean_std(x, x, 1.0)
    with pytest.raises(ValueError, match="shape \\[2\\]"):
        sampler.step_mean_std(x, x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="values must be in"):
        sampler.step_mean_std(x, x, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="must be integer"):
        sampler.step_mean_std(x, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="at must be 'current' or 'next'"):
        sampler.predict_x0(x, x, 0, at="previous")
    with pytest.raises(ValueError, match="at must be"):
        sampler.model_timesteps(0, 2, at="later")
    with pytest.raises(ValueError, match="noise shape"):
        sampler.step(x, x, 0, noise=x[:1])
    mean, std = sampler.step_mean_std(x, x, torch.tensor(3))  # 0-dim index tensor = int
    assert std.ndim == 0 and mean.shape == x.shape


def test_sample_input_errors() -> None:
    sampler = _sampler()
    model = TinyDenoiser()
    x = _randn(2, *LATENT, seed=20)
    with pytest.raises(ValueError, match="needs x_T or a shape"):
        sampler.sample(model)
    with pytest.raises(ValueError, match="x_T must be"):
        sampler.sample(model, x[:, 0, 0, 0])
    with pytest.raises(ValueError, match="noises must have shape \\[2, 8, 2, 3, 3\\]"):
        sampler.sample(model, x, noises=_randn(2, STEPS - 1, *LATENT, seed=0))
    with pytest.raises(ValueError, match="grad_last_k must be"):
        sampler.sample(model, x, grad_last_k=STEPS + 1)
    with pytest.raises(ValueError, match="model_fn returned \\(2, 18\\) at step 0"):
        sampler.sample(lambda x, t: x.flatten(1), x)
    with pytest.raises(ValueError, match="model_fn returned tuple"):
        sampler.sample(lambda x, t: (x,), x)


# --------------------------------------------------------------------------- Trajectory container
def test_trajectory_helpers() -> None:
    sampler = _sampler("sde-dpmsolver++")
    model = TinyDenoiser()
    traj = sampler.sample(model, shape=(3, *LATENT), dtype=DTYPE, record_scores=True,
                          generator=torch.Generator().manual_seed(0))
    assert (traj.batch_size, traj.num_steps) == (3, STEPS)
    assert traj.states.shape == traj.next_states.shape == (3, STEPS, *LATENT)
    sub = traj.select([2, 0])
    torch.testing.assert_close(sub.latents, traj.latents[[2, 0]])
    torch.testing.assert_close(sub.scores, traj.scores[[2, 0]])
    assert traj.select(slice(0, 1)).batch_size == 1
    both = Trajectory.concat([traj.select([0]), traj.select([1, 2])])
    torch.testing.assert_close(both.latents, traj.latents)
    torch.testing.assert_close(both.log_probs, traj.log_probs)
    no_scores = Trajectory.concat([traj, sampler.sample(model, traj.latents[:, 0])])
    assert no_scores.scores is None and no_scores.batch_size == 6
    assert traj.to("cpu").detach().latents.device.type == "cpu"
    other = _sampler("sde-dpmsolver++", steps=STEPS + 1).sample(model, traj.latents[:, 0])
    with pytest.raises(ValueError, match="different timesteps"):
        Trajectory.concat([traj, other.select([0])])
    with pytest.raises(ValueError, match="at least one"):
        Trajectory.concat([])
    with pytest.raises(ValueError, match="Trajectory.means must have shape"):
        Trajectory(**{**traj.__dict__, "means": traj.means[:, :-1]})
    with pytest.raises(ValueError, match="Trajectory.stds must have shape"):
        Trajectory(**{**traj.__dict__, "stds": traj.stds[:-1]})
    with pytest.raises(ValueError, match="Trajectory.log_probs must have shape"):
        Trajectory(**{**traj.__dict__, "log_probs": traj.log_probs[:1]})
    with pytest.raises(ValueError, match="latents must be"):
        Trajectory(**{**traj.__dict__, "latents": traj.latents[:, 0, 0, 0, 0]})
    assert "sde-dpmsolver++" in repr(sampler)
