"""The one place that knows how to reach onnxruntime's training API without torch.

``import onnxruntime.training`` runs that package's ``__init__``, which imports its ``optim``
subpackage, which imports torch. The submodules this tool needs (``artifacts``, ``onnxblock``,
``api``) do not need torch, so we register an empty package object for ``onnxruntime.training``
that points at the real folder and import the submodules through it. If torch *is* importable
we simply use the regular import.

:func:`require_training_runtime` detects the dependency trap: plain ``onnxruntime`` and
``onnxruntime-training-cpu`` own the same ``onnxruntime`` module, so whichever pip installs last wins,
silently (``pip check`` passes). With plain onnxruntime on top, ``GradientGraphBuilder`` and the
``onnxruntime.training`` folder's native parts are gone. ``compress`` calls the check before any work,
the gradient builder and :func:`load` before they touch the training API. It is not run at import of
:mod:`impq_onnx.engine`: the CLI builds ``compress``'s options from modules that import it, and
``inspect``, ``evaluate``, ``lower`` and ``verify`` must work with mainline onnxruntime.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types

from impq_onnx.errors import PlatformError

__all__ = ["load", "require_training_runtime", "training_runtime_problem", "TrainingRuntimeError"]

TRAINING_DISTRIBUTION = "onnxruntime-training-cpu==1.19.2"


class TrainingRuntimeError(PlatformError):
    """The installed onnxruntime is not the training build: an environment error (exit code 5)."""


def training_runtime_problem() -> str | None:
    """Why the installed ``onnxruntime`` cannot train (one line with the fix), or None when it can."""
    try:
        import onnxruntime
        from onnxruntime.capi import _pybind_state
    except ImportError as exc:
        return f"onnxruntime cannot be imported ({exc}); install {TRAINING_DISTRIBUTION}"
    if hasattr(_pybind_state, "GradientGraphBuilder") and importlib.util.find_spec(_PACKAGE) is not None:
        return None
    owners = sorted(set(importlib.metadata.packages_distributions().get("onnxruntime", [])))
    installed = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in owners) or "unknown package"
    return (f"onnxruntime {onnxruntime.__version__} in {sys.prefix} is not the training build that compress and "
            f"sensitivity need (installed: {installed}; these share the 'onnxruntime' module and the last one "
            f"installed wins); fix: pip uninstall -y {' '.join(owners) or 'onnxruntime'} && pip install "
            f"{TRAINING_DISTRIBUTION}, or keep plain onnxruntime in a separate environment (inspect, evaluate, "
            "lower and verify work with it)")


def require_training_runtime() -> None:
    """Raise :class:`TrainingRuntimeError` (one line, how to fix it) unless onnxruntime is the training build."""
    problem = training_runtime_problem()
    if problem is not None:
        raise TrainingRuntimeError(problem)

_PACKAGE = "onnxruntime.training"


def _register_torchless_package() -> None:
    if _PACKAGE in sys.modules:
        return
    import onnxruntime

    require_training_runtime()
    spec = importlib.util.find_spec(_PACKAGE)
    assert spec is not None and spec.submodule_search_locations  # require_training_runtime found it
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

