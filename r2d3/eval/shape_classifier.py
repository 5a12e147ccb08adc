"""Silhouette shape classifier: a small CNN judging which primitive a render shows, from geometry only.

Why: shape prompt-following must be measured by something the alignment does not optimise. This
classifier sees only the rendered **alpha** (silhouette) and **depth** — never the RGB that
``clip_tiny`` or ``colorfulness`` score — and has its own weights, trained on ground-truth renders of
the procedural TRAIN split.

Input per view (2 channels at 64x64, antialiased bilinear resize if the render differs):
- ``alpha`` in [0, 1];
- normalised depth ``alpha · (depth − d̄) / depth_scale`` where ``d̄`` is the alpha-weighted mean depth
  of the view (removes the camera distance) and ``depth_scale`` = 0.5 world units (about an object's
  half extent), so values are O(1) on the object and 0 on the background.

Predictions average the class probabilities over an asset's views. Weights (78 k parameters, 0.3 MB)
ship at ``r2d3/weights/shape_classifier/`` and are rebuilt by
``python pipelines/train_reward.py --what shape_classifier`` (seed 0; 3 epochs on the same cached
renders as ``clip_tiny``, 4–76 s depending on machine load). Held-out accuracy 100 % on 300 objects;
the numbers are in ``training_report.json`` next to the weights and in docs/benchmarks.md.

The CNN architecture (:class:`~r2d3.rewards.clip_tiny.ConvEncoder`) is shared with ``clip_tiny``, but
nothing else is: the input channels differ, and so do the weights and the training labels.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from r2d3.pretrained import load_pretrained_dir
from r2d3.data.procedural import SHAPES
from r2d3.data.procedural.views import RenderedViews
from r2d3.rewards.clip_tiny import ConvEncoder, to_model_resolution

REBUILD_COMMAND = "python pipelines/train_reward.py --what shape_classifier"


def default_weights_dir() -> Path:
    return Path(str(resources.files("r2d3"))) / "weights" / "shape_classifier"


def silhouette_features(alpha: Tensor, depth: Tensor, depth_scale: float = 0.5) -> Tensor:
    """``[N, 2, H, W]`` classifier input from ``alpha`` and ``depth`` ``[N, 1, H, W]`` (module docstring)."""
    alpha, depth = alpha.float(), depth.float()
    mass = alpha.sum(dim=(-2, -1), keepdim=True)
    mean_depth = (alpha * depth).sum(dim=(-2, -1), keepdim=True) / mass.clamp(min=1e-6)
    rel = (alpha * (depth - mean_depth) / depth_scale).clamp(-4, 4)
    return torch.cat([alpha, rel], dim=1)


class ShapeClassifier(ModelMixin, ConfigMixin):
    """``forward(alpha [N, 1, H, W], depth [N, 1, H, W]) -> logits [N, len(shapes)]``."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        shapes: tuple[str, ...] = SHAPES,
        image_size: int = 64,
        widths: tuple[int, ...] = (16, 32, 64, 64),
        depth_scale: float = 0.5,
    ):
        super().__init__()
        self.encoder = ConvEncoder(2, widths)
        self.head = nn.Sequential(
            nn.Linear(self.encoder.out_features, 128), nn.SiLU(), nn.Linear(128, len(shapes))
        )

    @property
    def shapes(self) -> list[str]:
        return list(self.config.shapes)

    def forward(self, alpha: Tensor, depth: Tensor) -> Tensor:
        x = silhouette_features(alpha, depth, self.config.depth_scale)
        x = to_model_resolution(x, self.config.image_size).to(self.head[0].weight.dtype)
        return self.head(self.encoder(x))

    @torch.no_grad()
    def probabilities(self, alpha: Tensor, depth: Tensor) -> Tensor:
        """Per-asset class probabilities ``[B, S]`` from views ``[B, V, 1, H, W]`` (mean over views)."""
        b, v = alpha.shape[:2]
        logits = self(alpha.flatten(0, 1), depth.flatten(0, 1))
        return logits.softmax(-1).reshape(b, v, -1).mean(1)

    def predict(self, alpha: Tensor, depth: Tensor) -> list[str]:
        """Predicted shape name per asset from views ``[B, V, 1, H, W]``."""
        return [self.shapes[i] for i in self.probabilities(alpha, depth).argmax(-1).tolist()]


