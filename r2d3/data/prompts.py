"""Prompt sources by name: the procedural grammar's splits, a text file, or Parquet shards.

Bad rows (missing, empty or non-string prompts) are skipped and counted, never fatal, so one broken
line in a 100k-prompt file does not end a run; a source with no usable prompt is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class PromptSourceError(ValueError):
    """A prompt source that cannot be read or holds no usable prompt."""


@dataclass
class PromptList:
    prompts: list[str]
    source: str
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row, reason)


def _clean(values: list[object], source: str) -> PromptList:
    out, skipped = [], []
    for row, value in enumerate(values):
        if not isinstance(value, str):
            skipped.append((row, f"not a string: {type(value).__name__}"))
        elif not value.strip():
            skipped.append((row, "empty prompt"))
        else:
            out.append(value.strip())
    if skipped:
        log.warning("%s: skipped %d bad prompt rows (first: row %d, %s)", source, len(skipped), *skipped[0])
    if not out:
        raise PromptSourceError(f"no usable prompt in {source} ({len(skipped)} bad rows)")
    return PromptList(out, source, skipped)


def load_prompts(source: str, column: str = "prompt") -> PromptList:
    """``procedural:<split>``, a ``.txt`` file (one prompt per line) or Parquet file(s)/directory."""
    if source.startswith("procedural:"):
        from r2d3.data.procedural import split_prompts

        split = source.split(":", 1)[1]
        return _clean(list(split_prompts(split)), source)
    if source.endswith(".txt"):
        path = Path(source)
        if not path.is_file():
            raise PromptSourceError(f"prompt file not found: {source}")
        return _clean(path.read_text(encoding="utf-8", errors="replace").splitlines(), source)
    import pyarrow.dataset as ds

    try:
        table = ds.dataset(source, format="parquet").to_table()
    except Exception as err:
        raise PromptSourceError(f"cannot read Parquet prompts from {source}: {err}") from err
    if column not in table.column_names:
        raise PromptSourceError(f"{source} has no {column!r} column (columns: {table.column_names})")
    return _clean(table.column(column).to_pylist(), source)
