"""Backend conformance suite (in the spirit of diffusers' ``ModelTesterMixin``): every registered backend
runs the same behavioural checks of the :class:`~r2d3.backends.base.Backend` protocol.

Each backend appears once in :data:`SPECS` with a builder of a small, deterministic instance: ``tiny`` with
its shipped weights, ``diffsplat`` and ``shap_e`` as the tiny random-weight models of their own test files
(``tests/test_diffsplat.py``, ``tests/test_shap_e.py``); nothing is downloaded. A backend registered without
an entry fails :func:`test_every_registered_backend_has_a_spec`.

What is checked, per backend:

* protocol members exist with the right types, constants are defined on the class (no ``getattr`` default
  needed by callers), ``device`` is where the denoiser's weights are;
* ``encode_prompts``: deterministic, row i of a batch equals prompt i encoded alone (up to padding), frozen,
  distinct prompts differ, the empty (CFG) prompt encodes; its encoder fingerprint is stable;
* ``denoise``: latent shape, finite, deterministic, batch-independent (row i of a batched call equals the
  single-row call to 1e-5, also with the prompt encoded alone, i.e. other padding), scalar ``t`` equals the
  broadcast vector, depends on ``t`` and on the prompt, leaves its inputs untouched;
* ``decode``: valid Gaussians (positive scales, unit quaternions as returned, opacities and colours in
  [0, 1], finite) also for large and zero latents, deterministic, batch-independent;
* differentiability: decode(latent) back to the latent (colour and geometry, per sample, no cross-talk
  between batch rows); denoise to every LoRA parameter;
* LoRA: every ``lora_target_modules`` entry matches a module of ``denoiser`` as a name suffix, peft adapts
  exactly those modules through ``add_lora`` (``r2d3.backends.lora``), with zero-initialised B (output unchanged),
  a non-zero adapter changes the output and ``adapters_disabled`` restores the base model exactly;
* ``scheduler_config`` builds both sampler kinds through :func:`r2d3.diffusion.scheduler_from_config`, with a
  valid, monotone schedule, without mutating the config; the sampler settings registered with the backend's
  name (``sampler_defaults(name)``, a copy) make a valid ``SamplerConfig`` and ``StochasticSampler``;
* a short guided sampling chain (``final_x0`` as the backend says) ends in a finite latent that decodes, and
  replays step by step: each stored output is CFG of the backend's own per-row outputs, each latent the
  kernel's mean plus its stored noise.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("peft")

from r2d3.backends import Backend, available_backends, load_backend  # noqa: E402
from r2d3.backends.base import sampler_defaults  # noqa: E402
from r2d3.jobs.configs import InferenceSamplerConfig  # noqa: E402
from r2d3.backends.diffsplat import tiny_diffsplat  # noqa: E402
from r2d3.backends.diffsplat_sd15 import tiny_diffsplat_sd15  # noqa: E402
from r2d3.backends.shap_e import ShapEBackend  # noqa: E402
from r2d3.text import PromptEmbeds  # noqa: E402
from r2d3.config import SamplerConfig  # noqa: E402
from r2d3.diffusion import (  # noqa: E402
    PREDICTION_TYPES,
    SCHEDULER_KINDS,
    StochasticSampler,
    scheduler_from_config,
    scheduler_kind,
)
from r2d3.render.gaussians import Gaussians  # noqa: E402

try:  # the LoRA helpers' home moved from r2d3.train to r2d3.backends
    from r2d3.backends.lora import adapters_disabled, add_lora  # noqa: E402
except ImportError:  # pragma: no cover
    from r2d3.train.lora import adapters_disabled, add_lora  # noqa: E402

BATCH_ATOL = 1e-5  # batch independence / padding invariance: float32 reordering only
#: decoded quaternions of a batch row vs the single-row call. Quaternions are unit directions computed from
#: normals (Shap-E: the normalised density gradient; the z -> n shortest-arc quaternion is ill-conditioned
#: for n near -z), which amplify the ~5e-7 float32 rounding of a batched vs a single-row GEMM: measured
#: 3.0e-5 on the random shap_e model (the other fields there stay below 5e-7). Cross-talk between rows is
#: checked bit-exactly instead.
QUAT_BATCH_ATOL = 1e-4
UNIT_QUAT_TOL = 1e-4

# --------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Spec:
    """How to build a small deterministic instance of a backend, and prompts its tokenizer knows (of
    different lengths, so that batched encodings are padded)."""

    build: Callable[[], Any]
    prompts: tuple[str, str, str]


DIFFSPLAT_VOCAB = ["a", "red", "chair", "blue", "lamp", "with"]


def _build_tiny() -> Any:
    return load_backend("tiny")  # the shipped weights


def _build_diffsplat(build: Callable[..., Any] = tiny_diffsplat) -> Any:
    # as tests/test_diffsplat.py's fixture: a 1-layer PixArt-Σ / GSVAE / T5 (or the SD1.5 UNet / GSVAE /
    # CLIP), parameters perturbed so that outputs are non-trivial (seeded, so every build is the same model)
    backend = build(vocab=DIFFSPLAT_VOCAB, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in backend.denoiser.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return backend


def _build_shap_e() -> Any:
    return ShapEBackend.random_init(seed=0, resolution=12)  # as tests/test_shap_e.py


SPECS: dict[str, Spec] = {
    "tiny": Spec(_build_tiny, ("a red cube", "a large blue sphere with stripes", "green torus")),
    "diffsplat": Spec(_build_diffsplat, ("a red chair", "a blue lamp with a red chair", "lamp")),
    "diffsplat_sd15": Spec(lambda: _build_diffsplat(tiny_diffsplat_sd15),
                           ("a red chair", "a blue lamp with a red chair", "lamp")),
    "shap_e": Spec(_build_shap_e, ("a red cube", "a blue sphere", "green chair")),
}

#: protocol members (kept in sync with the protocol by test_protocol_member_list_is_complete_and_documented)
DATA_MEMBERS = ("name", "denoiser", "lora_target_modules", "scheduler_config", "final_x0",
                "latent_shape", "device")
METHODS = ("encode_prompts", "denoise", "decode")
#: members every backend must define on its class (constants callers read; no getattr default needed)
CLASS_MEMBERS = ("name", "lora_target_modules", "final_x0", "latent_shape", "device")


@pytest.fixture(scope="module", params=sorted(SPECS))
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def spec(name) -> Spec:
    return SPECS[name]


@pytest.fixture(scope="module")
def backend(spec):
    """Shared per module and backend: tests using it must not modify it (LoRA tests use ``fresh``)."""
    return spec.build()


@pytest.fixture
def fresh(spec):
    return spec.build()


# --------------------------------------------------------------------------------------------- helpers


def latents(backend, batch: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(batch, *backend.latent_shape, generator=g)).to(backend.device)


def timesteps(backend, batch: int) -> torch.Tensor:
    """Distinct training timesteps per row (noisy, middle, nearly clean, ...)."""
    n = int(backend.scheduler_config["num_train_timesteps"])
    base = [int(0.9 * n), n // 2, 3, int(0.25 * n)]
    return torch.tensor([base[i % len(base)] for i in range(batch)], device=backend.device)


def pad_to(embeds: PromptEmbeds, length: int) -> PromptEmbeds:
    extra = length - embeds.tokens.shape[1]
    return PromptEmbeds(F.pad(embeds.tokens, (0, 0, 0, extra)), F.pad(embeds.mask, (0, extra)))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def suffix_matches(module: nn.Module, target: str) -> list[str]:
    """Module names peft's ``target_modules`` entry ``target`` selects (the name or a ``.``-suffix)."""
    return [n for n, _ in module.named_modules() if n == target or n.endswith("." + target)]


