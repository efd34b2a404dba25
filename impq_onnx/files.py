"""Writing files so that a reader, or a run killed at any moment, never sees a partial one.

Each file goes to a temporary name in its own folder, is flushed and fsync'ed, and is moved into
place with ``os.replace``. :func:`write_all` publishes several files only once all were written, so
an error leaves none of them behind (the outputs of compress and lower rely on this).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["write_temporary", "write_atomic", "write_all"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_temporary(path: str | os.PathLike, data: bytes | str) -> str:
    """Write ``data`` to a new temporary file beside ``path`` (flushed, fsync'ed, usual permissions);
    return its name. ``os.replace`` it onto ``path`` to publish it."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
    except OSError as exc:  # a full disk says nothing of the file: name it
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OSError(exc.errno, exc.strerror, exc.filename or os.fspath(path)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    write_all({Path(path): data})


def write_all(files: dict[Path, bytes | str]) -> None:
    """Write every file to a temporary name first, then rename them all; on error, none is left."""
    for path in files:  # never replace a device, FIFO or folder with a file
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise OSError(errno.EINVAL, "not a regular file (a folder, device or FIFO); outputs are regular "
                              "files only: give a file name", os.fspath(path))
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            temps.append((write_temporary(path, data), path))
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
