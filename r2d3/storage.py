"""Where r2d3 reads and writes files: one seam for local paths and ``s3://`` URIs, and atomic writes.

Filesystems are pyarrow's (:func:`filesystem`): Ray Data reads and writes through them and Ray Train
stores checkpoints with them, so jobs, Ray tasks and the trainer share one client and one way of
configuring S3 (the standard ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` for an S3-compatible server).

A crash, a full disk or a killed worker must never leave a half-written file or checkpoint under its
final name: nightly regeneration and resumed training decide what is done by what exists, so a
truncated file would be mistaken for a finished one. Local files are written to a hidden temporary
next to the destination (same filesystem, so the final ``os.replace`` is atomic) and renamed at the
end (:func:`atomic_path`, :func:`atomic_dir`); an S3 object is one PUT, which appears whole or not.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def _umask() -> int:
    """The process umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class OutputError(OSError):
    """An output location cannot be written (missing permissions, a file where a directory should be,
    an unreachable bucket, ...); the message names it."""


def _unwritable(path: Path, reason: str, cause: BaseException | None = None) -> OutputError:
    if isinstance(cause, OSError) and cause.strerror:
        reason = f"{reason}: {cause.strerror}"
    return OutputError(f"cannot write {str(path)!r}: {reason}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error delete it.

    The temporary name keeps ``path``'s suffix so writers that infer the format from the extension
    (imageio) still work. Parent directories are created. Raises :class:`ExportPathError` naming
    ``path`` when the location cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise _unwritable(path, "it is an existing directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(path, f"cannot create the directory {str(path.parent)!r}", e) from e
    try:
        # hidden, unique, and ending in the real suffix so extension-sniffing writers still work
        prefix, suffix = f".{path.name}.", f".partial{path.suffix}"
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    except OSError as e:
        raise _unwritable(path, "cannot create a file in its directory", e) from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would honour the umask
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the final path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty sibling directory of ``path`` to fill; on success it replaces ``path`` (an earlier
    directory there is removed first), on error it is deleted and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


T = TypeVar("T")

#: how object-store calls ride out an outage: attempts, and the first wait (doubled each time, at most 8 s);
#: the defaults wait 1 + 2 + 4 + 8 + 8 s, about half a minute, before the call fails naming its target
RETRY_ENV = ("R2D3_STORAGE_ATTEMPTS", "R2D3_STORAGE_BACKOFF_S")


def _permanent(err: OSError) -> bool:
    """Errors no retry can fix: a missing object, a denied request, a missing bucket."""
    text = str(err)
    return isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)) or \
        any(code in text for code in ("ACCESS_DENIED", "NO_SUCH_BUCKET", "NoSuchBucket"))


def retry_io(fn: Callable[[], T], what: str) -> T:
    """``fn()`` retried with exponential backoff while it raises a transient ``OSError`` (an unreachable
    or briefly failing S3 endpoint); then an :class:`OutputError` naming ``what`` and the attempts. Only
    remote storage goes through it: a full local disk is not worth waiting for."""
    attempts = max(1, int(os.environ.get(RETRY_ENV[0], "6")))
    wait = float(os.environ.get(RETRY_ENV[1], "1.0"))
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as err:
            if _permanent(err):
                raise
            if attempt == attempts:
                raise OutputError(f"{what}: storage unavailable after {attempts} attempts: {err}") from err
            time.sleep(min(wait * 2 ** (attempt - 1), 8.0))
    raise AssertionError("unreachable")


def slug(text: str, default: str = "x") -> str:
    """A file-name-safe form of ``text`` (letters, digits, ``.``, ``_``, ``-``; at most 60 characters; never
    hidden, ``.`` or ``..``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_").lstrip(".")[:60] or default


def is_uri(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def filesystem(uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path of a URI (``s3://bucket/key``), or of a local path
    (made absolute: Ray tasks need not share the driver's working directory)."""
    if is_uri(uri):
        return pafs.FileSystem.from_uri(str(uri).rstrip("/"))
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


