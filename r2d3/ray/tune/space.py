"""The search-space DSL: parse and check space files (see :mod:`r2d3.ray.tune`), Tune's ``param_space``."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from ray import tune

from r2d3.cli import unwrap_optional
from r2d3.config import ConfigError, to_dict, updated
from r2d3.train.config import AlignConfig
from r2d3.ray.tune.settings import RESERVED, SpaceError, SweepSettings, parse_settings
from r2d3.train.loop import validate

DISTRIBUTIONS = {
    "uniform": "[low, high]: floats, uniform, low < high",
    "loguniform": "[low, high]: floats, log-uniform, 0 < low < high",
    "randint": "[low, high]: integers, uniform, both bounds included",
    "choice": "[v1, v2, ...]: one of the values at random",
    "grid": "[v1, v2, ...]: every value, one trial each (num_samples repeats the grid)",
}

#: Options the sweep sets itself, so a space may not sample them.
SET_BY_SWEEP = {
    "run.name": "each trial's run is named after its trial id",
    "run.output_dir": "trials run under the sweep directory",
    "eval.every": "set sweep.eval_every instead",
    "train.epochs": "ASHA's time axis; set it in the base config (early stopping shortens trials)",
}


@dataclass(frozen=True)
class Param:
    """One search dimension: ``key`` (dotted AlignConfig option), distribution ``kind`` and its ``args``."""

    key: str
    kind: str
    args: tuple


def _section_classes(cls: type, name: str) -> list[type]:
    """The classes field ``name`` of config class ``cls`` can hold: its type, or every variant's."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    variants = f.metadata.get("variants")
    return [variants.resolve(n) for n in variants.names()] if variants else [typing.get_type_hints(cls)[name]]


