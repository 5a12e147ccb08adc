"""The per-worker alignment loop: sample with the current policy, train on stored trajectories, repeat.

It is plain torch and runs in-process (tests, debugging) or inside a Ray Train worker; the runtime is
behind :class:`~r2d3.train.session.Session`. Everything random draws from one ``torch.Generator`` whose
state is checkpointed, so a resumed run continues exactly where the uninterrupted run would be.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from r2d3.algos import SampleBatch, build_algorithm
from r2d3.algos.base import Targets
from r2d3.backends import available_backends, load_backend
from r2d3.backends.lora import add_lora, load_lora_state_dict, lora_state_dict
from r2d3.config import ConfigError, check_finite
from r2d3.train.config import AlignConfig
from r2d3.data.embeddings import load_embedding_cache
from r2d3.data.prompts import load_prompts
from r2d3.devices import resolve_device
from r2d3.diffusion import Trajectory
from r2d3.pipeline import Pipeline, Scorer
from r2d3.rewards import load_reward, reward_terms
from r2d3.text import PromptEmbeds
from r2d3.train.checkpoint import (
    CorruptCheckpointError,
    TrainState,
    check_compatible,
    load_checkpoint,
    save_checkpoint,
)
from r2d3.train.session import Session

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """Too many batches with non-finite losses or rewards."""


#: a lower bound on the memory one rendered pixel costs in the reward pass (RGB, alpha, depth, normals
#: and their gradients, float32): used to refuse sizes that cannot fit before any model loads
BYTES_PER_RENDERED_PIXEL = 64


def _memory_bytes(device: str) -> tuple[int, str]:
    if device == "auto" and torch.cuda.is_available():
        device = "cuda"
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else 0
        return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"
    import psutil

    return psutil.virtual_memory().total, "this machine"


def check_fits_in_memory(config: AlignConfig) -> None:
    """Refuse render sizes whose reward pass alone cannot fit (a lower bound), naming the options; an
    allocator error after the models loaded says neither which option nor by how much."""
    r, t = config.render, config.train
    per_batch = max(t.sample_batch_size, min(config.eval.num_prompts * config.eval.seeds_per_prompt, 16))
    need = per_batch * r.num_views * r.resolution ** 2 * BYTES_PER_RENDERED_PIXEL
    total, where = _memory_bytes(config.run.device)
    if need > total:
        raise ValueError(
            f"render.resolution={r.resolution} x render.num_views={r.num_views} x train.sample_batch_size="
            f"{t.sample_batch_size} needs at least {need / 2**30:.1f} GiB for one batch of reward renders, more "
            f"than the {total / 2**30:.1f} GiB of {where}; lower them (or use more workers with smaller batches)")


def validate(config: AlignConfig) -> None:
    """What the config sections cannot check alone, before any model loads: options of several sections
    together, the size of a batch against memory, and the registered algorithm (with its
    hyperparameters), reward and backend names. Single fields were checked when the config was built."""
    s = config.scale
    check_finite(config)
    if s.in_process and (s.num_workers > 1 or s.reward_actors > 0):
        raise ConfigError(f"scale.in_process=true runs one worker without Ray: it conflicts with scale.num_workers="
                          f"{s.num_workers} and scale.reward_actors={s.reward_actors} (drop one)")
    if config.sampler.eta <= 0:
        raise ConfigError(f"sampler.eta must be in (0, 1] for training (the losses need stochastic steps), got "
                          f"{config.sampler.eta}")
    if getattr(config.algo, "reward_image_noise", 0.0) and s.reward_actors > 0:
        raise ConfigError("algo.reward_image_noise needs the reward in the trainer: set scale.reward_actors=0")
    check_fits_in_memory(config)
    build_algorithm(config.algo, config.sampler.num_steps)  # algorithm hyperparameters, named on error
    reward_terms(config.reward)  # unknown names and bad weights, listed/named; nothing is built
    if config.model.backend not in available_backends():
        raise ConfigError(f"unknown backend {config.model.backend!r}; valid backends: "
                          f"{', '.join(available_backends())}")


@dataclass
class Worker:
    """Everything a worker builds once: model with LoRA, sampler, reward, algorithm, optimizer."""

    config: AlignConfig
    ctx: Pipeline
    algorithm: Any
    params: list[torch.nn.Parameter]  # the LoRA's
    optimizer: torch.optim.Optimizer
    prompts: list[str]
    device: torch.device
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # the algorithm's own networks

    @property
    def module_params(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]

    def modules_state(self) -> dict[str, torch.Tensor]:
        """The algorithm's networks as one flat state dict (``<name>.<key>``), for the checkpoint."""
        return {f"{name}.{k}": v.detach() for name, m in self.modules.items() for k, v in m.state_dict().items()}


