"""The files a command writes, checked before any work and published together at the end.

``compress`` and ``lower`` name every file they will write up front (the model and each derived one) and
:func:`check_paths` compares them with every input by real identity (resolved path, and device + inode
where the file exists): an output that is an input, or lies inside the data tree, is a one-line error
before anything runs. An existing output must be a regular file (a device, FIFO or folder is refused,
never opened); every name must be valid UTF-8 and short enough for its file system.

:class:`OutputSet` then holds the run's locks (:mod:`impq_onnx.run_lock`) and a staging folder beside the
outputs for the whole run. :meth:`OutputSet.commit` writes every file into the staging folder (a full
disk fails there, before any output is touched) and renames them onto their targets with SIGINT/SIGTERM/SIGHUP
held back; a failing rename puts back what was there before. So the outputs appear as a set, or not at
all, and an earlier set is never mixed with a new one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from impq_onnx.errors import ImpqError, PlatformError, UserError, os_error_class
from impq_onnx.files import shown
from impq_onnx.run_lock import RunLock
from impq_onnx.stop_signals import STOP_SIGNALS

__all__ = ["PathError", "show", "describe_os_error", "check_paths", "check_not_an_input", "input_file", "OutputSet",
           "deferred_signals"]


class PathError(UserError):
    """A file or folder the command needs cannot be used as asked (clash with an input, wrong kind, OS error)."""


def _os_failure(exc: OSError) -> type[ImpqError]:
    """PathError for a path the user can change; PlatformError (exit 5) for a full disk or an I/O error."""
    return PathError if os_error_class(exc) is not PlatformError else PlatformError


show = shown  # a path printable on any terminal, on one line (impq_onnx.files.shown)


_ADVICE = {
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "operation not permitted; choose a folder you can write to",
    errno.ENOSPC: "no space left on the device; free some space or choose another folder",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another folder",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter one",
    errno.EISDIR: "it is a folder; give a file name",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "it already exists",
}


def describe_os_error(exc: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for ``exc``: the path at fault, what went wrong and what to do."""
    where = path if path is not None else exc.filename
    advice = _ADVICE.get(exc.errno or -1, exc.strerror or str(exc))
    return f"{show(where)}: {advice}" if where is not None else f"{exc.strerror or exc}"


def _name_max(path: Path) -> int:
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _check_name(path: Path, what: str) -> None:
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PathError(f"{what} {show(path)}: the name is not valid UTF-8; rename it") from exc
    limit = _name_max(path)
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise PathError(f"{what} {show(path)}: the name '{show(part)[:40]}...' is longer than the {limit} "
                            "bytes the file system allows; choose a shorter name")


def _identity(path: Path) -> tuple[Path, tuple[int, int] | None]:
    """The resolved path, and (device, inode) of what it names when it exists."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        resolved = Path(os.path.abspath(path))
    try:
        st = os.stat(path)
        return resolved, (st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return resolved, None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def input_file(path: str | os.PathLike | None) -> Path | None:
    """An option's value as an input file for :func:`check_paths`: None when it names no existing file (not
    given, or not a path: a ``--classes`` list, a preprocess preset's name)."""
    return Path(path) if path is not None and Path(path).is_file() else None


def check_paths(outputs: list[tuple[str, Path]], inputs: Mapping[str, Path | None], *,
                trees: Mapping[str, Path | None] = {}, work_dir: Path | None = None, flag: str = "--output") -> None:
    """Refuse, before any work, outputs that would harm an input or cannot be written as regular files.

    ``outputs`` are (description, path) pairs (``("--output", ...)``, ``("the derived output", ...)``);
    ``inputs`` map a description (``"the input model"``) to a path; ``trees`` are input folders (the
    data) that no output may lie in; ``work_dir`` is the run's checkpoint folder, which must not hold
    an input nor lie in a tree. ``flag`` is the option that moves the outputs, for the advice.
    """
    given = {what: Path(p) for what, p in inputs.items() if p is not None}
    folders = {what: Path(p) for what, p in trees.items() if p is not None}
    for what, path in [*given.items(), *outputs, *(() if work_dir is None else (("--work-dir", work_dir),))]:
        _check_name(Path(path), what)
    seen_outputs: dict[Path, str] = {}
    for what, path in outputs:
        path = Path(path)
        resolved = check_not_an_input(what, path, given, folders, flag)
        if resolved in seen_outputs:
            raise PathError(f"{what} {show(path)} and {seen_outputs[resolved]} are the same file; choose another "
                            f"{flag}")
        seen_outputs[resolved] = what
        _check_writable_file(path, what)
    if work_dir is not None:
        _check_work_dir(Path(work_dir), given, folders, seen_outputs)


