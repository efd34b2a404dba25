"""impq-onnx: mixed-precision quantization of ONNX image classifiers by the IMPQ method.

Public API::

    model = impq_onnx.load("model.onnx")          # canonical form of any exported classifier
    sites = impq_onnx.find_sites(model, (1, 3, 224, 224))
    result = impq_onnx.compress("model.onnx", "images/", target_bits=5)   # CompressResult
"""

from __future__ import annotations

from impq_onnx.compression import CompressConfig, CompressResult, compress
from impq_onnx.errors import (
    ConfigError,
    DataError,
    ImpqError,
    InternalError,
    ModelError,
    PlanError,
    PlatformError,
    UserError,
)
from impq_onnx.frontend.canonical import CanonicalModel, from_proto, load
from impq_onnx.frontend.sites import ActivationSite, QuantLayer, SiteTable, WeightGroup
from impq_onnx.frontend.site_analysis import find_sites

__version__ = "0.1.0"

__all__ = [
    "compress", "CompressConfig", "CompressResult", "load", "from_proto", "find_sites", "CanonicalModel", "SiteTable", "QuantLayer", "ActivationSite",
    "WeightGroup", "ImpqError", "UserError", "ModelError", "DataError", "PlanError", "ConfigError", "PlatformError",
    "InternalError", "__version__",
]