def build_worker(config: AlignConfig, scorer: Scorer | None = None, load_prompt_list: bool = True) -> Worker:
    """Model with LoRA, sampler, reward, algorithm and optimizer for one worker.

    ``scorer`` replaces in-process render + reward (see :class:`~r2d3.pipeline.Pipeline`), e.g.
    with a pool of remote render/reward actors; then this process loads no reward model."""
    validate(config)
    device = resolve_device(config.run.device)
    torch.manual_seed(config.run.seed)  # LoRA init: identical on every worker
    backend = load_backend(config.model.backend, weights=config.model.weights, device=str(device))
    if config.data.embeddings:  # precomputed by pipelines/embed_prompts.py; misses use the encoder

        backend.encode_prompts = load_embedding_cache(config.data.embeddings, backend).encode
    targets = config.model.lora_targets or backend.lora_target_modules
    try:
        params = add_lora(backend.denoiser, config.model.lora_rank, config.model.lora_alpha, targets)
    except ValueError as err:
        raise ConfigError(f"model.lora_targets: {err} (the backend's own list: {backend.lora_target_modules})") from err
    algorithm = build_algorithm(config.algo, config.sampler.num_steps)
    reward_fn = load_reward(config.reward, device) if scorer is None else None
    ctx = Pipeline.build(backend, config.sampler, config.render, reward_fn, scorer)
    modules = algorithm.build_modules(ctx)
    t = config.train
    groups = [{"params": params}] + [{"params": list(m.module.parameters()), "lr": m.lr,
                                      "weight_decay": m.weight_decay} for m in modules.values()]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    prompts = load_prompts(config.data.prompts, config.data.prompt_column).prompts if load_prompt_list else []
    return Worker(config, ctx, algorithm, params, optimizer, prompts, device,
                  {name: m.module for name, m in modules.items()})


def sample_batch(ctx: Pipeline, prompts: list[str], generator: torch.Generator) -> SampleBatch:
    """Trajectories for ``prompts`` with the current policy, scored with jittered reward cameras; noise
    and camera jitter come from the run's generator (on the CPU: the same numbers on any device)."""
    g = ctx.generate(prompts, ctx.noise(len(prompts), generator), generator=generator, jitter=True, render=False)
    return SampleBatch.from_generation(g)


def _finite_grads(params: list[torch.nn.Parameter]) -> bool:
    return all(p.grad is None or torch.isfinite(p.grad).all() for p in params)


