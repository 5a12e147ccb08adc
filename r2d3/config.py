"""Typed configuration: dataclasses validated by OmegaConf, loaded from YAML files, overridden from the
command line with ``section.key=value`` and saved next to every run.

Each field's help text lives in its ``metadata["help"]``, so ``--help`` documents every option from
the same source the code reads. So do its allowed values: ``choices`` and a ``check`` (a predicate and
what it requires) in the same metadata, enforced by every section's ``__post_init__``. OmegaConf builds
sections through their constructors, so a bad value from a YAML file, a ``key=value`` override, a
sweep trial or ``dataclasses.replace`` is a :class:`ConfigError` naming the key before any model loads.
A section may take its class from its ``name`` (:class:`Variants`): each algorithm's options are
its own subclass of :class:`AlgoConfig`, declared next to its code. The jobs compose the sections
(:class:`r2d3.train.config.AlignConfig` for alignment). Checks that need a registry (backend and
reward names) or several sections at once live in :func:`r2d3.train.loop.validate`, which also runs
before anything loads.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")

#: values of ``run.wandb_mode``
WANDB_MODES = ("offline", "online", "disabled")
#: values of ``sampler.kind`` (the schedulers of :mod:`r2d3.diffusion.schedules`)
SAMPLER_KINDS = ("ddim", "sde-dpmsolver++")
#: values of ``render.backend`` (``auto`` and the rasterisers of :mod:`r2d3.render.splat`)
RENDER_BACKENDS = ("auto", "torch", "gsplat")
#: ``run.device`` values: auto, cpu, mps, cuda, cuda:N
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

#: a predicate on a field's value and what it requires ("must be >= 1")
Check = tuple[Callable[[Any], bool], str]
DEVICE_CHECK: Check = (lambda v: DEVICE_PATTERN.fullmatch(v) is not None, "must be auto, cpu, mps, cuda or cuda:N")


class ConfigError(ValueError):
    """A bad configuration value or file; the message names the key or file."""


def at_least(low: float) -> Check:
    return (lambda v: v >= low, f"must be >= {low:g}")


def positive() -> Check:
    return (lambda v: v > 0, "must be > 0")


def within(low: float, high: float, open_low: bool = False) -> Check:
    return ((lambda v: low < v <= high) if open_low else (lambda v: low <= v <= high),
            f"must be in {'(' if open_low else '['}{low:g}, {high:g}]")


def opt(default: Any, help: str, *, choices: Sequence[Any] | None = None,  # noqa: A002 - argparse's name
        check: Check | None = None, **kwargs: Any) -> Any:
    """A dataclass field with a help string and, optionally, the values it accepts (``choices``) or a
    ``check`` (``None`` passes both: it means "the default"); mutable defaults are copied."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "check": check}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


class Section:
    """A config section: ``__post_init__`` checks every field against its metadata, naming it as
    ``<key>.<field>`` (``key``: the section's name in the job's config)."""

    key: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, name = getattr(self, f.name), f"{self.key}.{f.name}" if self.key else f.name
            check_finite(value, name)
            choices, check = f.metadata.get("choices"), f.metadata.get("check")
            if choices is not None and value is not None and value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
            if check is not None and value is not None and not check[0](value):
                raise ConfigError(f"{name} {check[1]}, got {value!r}")


def section(cls: type, help: str) -> Any:  # noqa: A002
    return field(default_factory=cls, metadata={"help": help})


@dataclass(frozen=True)
class Variants:
    """A section whose class is chosen by its ``name`` key: ``resolve(name)`` gives the class (a
    ``ValueError`` for an unknown name), ``names()`` the registered names. Keeps :mod:`r2d3.config` free
    of the registries above it."""

    resolve: Callable[[str], type]
    names: Callable[[], Sequence[str]]


def variant_section(default: type, variants: Variants, help: str) -> Any:  # noqa: A002
    """A section field typed by its base class whose subclass follows its ``name`` (see :func:`_merge`)."""
    return field(default_factory=default, metadata={"help": help, "variants": variants})


#: the alignment default's reward, also what evaluation and regeneration score unless told otherwise
DEFAULT_REWARD = {"name": "dnc", "kwargs": {"detach_depth": False}}