def _option_keys(cls: type = AlignConfig, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        classes = _section_classes(cls, f.name)
        if dataclasses.is_dataclass(classes[0]):
            keys.extend(dict.fromkeys(k for c in classes for k in _option_keys(c, f"{prefix}{f.name}.")))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def option_type(key: str) -> Any:
    """The type of AlignConfig option ``key`` (``Optional`` unwrapped); :class:`SpaceError` if none."""
    cls: Any = AlignConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls) or part not in typing.get_type_hints(cls):
            close = difflib.get_close_matches(key, _option_keys(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            if not dataclasses.is_dataclass(cls):
                hint = f"; {'.'.join(parts[:i])} is a free-form option: sweep its whole value with choice or grid"
            raise SpaceError(f"{key}: not an AlignConfig option{hint} (see pipelines/align.py --help)")
        classes, key_below = _section_classes(cls, part), parts[i + 1] if i + 1 < len(parts) else None
        cls = next((c for c in classes if dataclasses.is_dataclass(c) and key_below in typing.get_type_hints(c)),
                   classes[0])  # in a variant section (algo), the variant that declares the key
    if dataclasses.is_dataclass(cls):
        raise SpaceError(f"{key}: is a config section, not an option; name one of its keys ({key}.<name>)")
    return unwrap_optional(cls)


def _number(key: str, kind: str, value: Any) -> float:
    if isinstance(value, bool):
        raise SpaceError(f"{key}: {kind} bounds must be numbers, got {value!r}")
    if isinstance(value, str):  # YAML 1.1 reads 1e3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise SpaceError(f"{key}: {kind} bounds must be numbers, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpaceError(f"{key}: {kind} bounds must be finite numbers, got {value!r}")
    return value


def get_dotted(data: dict, key: str) -> Any:
    """``data[a][b]`` for ``key`` ``a.b``."""
    for part in key.split("."):
        data = data[part]
    return data


def apply_params(config: AlignConfig, values: dict[str, Any]) -> AlignConfig:
    """``config`` with the dotted ``values`` set (validated; errors name the key). A sampled ``algo.name``
    is set first, so the other ``algo.*`` values are checked against that algorithm's options."""
    for key in sorted(values, key=lambda k: not k.endswith(".name")):
        option_type(key)
        try:
            config = updated(config, {key: values[key]})
        except ConfigError as err:
            raise SpaceError(f"{key}: invalid value {values[key]!r}: {err}") from None
    return config


def _canonical(key: str, value: Any) -> Any:
    """``value`` as the config stores it (``"1e3"`` -> 1000.0 for a float option); checks its type."""
    return get_dotted(to_dict(apply_params(AlignConfig(), {key: value})), key)


def parse_param(key: str, spec: Any) -> Param:
    """One ``key: {distribution: args}`` entry of a space file."""
    tp = option_type(key)
    if key in SET_BY_SWEEP:
        raise SpaceError(f"{key}: set by the sweep, cannot be searched ({SET_BY_SWEEP[key]})")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(f"{key}: expected a one-key mapping {{distribution: args}} with a distribution among "
                         f"{', '.join(DISTRIBUTIONS)}; got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), list(DISTRIBUTIONS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SpaceError(f"{key}: unknown distribution {kind!r}{hint}; valid: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        form = DISTRIBUTIONS[kind].split(":")[0]
        raise SpaceError(f"{key}: {kind} takes a non-empty list {form}, got {args!r}")
    if kind in ("choice", "grid"):
        return Param(key, kind, tuple(_canonical(key, v) for v in args))
    if len(args) != 2:
        raise SpaceError(f"{key}: {kind} takes [low, high], got {args!r}")
    low, high = (_number(key, kind, v) for v in args)
    if kind == "randint":
        if tp not in (int, float) or any(float(v) != int(v) for v in (low, high)):
            raise SpaceError(f"{key}: randint needs integer bounds and a numeric option, got {args!r} for "
                             f"{getattr(tp, '__name__', tp)}")
        low, high = int(low), int(high)
        if low > high:
            raise SpaceError(f"{key}: randint needs low <= high, got [{low}, {high}]")
        for v in (low, high):
            _canonical(key, v)
        return Param(key, kind, (low, high))
    if tp is not float:
        raise SpaceError(f"{key}: {kind} draws floats but {key} is {getattr(tp, '__name__', tp)}; use randint, "
                         f"choice or grid")
    if not low < high:
        raise SpaceError(f"{key}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{key}: loguniform needs 0 < low, got [{low}, {high}]")
    return Param(key, kind, (float(low), float(high)))


def parse_space(data: Any, source: str = "<space>",
                overrides: Sequence[str] = ()) -> tuple[list[Param], SweepSettings]:
    """Search dimensions and settings from a space mapping (see :mod:`r2d3.ray.tune`)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: a search space is a mapping of dotted config keys to distributions")
    params = []
    for key, spec in data.items():
        if key == RESERVED:
            continue
        try:
            params.append(parse_param(str(key), spec))
        except SpaceError as err:
            raise SpaceError(f"{source}: {err}") from None
    if not params:
        raise SpaceError(f"{source}: the search space has no dimensions")
    return params, parse_settings(data.get(RESERVED), source, overrides)


def load_space(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[list[Param], SweepSettings]:
    """Parse a space file (``overrides``: ``sweep.key=value`` strings)."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"cannot parse search space file {path}: {err}") from None
    return parse_space(data, str(path), overrides)


def space_document(params: Sequence[Param], settings: SweepSettings) -> dict[str, Any]:
    """The space file that :func:`parse_space` reads back as ``params`` and ``settings``."""
    doc: dict[str, Any] = {p.key: {p.kind: list(p.args)} for p in params}
    doc[RESERVED] = OmegaConf.to_container(OmegaConf.structured(settings))
    return doc


def check_space(params: Sequence[Param], base: AlignConfig) -> None:
    """Every bound and listed value, applied to ``base``, passes :func:`r2d3.train.loop.validate`, and
    ``base`` evaluates on held-out prompts."""
    if base.eval.num_prompts < 1:
        raise SpaceError("a sweep scores trials on held-out prompts: eval.num_prompts must be >= 1")
    for p in params:
        for value in p.args:
            try:
                validate(apply_params(base, {p.key: value}))
            except ValueError as err:
                raise SpaceError(f"{p.key}={value!r}: {err}") from None


def to_param_space(params: Sequence[Param]) -> dict[str, Any]:
    """Tune's ``param_space`` (flat dotted keys)."""
    make = {
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(a[0], a[1] + 1),  # Tune's upper bound is exclusive
        "choice": lambda a: tune.choice(list(a)),
        "grid": lambda a: tune.grid_search(list(a)),
    }
    return {p.key: make[p.kind](p.args) for p in params}
