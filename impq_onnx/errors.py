"""Errors the tool reports to users as one line, with a non-zero exit and no traceback.

Every message names the file, node or key at fault and says what to do about it.
"""

from __future__ import annotations

__all__ = ["ImpqError", "ModelError", "DataError", "PlanError", "ConfigError"]


class ImpqError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits with code 2."""

    exit_code = 2

    def __init__(self, message: str):
        # One line: runtimes like to embed newlines in their messages.
        super().__init__(" ".join(str(message).split()))


class ModelError(ImpqError):
    """The ONNX model cannot be read, canonicalised or run."""


class DataError(ImpqError):
    """The image data cannot be read or does not fit the model."""


class PlanError(ImpqError):
    """A precision plan does not fit the model or is malformed."""


class ConfigError(ImpqError):
    """A YAML/JSON configuration has an unknown key or a bad value."""