def reward_option(help: str = "") -> Any:  # noqa: A002
    return opt(DEFAULT_REWARD, "reward: a name, {name: weight, ...} for a weighted sum, or {name, kwargs}. Default: "
                               "depth-normal consistency with the exact gradient (see docs/results.md)" + help)


# ---------------------------------------------------------------------------------------------------------
# The alignment job


@dataclass
class RunConfig(Section):
    key: ClassVar[str] = "run"
    name: Optional[str] = opt(None, "run name; default: <algo>-<reward>-<timestamp>. Reusing a name resumes that run",
                              check=(lambda v: bool(v) and v not in (".", "..") and "/" not in v and "\\" not in v
                                     and v == v.strip(), "must be a plain directory name (no '/', '..' or "
                                     "surrounding spaces) so the run stays inside run.output_dir"))
    output_dir: str = opt("runs", "local parent directory of run directories (see scale.storage_path for s3://)")
    seed: int = opt(0, "seed for sampling noise, prompts, cameras and LoRA init")
    device: str = opt("auto", "auto | cpu | mps | cuda | cuda:N",
                      check=DEVICE_CHECK)
    resume: bool = opt(True, "continue from the latest checkpoint in the run directory if there is one")
    restart: bool = opt(False, "with run.resume=false on a directory that holds a run: move the old run aside "
                               "(<name>.old-<time>) and start over (without it such a run is refused)")
    checkpoint_every: int = opt(5, "save a checkpoint every N epochs (and always at the end)", check=at_least(1))
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep", check=at_least(1))
    wandb_mode: str = opt("offline", "wandb mode: offline | online | disabled", choices=WANDB_MODES)
    wandb_project: str = opt("r2d3", "wandb project")
    log_images_every: int = opt(5, "log multi-view renders every N epochs (0: never)", check=at_least(0))
    progress: bool = opt(True, "show progress bars")


@dataclass
class ModelConfig(Section):
    key: ClassVar[str] = "model"
    backend: str = opt("tiny", "registered backend name (see r2d3.backends.available_backends())")
    weights: Optional[str] = opt(None, "weights directory for the backend; default: the backend's own")
    lora_rank: int = opt(8, "LoRA rank", check=at_least(1))
    lora_alpha: Optional[float] = opt(None, "LoRA alpha; default: equal to the rank (scale 1)", check=positive())
    lora_targets: Optional[list[str]] = opt(None, "module-name suffixes LoRA adapts; default: the backend's list",
                                            check=(lambda v: len(v) > 0 and all(str(x).strip() for x in v),
                                                   "must be null (the backend's list) or non-empty names"))


@dataclass
class SamplerConfig(Section):
    key: ClassVar[str] = "sampler"
    kind: str = opt("ddim", "ddim (eta-controlled DDIM) | sde-dpmsolver++ (1st-order SDE-DPM-Solver++)",
                    choices=SAMPLER_KINDS)
    num_steps: int = opt(20, "sampling steps K", check=at_least(1))
    eta: float = opt(1.0, "DDIM eta in [0, 1]; 1 is DDPM-like (needed: the losses need stochastic steps)",
                     check=within(0, 1))
    guidance_scale: float = opt(1.5, "classifier-free guidance scale (1: none; the tiny model follows shapes best "
                                     "at 1.5, see docs/benchmarks.md)", check=at_least(1))


