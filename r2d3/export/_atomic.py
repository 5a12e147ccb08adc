"""Atomic file writes shared by every exporter.

A crash, a full disk or a killed worker must never leave a half-written ``.ply`` / ``.png`` under
the final name: nightly regeneration resumes by checking which outputs exist, so a truncated file
would be mistaken for a finished one. Everything is written to a hidden temporary file in the
destination directory (same filesystem, so the final ``os.replace`` is atomic) and renamed at the end.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def _umask() -> int:
    """The process umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class ExportPathError(OSError):
    """The output path cannot be written (missing permissions, a file where a directory should be, ...)."""


def _unwritable(path: Path, reason: str, cause: BaseException | None = None) -> ExportPathError:
    if isinstance(cause, OSError) and cause.strerror:
        reason = f"{reason}: {cause.strerror}"
    return ExportPathError(f"cannot write {str(path)!r}: {reason}")


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
