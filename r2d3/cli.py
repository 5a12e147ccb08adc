"""Command lines as views of the typed configs: ``prog [--config FILE ...] [--flag VALUE ...]
[section.key=value ...]``, with ``--help`` generated from the fields' help, defaults and choices.

A flag is only another spelling of one option (``--steps`` is ``sampler.num_steps``), so it is checked
by the same section and a bad value is named by the same key as in a YAML file or an override.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from typing import Any, Sequence, TypeVar

from r2d3.config import ConfigError, Variants, build_config

T = TypeVar("T")
#: a ``section.key=value`` override (anything else is a positional value)
OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def describe(cls: type, prefix: str = "", skip: Sequence[str] = ()) -> list[str]:
    """One line per option: ``key  (type, default) help``; a variant section lists each variant's own."""
    hints = typing.get_type_hints(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n[{key}] {f.metadata.get('help', '')}")
            lines.extend(describe(tp, prefix=f"{key}."))
            variants: Variants | None = f.metadata.get("variants")
            for name in variants.names() if variants else ():
                lines.append(f"  with {key}.name={name}:")
                lines.extend(describe(variants.resolve(name), prefix=f"{key}.", skip=("name",)))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {key:<34} ({_type_name(tp)}, default {default!r})  {f.metadata.get('help', '')}")
    return lines


def _option(cls: type, key: str) -> tuple[dataclasses.Field, Any]:
    """The field and type hint of dotted option ``key`` of config class ``cls``."""
    *sections, name = key.split(".")
    for part in sections:
        cls = typing.get_type_hints(cls)[part]
    return next(f for f in dataclasses.fields(cls) if f.name == name), typing.get_type_hints(cls)[name]


def _add_flag(parser: argparse.ArgumentParser, flag: str, key: str, cls: type) -> None:
    """``flag`` as a view of option ``key``: its help, default and type come from the field; a bool
    option's ``--no-...`` flag sets it false, others true; a list option takes several values."""
    f, tp = _option(cls, key)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    kwargs: dict[str, Any] = {"dest": f"option:{key}", "default": argparse.SUPPRESS,
                              "help": f"{f.metadata.get('help', '')} ({key}, default {default!r})"}
    if tp is bool:
        kwargs.update(action="store_const", const=not flag.startswith("--no-"))
    elif typing.get_origin(unwrap_optional(tp)) is list:  # --seeds 0 1 and --seeds 0 --seeds 1 alike
        kwargs.update(action="extend", nargs="+", metavar=f.name.upper())
    else:
        kwargs.update(metavar=f.name.upper())
    parser.add_argument(flag, **kwargs)


def unwrap_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def _flag_value(cls: type, key: str, value: Any) -> Any:
    """A free-form option's flag text is YAML (``--reward '{name: dnc}'``); typed options are converted
    and checked by the config itself."""
    _, tp = _option(cls, key)
    if tp is Any or typing.get_args(tp) == (Any,):
        import yaml

        return [yaml.safe_load(v) for v in value] if isinstance(value, list) else yaml.safe_load(value)
    return value


def parse_cli(cls: type[T], description: str, argv: Sequence[str] | None = None,
              extra: Sequence[tuple[tuple[str, ...], dict[str, Any]]] = (), flags: dict[str, str] | None = None,
              epilog: str = "", positional: str | None = None) -> tuple[T, argparse.Namespace]:
    """``prog [--config FILE ...] [--flag VALUE ...] [section.key=value ...]``; ``--help`` lists every option.

    ``flags`` maps command-line flags to config keys (``{"--steps": "sampler.num_steps"}``): each is a
    view of its option, so a bad value is named by its key, exactly as in a file or an override.
    ``positional`` names a list option that takes the arguments which are not ``section.key=value``
    overrides (``python -m r2d3.sample "a red cube" --out DIR``)."""
    options = "options (override with section.key=value):" + "\n".join(describe(cls))
    parser = argparse.ArgumentParser(description=description, epilog=f"{epilog}\n\n{options}".strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable, later wins)")
    for flag, key in (flags or {}).items():
        _add_flag(parser, flag, key, cls)
    for names, kwargs in extra:
        parser.add_argument(*names, **kwargs)
    parser.add_argument("overrides", nargs="*", metavar="ARG" if positional else "overrides",
                        help=f"{positional} values and " * bool(positional) + "section.key=value overrides")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else list(argv))
    values = {k[len("option:"):]: _flag_value(cls, k[len("option:"):], v) for k, v in vars(args).items()
              if k.startswith("option:")}
    if positional:
        given = [a for a in args.overrides if not OVERRIDE.match(a)]
        args.overrides = [a for a in args.overrides if OVERRIDE.match(a)]
        if given:
            values[positional] = given
    try:
        return build_config(cls, args.config, args.overrides, values), args
    except ConfigError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
