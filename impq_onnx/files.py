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
from typing import BinaryIO

__all__ = ["write_temporary", "write_atomic", "write_all", "open_input", "read_input", "shown", "MiB"]

MiB = 1 << 20


def shown(path: str | os.PathLike) -> str:
    """A path as text that can always be printed and written on one line: undecodable bytes as ``\\xNN``,
    control characters (a newline, a bell, an escape sequence in a file name) as Python writes them (``\\n``,
    ``\\x07``, ``\\x1b``)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def open_input(path: str | os.PathLike, limit: int, what: str, error: type[Exception],
               hint: str = "give the path of a file") -> BinaryIO:
    """Open the user's file ``path`` for reading if it is a regular file of at most ``limit`` bytes; never blocks;
    otherwise ``error`` with one line naming the file (``hint`` says what to do when it is not a regular file).

    Checked with ``stat`` before opening (a device is never opened: opening some has side effects), and
    again with ``fstat`` on the descriptor, opened non-blocking, in case the file was swapped in between: a
    FIFO without a writer would block the run, ``/dev/zero`` would be read until the memory runs out.
    """
    not_regular = f"{shown(path)}: not a regular file; {hint}"
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise error(not_regular)
        fd = os.open(path, flags)
    except OSError as err:
        raise error(f"{shown(path)}: cannot open the {what} ({err.strerror})") from err
    try:  # the descriptor is closed on every way out but the file object returned (an interrupt included)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(not_regular)
        if info.st_size > limit:
            raise error(f"{shown(path)}: {info.st_size} bytes is over the limit of {limit} bytes for a {what}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_input(path: str | os.PathLike, limit: int, what: str, error: type[Exception]) -> bytes:
    """The bytes of the user's file ``path`` (:func:`open_input`'s checks; a file that grew past ``limit`` after
    them is refused the same way)."""
    with open_input(path, limit, what, error) as f:
        try:
            data = f.read(limit + 1)
        except OSError as err:
            raise error(f"{shown(path)}: cannot read the {what} ({err.strerror})") from err
    if len(data) > limit:
        raise error(f"{shown(path)}: over the limit of {limit} bytes for a {what}")
    return data


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
        raise OSError(exc.errno, exc.strerror, exc.filename or os.fspath(path)) from exc
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
