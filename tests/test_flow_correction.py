"""The full Nabla-GFlowNet objective: the learned residual log-flow correction g_phi and the reverse loss.

The closed-form check: data N(0, I), an exact epsilon-predictor for it as the reference model, a linear
reward r(x) = a.x on the final latent, and the real DDIM (eta = 1) sampler. The reference chain is linear
Gaussian, x_{j+1} = A_j x_j + s_j xi, so the exact residual log-flow is linear, grad log F~_j = c_j with
c_K = beta a and c_j = A_j c_{j+1}. The tilted (optimal) policy shifts each step's mean by s_j^2 c_{j+1}.
With that policy fixed, the only g_phi satisfying the residual conditions is
g*(x_{j+1}) = c_{j+1} - beta w_j grad r(x0_hat(x_{j+1})), which training must approach.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

from r2d3.algos import build_algorithm
from r2d3.algos.flow import FlowCorrection
from r2d3.text import PromptEmbeds
from r2d3.algos.nabla_gfn import NablaGFNConfig
from r2d3.diffusion import StochasticSampler
from helpers import rows_at

DIM, STEPS, BETA = 2, 8, 0.5
A = torch.tensor([1.0, -0.5], dtype=torch.float64)


class ToyDenoiser:
    """Exact epsilon of N(0, I) data; with adapters on, plus a per-timestep offset (the tuned policy)."""

    def __init__(self, alphas_cumprod, offsets):
        self.abar, self.offsets, self.enabled = alphas_cumprod, offsets, True

    def disable_adapters(self):
        self.enabled = False

    def enable_adapters(self):
        self.enabled = True

    def __call__(self, x, t):
        ti = int(t[0])
        eps = (1 - self.abar[ti]).sqrt().to(x.dtype) * x
        if self.enabled and ti in self.offsets:
            eps = eps + self.offsets[ti].to(x.dtype)
        return eps


def toy_setup():
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, steps_offset=1,
                              set_alpha_to_one=False)
    sampler = StochasticSampler(scheduler, STEPS, eta=1.0)
    abar = scheduler.alphas_cumprod.double()
    denoiser = ToyDenoiser(abar, {})
    with torch.no_grad():  # the reference chain's linear maps A_j: mu_j(x) = A_j x
        coeffs = []
        for j in range(STEPS):
            x = torch.eye(DIM, dtype=torch.float64)
            t = sampler.timesteps[j].expand(DIM)
            denoiser.enabled = False
            mean, std = sampler.step_mean_std(x, denoiser(x, t), j)
            coeffs.append((float(mean[0, 0]), float(std)))
        denoiser.enabled = True
    c = [None] * (STEPS + 1)
    c[STEPS] = BETA * A
    for j in reversed(range(STEPS)):
        c[j] = coeffs[j][0] * c[j + 1]
    for j in range(STEPS):  # the tilted policy: mean + s_j^2 c_{j+1}, through d mu / d eps = b_j cm_j
        x = torch.zeros(1, DIM, dtype=torch.float64)
        t = sampler.timesteps[j].expand(1)
        m0, std = sampler.step_mean_std(x, torch.zeros_like(x), j)
        m1, _ = sampler.step_mean_std(x, torch.ones_like(x), j)
        slope = float((m1 - m0)[0, 0])
        denoiser.offsets[int(sampler.timesteps[j])] = std.square() * c[j + 1] / slope
    cond = PromptEmbeds(torch.zeros(1, 1, 4, dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool))
    ctx = SimpleNamespace(
        sampler=sampler,
        backend=SimpleNamespace(denoiser=denoiser, latent_shape=(DIM,), device=torch.device("cpu")),
        uncond=cond,
        model_fn=lambda _cond: denoiser,
        cameras=lambda n, gen: None,
        reward_of_latents=lambda x0, prompts, cams, image_noise=0.0, generator=None: (x0 * A.to(x0.dtype)).sum(-1),
    )
    return ctx, c, cond


def exact_flow(ctx, c, step: int, x_next: torch.Tensor) -> torch.Tensor:
    """g* at the state after ``step``: c_{j+1} minus the forward-looking term at that state."""
    x = x_next.detach().requires_grad_(True)
    t_next = ctx.sampler.next_timesteps[step].expand(x.shape[0])
    with torch.enable_grad():
        x0 = ctx.sampler.predict_x0(x, ctx.backend.denoiser(x, t_next), step, at="next")
        (grad,) = torch.autograd.grad(ctx.reward_of_latents(x0, None, None).sum(), x)
    w = float(ctx.sampler.alpha_bar_next[step])
    return c[step + 1].expand_as(x) - BETA * w * grad


def sample(ctx, n: int, gen: torch.Generator):
    noise = torch.randn(n, 1 + STEPS, DIM, generator=gen, dtype=torch.float64)
    return ctx.sampler.sample(ctx.backend.denoiser, x_T=noise[:, 0], noises=noise[:, 1:], dtype=torch.float64)


def algo(**kw):
    return build_algorithm(NablaGFNConfig(beta=BETA, reg_scale=0.0, flow_correction=True,
                                      flow_hidden=64, **kw), STEPS)


@pytest.mark.parametrize("reverse", [0.0, 1.0])
def test_trained_flow_correction_approaches_the_closed_form_residual_flow(reverse):
    torch.manual_seed(0)
    ctx, c, cond = toy_setup()
    nabla = algo(reverse_loss_scale=reverse)
    modules = nabla.build_modules(ctx)
    nabla.flow.double()
    opt = torch.optim.Adam(modules["flow"].module.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    exact = torch.stack([exact_flow(ctx, c, j, torch.zeros(1, DIM, dtype=torch.float64))[0] for j in range(STEPS)])
    scale = float(exact.norm(dim=1).max())
    assert scale > 0.05  # a non-trivial target (it shrinks towards the end, where x0_hat is nearly exact)
    assert exact[-1].norm() < 1e-3 * scale  # (nearly) vanishes at x_0, where x0_hat is the sample
    batch = 16
    conds = PromptEmbeds(cond.tokens.expand(batch, -1, -1), cond.mask.expand(batch, -1))
    for _ in range(120):
        traj = sample(ctx, batch, gen)
        opt.zero_grad()
        loss = nabla.terminal_loss(ctx, traj, conds)
        for j in range(STEPS):
            loss = loss + nabla.transition(ctx, ctx.backend.denoiser, rows_at(traj, j, [""] * batch, conds))["loss"]
        loss.backward()
        opt.step()
    traj = sample(ctx, 64, gen)
    conds64 = PromptEmbeds(cond.tokens.expand(64, -1, -1), cond.mask.expand(64, -1))
    with torch.no_grad():
        for j in range(STEPS):
            x_next = traj.latents[:, j + 1]
            t_next = ctx.sampler.next_timesteps[j].expand(64)
            learned = nabla.flow(x_next, t_next, conds64)
            target = exact_flow(ctx, c, j, x_next)
            err = (learned - target).norm(dim=1).mean() / scale
            assert err < 0.05, (j, float(err))


def test_residuals_of_the_tilted_policy_are_the_exact_flow_gradients():
    """The tilted policy's forward residual is c_{j+1} = grad log F~ at x_{j+1}, its reverse one -c_j."""
    ctx, c, _ = toy_setup()
    nabla = algo()
    traj = sample(ctx, 16, torch.Generator().manual_seed(1))
    for j in range(STEPS):
        terms = nabla.transition(ctx, ctx.backend.denoiser, rows_at(traj, j, [""] * 16))
        forward = terms["score"] - terms["score_ref"]
        assert torch.allclose(forward, c[j + 1].expand_as(forward), rtol=1e-6, atol=1e-9), j
        residual = nabla.reverse_residual(ctx, ctx.backend.denoiser, traj.latents[:, j], traj.latents[:, j + 1], j)
        assert torch.allclose(residual, -c[j].expand_as(residual), rtol=1e-6, atol=1e-9), j


