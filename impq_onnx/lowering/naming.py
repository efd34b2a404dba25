"""Every tensor and node name the lowering passes and targets invent, spelled once.

The names are derived from the model's own names (a weight initializer, a layer node, an activation
tensor), so that a reader of the lowered model can tell what each new tensor stands for. Only the passes
that *create* tensors use these functions; the targets find what they rewrite by graph structure
(:mod:`impq_onnx.lowering.patterns`), so they also convert a QDQ model whose names were made by another
tool. Changing a spelling here changes the bytes of every lowered model.
"""

from __future__ import annotations

__all__ = ["weight_names", "weight_nodes", "activation_names", "activation_nodes", "bias_names", "bits_vector",
           "BITS_VECTOR_SUFFIX", "bitwidth", "packed_names", "unpacked_names", "UNPACK_NODE", "quant_node",
           "layer_input", "expansion_prefix", "folded_names", "width_group", "requantized_names"]

BITS_VECTOR_SUFFIX = "_impq_bits"


def weight_names(weight: str) -> dict[str, str]:
    """Tensors made for weight initializer ``weight``: its integer codes, their DequantizeLinear parameters,
    the float-kernel residual and the float weight the layer reads."""
    return {
        "codes": f"{weight}_quantized",
        "scale": f"{weight}_scale",
        "zero_point": f"{weight}_zero_point",
        "dequantized": f"{weight}_dequantized",
        "float_kernels": f"{weight}_float_kernels",
        "weight": f"{weight}_lowered",
    }


def weight_nodes(layer: str) -> dict[str, str]:
    """Nodes made for the weight of layer node ``layer``."""
    return {"dequantize": f"{layer}/weight_dq", "float_kernels": f"{layer}/weight_float_kernels",
            "quant": f"{layer}/weight_quant"}


def packed_names(weight: str, layer: str) -> dict[str, str]:
    """The bit-packed codes of weight ``weight`` (packed target): their per-kernel table and unpacking node."""
    return {"table": f"{weight}_packed_table", "node": f"{layer}/weight_unpack"}


UNPACK_NODE = "impq/unpack_bits"  # the one UnpackBits node of a packed model


def unpacked_names(weight: str) -> dict[str, str]:
    """The standard ops that stand in for output ``weight`` of the packed ``UnpackBits`` when verifying: the
    codes (when the annotation does not name them), their DequantizeLinear, and the zero ``Add`` of wide codes."""
    return {"codes": f"{weight}_codes", "dequantized": f"{weight}_dequantized", "zeros": f"{weight}_zeros",
            "dequantize": f"{weight}/dequantize", "zeros_add": f"{weight}/zeros"}


def activation_names(tensor: str) -> dict[str, str]:
    """Tensors made for the activation site ``tensor``."""
    return {
        "clipped": f"{tensor}_clipped",
        "clip_min": f"{tensor}_clip_min",
        "clip_max": f"{tensor}_clip_max",
        "scale": f"{tensor}_scale",
        "zero_point": f"{tensor}_zero_point",
        "quantized": f"{tensor}_quantized",
        "dequantized": f"{tensor}_dequantized",
    }


def activation_nodes(tensor: str) -> dict[str, str]:
    """Nodes made for the activation site ``tensor``."""
    return {"clip": f"{tensor}/clip", "quantize": f"{tensor}/quantize", "dequantize": f"{tensor}/dequantize"}


def bias_names(bias: str, output: str, layer: str) -> dict[str, str]:
    """A Conv bias moved into an ``Add``: the channel-shaped bias, the Conv's output without it, the Add."""
    return {"channels": f"{bias}_channels", "with_bias": f"{output}_with_bias",
            "without_bias": f"{output}_without_bias", "add": f"{layer}/bias"}


def bits_vector(tensor: str) -> str:
    """The initializer holding the per-kernel bit widths of annotated ``tensor``."""
    return f"{tensor}{BITS_VECTOR_SUFFIX}"


def bitwidth(tensor: str) -> str:
    """The bit-width input of the QONNX ``Quant`` of ``tensor``."""
    return f"{tensor}_bitwidth"


def quant_node(tensor: str) -> str:
    """The QONNX ``Quant`` node of the activation ``tensor``."""
    return f"{tensor}/quant"


def layer_input(tensor: str) -> dict[str, str]:
    """The ``Identity`` that gives the quantized layers their own copy of ``tensor`` (encodings target)."""
    return {"value": f"{tensor}_layer_input", "node": f"{tensor}/layer_input"}


def expansion_prefix(name: str, kind: str) -> str:
    """Prefix of the standard ops that stand in for a node or encoding ``name`` when verifying (``kind``:
    ``std`` for a QONNX Quant, ``encoding`` for an applied encoding)."""
    return f"{name}/{kind}"


def folded_names(layer: str) -> dict[str, str]:
    """Tensors and nodes made for layer node ``layer`` by the onnxruntime target: the batch-norm-folded float
    bias, and its int32 codes with their DequantizeLinear."""
    return {"bias": f"{layer}_folded_bias", "bias_codes": f"{layer}_bias_quantized",
            "bias_scale": f"{layer}_bias_scale", "bias_zero_point": f"{layer}_bias_zero_point",
            "bias_dequantized": f"{layer}_bias_dequantized", "bias_dequantize": f"{layer}/bias_dq"}


def requantized_names(tensor: str) -> dict[str, str]:
    """The lossless ``QuantizeLinear -> DequantizeLinear`` the onnxruntime target puts on ``tensor``, whose values
    are on a quantizer's grid already (moved through Slice/Pad/Reshape...), so that the op reading it fuses."""
    return {"quantized": f"{tensor}_requantized", "dequantized": f"{tensor}_redequantized",
            "quantize": f"{tensor}/requantize", "dequantize": f"{tensor}/redequantize"}


def width_group(layer: str, bits: int) -> dict[str, str]:
    """Nodes and tensors of the kernels of layer node ``layer`` that share the container width ``bits`` (QONNX)."""
    p = f"{layer}/weight_w{bits}"
    return {"indices": f"{p}_indices", "gather": f"{p}_gather", "scale_gather": f"{p}_scale_gather",
            "bitwidth": f"{p}_bitwidth", "quant": f"{p}_quant", "concat": f"{layer}/weight_concat",
            "order": f"{layer}/weight_order", "reorder": f"{layer}/weight_reorder"}