def check_gaussians(g: Gaussians, batch: int, device: torch.device, what: str) -> None:
    assert isinstance(g, Gaussians), f"{what}: decode returned {type(g).__name__}"
    assert g.batch_size == batch and g.num_gaussians > 0, f"{what}: {tuple(g.means.shape)}"
    assert g.means.dtype == torch.float32, f"{what}: dtype {g.means.dtype}"
    assert g.means.device.type == device.type, f"{what}: on {g.means.device}, latents on {device}"
    # shapes, dtypes, finite, scales > 0, opacities in [0, 1], non-zero quaternions. Quaternions may be returned
    # unnormalised (DiffSplat keeps its decoder's raw ones for render.quaternions=raw): validate() normalises
    unit = g.validate().quats
    norm_err = max_diff(unit.norm(dim=-1), torch.ones_like(unit[..., 0]))
    assert norm_err < UNIT_QUAT_TOL, f"{what}: validated quaternions are not unit (|q| off by {norm_err:.2e})"
    assert g.colors.min() >= 0 and g.colors.max() <= 1, \
        f"{what}: colours outside [0, 1] ({g.colors.min():.4f}, {g.colors.max():.4f})"


def assert_rows_match(batched: torch.Tensor, singles: list[torch.Tensor], what: str, atol: float = BATCH_ATOL
                      ) -> None:
    for i, single in enumerate(singles):
        diff = max_diff(batched[i: i + 1], single)
        assert diff <= atol, f"{what}: row {i} of the batch differs from the single-row call by {diff:.3e} > {atol}"