def test_reverse_residual_matches_finite_differences():
    ctx, c, _ = toy_setup()
    nabla = algo()
    ctx.backend.denoiser.offsets = {k: v * 3 + 0.1 for k, v in ctx.backend.denoiser.offsets.items()}
    gen = torch.Generator().manual_seed(2)
    traj = sample(ctx, 3, gen)
    j = 3
    x_t, x_next = traj.latents[:, j], traj.latents[:, j + 1]
    got = nabla.reverse_residual(ctx, ctx.backend.denoiser, x_t, x_next, j)

    def log_ratio(x):
        t = ctx.sampler.timesteps[j].expand(x.shape[0])
        out = []
        for enabled in (True, False):
            ctx.backend.denoiser.enabled = enabled
            mean, std = ctx.sampler.step_mean_std(x, ctx.backend.denoiser(x, t), j)
            out.append(-(x_next - mean).square().sum(-1) / (2 * std**2))
        ctx.backend.denoiser.enabled = True
        return out[0] - out[1]

    h = 1e-6
    fd = torch.zeros_like(x_t)
    for d in range(DIM):
        e = torch.zeros_like(x_t)
        e[:, d] = h
        fd[:, d] = (log_ratio(x_t + e) - log_ratio(x_t - e)) / (2 * h)
    assert torch.allclose(got, fd, rtol=1e-5, atol=1e-7)


