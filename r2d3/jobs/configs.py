"""The inference jobs' configurations (evaluation, regeneration, ``r2d3.sample``), and the flags of
their command lines.

They sample with the sections alignment uses (``model``, ``sampler``, ``render``, ``reward``), so an
alignment config or a run's ``config.yaml`` given with ``--config`` sets them exactly as the run
trained (its other sections are read past). A sampler option none of those sets is the backend's own
(``register_backend(..., sampler_defaults=)``: DiffSplat samples with its 20-step SDE-DPM-Solver++ at
CFG 5), else r2d3's default. Every flag of ``pipelines/evaluate.py``, ``pipelines/regenerate.py`` and
``python -m r2d3.sample`` is a view of one option (:func:`r2d3.cli.parse_cli`): ``--steps 4`` is
``sampler.num_steps=4``, with the same checks and the same error naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from r2d3.backends.base import sampler_defaults
from r2d3.config import (
    DEVICE_CHECK,
    ActorsConfig,
    ModelConfig,
    RenderConfig,
    SamplerConfig,
    Section,
    at_least,
    opt,
    reward_option,
    section,
)
from r2d3.export.frame import FRAMES

#: the sections of an alignment config these jobs do not have (read past in ``--config`` files)
ALIGN_ONLY_SECTIONS = ("run", "algo", "train", "data", "eval", "scale")

CHECKPOINTS_HELP = ("'base', checkpoint directories (with lora.safetensors) or run directories (their newest "
                    "checkpoint), local or s3://, each optionally as LABEL=PATH to name it")
PROMPTS_HELP = "procedural:<split>, a .txt file, or Parquet shards (file, dir, glob, s3://)"
DISTINCT = (lambda v: len(v) > 0 and len(set(v)) == len(v), "must be at least one value, none repeated")

def _backends_own(name: str) -> Any:
    """Sampler option ``name`` as an inference job takes it: unset (null) means the backend's own value."""
    f = SamplerConfig.__dataclass_fields__[name]
    return opt(None, f"{f.metadata['help']} (null: the backend's own, else {f.default!r})",
               choices=f.metadata["choices"], check=f.metadata["check"])


@dataclass
class InferenceSamplerConfig(Section):
    """``SamplerConfig`` with every option optional: what is not given is the backend's own."""

    key: ClassVar[str] = "sampler"
    kind: Optional[str] = _backends_own("kind")
    num_steps: Optional[int] = _backends_own("num_steps")
    eta: Optional[float] = _backends_own("eta")
    guidance_scale: Optional[float] = _backends_own("guidance_scale")

    def resolve(self, backend: str) -> SamplerConfig:
        """The sampler these options give on backend ``backend`` (a ``ValueError`` for an unknown name)."""
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return SamplerConfig(**{**dataclasses.asdict(SamplerConfig()), **sampler_defaults(backend), **given})


@dataclass
class SamplingJobConfig:
    """The sections every sampling job shares: the model, its sampler, the reward cameras and renders,
    the reward, and the Ray Data actor pool."""

    foreign_sections: ClassVar[tuple[str, ...]] = ALIGN_ONLY_SECTIONS
    model: ModelConfig = section(ModelConfig, "backend (model.backend, model.weights; LoRA from the checkpoints)")
    sampler: InferenceSamplerConfig = section(InferenceSamplerConfig, "sampler, the same for every checkpoint")
    render: RenderConfig = section(RenderConfig, "the cameras the rewards score, and their renders")
    reward: Any = reward_option()
    actors: ActorsConfig = section(ActorsConfig, "Ray Data actors")


#: flags both jobs share: the model, the sampler, the renders and the actor pool
SHARED_FLAGS = {
    "--backend": "model.backend", "--weights": "model.weights", "--reward": "reward",
    "--sampler": "sampler.kind", "--steps": "sampler.num_steps", "--eta": "sampler.eta",
    "--guidance-scale": "sampler.guidance_scale", "--views": "render.num_views",
    "--resolution": "render.resolution", "--actors": "actors.num", "--batch-size": "actors.batch_size",
    "--cpus-per-actor": "actors.cpus", "--gpus-per-actor": "actors.gpus", "--device": "actors.device",
}


