"""Prompt sources by name: the procedural grammar's splits, a text file, or Parquet shards (local or
``s3://``), read into memory or streamed (:class:`PromptStream`, fed by Ray Data on a cluster).

Bad rows (missing, empty or non-string prompts) are skipped and counted, never fatal, so one broken
line in a 100k-prompt file does not end a run; a source with no usable prompt is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from r2d3.data.procedural import split_prompts
from r2d3.storage import filesystem

log = logging.getLogger(__name__)


class PromptSourceError(ValueError):
    """A prompt source that cannot be read or holds no usable prompt."""


@dataclass
class PromptList:
    prompts: list[str]
    source: str
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row, reason)
    skipped_shards: list[tuple[str, str]] = field(default_factory=list)  # (shard, reason)


def _row_problem(value: object) -> str | None:
    """Why a prompt cell is unusable, or None."""
    if not isinstance(value, str):
        return f"not a string: {type(value).__name__}"
    if not value.strip():
        return "empty prompt"
    return None


def clean_cells(values: Sequence[object], first_row: int = 0) -> tuple[list[str], list[tuple[int, str]]]:
    """The usable prompts of ``values`` (stripped) and the ``(row, reason)`` of the others, rows counted
    from ``first_row``."""
    out, skipped = [], []
    for row, value in enumerate(values, first_row):
        problem = _row_problem(value)
        if problem:
            skipped.append((row, problem))
        else:
            out.append(value.strip())
    return out, skipped


def _clean(values: list[object], source: str) -> PromptList:
    out, skipped = clean_cells(values)
    if skipped:
        log.warning("%s: skipped %d bad prompt rows (first: row %d, %s)", source, len(skipped), *skipped[0])
    if not out:
        raise PromptSourceError(f"no usable prompt in {source} ({len(skipped)} bad rows)")
    return PromptList(out, source, skipped)


def is_parquet_source(source: str) -> bool:
    """Parquet shards (file, directory, glob or s3:// prefix), as opposed to procedural:<split> or .txt."""
    return not (source.startswith("procedural:") or source.endswith(".txt"))


def is_text_type(tp) -> bool:
    """Arrow types that hold prompt text: (large) strings, string views, and dictionary-encoded strings
    (what pandas writes for a Categorical column)."""
    import pyarrow as pa

    if pa.types.is_dictionary(tp):
        return is_text_type(tp.value_type)
    return pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_string_view(tp)


@dataclass
class ShardCheck:
    files: list[str]  # readable shards with a string prompt column, as URIs/paths to pass to readers
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (shard, reason)


def check_shards(source: str, column: str = "prompt", verify_data: bool = True) -> ShardCheck:
    """List the Parquet shards of ``source`` and keep those whose ``column`` holds strings and reads
    end to end; the others are skipped with a reason (a broken shard must not end a week-long run).
    Reads the footer and then, with ``verify_data``, the prompt column (its data pages: a shard can have
    an intact footer and corrupt pages), which is small next to the rest of a row. :func:`load_prompts`
    reads that column anyway, so it checks the pages as it goes instead of reading them twice."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    try:
        fs, path = filesystem(source)
        if any(ch in path for ch in "*?["):
            import fnmatch

            parent = path[: path.rfind("/", 0, min(path.find(c) for c in "*?[" if c in path))]
            infos = [i for i in fs.get_file_info(pafs.FileSelector(parent, recursive=True))
                     if fnmatch.fnmatch(i.path, path)]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise PromptSourceError(f"prompt shards not found: {source}")
            infos = [info] if info.type == pafs.FileType.File else \
                fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except PromptSourceError:
        raise
    except Exception as err:  # bad URI, no credentials, unreachable endpoint: name the source
        raise PromptSourceError(f"cannot list Parquet prompts at {source}: {err}") from err
    scheme = source.split("://", 1)[0] + "://" if "://" in source else ""
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise PromptSourceError(f"no .parquet files under {source}")
    check = ShardCheck([])
    for path in files:
        try:
            with fs.open_input_file(path) as f:
                schema = pq.read_schema(f)
        except Exception as err:
            check.skipped.append((scheme + path, f"unreadable Parquet: {err}"))
            continue
        if column not in schema.names:
            check.skipped.append((scheme + path, f"no {column!r} column (columns: {schema.names})"))
        elif not is_text_type(schema.field(column).type):
            check.skipped.append((scheme + path, f"column {column!r} has type {schema.field(column).type}, not string"))
        else:
            if verify_data:
                try:
                    with fs.open_input_file(path) as f:
                        pq.read_table(f, columns=[column])
                except Exception as err:
                    check.skipped.append((scheme + path, f"unreadable Parquet data in column {column!r}: {err}"))
                    continue
            check.files.append(scheme + path)
    for shard, reason in check.skipped:
        log.warning("skipped prompt shard %s: %s", shard, reason)
    if not check.files:
        first = check.skipped[0]
        raise PromptSourceError(f"no usable prompt shard in {source} ({len(check.skipped)} skipped; "
                                f"first: {first[0]}: {first[1]})")
    return check


def load_prompts(source: str, column: str = "prompt") -> PromptList:
    """``procedural:<split>``, a ``.txt`` file (one prompt per line) or Parquet shards (file, directory,
    glob or ``s3://`` prefix) read into memory; for streaming large shard sets see :class:`PromptStream`."""
    if source.startswith("procedural:"):
        split = source.split(":", 1)[1]
        return _clean(list(split_prompts(split)), source)
    if source.endswith(".txt"):
        path = Path(source)
        if not path.is_file():
            raise PromptSourceError(f"prompt file not found: {source}")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")  # a byte-order mark is not part of the first prompt
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise PromptSourceError(f"{source} is not UTF-8 (line {line}, byte {err.start}); re-save it as UTF-8, "
                                    f"e.g. iconv -f latin1 -t utf-8") from None
        return _clean(text.splitlines(), source)
    import pyarrow.parquet as pq

    shards = check_shards(source, column, verify_data=False)  # the pages are read (and checked) below
    values: list[object] = []
    readable: list[tuple[str, str]] = []
    for shard in shards.files:
        try:
            values += pq.read_table(shard, columns=[column]).column(column).to_pylist()
        except Exception as err:  # corrupt data pages behind an intact footer: skip and record it
            readable.append((shard, f"unreadable Parquet data in column {column!r}: {err}"))
    out = _clean(values, source)
    out.skipped_shards = shards.skipped + readable
    return out


def select_prompts(prompts: Sequence[str], n: int) -> list[str]:
    """``n`` prompts spread evenly over ``prompts`` (deterministic; all of them when ``n`` is larger): the
    held-out set of the training job and of the evaluation job."""
    n = min(n, len(prompts))
    return [prompts[int(i * len(prompts) / n)] for i in range(n)] if n > 0 else []


class PromptStream:
    """Prompt batches pulled from a stream of row batches that restarts every data epoch.

    ``epoch`` returns a fresh iterator over batches of raw cells (one data epoch: a Ray Data shard's
    ``iter_batches``, say). Every :meth:`take` consumes exactly one batch, so data-parallel workers
    reading equal-sized splits start their data epochs in lockstep (Ray's streaming split waits for all
    readers at each epoch boundary: a worker that ran ahead would deadlock against one blocked in a
    collective). Bad cells are skipped and counted in :attr:`skipped`; a batch left short by them is
    topped up by repeating its good prompts (or the previous batch's, if none is good); a whole data
    epoch without a usable prompt is an error rather than an endless loop."""

    def __init__(self, epoch: Callable[[], Iterable[Sequence[object]]], source: str):
        self._epoch = epoch
        self.source = source
        self.skipped = 0
        self.data_epochs = 0
        self._batches: Iterator[Sequence[object]] = iter(())
        self._usable_this_epoch = 0
        self._last: list[str] = []

    def _next_batch(self) -> Sequence[object]:
        while True:
            try:
                return next(self._batches)
            except StopIteration:
                if self.data_epochs and not self._usable_this_epoch:
                    raise PromptSourceError(f"no usable prompt in {self.source} "
                                            f"({self.skipped} bad rows in one pass)") from None
                self.data_epochs += 1
                self._usable_this_epoch = 0
                self._batches = iter(self._epoch())

    def take(self, n: int) -> list[str]:
        while True:
            batch = self._next_batch()
            good = [v.strip() for v in batch if not _row_problem(v)]
            self.skipped += len(batch) - len(good)
            self._usable_this_epoch += len(good)
            if good:
                self._last = good
                break
            if self._last:
                good = self._last
                break
        return [good[i % len(good)] for i in range(n)]
