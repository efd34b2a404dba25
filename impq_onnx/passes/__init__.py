"""Graph passes: small classes with an exact ``modified`` flag, run by ``onnx_ir.passes.PassManager``.

Canonicalisation passes live here beside the lowering passes; each pass is one module.
"""

from .float16_to_float32 import Float16ToFloat32Pass
from .name_nodes import NameNodesPass
from .strip_classifier_head import StripClassifierHeadPass

__all__ = ["Float16ToFloat32Pass", "NameNodesPass", "StripClassifierHeadPass"]
from .quantize_weights import QuantizeWeightsPass
from .quantize_activations import QuantizeActivationsPass
from .annotate_bits import AnnotateBitsPass

__all__ += ["QuantizeWeightsPass", "QuantizeActivationsPass", "AnnotateBitsPass"]
from .split_conv_bias import SplitConvBiasPass

__all__ += ["SplitConvBiasPass"]
