"""Training and held-out evaluation of the ``clip_tiny`` reward (used by ``pipelines/train_reward.py``).

Objective, per step on a batch of ``B`` cached views (random object, random view, random horizontal
flip, random prompt template):

- candidate prompts = the batch's own prompts + for every view ``colour_negatives`` prompts that
  differ from its object's only in the body colour and ``shape_negatives`` that differ only in the
  shape (same template, size, aspect, pattern; these hard negatives teach the fine distinctions the
  acceptance test measures, which random in-batch negatives rarely probe);
- image→text InfoNCE over all candidates and text→image InfoNCE over the batch's images, both with
  multiple positives (every candidate / image with the same attributes counts as a match, so
  duplicates in a batch are not pushed apart), temperature learned (CLIP's ``logit_scale``, ≤ 100).

Held-out pairwise accuracy (the acceptance measure): for each object of the HELD-OUT split and its
views, the reward (cosine, averaged over views) of its own prompt is compared with every prompt that
differs only in body colour (``color``), only in shape (``shape``), or — reported for information —
only in the second colour of two-tone/striped objects (``color2``). ``overall`` pools the colour and
shape pairs.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from r2d3.data.procedural import (
    NUM_TEMPLATES,
    PRIMARY_COLORS,
    SHAPE_ASPECTS,
    SHAPES,
    VOCABULARY,
    ShapeAttributes,
)
from r2d3.data.procedural.views import RenderedViews
from r2d3.rewards.clip_tiny import ClipTinyModel


@dataclass
class ClipTinyTrainConfig:
    seed: int = 0
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    colour_negatives: int = 3
    shape_negatives: int = 2
    max_logit_scale: float = 100.0
    eval_every: int = 3  # epochs


def colour_variants(attributes: ShapeAttributes) -> list[ShapeAttributes]:
    """Every valid description differing from ``attributes`` only in the body colour."""
    taken = (attributes.color, attributes.color2)
    return [replace(attributes, color=c) for c in PRIMARY_COLORS if c not in taken]


def shape_variants(attributes: ShapeAttributes) -> list[ShapeAttributes]:
    """Every valid description differing only in the shape (the aspect must exist for the new shape)."""
    return [replace(attributes, shape=s) for s in SHAPES
            if s != attributes.shape and attributes.aspect in SHAPE_ASPECTS[s]]


def colour2_variants(attributes: ShapeAttributes) -> list[ShapeAttributes]:
    """Descriptions differing only in the second (stripe / lower-half) colour."""
    if attributes.pattern == "solid":
        return []
    out = []
    for c in ("white", *PRIMARY_COLORS):
        if c in (attributes.color, attributes.color2):
            continue
        try:
            out.append(replace(attributes, color2=c))
        except ValueError:  # e.g. white is not a two-tone colour
            continue
    return out


def template_of(attributes: ShapeAttributes, prompt: str) -> int:
    """Which template wrote ``prompt`` (0 if none matches exactly)."""
    for t in range(NUM_TEMPLATES):
        if attributes.prompt(t) == prompt:
            return t
    return 0


def _multi_positive_nce(logits: Tensor, positive: Tensor) -> Tensor:
    """``-log sum_{pos} softmax(logits)`` per row, averaged."""
    matched = torch.logsumexp(logits.masked_fill(~positive, -1e4), dim=1)
    return (torch.logsumexp(logits, dim=1) - matched).mean()


@torch.no_grad()
def pairwise_accuracy(
    model: ClipTinyModel, views: RenderedViews, batch_size: int = 128
) -> dict[str, float | int]:
    """Held-out pairwise accuracies (see the module docstring) on ``views``; also the pair counts."""
    model.eval()
    wins: dict[str, list[float]] = {"color": [], "shape": [], "color2": []}
    for lo in range(0, len(views), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(views))))
        rgb = views.rgb_float(slice(lo, idx[-1] + 1))
        m, v = rgb.shape[:2]
        image = model.encode_image(rgb.flatten(0, 1)).reshape(m, v, -1)
        texts: list[str] = []
        plan: list[tuple[int, str, int, int]] = []  # (object, kind, matching text index, mismatching index)
        for j, i in enumerate(idx):
            attributes = views.attributes[i]
            template = template_of(attributes, views.prompts[i])
            own = len(texts)
            texts.append(attributes.prompt(template))
            kinds = (("color", colour_variants(attributes)), ("shape", shape_variants(attributes)),
                     ("color2", colour2_variants(attributes)))
            for kind, variants in kinds:
                for other in variants:
                    plan.append((j, kind, own, len(texts)))
                    texts.append(other.prompt(template))
        text = model.encode_text(texts)
        obj = torch.tensor([p[0] for p in plan])
        score_own = (image[obj] * text[[p[2] for p in plan]][:, None]).sum(-1).mean(-1)
        score_other = (image[obj] * text[[p[3] for p in plan]][:, None]).sum(-1).mean(-1)
        for p, win in zip(plan, (score_own > score_other).float().tolist()):
            wins[p[1]].append(win)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {
        "overall": mean(wins["color"] + wins["shape"]),
        "color": mean(wins["color"]),
        "shape": mean(wins["shape"]),
        "color2": mean(wins["color2"]),
        "pairs_color": len(wins["color"]),
        "pairs_shape": len(wins["shape"]),
        "pairs_color2": len(wins["color2"]),
        "objects": len(views),
    }


def train_clip_tiny(
    train: RenderedViews,
    heldout: RenderedViews,
    config: ClipTinyTrainConfig | None = None,
    log: Callable[[str], None] = print,
    model: ClipTinyModel | None = None,
) -> tuple[ClipTinyModel, dict]:
    """Train ``clip_tiny`` on cached views; returns the model (eval mode) and a report with the config,
    wall time and held-out pairwise accuracies."""
    config = config or ClipTinyTrainConfig()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model = model or ClipTinyModel(vocab=VOCABULARY)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    steps_per_epoch = train.steps_per_epoch(config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))

    start = time.perf_counter()
    history = []
    step = 0
    for epoch in range(config.epochs):
        running = 0.0
        for obj, view, flip in train.single_view_batches(config.batch_size):
            images = train.mirror(train.rgb[obj, view].float() / 255.0, flip)

            attrs = [train.attributes[i] for i in obj.tolist()]
            templates = [rng.randrange(NUM_TEMPLATES) for _ in attrs]
            candidates: dict[str, ShapeAttributes] = {}
            for a, t in zip(attrs, templates):
                candidates.setdefault(a.prompt(t), a)
                colours, shapes = colour_variants(a), shape_variants(a)
                negatives = rng.sample(colours, min(config.colour_negatives, len(colours)))
                negatives += rng.sample(shapes, min(config.shape_negatives, len(shapes)))
                for n in negatives:
                    candidates.setdefault(n.prompt(t), n)
            texts = list(candidates)
            text_attrs = list(candidates.values())
            own_text = torch.tensor([texts.index(a.prompt(t)) for a, t in zip(attrs, templates)])

            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            image_emb = model.encode_image(images)
            text_emb = model.encode_text(texts)
            scale = model.logit_scale.exp().clamp(max=config.max_logit_scale)
            logits = scale * image_emb @ text_emb.T  # [B, U]
            attr_ids = {a: k for k, a in enumerate(dict.fromkeys(text_attrs))}
            img_key = torch.tensor([attr_ids[a] for a in attrs])
            txt_key = torch.tensor([attr_ids[a] for a in text_attrs])
            i2t = _multi_positive_nce(logits, img_key[:, None] == txt_key[None, :])
            t2i = _multi_positive_nce(logits[:, own_text].T, img_key[:, None] == img_key[None, :])
            loss = 0.5 * (i2t + t2i)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running += loss.item()
            step += 1
        entry = {
            "epoch": epoch + 1,
            "loss": running / steps_per_epoch,
            "seconds": time.perf_counter() - start,
            "logit_scale": float(model.logit_scale.detach().exp()),
        }
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            entry["heldout"] = pairwise_accuracy(model, heldout)
            model.train()
        history.append(entry)
        acc = entry.get("heldout", {})
        log(f"clip_tiny epoch {epoch + 1}/{config.epochs} loss {entry['loss']:.4f} "
            f"t={entry['seconds']:.0f}s" + (f" heldout overall {acc['overall']:.3f} color {acc['color']:.3f} "
                                          f"shape {acc['shape']:.3f}" if acc else ""))
    model.eval().requires_grad_(False)
    report = {
        "config": asdict(config),
        "train_objects": len(train),
        "views_per_object": train.num_views,
        "train_seconds": time.perf_counter() - start,
        "heldout": history[-1]["heldout"],
        "history": history,
    }
    return model, report
