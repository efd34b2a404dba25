"""``Gemm`` (``Y = alpha * A @ op(B) + beta * C`` with a constant 2-D ``B``) as a layer op.

Kernels are the output columns: weight axis 0 with ``transB=1`` (the PyTorch ``Linear`` export),
else axis 1. ``transA=1`` is not a quantizable layer. Per-sample weight gradient:
``dW_n[k] = alpha * dy_n[k] * x_n``, so ``|dW_n[k]|^2 = alpha^2 * dy_n[k]^2 * |x_n|^2``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from impq_onnx.errors import ModelError
from impq_onnx.frontend.ops.base import LayerGeometry, LayerOp, LayerShape, NormEmitter, const_array, proto_attributes

__all__ = ["GemmOp", "GemmGeometry"]


@dataclasses.dataclass(frozen=True)
class GemmGeometry(LayerGeometry):
    alpha: float = 1.0


class GemmOp(LayerOp):
    op_type = "Gemm"
    bias_input = 2
    linear_output = True

    def analyse(self, node: ir.Node, weight_shape: tuple[int, ...], in_shape: tuple[int, ...] | None,
                out_shape: tuple[int, ...]) -> LayerShape | None:
        if len(weight_shape) != 2 or ("transA" in node.attributes and node.attributes["transA"].value):
            return None
        trans_b = "transB" in node.attributes and bool(node.attributes["transB"].value)
        axis = 0 if trans_b else 1
        dot = weight_shape[1 - axis]
        bias = node.inputs[2].name if len(node.inputs) > 2 and const_array(node.inputs[2]) is not None else None
        return LayerShape(kernel_axis=axis, kernels=weight_shape[axis], groups=1, dot_length=int(dot),
                          macs=int(math.prod(out_shape[1:]) * dot), bias=bias, output=node.outputs[0].name)

    def geometry(self, node: onnx.NodeProto, weight_shape: Sequence[int], kernel_axis: int) -> LayerGeometry:
        attrs = proto_attributes(node)
        if attrs.get("transA", 0):
            raise ModelError(f"layer '{node.name}': Gemm with transA=1 is not supported by the sensitivity")
        return GemmGeometry("Gemm", tuple(weight_shape), kernel_axis, alpha=float(attrs.get("alpha", 1.0)))

    def kernel_square_norms(self, geometry: LayerGeometry, x: np.ndarray, dy: np.ndarray) -> np.ndarray:
        assert isinstance(geometry, GemmGeometry)
        n = x.shape[0]
        x2 = x.reshape(n, -1).astype(np.float64)
        d2 = dy.reshape(n, -1).astype(np.float64)
        return geometry.alpha ** 2 * d2 ** 2 * np.einsum("ni,ni->n", x2, x2)[:, None]

    def emit_kernel_square_norms(self, norms: NormEmitter, geometry: LayerGeometry, x: str, dy: str,
                                 output: str) -> str:
        assert isinstance(geometry, GemmGeometry)
        x_sq = norms.op("ReduceSum", [norms.op("Mul", [x, x]), norms.const([1])], keepdims=1)
        scaled = norms.op("Mul", [norms.op("Mul", [dy, dy]), x_sq])
        total = norms.op("ReduceSum", [scaled, norms.const([0])], keepdims=0)
        return norms.op("Mul", [total, norms.float_const(geometry.alpha**2, "alpha")], output)