class _RetryingHandler(pafs.FileSystemHandler):
    """Every call of an object-store filesystem through :func:`retry_io`. Files are read and written whole
    (a stream cut mid-object cannot be resumed, a whole object can be re-sent): meant for checkpoints and
    run outputs, not for datasets."""

    def __init__(self, fs: pafs.FileSystem):
        if isinstance(fs, pafs.S3FileSystem):
            # writes in the caller's thread: callers such as pyarrow's copy_files run this handler on
            # arrow's IO threads, and an S3 stream closing there would wait for uploads queued behind
            # it on the same pool (a deadlock once every IO thread waits)
            options = dict(fs.__reduce__()[1][0], background_writes=False)
            fs = pafs.S3FileSystem(**options)
        self.fs = fs

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return retry_io(fn, f"{self.fs.type_name} {what}")

    def get_type_name(self) -> str:
        return f"retrying-{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def equals(self, other: Any) -> bool:
        return isinstance(other, _RetryingHandler) and self.fs.equals(other.fs)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._retry(lambda: self.fs.get_file_info(paths), ", ".join(paths[:3]))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._retry(lambda: self.fs.get_file_info(selector), f"listing {selector.base_dir}")

    def create_dir(self, path: str, recursive: bool) -> None:
        self._retry(lambda: self.fs.create_dir(path, recursive=recursive), path)

    def delete_dir(self, path: str) -> None:
        self._retry(lambda: self.fs.delete_dir(path), path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._retry(lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok), path)

    def delete_root_dir_contents(self) -> None:
        self._retry(lambda: self.fs.delete_dir_contents("/", accept_root_dir=True), "/")

    def delete_file(self, path: str) -> None:
        self._retry(lambda: self.fs.delete_file(path), path)

    def move(self, src: str, dest: str) -> None:
        self._retry(lambda: self.fs.move(src, dest), src)

    def copy_file(self, src: str, dest: str) -> None:
        self._retry(lambda: self.fs.copy_file(src, dest), src)

    def _read(self, path: str) -> pa.BufferReader:
        def read() -> bytes:
            with self.fs.open_input_stream(path) as f:
                return f.read()

        return pa.BufferReader(self._retry(read, path))

    def open_input_stream(self, path: str) -> pa.BufferReader:
        return self._read(path)

    def open_input_file(self, path: str) -> pa.BufferReader:
        return self._read(path)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None) -> pa.PythonFile:
        handler = self

        class Upload(io.BytesIO):
            def close(self) -> None:
                if not self.closed:
                    data = self.getvalue()

                    def put() -> None:
                        with handler.fs.open_output_stream(path, metadata=metadata) as f:
                            f.write(data)

                    handler._retry(put, path)
                super().close()

        return pa.PythonFile(Upload(), mode="w")

    def open_append_stream(self, path: str, metadata: dict[str, str] | None) -> pa.NativeFile:
        raise NotImplementedError(f"{self.fs.type_name} has no appends ({path})")