@dataclass
class EvaluateOptions(Section):
    key: ClassVar[str] = "evaluate"
    checkpoints: list[str] = opt(["base"], CHECKPOINTS_HELP + "; the base model is always evaluated", check=DISTINCT)
    prompts: str = opt("procedural:heldout", "held-out prompts: " + PROMPTS_HELP)
    prompt_column: str = opt("prompt", "column holding prompts in Parquet shards")
    num_prompts: int = opt(16, "prompts spread evenly over the source (the paper uses 60)", check=at_least(1))
    seeds: list[int] = opt([0, 1, 2, 3], "seeds per prompt, the same for every checkpoint (the paper uses 32)",
                           check=DISTINCT)
    extractor: str = opt("clip_tiny", "features for FID/diversity and the image-text model for similarity: "
                                      "clip_tiny (shipped), clip_tiny:<dir>, clip:<dir> (transformers CLIP saved "
                                      "locally), vision:<dir> (a transformers image backbone); nothing is downloaded")
    out: Optional[str] = opt(None, "output directory (default: runs/eval-<timestamp>)")
    bootstrap: int = opt(1000, "bootstrap draws for mean intervals", check=at_least(1))
    fid_bootstrap: int = opt(200, "bootstrap draws for FID intervals", check=at_least(1))
    report: bool = opt(True, "write report.md / report.html with plots and image grids")


@dataclass
class EvaluateConfig(SamplingJobConfig):
    evaluate: EvaluateOptions = section(EvaluateOptions, "what is evaluated, and where it goes")


EVALUATE_FLAGS = {
    "--checkpoints": "evaluate.checkpoints", "--prompts": "evaluate.prompts",
    "--prompt-column": "evaluate.prompt_column", "--num-prompts": "evaluate.num_prompts",
    "--seeds": "evaluate.seeds", "--extractor": "evaluate.extractor", "--out": "evaluate.out",
    "--bootstrap": "evaluate.bootstrap", "--fid-bootstrap": "evaluate.fid_bootstrap",
    "--no-report": "evaluate.report", **SHARED_FLAGS,
}


def _frame_option() -> Any:
    return opt("y-up", "frame of the .ply/.glb files: y-up (r2d3's and glTF's; three.js, Blender, PlayCanvas, "
                       "GaussianSplats3D) or y-down (INRIA/COLMAP-style viewers: SuperSplat Viewer, gsplat.js)",
               choices=FRAMES)


def _ply_rgb_option() -> Any:
    return opt(False, "also write uint8 red/green/blue columns in the .ply (DiffSplat's own files; point-cloud "
                      "tools such as MeshLab colour points by them)")


def _sh_degree_option() -> Any:
    return opt(0, "3: write zero f_rest_* coefficients for loaders that require SH degree 3 (INRIA's)",
               choices=(0, 3))


