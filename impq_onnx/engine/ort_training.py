"""The one place that knows how to reach onnxruntime's training API without torch.

``import onnxruntime.training`` runs that package's ``__init__``, which imports its ``optim``
subpackage, which imports torch. The submodules this tool needs (``artifacts``, ``onnxblock``,
``api``) do not need torch, so we register an empty package object for ``onnxruntime.training``
that points at the real folder and import the submodules through it. If torch *is* importable
we simply use the regular import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__all__ = ["load"]

_PACKAGE = "onnxruntime.training"


def _register_torchless_package() -> None:
    if _PACKAGE in sys.modules:
        return
    import onnxruntime

    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        from impq_onnx.errors import PlatformError

        raise PlatformError(
            f"onnxruntime {onnxruntime.__version__} has no training API: install "
            "onnxruntime-training-cpu==1.19.2 (and uninstall plain onnxruntime, which owns the same module)"
        )
    package = types.ModuleType(_PACKAGE)
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = _PACKAGE
    package.__spec__ = spec
    sys.modules[_PACKAGE] = package
    onnxruntime.training = package  # type: ignore[attr-defined]


def load() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """Return the ``(artifacts, api, onnxblock)`` modules of onnxruntime-training."""
    _register_torchless_package()
    artifacts_mod = importlib.import_module(f"{_PACKAGE}.artifacts")
    api_mod = importlib.import_module(f"{_PACKAGE}.api")
    onnxblock_mod = importlib.import_module(f"{_PACKAGE}.onnxblock")
    return artifacts_mod, api_mod, onnxblock_mod