def retrying_filesystem(uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """:func:`filesystem`, with every call of an object store retried through an outage (Ray Train's own
    checkpoint uploads and bookkeeping writes go through it); local paths as they are."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return fs, path
    return pafs.PyFileSystem(_RetryingHandler(fs)), path


def files_under(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """Every file at or below ``path`` (itself when it is a file; empty when nothing is there)."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [info]
    return [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            if i.type == pafs.FileType.File]


class Store:
    """Files under a root that is a local directory or an ``s3://bucket/prefix``. Paths are relative,
    ``/``-separated; local writes are atomic, S3 writes are single PUTs."""

    def __init__(self, root: str | os.PathLike[str]):
        self.uri = str(root).rstrip("/")
        self.is_s3 = is_uri(self.uri)
        self.fs, self.base = filesystem(self.uri)

    def __getstate__(self) -> dict[str, Any]:  # pyarrow filesystems are rebuilt in each process
        return {"uri": self.uri}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"])

    def full(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def _io(self, fn: Callable[[], T], rel: str) -> T:
        """S3 calls ride out a brief outage (:func:`retry_io`); local ones run once."""
        return retry_io(fn, f"{self.uri}/{rel}") if self.is_s3 else fn()

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.is_s3:
            def put() -> None:
                with self.fs.open_output_stream(self.full(rel)) as f:
                    f.write(data)
            self._io(put, rel)
        else:
            atomic_write_bytes(self.full(rel), data)

    def read_bytes(self, rel: str) -> bytes:
        def get() -> bytes:
            with self.fs.open_input_stream(self.full(rel)) as f:
                return f.read()
        return self._io(get, rel)

    def exists(self, rel: str) -> bool:
        return self._io(lambda: self.fs.get_file_info(self.full(rel)).type == pafs.FileType.File, rel)

    def listing(self, under: str = "") -> set[str]:
        """Relative paths of every file below the root, or below its folder ``under`` (one recursive
        listing)."""
        return self._io(lambda: {i.path[len(self.base) + 1:] for i in files_under(self.fs, self.full(under))}, under)

    def delete(self, rel: str) -> None:
        def rm() -> None:
            with suppress(FileNotFoundError):
                self.fs.delete_file(self.full(rel))
        self._io(rm, rel)

    def check_writable(self) -> None:
        """Write and remove a probe object, so an output that is a file, read-only or unreachable fails
        before anything is computed (with the path in the message)."""
        probe = ".write_test"
        try:
            if not self.is_s3:
                if Path(self.base).exists() and not Path(self.base).is_dir():
                    raise NotADirectoryError(f"{self.base} is a file")
                Path(self.base).mkdir(parents=True, exist_ok=True)
            self.write_bytes(probe, b"")
            self.delete(probe)
        except OSError as err:
            raise OutputError(f"output {self.uri} is not writable: {err}") from err

    def write_table(self, rel: str, table: Any) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str) -> Any:
        return pq.read_table(io.BytesIO(self.read_bytes(rel)))

    def batches(self, rel: str) -> Iterator[pa.RecordBatch]:
        """The record batches of a Parquet file (its bytes fetched once, decoded one row group at a time)."""
        yield from pq.ParquetFile(io.BytesIO(self.read_bytes(rel))).iter_batches()

    @contextmanager
    def table_writer(self, rel: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """A Parquet writer for a table written piece by piece; the file appears whole or not at all
        (written to a local temporary first: renamed at the end, or uploaded to S3 once complete)."""
        if not self.is_s3:
            with atomic_path(self.full(rel)) as tmp:
                with pq.ParquetWriter(str(tmp), schema) as writer:
                    yield writer
            return
        with tempfile.TemporaryDirectory(prefix="r2d3-table-") as tmp:
            local = os.path.join(tmp, "table.parquet")
            with pq.ParquetWriter(local, schema) as writer:
                yield writer
            def upload() -> None:
                with open(local, "rb") as src, self.fs.open_output_stream(self.full(rel)) as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
            self._io(upload, rel)


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema, metadata: dict[str, Any] | None = None) -> pa.Table:
    """Rows as a table of ``schema`` (rows made by older versions are coerced: 0.0/1.0 checks become
    booleans); ``metadata`` is stored as JSON under the schema's ``r2d3`` key."""
    bools = {f.name for f in schema if pa.types.is_boolean(f.type)}
    table = pa.Table.from_pylist([{k: (bool(r[k]) if k in bools and r.get(k) is not None else r.get(k))
                                   for k in schema.names} for r in rows], schema=schema)
    if metadata is not None:
        table = table.replace_schema_metadata({"r2d3": json.dumps(metadata, sort_keys=True, default=str)})
    return table
