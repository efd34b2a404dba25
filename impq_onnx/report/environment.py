"""What produced a run: tool and library versions and the command line, for ``<stem>.report.json``.

Only things that are the same for the same installation and command go in (no time, host or user),
so the same inputs still give the same bytes. The library never reads ``sys.argv``: the
``impq-onnx`` entry point hands its arguments to :func:`record_command_line`; without it (a call
from Python) the command is ``"Python API"``.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shlex

__all__ = ["PYTHON_API", "record_command_line", "run_environment"]

PYTHON_API = "Python API"
_command: str | None = None


def record_command_line(arguments: list[str]) -> None:
    """Called once by the command-line entry point with ``sys.argv[1:]``."""
    global _command
    readable = [a.encode("utf-8", "backslashreplace").decode("utf-8") for a in arguments]
    _command = shlex.join(["impq-onnx", *readable])


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def run_environment() -> dict[str, str | None]:
    """``{"impq_onnx", "onnx", "onnxruntime", "numpy", "python", "command"}``; a version is None when the
    distribution is not installed under a known name."""
    return {
        "impq_onnx": _version("impq-onnx"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime-training", "onnxruntime-training-cpu", "onnxruntime", "onnxruntime-gpu"),
        "numpy": _version("numpy"),
        "python": platform.python_version(),
        "command": _command or PYTHON_API,
    }