@dataclass
class RenderConfig(Section):
    key: ClassVar[str] = "render"
    num_views: int = opt(4, "views rendered per asset for the reward", check=at_least(1))
    resolution: int = opt(64, "square render resolution in pixels", check=at_least(8))
    fov_deg: float = opt(40.0, "vertical field of view", check=((lambda v: 0 < v < 180), "must be in (0, 180)"))
    distance: float = opt(2.5, "orbit radius of the cameras", check=positive())
    elevation_deg: float = opt(20.0, "camera elevation")
    elevation_jitter_deg: float = opt(5.0, "uniform elevation jitter (+-) shared by an asset's views",
                                      check=at_least(0))
    azimuth_jitter_deg: float = opt(10.0, "uniform azimuth jitter (+-) shared by an asset's views", check=at_least(0))
    background: list[float] = opt([1.0, 1.0, 1.0], "background colour (RGB in [0, 1])",
                                  check=(lambda v: len(v) == 3 and all(0 <= c <= 1 for c in v),
                                         "must be three values in [0, 1]"))
    backend: str = opt("auto", "rasteriser: auto (gsplat for float32 CUDA tensors when installed, else torch) | "
                               "torch | gsplat", choices=RENDER_BACKENDS)
    quaternions: str = opt("unit", "rotation of each splat's covariance: unit (the quaternion normalised, as 3DGS "
                                   "and gsplat) | raw (the 3DGS formula at the decoder's raw quaternion, as the "
                                   "DiffSplat renderer the reference code trains with)", choices=("unit", "raw"))

    def raster_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`r2d3.render.render_gaussians` this section sets."""
        return {"background": tuple(self.background), "backend": self.backend,
                "raw_quaternions": self.quaternions == "raw"}


@dataclass
class AlgoConfig(Section):
    """The ``algo`` section's common part: which algorithm. Each algorithm declares its own options in a
    subclass next to its code (:func:`r2d3.algos.base.register_algorithm`), so ``algo.beta`` exists
    when ``algo.name=nabla_gfn`` and is an error naming the key for DDPO."""

    key: ClassVar[str] = "algo"
    name: str = opt("nabla_gfn", "registered algorithm (see r2d3.algos.available_algorithms())")


@dataclass
class TrainConfig(Section):
    key: ClassVar[str] = "train"
    epochs: int = opt(6, "epochs (one sampling phase + one training phase each)", check=at_least(1))
    sample_batch_size: int = opt(16, "trajectories sampled per batch", check=at_least(1))
    sample_batches_per_epoch: int = opt(1, "sampling batches per epoch", check=at_least(1))
    train_batch_size: int = opt(4, "trajectories per backward pass", check=at_least(1))
    grad_accum: int = opt(1, "train batches accumulated per optimizer step", check=at_least(1))
    lr: float = opt(1e-3, "AdamW learning rate (LoRA parameters only)", check=positive())
    weight_decay: float = opt(1e-4, "AdamW weight decay", check=at_least(0))
    adam_betas: list[float] = opt([0.9, 0.999], "AdamW betas", check=(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
                                                                      "must be two values in [0, 1)"))
    adam_eps: float = opt(1e-8, "AdamW epsilon", check=positive())
    max_grad_norm: float = opt(1.0, "clip the LoRA gradient norm", check=positive())
    max_bad_batches: int = opt(5, "abort after this many batches with a NaN/inf loss or reward (skipped and counted)",
                               check=at_least(0))


@dataclass
class DataConfig(Section):
    key: ClassVar[str] = "data"
    prompts: str = opt("procedural:train", "training prompts: procedural:<split>, a .txt file, or Parquet shards (dir/glob/s3://)")
    heldout_prompts: str = opt("procedural:heldout", "held-out prompts for evaluation (same forms)")
    prompt_column: str = opt("prompt", "column holding prompts in Parquet shards")
    shuffle_buffer: int = opt(256, "rows in each worker's local shuffle buffer when streaming Parquet shards",
                              check=at_least(0))
    embeddings: Optional[str] = opt(None, "precomputed prompt embeddings (dir/glob/s3://, written by "
                                          "pipelines/embed_prompts.py with the same backend and weights) used "
                                          "instead of the text encoder; unknown prompts are encoded as usual")


@dataclass
class EvalConfig(Section):
    key: ClassVar[str] = "eval"
    num_prompts: int = opt(48, "held-out prompts evaluated before and after alignment", check=at_least(0))
    seeds_per_prompt: int = opt(4, "samples per held-out prompt (same noise for every checkpoint)", check=at_least(1))
    every: int = opt(0, "also evaluate every N epochs (0: only before and after)", check=at_least(0))
    extractor: str = opt("clip_tiny", "features for FID/diversity and the image–text model for similarity (the "
                                      "evaluation job's --extractor: clip_tiny, clip:<dir>, vision:<dir>)")


@dataclass
class ScaleConfig(Section):
    key: ClassVar[str] = "scale"
    num_workers: int = opt(1, "Ray Train workers (data-parallel)", check=at_least(1))
    use_gpu: Optional[bool] = opt(None, "true | false | null (auto: a GPU per worker when the driver sees CUDA)")
    min_workers: Optional[int] = opt(None, "elastic training: the fewest workers to go on with (null: always "
                                           "num_workers, waiting for lost nodes to come back). When a restarted "
                                           "worker group cannot be placed within RAY_TRAIN_WORKER_GROUP_START_"
                                           "TIMEOUT_S (60 s), it re-forms from the last checkpoint with the "
                                           "workers the cluster fits, at least min_workers; a later run with the "
                                           "same run.name uses num_workers again", check=at_least(1))
    cpus_per_worker: Optional[float] = opt(None, "CPUs reserved per training worker (and its torch threads); "
                                                 "null: on a Ray instance the job starts itself (one machine), "
                                                 "its CPUs left by the reward actors, shared by the workers; "
                                                 "on a running cluster 1", check=positive())
    in_process: bool = opt(False, "run the worker loop in this process without Ray (debugging)")
    storage_path: Optional[str] = opt(None, "Ray Train storage for checkpoints and run outputs: a shared path "
                                            "or s3://bucket/prefix (default: run.output_dir)")
    max_failures: int = opt(2, "restarts of the whole worker group from the last checkpoint after a crash "
                               "(-1: unlimited)", check=at_least(-1))
    reward_actors: int = opt(0, "render + reward in a pool of N Ray actors shared by the trainers (0: in each "
                                "trainer process)", check=at_least(0))
    reward_actor_gpus: float = opt(0.0, "GPUs per render/reward actor (fractions share a GPU)", check=at_least(0))
    reward_actor_cpus: float = opt(1.0, "CPUs per render/reward actor", check=at_least(0))
    resource_wait_s: float = opt(120.0, "how long to wait for the cluster to offer the requested CPUs/GPUs "
                                        "(an autoscaler may add nodes) before failing with what is missing",
                                 check=positive())

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ConfigError(f"scale.min_workers ({self.min_workers}) must be <= scale.num_workers "
                              f"({self.num_workers})")


@dataclass
class ActorsConfig(Section):
    """The Ray Data actor pool of the evaluation and regeneration jobs."""

    key: ClassVar[str] = "actors"
    num: int = opt(2, "Ray Data actors (0: in this process, no Ray)", check=at_least(0))
    batch_size: int = opt(1, "work items per actor call", check=at_least(1))
    cpus: float = opt(1.0, "CPUs reserved per actor", check=at_least(0))
    gpus: float = opt(0.0, "GPUs per actor (0: CPU; fractions share a GPU)", check=at_least(0))
    device: str = opt("auto", "auto | cpu | mps | cuda | cuda:N, inside each actor", check=DEVICE_CHECK)


# ---------------------------------------------------------------------------------------------------------
# Loading, overriding, saving


def reward_label(spec: Any) -> str:
    """A short name for a reward spec (run names, plot titles): ``dnc``, ``clip_tiny+dnc``, ..."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and "name" in spec:
        return str(spec["name"])
    if isinstance(spec, dict):
        return "+".join(sorted(spec))
    return "+".join(reward_label(item) for item in spec)


