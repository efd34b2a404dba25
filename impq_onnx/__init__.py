"""impq-onnx: mixed-precision quantization of ONNX image classifiers by the IMPQ method.

Public API (:mod:`impq_onnx.api`, reference in ``docs/api.md``)::

    result = impq_onnx.compress("model.onnx", "images/", output="model.impq.onnx", target_bits=5)
    result = impq_onnx.compress(onnx_model, (images, labels), output="out.onnx")   # in memory
    model = impq_onnx.load("model.onnx")          # canonical form of any exported classifier
    impq_onnx.inspect(model), impq_onnx.evaluate(model, data), impq_onnx.sensitivity(model, data),
    impq_onnx.lower(model, plan, output=...), impq_onnx.verify(lowered, model, plan, data),
    impq_onnx.report(work_dirs, "report.html")

The library prints nothing and configures no logging (its loggers, under ``impq_onnx``, have a
``NullHandler``); progress goes to a ``progress`` callback when one is given.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import Any

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Loaded on first use, so that ``impq-onnx`` can install its signal handlers before numpy and onnx load.
_EXPORTS = {
    "impq_onnx.api": ("load", "inspect", "evaluate", "sensitivity", "compress", "lower", "verify", "report",
                      "InspectResult", "EvalResult", "SensitivityTable", "LowerResult", "VerifyResult",
                      "ReportResult", "DEFAULT"),
    "impq_onnx.compression": ("CompressConfig", "CompressResult"),
    "impq_onnx.errors": ("ConfigError", "DataError", "ImpqError", "InternalError", "ModelError", "PlanError",
                         "PlatformError", "UserError", "VerificationError"),
    "impq_onnx.frontend.canonical": ("CanonicalModel", "from_proto"),
    "impq_onnx.frontend.sites": ("ActivationSite", "QuantLayer", "SiteTable", "WeightGroup"),
    "impq_onnx.frontend.site_analysis": ("find_sites",),
    "impq_onnx.quant.plan": ("PrecisionPlan",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'impq_onnx' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)


class _Package(types.ModuleType):
    """``impq_onnx.report`` and ``impq_onnx.sensitivity`` are the API functions, although subpackages share
    their names: importing a subpackage binds it on its parent, and this keeps the API name (the subpackage
    stays importable by its full name, ``from impq_onnx.report import write_report``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _MODULE_OF.get(name) == "impq_onnx.api":
            self.__dict__.pop(name, None)  # resolved by __getattr__ to the function
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__version__ = "0.1.0"

__all__ = [
    "load", "inspect", "evaluate", "sensitivity", "compress", "lower", "verify", "report", "CompressConfig",
    "CompressResult", "InspectResult", "EvalResult", "SensitivityTable", "LowerResult", "VerifyResult",
    "ReportResult", "DEFAULT", "PrecisionPlan", "from_proto", "find_sites", "CanonicalModel", "SiteTable",
    "QuantLayer", "ActivationSite", "WeightGroup", "ImpqError", "UserError", "ModelError", "DataError", "PlanError",
    "ConfigError", "PlatformError", "InternalError", "VerificationError", "__version__",
]