@dataclass
class RegenerateOptions(Section):
    key: ClassVar[str] = "regenerate"
    prompts: Optional[str] = opt(None, "prompt source (required): " + PROMPTS_HELP)
    prompt_column: str = opt("prompt", "column holding prompts in Parquet shards")
    max_prompts: Optional[int] = opt(None, "use only the first N prompt rows", check=at_least(1))
    checkpoints: list[str] = opt(["base"], CHECKPOINTS_HELP, check=DISTINCT)
    compare: Optional[str] = opt(None, "comparison mode: base and this checkpoint on the same prompts and seeds, "
                                       "side by side in the gallery with reward deltas")
    seeds: list[int] = opt([0], "seeds per prompt", check=DISTINCT)
    out: Optional[str] = opt(None, "output directory or s3://bucket/prefix (required)")
    scores: list[Any] = opt([], "more reward specs scored into reward_<name> columns (the first is 'reward')")
    preview_size: int = opt(128, "pixels per view of preview.png, cameras framed to fit the asset", check=at_least(8))
    turntable_frames: int = opt(12, "turntable frames", check=at_least(1))
    turntable_size: int = opt(128, "turntable frame size", check=at_least(8))
    mesh: bool = opt(True, "write the .glb meshes")
    mesh_resolution: int = opt(64, "grid resolution of the .glb isosurface", check=at_least(8))
    frame: str = _frame_option()
    sh_degree: int = _sh_degree_option()
    min_opacity: float = opt(0.0, "leave splats below this opacity out of the .ply (0: keep all)",
                             check=(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"))
    ply_rgb: bool = _ply_rgb_option()
    unlit: bool = opt(False, ".glb material KHR_materials_unlit (default: PBR, non-metallic)")
    gallery: bool = opt(True, "write gallery.html")
    gallery_assets: int = opt(1000, "assets shown in gallery.html (the first of the manifest)", check=at_least(1))
    progress: bool = opt(True, "show a progress bar")
    max_assets: Optional[int] = opt(None, "stop once N new assets are made, then commit (a partial run)",
                                    check=at_least(1))
    part_size: int = opt(256, "prompt rows per unit of work (one record under parts/; what a rerun skips "
                              "or redoes)", check=at_least(1))
    verify: bool = opt(False, "re-check every finished asset's files first (one full listing of --out) and "
                              "make again those with a file missing")
    dry_run: bool = opt(False, "everything but the model and the asset files: stream the prompts, plan and "
                               "record the work, write manifest and errors (assets under their own ids)")


@dataclass
class RegenerateConfig(SamplingJobConfig):
    regenerate: RegenerateOptions = section(RegenerateOptions, "what is made, and where it goes")


REGENERATE_FLAGS = {
    "--prompts": "regenerate.prompts", "--prompt-column": "regenerate.prompt_column",
    "--max-prompts": "regenerate.max_prompts", "--checkpoint": "regenerate.checkpoints",
    "--compare": "regenerate.compare", "--seeds": "regenerate.seeds", "--out": "regenerate.out",
    "--score": "regenerate.scores", "--preview-size": "regenerate.preview_size",
    "--turntable-frames": "regenerate.turntable_frames", "--turntable-size": "regenerate.turntable_size",
    "--no-mesh": "regenerate.mesh", "--mesh-resolution": "regenerate.mesh_resolution",
    "--frame": "regenerate.frame", "--sh-degree": "regenerate.sh_degree", "--min-opacity": "regenerate.min_opacity",
    "--ply-rgb": "regenerate.ply_rgb",
    "--unlit": "regenerate.unlit", "--no-gallery": "regenerate.gallery", "--no-progress": "regenerate.progress",
    "--max-assets": "regenerate.max_assets", "--part-size": "regenerate.part_size", "--verify": "regenerate.verify",
    "--dry-run": "regenerate.dry_run", **SHARED_FLAGS,
}


@dataclass
class SampleOptions(Section):
    key: ClassVar[str] = "sample"
    prompts: Optional[list[str]] = opt(None, "text prompts (required)",
                                       check=(lambda v: len(v) > 0 and all(p.strip() for p in v),
                                              "must be at least one non-blank prompt"))
    out: Optional[str] = opt(None, "output directory (required)")
    seeds: list[int] = opt([0], "seeds per prompt", check=DISTINCT)
    lora: Optional[str] = opt(None, "alignment run directory (its newest checkpoint), checkpoint directory or "
                                    "lora.safetensors (default: the base model)")
    device: str = opt("auto", "auto | cpu | mps | cuda | cuda:N", check=DEVICE_CHECK)
    resolution: int = opt(128, "preview size per view", check=at_least(8))
    frame: str = _frame_option()
    sh_degree: int = _sh_degree_option()
    ply_rgb: bool = _ply_rgb_option()


@dataclass
class SampleConfig:
    """``python -m r2d3.sample``: a model and its sampler; nothing is rendered for a reward or scored."""

    foreign_sections: ClassVar[tuple[str, ...]] = ("render", "reward", "actors", "evaluate", "regenerate",
                                                   *ALIGN_ONLY_SECTIONS)
    model: ModelConfig = section(ModelConfig, "backend (model.backend, model.weights; LoRA from sample.lora)")
    sampler: InferenceSamplerConfig = section(InferenceSamplerConfig, "sampler")
    sample: SampleOptions = section(SampleOptions, "what is sampled, and where it goes")


SAMPLE_FLAGS = {
    "--out": "sample.out", "--seeds": "sample.seeds", "--lora": "sample.lora", "--device": "sample.device",
    "--resolution": "sample.resolution", "--frame": "sample.frame", "--sh-degree": "sample.sh_degree",
    "--ply-rgb": "sample.ply_rgb",
    **{flag: SHARED_FLAGS[flag] for flag in ("--backend", "--weights", "--sampler", "--steps", "--eta",
                                             "--guidance-scale")},
}
