"""Prompt sources cut into chunks that are read on their own: the unit of work of the regeneration job
at library scale.

The driver plans chunks from Parquet footers (row counts per row group) and never holds the prompts;
whoever works on a chunk reads only its rows (:func:`read_chunk`). A chunk carries its source's
``version`` (size and modification time), so a rewritten shard is never mistaken for a finished one,
while an untouched shard keeps its chunks, and their finished work, across runs.

Rows are raw rows of the source, bad cells included: the reader skips and reports them (the row number
names the row of that shard), so one broken cell does not move every later chunk.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from r2d3.data.procedural import split_prompts
from r2d3.data.prompts import PromptSourceError, check_shards, is_parquet_source, load_prompts
from r2d3.storage import OutputError, filesystem, is_uri, retry_io


@dataclass(frozen=True)
class Chunk:
    """Raw rows ``[start, stop)`` of ``source`` (a Parquet shard, a ``.txt`` file or ``procedural:<split>``);
    Parquet chunks never span a row group (``row_group``, whose first row is ``group_start``)."""

    source: str
    start: int
    stop: int
    version: str
    row_group: int = 0
    group_start: int = 0

    def __len__(self) -> int:
        return self.stop - self.start


def _cut(source: str, version: str, start: int, stop: int, size: int, group: int = 0) -> list[Chunk]:
    return [Chunk(source, a, min(a + size, stop), version, group, start) for a in range(start, stop, size)]


def plan_chunks(source: str, column: str = "prompt", size: int = 256,
                limit: int | None = None) -> tuple[list[Chunk], list[tuple[str, str]]]:
    """Chunks of at most ``size`` rows covering the first ``limit`` rows of ``source`` (all when None), and
    the shards skipped with a reason (no such column, not text, unreadable footer). Reads only Parquet
    footers; ``.txt`` files and procedural splits are small and read whole."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    chunks: list[Chunk] = []
    skipped: list[tuple[str, str]] = []
    if not is_parquet_source(source):
        load_prompts(source)  # a missing, non-UTF-8 or empty source is named here, before any work
        version = "procedural" if source.startswith("procedural:") else _local_version(source)
        chunks = _cut(source, version, 0, len(_raw_rows(source, version)), size)
    else:
        import pyarrow.parquet as pq

        check = check_shards(source, column, verify_data=False)  # data pages are checked as chunks are read
        skipped = list(check.skipped)
        for shard in check.files:
            fs, path = filesystem(shard)
            info = fs.get_file_info(path)
            try:
                with fs.open_input_file(path) as f:
                    meta = pq.ParquetFile(f).metadata
            except Exception as err:
                skipped.append((shard, f"unreadable Parquet: {err}"))
                continue
            version = f"{info.size}-{info.mtime_ns if info.mtime_ns is not None else info.mtime}"
            first = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                chunks += _cut(shard, version, first, first + rows, size, g)
                first += rows
    if limit is not None:
        kept, total = [], 0
        for c in chunks:
            if total >= limit:
                break
            take = min(len(c), limit - total)
            kept.append(Chunk(c.source, c.start, c.start + take, c.version, c.row_group, c.group_start))
            total += take
        chunks = kept
    return chunks, skipped


def _local_version(path: str) -> str:
    st = Path(path).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


@functools.lru_cache(maxsize=2)  # consecutive chunks of one row group or file share a read
def _raw_rows(source: str, version: str, column: str = "prompt", group: int = 0) -> list[object]:
    if source.startswith("procedural:"):
        return list(split_prompts(source.split(":", 1)[1]))
    if source.endswith(".txt"):
        return Path(source).read_bytes().decode("utf-8-sig").splitlines()
    import pyarrow.parquet as pq

    fs, path = filesystem(source)

    def read() -> list[object]:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).read_row_group(group, columns=[column]).column(column).to_pylist()
    return retry_io(read, source) if is_uri(source) else read()


def read_chunk(chunk: Chunk, column: str = "prompt") -> list[object]:
    """The raw cells of ``chunk`` (validate them with :func:`r2d3.data.prompts.clean_cells`). Raises
    :class:`PromptSourceError` naming the shard when its data cannot be read or it changed since planning."""
    try:
        rows = _raw_rows(chunk.source, chunk.version, column, chunk.row_group)
    except OutputError:  # the store is down, not the shard broken: the job stops and a rerun resumes
        raise
    except Exception as err:
        raise PromptSourceError(f"unreadable Parquet data in column {column!r} of {chunk.source}: {err}") from err
    cells = rows[chunk.start - chunk.group_start: chunk.stop - chunk.group_start]
    if len(cells) != len(chunk):
        raise PromptSourceError(f"{chunk.source} changed since the job planned its work "
                                f"(rows {chunk.start}-{chunk.stop} are not there)")
    return cells


__all__ = ["Chunk", "plan_chunks", "read_chunk"]
