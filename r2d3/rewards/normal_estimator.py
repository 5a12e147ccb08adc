"""Normal-estimator reward (``normal_estimator``): rendered normals against a monocular normal estimator.

Nabla-R2D3's ``normal_yoso`` reward (method notes §6(g)): a monocular normal estimator (StableNormal-YOSO
in the paper) predicts a normal map ``N_est`` from each rendered RGB view and the reward is the masked
mean cosine between it and the rendered normal ``N_r``, per view::

    r = Σ_p M(p) ⟨N̂_r(p), T·N_est(p)⟩ / Σ_p M(p),      M = [alpha > alpha_threshold]  (hard mask)

Conventions (the same as :mod:`r2d3.rewards.geometry`, the ``dnc`` reward):

- ``N_r`` is ``render.normal``: camera-space normals in the renderer's **OpenCV** camera frame (x right,
  y down, z forward into the scene), oriented toward the camera (a fronto-parallel surface has
  ``N_r = (0, 0, -1)``). It is normalised before the dot product (``N̂_r``), as in ``dnc``, so the score
  is a cosine in [−1, 1]; a view with an empty mask scores 0 (``torch.where``, no NaN gradients).
- ``N_est`` is a **stop-gradient target**: the estimator runs under ``torch.no_grad`` on the detached
  ``render.rgb`` (composited over the render's background) in fp32 and its output is detached and
  renormalised to unit length. The gradient flows only through ``render.normal`` (never to ``rgb``,
  ``alpha`` or ``depth``) -- the paper's ``reward_context=inference``.
- ``T = diag(s)`` maps the estimator's normal convention to the renderer's frame. It is the explicit
  option ``estimator_frame`` (see :data:`FRAMES`), not a hidden constant:

  ``"opencv"``  the renderer's frame (x right, y down, z forward, normals toward the camera); ``s = (1, 1, 1)``.
  ``"opengl"``  x right, y **up**, z **toward the viewer**, normals toward the camera (a fronto-parallel
                surface is ``(0, 0, +1)``); ``s = (1, −1, −1)``. Marigold's convention.
  ``"negated"`` the renderer's frame with normals pointing **away** from the camera (into the surface);
                ``s = (−1, −1, −1)``. This is the paper's literal ``⟨−N_r, N_est⟩``.

  A sequence of three signs (e.g. ``[1, -1, -1]``) states any other axis-flip convention. Which one is
  right depends on the estimator (and, in the paper, on the RaDe-GS renderer's normal orientation), so
  it must be stated per estimator: ``estimator_frame=None`` (default) takes the estimator's own ``frame``
  attribute when it has one, else ``"opencv"``; passing a frame that contradicts the estimator's
  declared ``frame`` raises ``ValueError`` (so a conversion is never applied twice).

  Choosing it for a new estimator: render a surface facing the camera and tilted in x and y (the tests
  use a sheet of flat Gaussians seen obliquely); an estimator that sees it correctly must score 1 there.
  Marigold's frame is documented by diffusers (see :class:`MarigoldNormalEstimator`); StableNormal's is
  not checked in this repository, so state it when plugging it in through ``python:``.

Estimators are pluggable behind a tiny protocol (:class:`NormalEstimator`)::

    estimator(images: Tensor [N, 3, H, W] in [0, 1], fp32) -> Tensor [N, 3, H, W] unit normals

in the renderer's camera frame unless the estimator declares another ``frame``. ``estimator`` is a spec
string (:func:`build_estimator`) or such a callable:

``"marigold:<dir>"``             diffusers' :class:`~diffusers.MarigoldNormalsPipeline` from a LOCAL
                                 directory (:class:`MarigoldNormalEstimator`; nothing is downloaded).
``"python:<module>:<factory>"``  ``importlib.import_module(module).<factory>(**estimator_kwargs)`` must
                                 return an estimator: how StableNormal-YOSO, DSINE, Omnidata or anything
                                 else plugs in (its own package, its own weights).

``estimator_kwargs`` (a mapping) goes to :class:`MarigoldNormalEstimator` or to the factory. An estimator
that is an ``nn.Module`` is registered as a submodule, so ``load_reward(..., device)`` moves and freezes it.

Example spec::

    {"name": "normal_estimator",
     "kwargs": {"estimator": "marigold:weights/marigold-normals-v1-1",
                "estimator_kwargs": {"num_inference_steps": 4, "processing_resolution": 256}}}
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from r2d3.pretrained import WeightsError
from r2d3.render.output import RenderOutput
from r2d3.rewards.base import Reward, register_reward, views_as_batch

#: named normal conventions: per-axis signs taking an estimator's normal to the renderer's OpenCV camera
#: frame (x right, y down, z forward, normals toward the camera); see the module docstring
FRAMES: dict[str, tuple[float, float, float]] = {
    "opencv": (1.0, 1.0, 1.0),
    "opengl": (1.0, -1.0, -1.0),
    "negated": (-1.0, -1.0, -1.0),
}

#: the accepted forms of an estimator spec string (named in every bad-spec error)
SPEC_FORMS = ("'marigold:<dir>' (a local diffusers MarigoldNormalsPipeline directory) or "
              "'python:<module>:<factory>' (a factory returning a callable "
              "images [N, 3, H, W] in [0, 1] -> unit normals [N, 3, H, W])")


@runtime_checkable
class NormalEstimator(Protocol):
    """``estimator(images [N, 3, H, W] in [0, 1]) -> unit normals [N, 3, H, W]``, in the renderer's camera
    frame, or in the frame named by an optional ``frame`` attribute (a key of :data:`FRAMES`)."""

    def __call__(self, images: Tensor) -> Tensor: ...


def frame_signs(frame: str | Sequence[float]) -> tuple[float, float, float]:
    """The per-axis signs of a named convention (:data:`FRAMES`) or of an explicit ``[sx, sy, sz]``."""
    if isinstance(frame, str):
        if frame not in FRAMES:
            raise ValueError(f"unknown normal frame {frame!r}; valid frames: {', '.join(FRAMES)} "
                             "or a sequence of three signs such as [1, -1, -1]")
        return FRAMES[frame]
    signs = tuple(float(s) for s in frame)
    if len(signs) != 3 or any(s not in (1.0, -1.0) for s in signs):
        raise ValueError(f"a normal frame given as signs must be three values of +1 or -1, got {frame!r}")
    return signs  # type: ignore[return-value]


def to_renderer_frame(normals: Tensor, frame: str | Sequence[float], dim: int = -3) -> Tensor:
    """Normals in ``frame`` (channel axis ``dim``) expressed in the renderer's OpenCV camera frame."""
    signs = normals.new_tensor(frame_signs(frame))
    shape = [1] * normals.ndim
    shape[dim] = 3
    return normals * signs.reshape(shape)