def train_epoch(worker: Worker, samples: SampleBatch, generator: torch.Generator, session: Session,
                state: TrainState, progress: bool = False) -> dict[str, float]:
    """Optimizer steps over ``samples``: shuffled train batches, ``grad_accum`` per step."""
    t = worker.config.train
    samples = worker.algorithm.prepare(samples)
    order = torch.randperm(len(samples), generator=generator)
    # samples dropped for non-finite rewards are replaced by repeats, so every worker takes the same
    # number of steps (each step all-reduces gradients: a worker with fewer steps would hang the rest)
    expected = t.sample_batch_size * t.sample_batches_per_epoch
    if 0 < len(order) < expected:
        order = order.repeat(math.ceil(expected / len(order)))[:expected]
    batches = [order[i: i + t.train_batch_size] for i in range(0, len(order), t.train_batch_size)]
    sums: dict[str, float] = {}
    count = 0
    steps = math.ceil(len(batches) / t.grad_accum)
    bar = tqdm(range(steps), desc="train", leave=False, disable=not progress)
    for step in bar:
        group = batches[step * t.grad_accum: (step + 1) * t.grad_accum]
        worker.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        for idx in group:
            m = worker.algorithm.accumulate(worker.ctx, samples.select(idx.to(samples.rewards.device)),
                                            1.0 / len(group), generator)
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(group)
        trained = worker.params + worker.module_params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trained]
        session.all_reduce_mean_(grads)
        for p, g in zip(trained, grads):
            p.grad = g
        if not math.isfinite(metrics.get("loss", 0.0)) or not _finite_grads(trained):
            state.bad_batches += 1
            log.warning("non-finite loss or gradient: skipped optimizer step (%d so far)", state.bad_batches)
            if state.bad_batches > t.max_bad_batches:
                raise TrainingAborted(f"{state.bad_batches} batches had non-finite losses/gradients "
                                      f"(train.max_bad_batches={t.max_bad_batches}); lower train.lr or algo.beta")
            worker.optimizer.zero_grad(set_to_none=True)
            continue
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(worker.params, t.max_grad_norm))
        if worker.modules:  # clipped on their own, so they do not change how much the LoRA moves
            metrics["grad_norm_modules"] = float(torch.nn.utils.clip_grad_norm_(worker.module_params, t.max_grad_norm))
        worker.optimizer.step()
        state.optimizer_steps += 1
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
    return {f"train/{k}": v / max(count, 1) for k, v in sums.items()}


def check_in_sync(params: list[torch.nn.Parameter], session: Session) -> float:
    """Largest deviation of any LoRA weight from its mean over workers; an error unless 0.

    All-reduced gradients and identical optimizer states keep data-parallel replicas bitwise equal;
    a replica that drifts (an un-synced adapter, a rank that skipped a step) would silently train a
    different model on each worker, so it stops the run instead."""
    flat = torch.cat([p.detach().flatten() for p in params]).double()
    mean = flat.clone()
    session.all_reduce_mean_([mean])
    worst = (flat - mean).abs().max().reshape(1)
    session.all_reduce_mean_([worst])  # > 0 iff some rank deviates
    if worst.item() > 0:
        raise TrainingAborted(f"LoRA weights differ across the {session.world_size} workers (max deviation "
                              f"{worst.item():.3e}): gradients were not synchronised")
    return worst.item()


def _drop_nonfinite(batch: SampleBatch, state: TrainState, max_bad: int) -> SampleBatch:
    ok = torch.isfinite(batch.rewards)
    if ok.all():
        return batch
    state.bad_batches += 1
    log.warning("%d samples with non-finite rewards dropped", int((~ok).sum()))
    if state.bad_batches > max_bad or not ok.any():
        raise TrainingAborted(f"non-finite rewards in {state.bad_batches} batches "
                              f"(train.max_bad_batches={max_bad}); check the reward model")
    return batch.select(ok.nonzero()[:, 0])


def _buffer_tensors(batch: SampleBatch) -> dict[str, torch.Tensor]:
    t = batch.trajectory
    out = {"latents": t.latents, "model_outputs": t.model_outputs, "means": t.means, "noises": t.noises,
           "rewards": batch.rewards, "cond_tokens": batch.cond.tokens, "cond_mask": batch.cond.mask}
    for name in ("log_probs", "clean_final", "extra_outputs"):
        if getattr(t, name) is not None:
            out[name] = getattr(t, name)
    if batch.targets is not None:
        out.update(batch.targets.tensors())
    return {k: v.detach().cpu() for k, v in out.items()}