def load_shape_classifier(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> ShapeClassifier:
    """Load the classifier from ``path`` (default: the shipped weights); missing or corrupt files raise
    :class:`~r2d3.backends.base.WeightsError` naming the path and the command that rebuilds them."""
    path = Path(path) if path is not None else default_weights_dir()
    return load_pretrained_dir(ShapeClassifier, path, "shape classifier", REBUILD_COMMAND, device)


@dataclass
class ShapeClassifierTrainConfig:
    seed: int = 0
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 30


@torch.no_grad()
def shape_accuracy(model: ShapeClassifier, views: RenderedViews, batch_size: int = 256) -> dict:
    """Per-object accuracy (probabilities averaged over views) overall and per shape, on ``views``."""
    model.eval()
    predicted: list[str] = []
    for lo in range(0, len(views), batch_size):
        sl = slice(lo, lo + batch_size)
        predicted += model.predict(views.alpha[sl].float(), views.depth[sl].float())
    truth = [a.shape for a in views.attributes]
    per_shape = {}
    for shape in model.shapes:
        rows = [p == t for p, t in zip(predicted, truth) if t == shape]
        if rows:
            per_shape[shape] = sum(rows) / len(rows)
    return {
        "accuracy": sum(p == t for p, t in zip(predicted, truth)) / len(truth),
        "per_shape": per_shape,
        "objects": len(truth),
    }


def train_shape_classifier(
    train: RenderedViews,
    heldout: RenderedViews,
    config: ShapeClassifierTrainConfig | None = None,
    log: Callable[[str], None] = print,
) -> tuple[ShapeClassifier, dict]:
    """Train on single views of ``train`` (random horizontal flips); report held-out accuracy."""
    config = config or ShapeClassifierTrainConfig()
    torch.manual_seed(config.seed)
    model = ShapeClassifier().train()
    label = {s: i for i, s in enumerate(model.shapes)}
    targets = torch.tensor([label[a.shape] for a in train.attributes])
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = train.steps_per_epoch(config.batch_size)
    total = steps_per_epoch * config.epochs
    start = time.perf_counter()
    history, step = [], 0
    for epoch in range(config.epochs):
        running = 0.0
        for obj, view, flip in train.single_view_batches(config.batch_size):
            alpha = train.mirror(train.alpha[obj, view].float(), flip)
            depth = train.mirror(train.depth[obj, view].float(), flip)
            warm = min(1.0, (step + 1) / config.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * warm * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(alpha, depth), targets[obj])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            step += 1
        seconds = time.perf_counter() - start
        history.append({"epoch": epoch + 1, "loss": running / steps_per_epoch, "seconds": seconds})
        log(f"shape_classifier epoch {epoch + 1}/{config.epochs} loss {history[-1]['loss']:.4f} "
            f"t={history[-1]['seconds']:.0f}s")
    model.eval().requires_grad_(False)
    heldout_acc = shape_accuracy(model, heldout)
    log(f"shape_classifier held-out accuracy {heldout_acc['accuracy']:.3f}")
    report = {
        "config": asdict(config),
        "train_objects": len(train),
        "views_per_object": train.num_views,
        "train_seconds": time.perf_counter() - start,
        "heldout": heldout_acc,
        "history": history,
    }
    return model, report


def classify_shapes(alpha: Tensor, depth: Tensor, model: ShapeClassifier | None = None) -> list[str]:
    """Shape names for assets rendered as ``[B, V, 1, H, W]`` alpha/depth (default: the shipped model)."""
    return (model or _default_model()).predict(alpha, depth)


_DEFAULT: dict[str, ShapeClassifier] = {}


def _default_model() -> ShapeClassifier:
    if "model" not in _DEFAULT:
        _DEFAULT["model"] = load_shape_classifier()
    return _DEFAULT["model"]


__all__: Sequence[str] = [
    "ShapeClassifier",
    "ShapeClassifierTrainConfig",
    "classify_shapes",
    "load_shape_classifier",
    "shape_accuracy",
    "silhouette_features",
    "train_shape_classifier",
]
