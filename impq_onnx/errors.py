"""Errors the tool reports as one line, grouped by cause, each with its own exit code.

- the user's input (model, data, plan, option, config file): :class:`UserError` and its subclasses
  :class:`ModelError`, :class:`DataError`, :class:`PlanError` and :class:`ConfigError`; exit code 2;
  the user fixes the input the message names.
- the environment (a missing package, a full disk, an I/O error, the OS): :class:`PlatformError`;
  exit code 5; the user fixes the machine.
- a bug in impq-onnx (an invariant of its own failed, whatever the input): :class:`InternalError`;
  exit code 1; the message asks for a report. :class:`VerificationError`, the model ``compress`` lowered
  failing its own verification, is one with exit code 3, the code of a failed ``verify``.

Every message names the file, node or key at fault and says what to do about it. The exception that
caused an error is kept as ``__cause__`` (``raise ... from exc``); the CLI prints only the one line,
and the whole chain with tracebacks at ``-vv``. :func:`as_impq_error` files any other exception the
CLI catches under one of these causes.
"""

from __future__ import annotations

import errno

__all__ = [
    "ImpqError",
    "UserError",
    "ModelError",
    "DataError",
    "PlanError",
    "ConfigError",
    "PlatformError",
    "InternalError",
    "VerificationError",
    "as_impq_error",
    "os_error_class",
]

REPORT_HINT = "this is a bug in impq-onnx; please report it with the command and its output at -vv"


class ImpqError(Exception):
    """An error the tool reports as one line: the base of every cause below."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line: runtimes like to embed newlines in their messages.
        super().__init__(" ".join(str(message).split()))


class UserError(ImpqError):
    """The user's input is wrong: the CLI prints it as one line and exits with code 2."""

    exit_code = 2


class ModelError(UserError):
    """The ONNX model cannot be read, canonicalised or run."""


class DataError(UserError):
    """The image data cannot be read or does not fit the model."""


class PlanError(UserError):
    """A precision plan does not fit the model or is malformed."""


class ConfigError(UserError):
    """An option (argument, CLI flag or key of a YAML/JSON configuration) is unknown or has a bad value."""


class PlatformError(ImpqError):
    """The machine cannot do what was asked (a missing package, a full disk, an I/O error): exit code 5."""

    exit_code = 5


class InternalError(ImpqError):
    """An invariant of impq-onnx itself failed, whatever the input: a bug; exit code 1, asking for a report."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}; {REPORT_HINT}")


class VerificationError(InternalError):
    """The model compress lowered differs from the simulation it was searched under: exit code 3 (as a failed
    ``impq-onnx verify``), with the report hint of an internal error."""

    exit_code = 3


# OSErrors the user fixes by changing the paths they gave (or their permissions); the rest (disk full, I/O
# error, ...) are the machine's.
_USER_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EACCES,
                errno.EPERM, errno.EROFS}


def one_line(value: object, limit: int = 120) -> str:
    """``str(value)`` on one line (runs of whitespace, newlines included, as one space), cut to ``limit``
    characters: an exception's text or a user's value inside a one-line message."""
    return " ".join(str(value).split())[:limit]


def os_error_class(exc: OSError) -> type[ImpqError]:
    """:class:`UserError` for a path the user can change (missing, wrong kind, not writable), else
    :class:`PlatformError` (a full disk, an I/O error)."""
    return UserError if exc.errno in _USER_ERRNOS else PlatformError


def as_impq_error(exc: BaseException) -> ImpqError:
    """``exc`` as an :class:`ImpqError` of its cause (itself when it already is one), with ``exc`` as the cause.

    An ``ImportError`` or an ``OSError`` other than a wrong path is the environment's; a wrong path is the
    user's; anything else escaping the library is a bug.
    """
    if isinstance(exc, ImpqError):
        return exc
    error: ImpqError
    if isinstance(exc, ImportError):
        error = PlatformError(f"cannot import {exc.name or 'a module'} ({exc}); install impq-onnx's dependencies "
                              "with pip install -e .")
    elif isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename is not None else ""
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            error = UserError(f"{where}{reason}; check the permissions or choose another path")
        elif exc.errno in _USER_ERRNOS:
            error = UserError(f"{where}{reason}; check the path")
        elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
            error = PlatformError(f"{where}{reason}; free disk space and run again")
        else:
            error = PlatformError(f"{where}{reason}; the operating system refused; check the machine and run again")
    elif isinstance(exc, MemoryError):
        error = PlatformError("out of memory; use a smaller batch size or fewer threads")
    else:
        error = InternalError(f"unexpected {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