# ---- estimator specs ------------------------------------------------------------------------------


def parse_estimator_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"marigold:<dir>"`` -> ``("marigold", (dir,))``; ``"python:<module>:<factory>"`` ->
    ``("python", (module, factory))``; anything else raises ``ValueError`` naming the valid forms."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"bad normal estimator spec {spec!r}; valid forms: {SPEC_FORMS}")
    kind, rest = spec.split(":", 1)
    if kind == "marigold" and rest.strip():
        return kind, (rest,)
    if kind == "python" and ":" in rest:
        module, factory = rest.rsplit(":", 1)
        if module.strip() and factory.strip():
            return kind, (module.strip(), factory.strip())
    raise ValueError(f"bad normal estimator spec {spec!r}; valid forms: {SPEC_FORMS}")


def import_factory(module: str, factory: str) -> Callable[..., Any]:
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"normal estimator 'python:{module}:{factory}': cannot import module {module!r} "
                         f"({type(err).__name__}: {err}); valid forms: {SPEC_FORMS}") from err
    fn = getattr(mod, factory, None)
    if fn is None or not callable(fn):
        raise ValueError(f"normal estimator 'python:{module}:{factory}': module {module!r} has no callable "
                         f"{factory!r}; valid forms: {SPEC_FORMS}")
    return fn


def build_estimator(spec: str | Callable[[Tensor], Tensor], **kwargs: Any) -> Callable[[Tensor], Tensor]:
    """An estimator from a spec string (see the module docstring) or a ready callable (returned as is;
    ``kwargs`` must then be empty)."""
    if callable(spec) and not isinstance(spec, str):
        if kwargs:
            raise ValueError("estimator_kwargs only apply to spec strings, not to a ready estimator callable")
        return spec
    kind, args = parse_estimator_spec(spec)  # type: ignore[arg-type]
    if kind == "marigold":
        return MarigoldNormalEstimator(args[0], **kwargs)
    estimator = import_factory(*args)(**kwargs)
    if not callable(estimator):
        raise TypeError(f"normal estimator factory {spec!r} returned {type(estimator).__name__}, not a callable "
                        "images [N, 3, H, W] -> normals [N, 3, H, W]")
    return estimator