def test_zero_initialised_flow_leaves_the_lora_gradient_of_the_no_flow_objective():
    ctx, _, cond = toy_setup()
    gen = torch.Generator().manual_seed(3)
    traj = sample(ctx, 4, gen)
    offsets = {k: torch.nn.Parameter(v.clone()) for k, v in ctx.backend.denoiser.offsets.items()}
    ctx.backend.denoiser.offsets = offsets
    conds = PromptEmbeds(cond.tokens.expand(4, -1, -1), cond.mask.expand(4, -1))
    grads = []
    for flow in (False, True):
        nabla = build_algorithm(NablaGFNConfig(beta=BETA, reg_scale=1.0, flow_correction=flow), STEPS)
        nabla.build_modules(ctx)
        if nabla.flow is not None:
            nabla.flow.double()
        for p in offsets.values():
            p.grad = None
        for j in range(STEPS):
            nabla.transition(ctx, ctx.backend.denoiser, rows_at(traj, j, [""] * 4, conds))["loss"].backward()
        grads.append(torch.stack([p.grad.clone() for p in offsets.values()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_flow_terms_gradients_match_their_closed_forms():
    """d/dg of the forward loss is -2 (score - target) / n, of the terminal loss 2 g / n."""
    ctx, _, cond = toy_setup()
    nabla = algo()
    nabla.build_modules(ctx)
    nabla.flow.double()
    torch.nn.init.normal_(nabla.flow.out.weight, std=0.1)
    gen = torch.Generator().manual_seed(4)
    traj = sample(ctx, 5, gen)
    conds = PromptEmbeds(cond.tokens.expand(5, -1, -1), cond.mask.expand(5, -1))
    j = 2
    captured = {}
    def keep(module, inputs, output):
        output.retain_grad()
        captured["g"] = output

    hook = nabla.flow.register_forward_hook(keep)
    terms = nabla.transition(ctx, ctx.backend.denoiser, rows_at(traj, j, [""] * 5, conds))
    terms["loss_score"].backward()
    g = captured.pop("g")
    expected = -2 * (terms["score"] - terms["target"]).detach() / terms["score"].numel()
    torch.testing.assert_close(g.grad, expected)
    term = nabla.terminal_loss(ctx, traj, conds)
    g = captured.pop("g")
    term.backward()
    torch.testing.assert_close(g.grad, 2 * g.detach() / g.numel())
    hook.remove()


def test_flow_options_are_validated():
    with pytest.raises(ValueError, match="reverse_loss_scale > 0 needs algo.flow_correction"):
        build_algorithm(NablaGFNConfig(reverse_loss_scale=1.0), 10)
    with pytest.raises(ValueError, match="reverse_loss_scale must be >= 0"):
        build_algorithm(NablaGFNConfig(reverse_loss_scale=-1.0, flow_correction=True), 10)
    with pytest.raises(ValueError, match="flow_lr must be > 0"):
        build_algorithm(NablaGFNConfig(flow_correction=True, flow_lr=0.0), 10)


def test_flow_network_output_starts_at_zero_and_keeps_the_latent_shape():
    net = FlowCorrection((3, 4, 5), text_dim=6, hidden=8)
    cond = PromptEmbeds(torch.randn(2, 7, 6), torch.tensor([[True] * 3 + [False] * 4, [True] * 7]))
    out = net(torch.randn(2, 3, 4, 5), torch.tensor([10, 900]), cond)
    assert out.shape == (2, 3, 4, 5) and out.abs().max() == 0
    assert math.isfinite(float(net.inp.weight.detach().sum()))
