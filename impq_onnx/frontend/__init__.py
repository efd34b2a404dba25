"""Stage 1, frontend: the model file, its canonical form, and the analysis of its quantization sites.

``load(path)`` reads an exported classifier as untrusted input (:mod:`.model_file`) and canonicalises it
(:mod:`.canonical`, passes in :mod:`.passes`); ``find_sites`` (:mod:`.site_analysis`, data in :mod:`.sites`) lists the weight groups and
activation sites that every later stage is keyed by; :mod:`.inspection` prints them. :mod:`.ops` is the
layer-op registry: what every stage needs to know about Conv, Gemm, MatMul, ConvTranspose (one module each).
"""

from __future__ import annotations

from impq_onnx.frontend.canonical import CanonicalModel, from_proto, load
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.frontend.sites import ActivationSite, BatchNormStats, QuantLayer, SiteTable, WeightGroup

__all__ = ["load", "from_proto", "CanonicalModel", "find_sites", "SiteTable", "QuantLayer", "ActivationSite",
           "BatchNormStats", "WeightGroup"]
