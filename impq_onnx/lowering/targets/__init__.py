"""Output targets: the registry of formats ``lower`` can write, one module per format.

- :mod:`.qdq`: standard QuantizeLinear / DequantizeLinear (the default).
- :mod:`.qonnx`: QONNX ``Quant`` nodes (domain ``qonnx.custom_op.general``).
- :mod:`.encodings`: a float model with on-grid weights plus a per-tensor / per-channel encodings JSON
  in the layout Qualcomm's converters read through ``--quantization_overrides``.
- :mod:`.qdq_int4`: QDQ with the weights of <= 4-bit layers stored as int4 (opset 21).
- :mod:`.packed`: QDQ with the weight codes bit-packed at their true width (accelerator toolchains);
  :mod:`.packed_folded` the same with batch-norm folded into the scales and biases.

Each derives its output from the QDQ-lowered graph, whose quantizers it finds by structure
(:mod:`impq_onnx.lowering.patterns`). A new format is a module with a :class:`Target` subclass and one
``register`` line below. What each keeps and loses is in its module docstring and in ``docs/lowering.md``.
"""

from impq_onnx.lowering.targets.base import (TARGETS, Target, get_target, register, target_help, target_names,
                                             unregister)
from impq_onnx.lowering.targets.encodings import EncodingsTarget, ToEncodingsPass, apply_encodings, encodings_of
from impq_onnx.lowering.targets.packed import PackedTarget
from impq_onnx.lowering.targets.packed_folded import PackedFoldedTarget
from impq_onnx.lowering.targets.ort import OrtTarget
from impq_onnx.lowering.targets.qdq import QdqTarget
from impq_onnx.lowering.targets.qdq_int4 import QdqInt4Target
from impq_onnx.lowering.targets.qonnx import QONNX_DOMAIN, QonnxTarget, ToQonnxPass, qonnx_as_standard_ops

__all__ = ["Target", "TARGETS", "register", "unregister", "get_target", "target_names", "target_help", "QdqTarget",
           "QonnxTarget", "EncodingsTarget", "ToQonnxPass", "qonnx_as_standard_ops", "QONNX_DOMAIN",
           "ToEncodingsPass", "encodings_of", "apply_encodings", "PackedTarget", "PackedFoldedTarget",
           "QdqInt4Target"]

register(QdqTarget())
register(QonnxTarget())
register(EncodingsTarget())
register(PackedTarget())
register(PackedFoldedTarget())
register(QdqInt4Target())
register(OrtTarget())