def carry_over(old: Any, cls: type[T], name: str, **changes: Any) -> T:
    """Section ``cls`` named ``name``, keeping ``old``'s values of the options both classes declare and
    dropping the rest (``algo.timestep_fraction`` survives a switch from nabla_gfn to ddpo, ``algo.beta``
    does not), so a file tuned for one algorithm reruns with another by one override."""
    common = {f.name for f in dataclasses.fields(old)}
    kept = {f.name: getattr(old, f.name) for f in dataclasses.fields(cls) if f.name != "name" and f.name in common}
    return cls(**(kept | {"name": name} | changes))


def _switch_variant(base: Any, name: str, field_name: str, variants: Variants) -> None:
    """Give ``base[field_name]`` the class registered for ``name`` (see :func:`carry_over`)."""
    try:
        new_cls = variants.resolve(name)
    except ValueError as err:
        raise ConfigError(f"{field_name}.name: {err}") from None
    base[field_name] = OmegaConf.structured(carry_over(OmegaConf.to_object(base[field_name]), new_cls, name))


def _merge(base: Any, layer: Any, cls: type) -> Any:
    """Merge ``layer`` into ``base``; free-form (``Any``) fields such as ``reward`` are replaced, not
    merged, so ``reward={dnc: 1.0}`` does not inherit keys of the default spec; a variant section takes
    the class of the ``name`` the layer sets before the layer's options are checked against it."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        variants: Variants | None = f.metadata.get("variants")
        given = layer.get(f.name) if isinstance(layer, DictConfig) else None
        if variants and isinstance(given, DictConfig) and "name" in given and given.name != base[f.name].name:
            _switch_variant(base, str(given.name), f.name, variants)
        if hints[f.name] is Any and f.name in layer:
            OmegaConf.update(base, f.name, layer[f.name], merge=False)
            layer = OmegaConf.masked_copy(layer, [k for k in layer if k != f.name])
    return OmegaConf.merge(base, layer)


def check_finite(value: Any, key: str = "") -> None:
    """Reject NaN and infinity anywhere in a config (nested sections, lists, free-form reward specs):
    ``algo.beta=nan`` would otherwise skip every optimizer step and still exit 0."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            check_finite(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value} is not a finite number")


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    """``key: what is wrong`` (OmegaConf's own text also lists its internal reference types)."""
    key, msg = getattr(err, "full_key", None), (getattr(err, "msg", None) or str(err)).split("\n")[0]
    section = getattr(err, "object_type", None)
    if key and isinstance(err, ConfigKeyError) and isinstance(section, type):
        variant = f" (the options of {section.key}.name={section().name})" if issubclass(section, AlgoConfig) else ""
        return f"{key}: no such option in {section.__name__}{variant}; --help lists them"
    return f"{key}: {msg}" if key else msg


