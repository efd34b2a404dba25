"""impq-onnx: mixed-precision quantization of ONNX image classifiers by the IMPQ method.

Public API::

    model = impq_onnx.load("model.onnx")          # canonical form of any exported classifier
    sites = impq_onnx.find_sites(model, (1, 3, 224, 224))
    result = impq_onnx.compress("model.onnx", "images/", target_bits=5)   # CompressResult
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, so that ``impq-onnx`` can install its signal handlers before numpy and onnx load.
_EXPORTS = {
    "impq_onnx.compression": ("CompressConfig", "CompressResult", "compress"),
    "impq_onnx.errors": ("ConfigError", "DataError", "ImpqError", "ModelError", "PlanError"),
    "impq_onnx.frontend.canonical": ("CanonicalModel", "from_proto", "load"),
    "impq_onnx.frontend.sites": ("ActivationSite", "QuantLayer", "SiteTable", "WeightGroup"),
    "impq_onnx.frontend.site_analysis": ("find_sites",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'impq_onnx' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)


__version__ = "0.1.0"

__all__ = [
    "compress", "CompressConfig", "CompressResult", "load", "from_proto", "find_sites", "CanonicalModel", "SiteTable", "QuantLayer", "ActivationSite",
    "WeightGroup", "ImpqError", "ModelError", "DataError", "PlanError", "ConfigError", "__version__",
]
