"""An exclusive lock per output and work dir, so two runs never write the same files.

The lock is ``fcntl.flock`` on a hidden file beside the locked path (``.<name>.lock``), holding the
pid of the run that holds it. The kernel drops it when the process ends, however it ends, so a
killed run never leaves a stale lock; the file is removed on release. A second run that finds it
held gets a one-line error naming the holder's pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from impq_onnx.errors import UserError
from impq_onnx.files import shown

__all__ = ["RunLock", "LockedError"]


class LockedError(UserError):
    """Another run holds the lock on an output or a work dir."""


class RunLock:
    """``flock`` on ``.<name>.lock`` beside ``path`` (``path`` itself need not exist)."""

    def __init__(self, path: str | os.PathLike, command: str = "impq-onnx"):
        self.path = Path(path)
        self.file = self.path.parent / f".{self.path.name[:200]}.lock"
        self.command = command
        self.fd: int | None = None

    def acquire(self) -> None:
        for _ in range(10):  # a holder may remove the file between our open and our flock: retry
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise LockedError(f"cannot lock {shown(self.path)}: {shown(self.file)}: {exc.strerror or exc}; "
                                  "choose a writable folder") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise LockedError(f"{shown(self.path)} is in use by another impq-onnx run (pid {holder}, lock "
                                  f"{shown(self.file)}); wait for it to finish or choose another output / work dir")
            except OSError as exc:
                os.close(fd)
                raise LockedError(f"cannot lock {shown(self.path)}: {shown(self.file)}: {exc.strerror or exc}; "
                                  "choose a writable folder") from exc
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return
        raise LockedError(f"{shown(self.path)}: could not take the lock {shown(self.file)}; try again")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.file)  # while still held: a waiter that opened it sees another inode and retries
        os.close(self.fd)
        self.fd = None