def _buffer_from_tensors(ctx: Pipeline, data: dict[str, torch.Tensor], prompts: list[str]) -> SampleBatch:
    dev = ctx.backend.device
    s = ctx.sampler
    traj = Trajectory(latents=data["latents"].to(dev), timesteps=s.timesteps.clone(),
                      next_timesteps=s.next_timesteps.clone(), step_indices=s.step_indices.clone(),
                      model_outputs=data["model_outputs"].to(dev), means=data["means"].to(dev),
                      stds=s.stds.clone(), noises=data["noises"].to(dev),
                      log_probs=data["log_probs"].to(dev) if "log_probs" in data else None,
                      clean_final=data["clean_final"].to(dev) if "clean_final" in data else None,
                      extra_outputs=data["extra_outputs"].to(dev) if "extra_outputs" in data else None)
    cond = PromptEmbeds(data["cond_tokens"].to(dev), data["cond_mask"].to(dev))
    return SampleBatch(traj, prompts, cond, data["rewards"].to(dev), targets=Targets.from_tensors(data, dev))


def load_modules_state(worker: Worker, state: dict[str, torch.Tensor] | None, path) -> None:
    """Put a checkpoint's algorithm networks back (strictly: a run with g_phi needs the checkpoint's)."""
    if not worker.modules:
        if state:
            names = ", ".join(sorted({k.split(".")[0] for k in state}))
            raise CorruptCheckpointError(f"checkpoint {path} holds networks ({names}) this run's algorithm does "
                                         "not train")
        return
    if state is None:
        raise CorruptCheckpointError(f"checkpoint {path} lacks modules.safetensors (the algorithm's networks: "
                                     f"{', '.join(worker.modules)})")
    for name, module in worker.modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v.to(worker.device) for k, v in state.items() if k.startswith(prefix)})


def _load_newest_usable(session: Session):
    """The newest checkpoint that loads; a corrupt one (named in the log) falls back to the one before it.
    With checkpoints but none usable, the error names the newest one's bad file."""
    first_error = None
    for path in session.checkpoint_candidates():
        try:
            return path, load_checkpoint(path)
        except CorruptCheckpointError as err:
            log.warning("skipping checkpoint %s: %s", path, err)
            first_error = first_error or err
    if first_error is not None:
        raise CorruptCheckpointError(f"{first_error}; no older complete checkpoint to resume from (start over "
                                     "with run.resume=false run.restart=true)") from first_error
    return None, None


