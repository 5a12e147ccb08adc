"""The embedded backend: shapes, set equivariance, decode conventions, LoRA switching, weight loading."""

import pytest
import torch

from r2d3.backends import TinySplatBackend, WeightsError, available_backends, load_backend
from r2d3.render.gaussians import quat_from_z_to, rotate_z_by
from r2d3.backends.lora import adapters_disabled, add_lora, load_lora_state_dict, lora_state_dict


@pytest.fixture
def backend():
    return TinySplatBackend.random_init(num_gaussians=16, dim=16, vocab=("a", "red", "cube"))


def _perturb_lora(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_denoiser_is_equivariant_to_token_order(backend):
    cond = backend.encode_prompts(["a red cube", "a cube"])
    x = torch.randn(2, 16, 9)
    out = backend.denoise(x, torch.tensor([10, 500]), cond)
    # untrained output projection is zero: make it non-trivial first
    torch.nn.init.normal_(backend.denoiser.proj_out.weight, std=0.1)
    out = backend.denoise(x, torch.tensor([10, 500]), cond)
    perm = torch.randperm(16)
    out_perm = backend.denoise(x[:, perm], torch.tensor([10, 500]), cond)
    assert out.shape == (2, 16, 9)
    torch.testing.assert_close(out_perm, out[:, perm], atol=1e-5, rtol=1e-5)


def test_denoiser_rejects_wrong_latent_shape(backend):
    cond = backend.encode_prompts(["a"])
    with pytest.raises(ValueError, match=r"latents \[B, N, 9\]"):
        backend.denoise(torch.randn(1, 16, 7), torch.tensor([1]), cond)


def test_quaternion_maps_z_to_normal_including_antipode():
    n = torch.nn.functional.normalize(torch.randn(500, 3, dtype=torch.float64), dim=-1)
    n = torch.cat([n, torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)])
    q = quat_from_z_to(n)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(len(n), dtype=torch.float64))
    torch.testing.assert_close(rotate_z_by(q), n, atol=1e-9, rtol=0)


def test_decode_then_encode_round_trips(backend):
    latents = torch.randn(3, 16, 9)
    latents[..., 3:6] = latents[..., 3:6].clamp(-0.99, 0.99)
    latents[..., 6:9] = torch.nn.functional.normalize(latents[..., 6:9], dim=-1)
    g = backend.decode(latents).validate()
    # the normal is the shortest axis of every Gaussian
    assert (g.scales[..., 2] < g.scales[..., 0]).all()
    torch.testing.assert_close(backend.encode_gaussians(g), latents, atol=1e-5, rtol=1e-5)


def test_lora_changes_output_only_when_enabled(backend):
    cond = backend.encode_prompts(["a red cube"])
    torch.nn.init.normal_(backend.denoiser.proj_out.weight, std=0.1)
    x, t = torch.randn(1, 16, 9), torch.tensor([300])
    base = backend.denoise(x, t, cond).detach()
    params = add_lora(backend.denoiser, rank=4, alpha=None, targets=backend.lora_target_modules)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in backend.denoiser.named_parameters() if "lora_" not in n)
    torch.testing.assert_close(backend.denoise(x, t, cond), base)  # zero-initialised B: no change yet
    _perturb_lora(backend.denoiser)
    adapted = backend.denoise(x, t, cond).detach()
    assert (adapted - base).abs().max() > 1e-4
    with adapters_disabled(backend.denoiser):
        torch.testing.assert_close(backend.denoise(x, t, cond), base)
    torch.testing.assert_close(backend.denoise(x, t, cond), adapted)


def test_lora_state_dict_reloads_into_fresh_model(backend):
    cond = backend.encode_prompts(["a red cube"])
    torch.nn.init.normal_(backend.denoiser.proj_out.weight, std=0.1)
    add_lora(backend.denoiser, 4, None, backend.lora_target_modules)
    _perturb_lora(backend.denoiser)
    state = lora_state_dict(backend.denoiser)
    assert all("lora_" in k and not k.startswith("module.") for k in state)
    fresh = TinySplatBackend.random_init(num_gaussians=16, dim=16, vocab=("a", "red", "cube"))
    fresh.denoiser.load_state_dict(backend.denoiser.state_dict(), strict=False)
    add_lora(fresh.denoiser, 4, None, fresh.lora_target_modules)
    load_lora_state_dict(fresh.denoiser, state)
    x, t = torch.randn(1, 16, 9), torch.tensor([700])
    torch.testing.assert_close(fresh.denoise(x, t, cond), backend.denoise(x, t, cond))
    with pytest.raises(ValueError, match="do not match"):
        load_lora_state_dict(fresh.denoiser, {k: v for k, v in list(state.items())[1:]})


def test_save_and_load_round_trip(backend, tmp_path):
    torch.nn.init.normal_(backend.denoiser.proj_out.weight, std=0.1)
    backend.save_pretrained(tmp_path / "w")
    loaded = TinySplatBackend.from_pretrained(tmp_path / "w")
    x, t = torch.randn(1, 16, 9), torch.tensor([42])
    torch.testing.assert_close(
        loaded.denoise(x, t, loaded.encode_prompts(["a red cube"])),
        backend.denoise(x, t, backend.encode_prompts(["a red cube"])),
    )
    assert loaded.latent_shape == (16, 9)


def test_missing_weights_name_the_files_and_the_fix(tmp_path):
    with pytest.raises(WeightsError, match=r"missing .*pipelines/pretrain.py"):
        TinySplatBackend.from_pretrained(tmp_path / "nowhere")


def test_corrupt_weights_give_a_clear_error(backend, tmp_path):
    backend.save_pretrained(tmp_path / "w")
    weights = next((tmp_path / "w" / "denoiser").glob("*.safetensors"))
    weights.write_bytes(b"this is not a safetensors file")
    with pytest.raises(WeightsError, match="could not load tiny backend weights"):
        TinySplatBackend.from_pretrained(tmp_path / "w")


def test_unknown_backend_lists_valid_names():
    assert "tiny" in available_backends()
    with pytest.raises(ValueError, match="valid backends: .*tiny"):
        load_backend("nope")
