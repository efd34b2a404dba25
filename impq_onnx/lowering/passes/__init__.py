"""Lowering passes: small classes with an exact ``modified`` flag, run by ``onnx_ir.passes.PassManager``.

Each pass reads a precision plan and its site table and rewrites the canonical model towards the deployable
one; each pass is one module.
"""

from impq_onnx.lowering.passes.annotate_bits import AnnotateBitsPass
from impq_onnx.lowering.passes.quantize_activations import QuantizeActivationsPass
from impq_onnx.lowering.passes.quantize_weights import QuantizeWeightsPass
from impq_onnx.lowering.passes.split_conv_bias import SplitConvBiasPass

__all__ = ["QuantizeWeightsPass", "QuantizeActivationsPass", "AnnotateBitsPass", "SplitConvBiasPass"]