def run(config: AlignConfig, session: Session, evaluate_fn=None, on_epoch=None) -> dict[str, Any]:
    """Align for ``config.train.epochs`` epochs (resuming from the session's latest checkpoint).

    ``evaluate_fn(worker, tag)`` (rank 0) returns held-out metrics before and after training;
    ``on_epoch(worker, epoch, samples, metrics, history)`` is called on rank 0 after each epoch (logging hooks).
    """
    stream = getattr(session, "prompt_stream", None)  # streamed shards (Ray Data) instead of an in-memory list
    worker = build_worker(config, scorer=getattr(session, "scorer", None), load_prompt_list=stream is None)
    generator = torch.Generator().manual_seed(config.run.seed * 1000 + session.rank)
    state, buffer = TrainState(), None
    ckpt_path, ckpt = _load_newest_usable(session) if config.run.resume else (None, None)
    if ckpt is not None:
        check_compatible(ckpt.fingerprint, config)
        try:
            load_lora_state_dict(worker.ctx.backend.denoiser, {k: v.to(worker.device) for k, v in ckpt.lora.items()})
            load_modules_state(worker, ckpt.modules, ckpt_path)
            worker.optimizer.load_state_dict(ckpt.optimizer)
        except (RuntimeError, ValueError, KeyError) as err:  # wrong shapes / keys: a file from another model
            raise CorruptCheckpointError(f"checkpoint {ckpt_path} does not fit this model: "
                                         f"{str(err).splitlines()[0]}") from err
        generator.set_state(ckpt.generator_state)
        if session.rank:  # rank 0's saved stream, forked deterministically per rank
            generator.manual_seed(int(torch.randint(2**62, (1,), generator=generator)) + session.rank)
        state = ckpt.state
        state.resumes.append(state.epoch)
        if ckpt.buffer is not None:
            buffer = _buffer_from_tensors(worker.ctx, ckpt.buffer, ckpt.buffer_prompts or [])
        log.info("resumed from %s at epoch %d", ckpt_path, state.epoch)
    summary: dict[str, Any] = {}
    if evaluate_fn is not None and session.rank == 0:
        if state.before is None and state.epoch == 0:
            state.before = evaluate_fn(worker, "before")
        if state.before is not None:
            summary["before"] = state.before
    t = config.train
    progress = config.run.progress and session.rank == 0 and session.shows_progress
    bar = tqdm(range(state.epoch, t.epochs), desc="align", disable=not progress,
               initial=state.epoch, total=t.epochs)
    for epoch in bar:
        start = time.time()
        batches = []
        for _ in range(t.sample_batches_per_epoch):
            if stream is not None:
                prompts = stream.take(t.sample_batch_size)
            else:
                idx = torch.randint(len(worker.prompts), (t.sample_batch_size,), generator=generator)
                prompts = [worker.prompts[i] for i in idx.tolist()]
            batches.append(sample_batch(worker.ctx, prompts, generator))
        samples = _drop_nonfinite(SampleBatch.concat(batches), state, t.max_bad_batches)
        sample_time = time.time() - start
        samples = worker.algorithm.precompute(worker.ctx, samples, generator)  # while the LoRA is the sampler's
        precompute_time = time.time() - start - sample_time
        train_on = buffer if worker.algorithm.uses_lag else samples
        metrics: dict[str, float] = {}
        if train_on is not None:
            metrics = train_epoch(worker, train_on, generator, session, state,
                                  progress=progress)
            if session.world_size > 1 and metrics:  # loss terms and norms: the mean over workers
                keys = sorted(metrics)
                values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
                session.all_reduce_mean_([values])
                metrics = dict(zip(keys, values.tolist()))
        buffer = samples
        state.epoch = epoch + 1
        if session.world_size > 1:
            metrics["lora_sync_max_diff"] = check_in_sync(worker.params + worker.module_params, session)
        if stream is not None:  # bad rows skipped so far, over all workers (each reads its own split)
            skipped = torch.tensor([float(stream.skipped)], dtype=torch.float64)
            session.all_reduce_mean_([skipped])
            metrics.update({"data/skipped_prompts": round(skipped.item() * session.world_size),
                            "data/epochs": stream.data_epochs})
        reward = samples.rewards.detach().float()
        stats = torch.stack([reward.mean(), reward.std(unbiased=False)])
        session.all_reduce_mean_([stats])
        metrics.update({"epoch": state.epoch, "optimizer_steps": state.optimizer_steps, "world_size": session.world_size,
                        "reward_mean": float(stats[0]), "reward_std": float(stats[1]),
                        "bad_batches": state.bad_batches, "time/sample_s": sample_time,
                        "time/precompute_s": precompute_time,
                        "time/epoch_s": time.time() - start})
        every = config.eval.every
        if evaluate_fn is not None and session.rank == 0 and every and state.epoch % every == 0:
            held = evaluate_fn(worker, f"epoch_{state.epoch:04d}")
            metrics.update({f"heldout/{k}": v for k, v in held.items() if isinstance(v, (int, float))})
        state.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        bar.set_postfix(reward=f"{metrics['reward_mean']:.4f}")
        last = state.epoch == t.epochs
        checkpoint_dir = None
        if last or state.epoch % max(config.run.checkpoint_every, 1) == 0:
            if session.rank == 0:  # LoRA weights are identical on every rank (all-reduced gradients)
                checkpoint_dir = session.checkpoint_path(state.epoch)
                save_checkpoint(checkpoint_dir, config, lora_state_dict(worker.ctx.backend.denoiser),
                                worker.optimizer, generator, state,
                                _buffer_tensors(buffer) if worker.algorithm.uses_lag else None, buffer.prompts,
                                worker.modules_state() or None)
        if on_epoch is not None and session.rank == 0:
            on_epoch(worker, state.epoch, samples, metrics, state.history)
        session.report(metrics, checkpoint_dir)
    if evaluate_fn is not None and session.rank == 0:
        summary["after"] = evaluate_fn(worker, "after")
    summary["history"] = state.history
    summary["resumes"] = state.resumes
    summary["worker"] = worker
    return summary