# ---- Marigold ------------------------------------------------------------------------------------

#: what the ``marigold:<dir>`` directory must hold (named in every missing-weights error)
MARIGOLD_DOWNLOAD = (
    "the Hugging Face repo `prs-eth/marigold-normals-v1-1` in diffusers format -- model_index.json, "
    "unet/ (config.json, diffusion_pytorch_model.safetensors), vae/ (config.json, "
    "diffusion_pytorch_model.safetensors), scheduler/ (scheduler_config.json), text_encoder/ (config.json, "
    "model.safetensors), tokenizer/ (vocab.json + merges.txt or tokenizer.json, tokenizer_config.json) -- "
    "e.g. `hf download prs-eth/marigold-normals-v1-1 --local-dir weights/marigold-normals-v1-1` on a machine "
    "with network access, then pass 'marigold:weights/marigold-normals-v1-1' "
    "(this project never downloads weights)"
)


def _weights_present(folder: Path, stem: str, variant: str | None) -> bool:
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    return (folder / name).is_file() or (folder / f"{name}.index.json").is_file()


def check_marigold_dir(path: str | os.PathLike, variant: str | None = None) -> Path:
    """Raise :class:`WeightsError` naming every missing file of a MarigoldNormalsPipeline directory."""
    path = Path(path)
    if not path.is_dir():
        raise WeightsError(f"marigold normal estimator weights not found: {path} is not a directory. "
                           f"Put {MARIGOLD_DOWNLOAD} there.")
    suffix = f".{variant}" if variant else ""
    missing: list[str] = []
    if not (path / "model_index.json").is_file():
        missing.append(str(path / "model_index.json"))
    for folder, stem, config in (("unet", "diffusion_pytorch_model", "config.json"),
                                 ("vae", "diffusion_pytorch_model", "config.json"),
                                 ("scheduler", None, "scheduler_config.json"),
                                 ("text_encoder", "model", "config.json")):
        if not (path / folder / config).is_file():
            missing.append(str(path / folder / config))
        if stem is not None and not _weights_present(path / folder, stem, variant):
            missing.append(str(path / folder / f"{stem}{suffix}.safetensors"))
    tok = path / "tokenizer"
    has_vocab = (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
    if not ((tok / "tokenizer.json").is_file() or has_vocab):
        missing.append(f"{tok}/tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise WeightsError(f"marigold normal estimator weights incomplete in {path}: missing "
                           f"{', '.join(missing)}. Put {MARIGOLD_DOWNLOAD} there.")
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"unreadable {path / 'model_index.json'} ({type(err).__name__}: {err}). "
                           f"Put {MARIGOLD_DOWNLOAD} there.") from err
    cls = index.get("_class_name") if isinstance(index, dict) else None
    if cls != "MarigoldNormalsPipeline":
        raise WeightsError(f"{path} holds a {cls!r} pipeline, not a MarigoldNormalsPipeline (normals, not depth "
                           f"or intrinsics). Put {MARIGOLD_DOWNLOAD} there.")
    return path