def _layer(values: dict[str, Any]) -> DictConfig:
    layer = OmegaConf.create()
    for key, value in values.items():
        OmegaConf.update(layer, key, value, force_add=True)
    return layer


def _file_layer(path: Path, cls: type) -> Any:
    """A YAML file as a layer. Sections listed in ``cls.foreign_sections`` are left out, so a job that
    shares sections with alignment reads them from an alignment config or a run's ``config.yaml``."""
    layer = OmegaConf.load(path)
    foreign = getattr(cls, "foreign_sections", ())
    if foreign and isinstance(layer, DictConfig):
        layer = OmegaConf.masked_copy(layer, [k for k in layer if k not in foreign])
    return layer


def build_config(cls: type[T], files: Sequence[str | Path] = (), overrides: Sequence[str] = (),
                 values: dict[str, Any] | None = None) -> T:
    """Defaults <- YAML files (in order) <- dotted ``values`` (a command line's flags) <- ``key=value``
    overrides, validated against ``cls``."""
    merged = OmegaConf.structured(cls)
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            merged = _merge(merged, _file_layer(path, cls), cls)
        except OmegaConfBaseException as err:
            raise ConfigError(f"invalid config file {path}: {_omegaconf_message(err)}") from None
        except ConfigError as err:
            raise ConfigError(f"invalid config file {path}: {err}") from None
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"cannot parse config file {path}: {err}") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like section.key=value, got: {' '.join(bad)}")
    try:
        if values:
            merged = _merge(merged, _layer(values), cls)
        free = {f.name for f in dataclasses.fields(cls) if typing.get_type_hints(cls)[f.name] is Any}
        inside = [o for o in overrides if "." in o.split("=", 1)[0] and o.split(".", 1)[0] in free]
        merged = _merge(merged, OmegaConf.from_dotlist([o for o in overrides if o not in inside]), cls)
        for override in inside:  # reward.kwargs.weights=... sets one key of the spec; reward={...} replaces it
            key = override.split("=", 1)[0]
            OmegaConf.update(merged, key, OmegaConf.select(OmegaConf.from_dotlist([override]), key), merge=True)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid override: {_omegaconf_message(err)}") from None
    check_finite(config)
    return config  # type: ignore[return-value]


def updated(config: T, values: dict[str, Any]) -> T:
    """``config`` with the dotted ``values`` set, merged as one more layer of :func:`build_config` (so a new
    ``algo.name`` brings its own option group); errors are :class:`ConfigError` naming the key."""
    try:
        result = OmegaConf.to_object(_merge(OmegaConf.structured(config), _layer(values), type(config)))
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None
    check_finite(result)
    return result  # type: ignore[return-value]


def to_dict(config: Any) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config from :func:`to_dict` output (e.g. after crossing a process boundary)."""
    config = OmegaConf.to_object(_merge(OmegaConf.structured(cls), OmegaConf.create(data), cls))
    check_finite(config)
    return config  # type: ignore[return-value]