# --------------------------------------------------------------------------------------------- registry / protocol


def test_every_registered_backend_has_a_spec():
    assert set(available_backends()) == set(SPECS), "add new backends to SPECS so they run this suite"


def test_protocol_member_list_is_complete_and_documented():
    """The member lists above are the protocol's, and every member has a docstring saying why it exists
    (a string right after an annotated attribute, as Sphinx reads it, or the property's / method's own)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Backend))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    documented, members = set(), set()
    for node, after in zip(cls.body, [*cls.body[1:], None]):
        if isinstance(node, ast.AnnAssign):
            members.add(node.target.id)
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and str(after.value.value).strip():
                documented.add(node.target.id)
        elif isinstance(node, ast.FunctionDef):
            members.add(node.name)
            if ast.get_docstring(node):
                documented.add(node.name)
    assert members == set(DATA_MEMBERS) | set(METHODS)
    assert documented == members, f"protocol members without a docstring: {sorted(members - documented)}"


def test_protocol_members_exist_with_the_right_types(name, backend):
    assert isinstance(backend, Backend), f"{type(backend).__name__} lacks protocol members"
    for member in CLASS_MEMBERS:
        assert hasattr(type(backend), member), f"{type(backend).__name__} does not define {member} on the class"
    assert isinstance(backend.name, str) and backend.name == name
    assert isinstance(backend.denoiser, nn.Module)
    assert isinstance(backend.latent_shape, tuple) and backend.latent_shape
    assert all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in backend.latent_shape)
    targets = backend.lora_target_modules
    assert isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    assert len(set(targets)) == len(targets), f"duplicate LoRA targets {targets}"
    assert isinstance(backend.scheduler_config, dict)
    json.dumps(backend.scheduler_config)  # written into checkpoints / backend.json
    assert type(backend.final_x0) is bool
    assert isinstance(backend.device, torch.device)
    assert backend.device == next(backend.denoiser.parameters()).device
    for method in METHODS:
        assert callable(getattr(backend, method))


# --------------------------------------------------------------------------------------------- encode_prompts


def test_encode_prompts_is_deterministic_and_batch_consistent(spec, backend):
    prompts = [*spec.prompts, ""]
    batch = backend.encode_prompts(prompts)
    again = backend.encode_prompts(prompts)
    assert isinstance(batch, PromptEmbeds) and len(batch) == len(prompts)
    b, length, dim = batch.tokens.shape
    assert batch.mask.shape == (b, length) and batch.mask.dtype == torch.bool
    assert batch.tokens.is_floating_point() and torch.isfinite(batch.tokens).all()
    assert batch.tokens.device.type == backend.device.type
    assert not batch.tokens.requires_grad, "the text encoder is frozen: embeddings must carry no graph"
    assert torch.equal(batch.tokens, again.tokens) and torch.equal(batch.mask, again.mask)
    assert batch.mask[: len(spec.prompts)].any(dim=1).all(), "every real prompt has a real token"
    for i, prompt in enumerate(prompts):
        alone = backend.encode_prompts([prompt])
        assert alone.tokens.shape[1] <= length and alone.tokens.shape[2] == dim
        alone = pad_to(alone, length)
        assert torch.equal(alone.mask, batch.mask[i: i + 1]), f"mask of {prompt!r} depends on the batch"
        diff = max_diff(alone.tokens, batch.tokens[i: i + 1])
        assert diff <= BATCH_ATOL, f"encoding of {prompt!r} alone differs from its batch row by {diff:.3e}"
    # reversed batch order gives the same rows
    flipped = backend.encode_prompts(prompts[::-1])
    assert max_diff(flipped.tokens.flip(0), batch.tokens) <= BATCH_ATOL
    # the encoder reads the prompt
    for i in range(len(spec.prompts)):
        for j in range(i):
            assert max_diff(batch.tokens[i], batch.tokens[j]) > 1e-3, f"{prompts[i]!r} and {prompts[j]!r} encode alike"


def test_encoder_fingerprint_is_stable(name, spec, backend):
    from r2d3.data.embeddings import encoder_fingerprint

    first = encoder_fingerprint(backend)
    assert first.startswith(f"{name}:") and first == encoder_fingerprint(backend)
    assert first == encoder_fingerprint(spec.build())  # the same weights, another instance


# --------------------------------------------------------------------------------------------- denoise


def test_denoise_shape_finite_deterministic_batch_independent(spec, backend):
    prompts = list(spec.prompts)
    cond = backend.encode_prompts(prompts)
    x, t = latents(backend, len(prompts)), timesteps(backend, len(prompts))
    x_copy, t_copy, tokens_copy = x.clone(), t.clone(), cond.tokens.clone()
    with torch.no_grad():
        out = backend.denoise(x, t, cond)
        again = backend.denoise(x, t, cond)
        assert torch.equal(x, x_copy) and torch.equal(t, t_copy) and torch.equal(cond.tokens, tokens_copy), \
            "denoise modified its inputs"
        assert isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all()
        assert out.abs().max() > 0, "the denoiser's output is identically zero"
        assert torch.equal(out, again), f"denoise is not deterministic (max diff {max_diff(out, again):.3e})"
        singles = [backend.denoise(x[i: i + 1], t[i: i + 1], cond[i]) for i in range(len(prompts))]
        assert_rows_match(out, singles, "denoise (batch cond rows)")
        alone = [backend.denoise(x[i: i + 1], t[i: i + 1], backend.encode_prompts([p])) for i, p in enumerate(prompts)]
        assert_rows_match(out, alone, "denoise (prompt encoded alone)")
        # no cross-talk: row 0 is bit-identical whatever the other rows hold (same batch shape and padding)
        rest = torch.tensor([0, *range(len(prompts) - 1, 0, -1)])  # row 0 kept, the others reversed
        other_x = torch.cat([x[:1], latents(backend, len(prompts) - 1, seed=5)])
        crossed = backend.denoise(other_x, t[rest], PromptEmbeds(cond.tokens[rest], cond.mask[rest]))
        assert torch.equal(crossed[:1], out[:1]), \
            f"denoise row 0 depends on the other rows ({max_diff(crossed[:1], out[:1]):.3e})"
        # the same batch with rows permuted gives the permuted output
        perm = torch.tensor([2, 0, 1])
        permuted = backend.denoise(x[perm], t[perm], PromptEmbeds(cond.tokens[perm], cond.mask[perm]))
        assert max_diff(permuted, out[perm]) <= BATCH_ATOL


def test_denoise_reads_timestep_and_prompt(spec, backend):
    cond = backend.encode_prompts(list(spec.prompts[:2]))
    x = latents(backend, 1).expand(2, *backend.latent_shape).contiguous()
    n = int(backend.scheduler_config["num_train_timesteps"])
    t = torch.full((2,), n // 2, device=backend.device)
    with torch.no_grad():
        out = backend.denoise(x, t, cond)
        scalar = backend.denoise(x, torch.tensor(n // 2, device=backend.device), cond)
        assert max_diff(scalar, out) <= BATCH_ATOL, "a scalar t must broadcast over the batch"
        assert max_diff(out[0], out[1]) > 1e-6, "denoise ignores the prompt"
        other_t = backend.denoise(x, torch.full((2,), 3, device=backend.device), cond)
        assert max_diff(other_t, out) > 1e-6, "denoise ignores the timestep"


# --------------------------------------------------------------------------------------------- decode


def test_decode_gives_valid_deterministic_gaussians(backend):
    x = torch.cat([latents(backend, 2, seed=1), latents(backend, 1, seed=2, scale=10.0),
                   torch.zeros(1, *backend.latent_shape, device=backend.device)])
    with torch.no_grad():
        g = backend.decode(x)
        check_gaussians(g, len(x), backend.device, "decode of random / x10 / zero latents")
        again = backend.decode(x)
    for f in dataclasses.fields(Gaussians):
        a, b = getattr(g, f.name), getattr(again, f.name)
        assert torch.equal(a, b), f"decode is not deterministic in {f.name} ({max_diff(a, b):.3e})"
    assert max_diff(g.colors[0], g.colors[1]) > 1e-6 or max_diff(g.means[0], g.means[1]) > 1e-6, \
        "decode ignores its latent"


def test_decode_is_batch_independent(backend):
    """No cross-talk: row 0 is bit-identical whatever the other rows hold (same batch shape), and equals
    the single-row call up to float32 rounding (``BATCH_ATOL``; ``QUAT_BATCH_ATOL`` for quaternions, see
    there)."""
    x = torch.cat([latents(backend, 2, seed=1), latents(backend, 1, seed=2, scale=10.0)])
    other = torch.cat([x[:1], latents(backend, 2, seed=4)])
    with torch.no_grad():
        g, g_other = backend.decode(x), backend.decode(other)
        singles = [backend.decode(x[i: i + 1]) for i in range(len(x))]
    for f in dataclasses.fields(Gaussians):
        a, b = getattr(g, f.name)[:1], getattr(g_other, f.name)[:1]
        assert torch.equal(a, b), f"decode {f.name} of row 0 depends on the other rows ({max_diff(a, b):.3e})"
    for i, single in enumerate(singles):
        check_gaussians(single, 1, backend.device, f"decode of row {i} alone")
        for f in dataclasses.fields(Gaussians):
            atol = QUAT_BATCH_ATOL if f.name == "quats" else BATCH_ATOL
            diff = max_diff(getattr(g, f.name)[i: i + 1], getattr(single, f.name))
            assert diff <= atol, f"decode {f.name}: row {i} of the batch differs from alone by {diff:.3e} > {atol}"


def test_decode_is_differentiable_in_the_latents(backend):
    x = latents(backend, 2, seed=3).requires_grad_(True)
    g = backend.decode(x)
    gen = torch.Generator().manual_seed(0)
    weights = {f.name: torch.randn(getattr(g, f.name).shape, generator=gen).to(x.device)
               for f in dataclasses.fields(Gaussians)}
    per_field = {}
    for f in dataclasses.fields(Gaussians):
        value = getattr(g, f.name)
        if not value.requires_grad:
            per_field[f.name] = 0.0
            continue
        (grad,) = torch.autograd.grad((value[:1] * weights[f.name][:1]).sum(), x, retain_graph=True,
                                      allow_unused=True)
        grad = torch.zeros_like(x) if grad is None else grad
        assert torch.isfinite(grad).all(), f"non-finite gradient of {f.name} w.r.t. the latent"
        assert grad[1:].abs().max() == 0, f"{f.name} of sample 0 has a gradient w.r.t. sample 1's latent"
        per_field[f.name] = float(grad[0].abs().sum())
    assert per_field["colors"] > 0, f"no gradient from colours to the latent: {per_field}"
    geometry = {k: per_field[k] for k in ("means", "scales", "quats", "opacities")}
    assert max(geometry.values()) > 0, f"no gradient from any geometric field to the latent: {per_field}"
    loss = sum((getattr(g, k) * w).sum() for k, w in weights.items() if getattr(g, k).requires_grad)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all(), "some sample's latent gets no gradient"


# --------------------------------------------------------------------------------------------- LoRA


def test_lora_targets_exist_and_peft_adapts_exactly_them(fresh):
    den = fresh.denoiser
    matched = {t: suffix_matches(den, t) for t in fresh.lora_target_modules}
    assert all(matched.values()), f"LoRA targets matching no module: {[t for t, m in matched.items() if not m]}"
    add_lora(den, rank=2, alpha=None, targets=list(fresh.lora_target_modules))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in den.named_modules() if n.endswith(".lora_A")}
    expected = {n for names in matched.values() for n in names}
    assert adapted == expected, f"peft adapted {sorted(adapted ^ expected)} differently from the suffix match"


def test_lora_starts_as_identity_and_trains(spec, fresh):
    prompts = list(spec.prompts)
    cond = fresh.encode_prompts(prompts)
    x, t = latents(fresh, len(prompts)), timesteps(fresh, len(prompts))
    with torch.no_grad():
        base = fresh.denoise(x, t, cond)
    params = add_lora(fresh.denoiser, rank=2, alpha=None, targets=list(fresh.lora_target_modules))
    named = {n: p for n, p in fresh.denoiser.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for p in named.values()}
    assert all("lora_" in n for n in named), f"non-LoRA parameters left trainable: {[n for n in named if 'lora_' not in n]}"
    b_params = {n: p for n, p in named.items() if "lora_B" in n}
    assert b_params and all(p.abs().max() == 0 for p in b_params.values()), "LoRA B must start at zero"
    with torch.no_grad():
        start = fresh.denoise(x, t, cond)
    assert max_diff(start, base) <= 1e-6, f"adding LoRA changed the output by {max_diff(start, base):.3e}"

    # gradient flow denoise -> LoRA: with B = 0 every B gets a gradient ...
    w = torch.randn(base.shape, generator=torch.Generator().manual_seed(1)).to(base)
    (fresh.denoise(x, t, cond) * w).sum().backward()
    no_grad = [n for n, p in b_params.items() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().max() == 0]
    assert not no_grad, f"LoRA B parameters without a (finite, non-zero) gradient: {no_grad}"
    # ... and once B is non-zero, every A too (each adapted layer is on denoise's path)
    fresh.denoiser.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in b_params.values():
            p.add_(1e-2 * torch.randn(p.shape, generator=g).to(p))
    out = fresh.denoise(x, t, cond)
    (out * w).sum().backward()
    no_grad = [n for n, p in named.items() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().max() == 0]
    assert not no_grad, f"LoRA parameters without a (finite, non-zero) gradient: {no_grad}"
    assert max_diff(out, base) > 1e-7, "a non-zero adapter does not change the output"
    with torch.no_grad(), adapters_disabled(fresh.denoiser):
        ref = fresh.denoise(x, t, cond)
    assert max_diff(ref, base) <= 1e-6, "adapters_disabled does not give back the base model (p_ref)"


# --------------------------------------------------------------------------------------------- schedule / sampler


def test_scheduler_config_builds_sampler_schedules(backend):
    config = copy.deepcopy(backend.scheduler_config)
    assert config.get("prediction_type", "epsilon") in PREDICTION_TYPES
    for kind in SCHEDULER_KINDS:
        scheduler = scheduler_from_config(backend.scheduler_config, kind=kind)
        assert scheduler_kind(scheduler) == kind
        n = int(scheduler.config.num_train_timesteps)
        assert n == int(backend.scheduler_config["num_train_timesteps"])
        assert scheduler.config.prediction_type == backend.scheduler_config.get("prediction_type", "epsilon")
        ac = scheduler.alphas_cumprod
        assert ac.shape == (n,) and torch.isfinite(ac).all()
        assert (ac[1:] < ac[:-1]).all() and (ac <= 1).all(), "alpha_bar must decrease"
        if ac[-1] == 0:  # zero terminal SNR (DDIM keeps it; DPM clamps it): epsilon cannot give x_0 there
            assert backend.scheduler_config.get("rescale_betas_zero_snr"), "alpha_bar = 0 without zero-SNR rescaling"
            assert kind != _sampler_config(backend).kind, "the backend's own sampler must take its schedule"
            if scheduler.config.prediction_type == "epsilon":
                with pytest.raises(ValueError, match="zero terminal SNR"):
                    StochasticSampler(scheduler, num_steps=min(10, n), eta=1.0)
                continue
        assert (ac > 0).all(), "alpha_bar must be in (0, 1]"
        StochasticSampler(scheduler, num_steps=min(10, n), eta=1.0)
    assert backend.scheduler_config == config, "building a scheduler mutated backend.scheduler_config"


def _sampler_config(backend) -> SamplerConfig:
    defaults = sampler_defaults(backend.name)
    unknown = set(defaults) - {f.name for f in dataclasses.fields(SamplerConfig)}
    assert not unknown, f"sampler_defaults has keys that are not SamplerConfig fields: {sorted(unknown)}"
    return SamplerConfig(**{**dataclasses.asdict(SamplerConfig()), **defaults})


def test_sampler_defaults_make_a_valid_sampler(backend):
    defaults = sampler_defaults(backend.name)
    assert isinstance(defaults, dict)
    defaults["num_steps"] = -1
    assert sampler_defaults(backend.name).get("num_steps") != -1, "sampler_defaults() must return a copy"
    s = _sampler_config(backend)
    assert InferenceSamplerConfig().resolve(backend.name) == s, "the inference jobs sample with these settings"
    assert s.kind in SCHEDULER_KINDS, f"sampler kind {s.kind!r} is not one of {SCHEDULER_KINDS}"
    assert isinstance(s.num_steps, int) and s.num_steps >= 1
    assert math.isfinite(s.guidance_scale) and s.guidance_scale >= 1
    sampler = StochasticSampler(scheduler_from_config(backend.scheduler_config, kind=s.kind), s.num_steps, eta=s.eta)
    assert sampler.is_stochastic, "the alignment losses need every sampling step to be stochastic"


def test_short_guided_sampling_chain_decodes(spec, backend):
    s = _sampler_config(backend)
    sampler = StochasticSampler(scheduler_from_config(backend.scheduler_config, kind=s.kind), 3, eta=s.eta)
    cond, uncond = backend.encode_prompts(list(spec.prompts[:2])), backend.encode_prompts([""])
    both = PromptEmbeds.cat([cond, uncond])  # as r2d3.sample: one padding for cond and uncond
    with torch.no_grad():
        traj = sampler.sample(lambda x, t, c: backend.denoise(x, t, PromptEmbeds(c["tokens"], c["mask"])),
                              shape=(2, *backend.latent_shape), generator=torch.Generator().manual_seed(0),
                              cond={"tokens": both.tokens[:2], "mask": both.mask[:2]},
                              uncond={"tokens": both.tokens[2:], "mask": both.mask[2:]},
                              guidance_scale=s.guidance_scale, final_x0=backend.final_x0, device=backend.device)
        final = traj.final
        assert final.shape == (2, *backend.latent_shape) and torch.isfinite(final).all()
        assert (traj.clean_final is not None) == backend.final_x0
        check_gaussians(backend.decode(final), 2, backend.device, "decode of a sampled latent")
        # replay: every stored transition is the sampler's kernel applied to classifier-free guidance of the
        # backend's own conditional and unconditional outputs, each row computed alone (no batching)
        w = s.guidance_scale
        for j in range(sampler.num_steps):
            x = traj.latents[:, j]
            t = sampler.model_timesteps(j, 1, device=backend.device)
            for i in range(2):
                c = backend.denoise(x[i:i + 1], t, PromptEmbeds(both.tokens[i:i + 1], both.mask[i:i + 1])).double()
                u = backend.denoise(x[i:i + 1], t, PromptEmbeds(both.tokens[2:], both.mask[2:])).double()
                guided = u + w * (c - u)
                torch.testing.assert_close(traj.model_outputs[i:i + 1, j].double(), guided, atol=1e-4, rtol=1e-4)
                mean, std = sampler.step_mean_std(x[i:i + 1], guided.float(), j)
                torch.testing.assert_close(traj.means[i:i + 1, j], mean.to(traj.means.dtype), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(traj.latents[:, j + 1], traj.means[:, j] + traj.stds[j] * traj.noises[:, j],
                                       atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_follows_the_weights_and_outputs_match_cpu(spec, fresh):
    prompts = list(spec.prompts)
    cond = fresh.encode_prompts(prompts)
    x, t = latents(fresh, len(prompts)), timesteps(fresh, len(prompts))
    with torch.no_grad():
        cpu_out, cpu_g = fresh.denoise(x, t, cond), fresh.decode(x)
        fresh.to("cuda")
        assert fresh.device.type == "cuda"
        gcond = fresh.encode_prompts(prompts)
        assert gcond.tokens.device.type == "cuda"
        torch.testing.assert_close(gcond.tokens.cpu(), cond.tokens, atol=1e-4, rtol=1e-4)
        out = fresh.denoise(x.cuda(), t.cuda(), gcond)
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), cpu_out, atol=1e-3, rtol=1e-3)
        g = fresh.decode(x.cuda())
        check_gaussians(g, len(prompts), fresh.device, "decode on CUDA")
        torch.testing.assert_close(g.means.cpu(), cpu_g.means, atol=1e-3, rtol=1e-3)