class MarigoldNormalEstimator(nn.Module):
    """Marigold normals (diffusers' ``MarigoldNormalsPipeline``) as a :class:`NormalEstimator`.

    Loaded from a local diffusers directory (``from_pretrained(dir, use_safetensors=True)``,
    ``local_files_only``), computed in fp32, frozen, run under ``no_grad``, and deterministic: ensemble
    size 1, no ensembling, and the initial noise of **every** image comes from its own CPU generator
    seeded with ``seed`` -- so an image's prediction depends neither on the device nor on the other images
    in the batch. ``num_inference_steps`` / ``processing_resolution`` default to the checkpoint's
    ``default_denoising_steps`` / ``default_processing_resolution`` (the paper's YOSO used 256); the
    prediction is resized back to the input resolution and renormalised (``match_input_resolution``).

    Frame: Marigold predicts normals with **x right, y up, z toward the viewer** (diffusers'
    ``MarigoldImageProcessor.visualize_normals``: "default direction is right / top / facing the
    observer"), i.e. the ``"opengl"`` convention of :data:`FRAMES`. The output is mapped to the renderer's
    OpenCV frame by ``(x, y, z) -> (x, -y, -z)`` (:data:`MARIGOLD_FRAME`), so this estimator's ``frame``
    is ``"opencv"``.
    """

    #: the convention of the returned normals (already mapped to the renderer's frame)
    frame = "opencv"

    def __init__(self, path: str | os.PathLike, num_inference_steps: int | None = None,
                 processing_resolution: int | None = None, seed: int = 0, batch_size: int | None = None,
                 device: str | torch.device = "cpu", variant: str | None = None,
                 resample_method: str = "bilinear"):
        super().__init__()
        path = check_marigold_dir(path, variant)
        from diffusers import MarigoldNormalsPipeline

        try:
            pipe = MarigoldNormalsPipeline.from_pretrained(path, use_safetensors=True, local_files_only=True,
                                                           variant=variant)
        except Exception as err:  # json, safetensors, diffusers and transformers raise several types
            raise WeightsError(f"could not load the marigold normal estimator from {path} "
                               f"({type(err).__name__}: {err}). The files are corrupt or incompatible; put "
                               f"{MARIGOLD_DOWNLOAD} there.") from err
        pipe = pipe.to(device=torch.device(device), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        # registered submodules: ``.to(device)`` on the reward moves the pipeline's models in place
        self.unet = pipe.unet.eval().requires_grad_(False)
        self.vae = pipe.vae.eval().requires_grad_(False)
        self.text_encoder = pipe.text_encoder.eval().requires_grad_(False)
        self.pipe = pipe
        self.path = path
        self.num_inference_steps = num_inference_steps if num_inference_steps is not None \
            else pipe.default_denoising_steps
        self.processing_resolution = processing_resolution if processing_resolution is not None \
            else pipe.default_processing_resolution
        if self.num_inference_steps is None or int(self.num_inference_steps) < 1:
            raise ValueError(f"marigold: num_inference_steps must be >= 1 (the checkpoint in {path} sets no "
                             f"default_denoising_steps), got {num_inference_steps!r}")
        if self.processing_resolution is None or int(self.processing_resolution) < 0:
            raise ValueError(f"marigold: processing_resolution must be >= 0 (0 = input resolution; the "
                             f"checkpoint in {path} sets no default), got {processing_resolution!r}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"marigold: batch_size must be >= 1, got {batch_size}")
        self.num_inference_steps = int(self.num_inference_steps)
        self.processing_resolution = int(self.processing_resolution)
        self.seed = int(seed)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.resample_method = resample_method

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"marigold expects images [N, 3, H, W], got {tuple(images.shape)}")
        device = self.unet.device
        x = images.detach().to(device=device, dtype=torch.float32).clamp(0.0, 1.0)
        n = x.shape[0]
        generators = [torch.Generator(device="cpu").manual_seed(self.seed) for _ in range(n)]
        out = self.pipe(
            x,
            num_inference_steps=self.num_inference_steps,
            ensemble_size=1,
            processing_resolution=self.processing_resolution,
            match_input_resolution=True,
            resample_method_input=self.resample_method,
            resample_method_output=self.resample_method,
            batch_size=self.batch_size or n,  # one batch: the generator list lines up with the images
            generator=generators,
            output_type="pt",
        )
        normals = to_renderer_frame(out.prediction.float(), MARIGOLD_FRAME, dim=1)
        return normals.to(images.device)


#: Marigold's normal convention (x right, y up, z toward the viewer), a key of :data:`FRAMES`
MARIGOLD_FRAME = "opengl"


# ---- the reward ----------------------------------------------------------------------------------


def _estimate(estimator: Callable[[Tensor], Tensor], images: Tensor, name: str) -> Tensor:
    with torch.no_grad():
        out = estimator(images)
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(images.shape):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"normal estimator {name} must return normals of the images' shape "
                         f"{tuple(images.shape)} [N, 3, H, W], got {shape}")
    out = out.detach()
    if not torch.isfinite(out).all():
        raise ValueError(f"normal estimator {name} returned non-finite normals")
    return out