def _named(name: str, path: Path) -> str:
    """``name`` and the path, once: a name that ends with the path already ("the input folder data") keeps it."""
    text = show(path)
    return name if name.endswith(f" {text}") else f"{name} {text}"


def check_not_an_input(what: str, path: Path, inputs: Mapping[str, Path], trees: Mapping[str, Path] = {},
                       flag: str = "--output") -> Path:
    """Refuse an output ``path`` that is one of ``inputs`` (by resolved path or by inode: a symlink or hard
    link to it) or lies in one of the ``trees``; return its resolved path. The part of :func:`check_paths` that
    also holds for an output that need not be a regular file (``--events`` may be a pipe)."""
    resolved, inode = _identity(path)
    for name, given in inputs.items():
        in_resolved, in_inode = _identity(given)
        if resolved == in_resolved or (inode is not None and inode == in_inode):
            raise PathError(f"{what} {show(path)} is {_named(name, given)}; it would be overwritten: "
                            f"write the outputs elsewhere (another {flag})")
    for name, folder in trees.items():
        if folder.is_dir() and _inside(resolved, _identity(folder)[0]):
            raise PathError(f"{what} {show(path)} lies inside {_named(name, folder)}; write the outputs "
                            f"outside it (another {flag})")
    return resolved


def _check_writable_file(path: Path, what: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _os_failure(exc)(f"{what}: {describe_os_error(exc, path)}") from exc
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise PathError(f"{what} {show(path)} is {kind}; outputs are regular files only: give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise PathError(f"{what} {show(path)}: {show(folder)} is not a folder; choose another path")


def _check_work_dir(work_dir: Path, inputs: dict[str, Path], trees: dict[str, Path],
                    outputs: dict[Path, str]) -> None:
    resolved, _ = _identity(work_dir)
    if resolved in outputs:
        raise PathError(f"--work-dir {show(work_dir)} is also {outputs[resolved]}; choose another --work-dir")
    for name, path in inputs.items():
        if _inside(_identity(path)[0], resolved):
            raise PathError(f"--work-dir {show(work_dir)} holds {name} {show(path)}; checkpoints must go to a "
                            "folder of their own: choose another --work-dir")
    for name, folder in trees.items():
        if folder.is_dir() and _inside(resolved, _identity(folder)[0]):
            raise PathError(f"--work-dir {show(work_dir)} lies inside {name} {show(folder)}; choose a "
                            "--work-dir outside the data")
    if work_dir.exists() and not work_dir.is_dir():
        raise PathError(f"--work-dir {show(work_dir)} exists and is not a folder; choose another --work-dir")
    if work_dir.is_dir():
        # search.checkpoint's files, impq_onnx.data.cache's decoded/, search.refit's refit/
        own = ("run.json", "machine.json", "state.json", "iterations", "decoded", "refit")
        foreign = sorted(p.name for p in work_dir.iterdir() if p.name not in own
                         and not (p.name.startswith(".") and p.name.endswith(".tmp")))
        if foreign:
            raise PathError(f"--work-dir {show(work_dir)} holds files that are not a compress run's (e.g. "
                            f"'{show(foreign[0])}'); choose an empty or new folder")


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back (delivered on exit), so a rename sequence is never cut in two.

    Python runs a signal's handler in the main thread, whichever thread the kernel gave the signal to (a
    process-directed signal goes to any thread that does not block it: numpy's BLAS workers, onnxruntime's
    pool), so blocking it in this thread's sigmask is not enough. The handlers are swapped for one that
    only notes the signal; on exit the old handlers come back and the first noted signal goes to its own.
    """
    noted: list[signal.Signals] = []

    def note(signum: int, frame: object) -> None:
        noted.append(signal.Signals(signum))

    old: dict[signal.Signals, Any] = {}
    try:
        try:  # a handler not installed from Python (getsignal gives None) is left alone: it cannot be put back;
            # an ignored signal (nohup's SIGHUP) too: noted first, it would hide a SIGTERM that follows it
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) not in (None, signal.SIG_IGN):
                    old[signum] = signal.signal(signum, note)
        except ValueError:  # not the main thread: Python runs no handler here, nothing can cut this thread
            pass
        yield
    finally:  # also when a signal's own handler raised between two swaps: what was swapped is put back
        for signum, handler in old.items():
            signal.signal(signum, handler)
        if noted:
            _deliver(noted[0], old[noted[0]])


def _deliver(signum: int, handler: object) -> None:
    """What the signal would have done outside the deferred block: its Python handler, or the default action."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


class OutputSet:
    """The locks and staging folders of one run's outputs (see the module docstring).

    ``targets``: the files the run will write; ``locked``: the paths whose locks it holds (the outputs'
    common stem, the work dir). Use as a context manager; leaving it without :meth:`commit` leaves the
    earlier outputs as they were and no staging folder behind.
    """

    def __init__(self, targets: list[Path], locked: list[Path], command: str = "impq-onnx"):
        self.targets = [Path(t) for t in targets]
        self.locks = [RunLock(path, command) for path in dict.fromkeys(Path(p) for p in locked)]
        self.staging: dict[Path, Path] = {}
        # Named after the first locked path: a folder left by a killed run is found, and removed, by the
        # next run that holds the same lock.
        first = self.locks[0].path if self.locks else Path(".")
        self.tag = hashlib.sha256(os.fsencode(first.parent.resolve() / first.name)).hexdigest()[:8]

    def __enter__(self) -> "OutputSet":
        try:
            with deferred_signals():  # a signal between a mkdir and its bookkeeping would leave the folder behind
                self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> None:
        for lock in self.locks:
            lock.acquire()
        for folder in dict.fromkeys(t.parent for t in self.targets):
            for stale in folder.glob(f".impq-staging-{self.tag}-*") if self.locks and folder.is_dir() else ():
                shutil.rmtree(stale, ignore_errors=True)
            self.staging[folder] = self._staging_folder(folder)

    def __exit__(self, *exc) -> None:
        self.close()

    def _staging_folder(self, folder: Path) -> Path:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=f".impq-staging-{self.tag}-", dir=folder))
        except OSError as exc:
            raise _os_failure(exc)(f"cannot write the outputs: {describe_os_error(exc, exc.filename or folder)}") \
                from exc

    def close(self) -> None:
        with deferred_signals():
            self._close()

    def _close(self) -> None:
        for staging in self.staging.values():
            shutil.rmtree(staging, ignore_errors=True)
        self.staging.clear()
        for lock in reversed(self.locks):
            lock.release()

    def commit(self, files: Mapping[Path, bytes]) -> list[Path]:
        """Write ``files`` (bytes by target path) into the staging folders, then rename them all into place."""
        staged: list[tuple[Path, Path]] = []
        for target, data in files.items():
            target = Path(target)
            _check_writable_file(target, "output")
            folder = self.staging.get(target.parent) or self.staging.setdefault(
                target.parent, self._staging_folder(target.parent))
            temp = folder / target.name
            try:
                with open(temp, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                raise _os_failure(exc)(f"cannot write {describe_os_error(exc, target)}; no output was written") \
                    from exc
            staged.append((temp, target))
        with deferred_signals():
            self._rename_all(staged)
        return [target for _, target in staged]

    def _rename_all(self, staged: list[tuple[Path, Path]]) -> None:
        done: list[tuple[Path, Path | None]] = []  # (target, backup of what it replaced)
        try:
            for i, (temp, target) in enumerate(staged):
                backup = None
                if os.path.lexists(target):
                    backup = temp.parent / f".backup-{i}"
                    try:
                        os.link(target, backup, follow_symlinks=False)
                    except OSError:
                        backup = None
                os.replace(temp, target)
                done.append((target, backup))
        except OSError as exc:
            for target, backup in reversed(done):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, target)
                    else:
                        os.unlink(target)
            raise _os_failure(exc)(f"cannot write {show(exc.filename or target)}: {describe_os_error(exc)}; the "
                            "earlier outputs were put back") from exc
        for folder in self.staging:
            with contextlib.suppress(OSError):
                fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

