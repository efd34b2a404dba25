"""Deployment targets other than plain QDQ, each derived from the QDQ-lowered graph.

- :mod:`.qonnx`: QONNX ``Quant`` nodes (domain ``qonnx.custom_op.general``).
- :mod:`.encodings`: a float model with on-grid weights plus a per-tensor / per-channel encodings JSON
  in the layout Qualcomm's converters read through ``--quantization_overrides``.

What each keeps and loses is in its module docstring and in ``docs/lowering.md``.
"""

from impq_onnx.lowering.targets.encodings import ToEncodingsPass, apply_encodings, encodings_of
from impq_onnx.lowering.targets.qonnx import QONNX_DOMAIN, ToQonnxPass, qonnx_as_standard_ops

__all__ = ["ToQonnxPass", "qonnx_as_standard_ops", "QONNX_DOMAIN", "ToEncodingsPass", "encodings_of",
           "apply_encodings"]