def normal_estimator_consistency(render: RenderOutput, target: Tensor, alpha_threshold: float = 0.5) -> Tensor:
    """Per-view scores ``[B, V]``: ``Σ M ⟨N̂_r, target⟩ / Σ M`` with ``M = [alpha > alpha_threshold]`` and
    ``target`` ``[B, V, 3, H, W]`` unit normals already in the renderer's frame (used as given: detach it
    for a stop-gradient target)."""
    normal, alpha = render.normal, render.alpha
    if normal.ndim != 5 or normal.shape[2] != 3 or alpha.shape != (*normal.shape[:2], 1, *normal.shape[3:]):
        raise ValueError(f"normal_estimator needs normal [B, V, 3, H, W] and alpha [B, V, 1, H, W], got "
                         f"{tuple(normal.shape)} and {tuple(alpha.shape)}")
    if target.shape != normal.shape:
        raise ValueError(f"target normals {tuple(target.shape)} do not match the rendered normals "
                         f"{tuple(normal.shape)}")
    mask = alpha.detach() > alpha_threshold  # hard mask, as in dnc
    cosine = (F.normalize(normal, dim=2, eps=1e-6) * target.to(normal)).sum(dim=2, keepdim=True)
    masked = torch.where(mask, cosine, torch.zeros_like(cosine))  # NaN-free gradients outside the mask
    count = mask.sum(dim=(2, 3, 4)).to(cosine.dtype)
    return masked.sum(dim=(2, 3, 4)) / count.clamp(min=1.0)


@register_reward("normal_estimator")
class NormalEstimatorReward(Reward):
    """Normal-estimator consistency (see the module docstring); prompt-independent, per-view in [−1, 1].

    ``estimator``: a spec string (``"marigold:<dir>"``, ``"python:<module>:<factory>"``) or a callable;
    ``estimator_kwargs``: options for the Marigold estimator or the factory; ``estimator_frame``: the
    convention of the estimator's normals (:data:`FRAMES` key or three signs; ``None`` = the estimator's
    ``frame`` attribute, else ``"opencv"``); ``alpha_threshold``: the hard mask ``alpha > threshold``.
    """

    def __init__(self, estimator: str | Callable[[Tensor], Tensor] | None = None,
                 estimator_kwargs: Mapping[str, Any] | None = None,
                 estimator_frame: str | Sequence[float] | None = None, alpha_threshold: float = 0.5):
        super().__init__()
        if estimator is None:
            raise ValueError(f"reward 'normal_estimator' needs `estimator`: {SPEC_FORMS}")
        if not 0.0 <= alpha_threshold < 1.0:
            raise ValueError(f"normal_estimator alpha_threshold must be in [0, 1), got {alpha_threshold}")
        if estimator_kwargs is not None and not isinstance(estimator_kwargs, Mapping):
            raise ValueError(f"estimator_kwargs must be a mapping, got {estimator_kwargs!r}")
        self.spec = estimator if isinstance(estimator, str) else type(estimator).__name__
        est = build_estimator(estimator, **dict(estimator_kwargs or {}))
        declared = getattr(est, "frame", None)
        if estimator_frame is None:
            estimator_frame = declared if declared is not None else "opencv"
        elif declared is not None and frame_signs(declared) != frame_signs(estimator_frame):
            raise ValueError(f"normal estimator {self.spec!r} declares frame {declared!r}, which contradicts "
                             f"estimator_frame={estimator_frame!r}; leave estimator_frame unset")
        self.signs = frame_signs(estimator_frame)
        self.estimator_frame = estimator_frame
        self.alpha_threshold = float(alpha_threshold)
        self.estimator = est  # an nn.Module estimator becomes a submodule (moved and frozen with the reward)

    def target(self, render: RenderOutput) -> Tensor:
        """The detached estimator normals ``[B, V, 3, H, W]`` in the renderer's frame, unit length."""
        rgb = render.rgb
        if rgb.ndim != 5 or rgb.shape[2] != 3:
            raise ValueError(f"normal_estimator needs rgb [B, V, 3, H, W], got {tuple(rgb.shape)}")
        images = views_as_batch(rgb.detach()).to(torch.float32)
        est = _estimate(self.estimator, images, repr(self.spec))
        est = F.normalize(to_renderer_frame(est.float(), self.signs, dim=1), dim=1, eps=1e-6)
        return est.reshape(rgb.shape).to(device=render.normal.device)

    def per_view(self, render: RenderOutput, prompts: Sequence[str] | None = None) -> Tensor:
        return normal_estimator_consistency(render, self.target(render), self.alpha_threshold)


__all__ = [
    "FRAMES",
    "MARIGOLD_DOWNLOAD",
    "MARIGOLD_FRAME",
    "MarigoldNormalEstimator",
    "NormalEstimator",
    "NormalEstimatorReward",
    "build_estimator",
    "check_marigold_dir",
    "frame_signs",
    "normal_estimator_consistency",
    "parse_estimator_spec",
    "to_renderer_frame",
]
