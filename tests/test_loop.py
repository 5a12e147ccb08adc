"""The per-worker loop in-process: exact resume, checkpoints, bad input, NaN handling."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from r2d3.algos.nabla_gfn import NablaGFN
from r2d3.backends import TinySplatBackend
from r2d3.config import build_config
from r2d3.train.config import AlignConfig
from r2d3.rewards.base import register_reward
from r2d3.train.checkpoint import CheckpointMismatchError, latest_checkpoint, load_checkpoint
from r2d3.train.loop import TrainingAborted, run
from r2d3.train.session import LocalSession


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    backend = TinySplatBackend.random_init(num_gaussians=24, dim=16, vocab=("a", "red", "blue", "cube"))
    torch.nn.init.normal_(backend.denoiser.proj_out.weight, std=0.05)
    backend.save_pretrained(path / "w")
    (path / "prompts.txt").write_text("a red cube\na blue cube\n")
    return path


def tiny_config(weights, *overrides) -> AlignConfig:
    return build_config(AlignConfig, overrides=[
        f"model.weights={weights / 'w'}", f"data.prompts={weights / 'prompts.txt'}", "reward=colorfulness",
        "train.epochs=3", "train.sample_batch_size=4", "train.train_batch_size=2", "train.grad_accum=1",
        "sampler.num_steps=4", "render.num_views=2", "render.resolution=16", "model.lora_rank=2",
        "run.progress=false", "run.checkpoint_every=1", "run.keep_checkpoints=5",
        *([] if any(o.startswith("algo.name=") for o in overrides) else ["algo.beta=1e3"]), *overrides])


def final_lora(run_dir):
    return load_file(latest_checkpoint(run_dir) / "lora.safetensors")


VARIANT_OVERRIDES = {"nabla_gfn": [], "nabla_gfn+flow": ["algo.flow_correction=true", "algo.reverse_loss_scale=0.1"],
                     "nabla_gfn+precomputed": ["algo.jacobian_free=true", "algo.precompute_targets=true"]}


@pytest.mark.parametrize("variant", list(VARIANT_OVERRIDES))
def test_resume_reproduces_the_uninterrupted_run_exactly(weights, tmp_path, variant):
    # nabla_gfn with the off-policy lag: the resumed run must also restore the sample buffer; with the
    # flow correction, g_phi's weights and its AdamW state too; with precomputed targets, the buffer's targets
    flow = variant == "nabla_gfn+flow"
    config = tiny_config(weights, *VARIANT_OVERRIDES[variant])
    run(config, LocalSession(tmp_path / "full", keep_checkpoints=5))
    # the same run stopped after 2 epochs, then resumed to 3
    run(replace(config, train=replace(config.train, epochs=2)), LocalSession(tmp_path / "split", keep_checkpoints=5))
    calls = []
    real = NablaGFN.precompute
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(NablaGFN, "precompute", lambda self, *a: calls.append(1) or real(self, *a))
    out = run(config, LocalSession(tmp_path / "split", keep_checkpoints=5))
    monkeypatch.undo()
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]
    assert len(calls) == 1  # the resumed epoch's fresh samples only: the buffer's targets come from the checkpoint
    buffers = [load_file(tmp_path / name / "checkpoint_000002" / "buffer.safetensors") for name in ("full", "split")]
    assert buffers[0].keys() == buffers[1].keys()
    assert ("targets.drive" in buffers[0]) == (variant == "nabla_gfn+precomputed")
    for key in buffers[0]:
        assert torch.equal(buffers[0][key], buffers[1][key]), key
    full, split = final_lora(tmp_path / "full"), final_lora(tmp_path / "split")
    assert full.keys() == split.keys()
    for key in full:
        assert torch.equal(full[key], split[key]), key
    initial = load_file(tmp_path / "full" / "checkpoint_000001" / "lora.safetensors")
    assert any(not torch.equal(initial[k], full[k]) for k in full)  # training changed the weights
    if flow:
        full_flow = load_file(latest_checkpoint(tmp_path / "full") / "modules.safetensors")
        split_flow = load_file(latest_checkpoint(tmp_path / "split") / "modules.safetensors")
        assert full_flow.keys() == split_flow.keys() and "flow.out.weight" in full_flow
        for key in full_flow:
            assert torch.equal(full_flow[key], split_flow[key]), key
        assert full_flow["flow.out.weight"].abs().max() > 0  # g_phi trained away from its zero output
        optim = load_checkpoint(latest_checkpoint(tmp_path / "full")).optimizer
        assert len(optim["param_groups"]) == 2 and optim["param_groups"][1]["lr"] == 1e-3


def test_checkpoint_without_the_flow_network_is_refused_for_a_flow_run(weights, tmp_path):
    run(tiny_config(weights, "train.epochs=1"), LocalSession(tmp_path / "r"))
    cfg = tiny_config(weights, "train.epochs=2", "algo.flow_correction=true")
    with pytest.raises(CheckpointMismatchError, match="algo.flow_correction"):
        run(cfg, LocalSession(tmp_path / "r"))


def test_checkpoint_contents_and_metrics(weights, tmp_path):
    run(tiny_config(weights, "train.epochs=2"), LocalSession(tmp_path / "r", keep_checkpoints=1))
    ckpts = sorted(p.name for p in (tmp_path / "r").glob("checkpoint_*"))
    assert ckpts == ["checkpoint_000002"]  # pruned to keep_checkpoints
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint_000002")
    assert ckpt.state.epoch == 2 and ckpt.state.optimizer_steps == 2  # epoch 1 only samples (off-policy lag)
    assert all(not k.startswith("module.") and ".lora_" in k for k in ckpt.lora)
    assert ckpt.buffer is not None and ckpt.buffer["latents"].shape[:2] == (4, 5)
    assert [h["epoch"] for h in ckpt.state.history] == [1, 2] and ckpt.state.resumes == []


def test_resume_with_a_different_config_names_the_mismatch(weights, tmp_path):
    run(tiny_config(weights, "train.epochs=1"), LocalSession(tmp_path / "r"))
    with pytest.raises(CheckpointMismatchError, match="algo.beta: checkpoint 1000.0 vs now 2000.0"):
        run(tiny_config(weights, "train.epochs=2", "algo.beta=2e3"), LocalSession(tmp_path / "r"))


def test_nan_rewards_are_skipped_then_abort(weights, tmp_path):
    calls = {"n": 0}

    @register_reward("test_sometimes_nan")
    def _build(**kwargs):
        def reward(render, prompts):
            calls["n"] += 1
            r = render.rgb.mean(dim=(1, 2, 3, 4))
            return torch.where(torch.arange(len(r)) == 0, torch.full_like(r, float("nan")), r)
        return reward

    config = tiny_config(weights, "reward=test_sometimes_nan", "train.epochs=2", "train.max_bad_batches=10",
                         "algo.name=ddpo")
    out = run(config, LocalSession(tmp_path / "a"))
    assert out["history"][-1]["bad_batches"] >= 2  # counted, and the run went on
    with pytest.raises(TrainingAborted, match="max_bad_batches=0"):
        run(tiny_config(weights, "reward=test_sometimes_nan", "train.max_bad_batches=0", "algo.name=ddpo"),
            LocalSession(tmp_path / "b"))


def test_unwritable_run_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable"):
        LocalSession(blocker / "run")


@pytest.mark.parametrize("override, message", [
    ("sampler.eta=0.0", "sampler.eta"), ("train.lr=0", "train.lr"), ("sampler.num_steps=0", "num_steps"),
    ("reward=nosuch", "nosuch"), ("model.backend=nosuch", "valid backends"),
    ("render.backend=opengl", "render.backend must be one of auto, torch, gsplat"),
])
def test_bad_config_values_are_named(weights, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run(tiny_config(weights, override), LocalSession(tmp_path / "r"))


def test_update_cost_counts_the_denoiser_passes_of_each_method(weights):
    from r2d3.jobs.compare import update_cost

    cost = update_cost(tiny_config(weights, "algo.timestep_fraction=0.5", "sampler.num_steps=6"), repeats=1,
                       methods=("nabla_gfn", "ddpo", "refl", "nabla_gfn+jacobian_free", "nabla_gfn+precomputed"))
    passes = {m: (c["denoiser_fwd_per_transition"], c["denoiser_bwd_per_transition"]) for m, c in cost.items()}
    # Nabla-R2D3: base (LoRA off), policy at x_t, policy at x_{t-1} for the reward gradient; backward
    # through the reward-gradient pass and the loss. Jacobian-free skips the first of those backwards;
    # precomputed targets leave the policy's own forward and backward, as DDPO (the rest ran before the update).
    assert passes == {"nabla_gfn": (3.0, 2.0), "ddpo": (1.0, 1.0), "refl": (1.0, 1.0),
                      "nabla_gfn+jacobian_free": (3.0, 1.0), "nabla_gfn+precomputed": (1.0, 1.0)}
    assert cost["nabla_gfn+precomputed"]["precompute_s"] > 0
    assert cost["nabla_gfn"]["transitions"] == cost["ddpo"]["transitions"] == 3  # half of 6 steps (carried over)
    assert all(c["update_s"] > 0 for c in cost.values())


def test_a_checkpoint_from_before_an_option_existed_resumes_under_its_default(weights, tmp_path):
    import json

    run(tiny_config(weights, "train.epochs=1"), LocalSession(tmp_path / "r"))
    state_file = latest_checkpoint(tmp_path / "r") / "state.json"
    meta = json.loads(state_file.read_text())
    del meta["fingerprint"]["algo.flow_correction"]  # as written before the option was added
    state_file.write_text(json.dumps(meta))
    out = run(tiny_config(weights, "train.epochs=2"), LocalSession(tmp_path / "r"))
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    with pytest.raises(CheckpointMismatchError, match="algo.flow_correction: checkpoint False vs now True"):
        run(tiny_config(weights, "train.epochs=3", "algo.flow_correction=true"), LocalSession(tmp_path / "r"))
