"""``MatMul`` with a constant 2-D right operand ``W[K_in, K_out]`` as a layer op.

Kernels are the output columns (weight axis 1); a constant ``Add`` that alone reads the output is
the layer's bias, and the tensor after it is the layer's output. Per-sample weight gradient:
``dW_n = sum_t x[n, t]^T dy[n, t]`` (summed over any middle axes; one outer product for 2-D inputs).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from impq_onnx.frontend.ops.base import LayerGeometry, LayerOp, LayerShape, NormEmitter

__all__ = ["MatMulOp"]


class MatMulOp(LayerOp):
    op_type = "MatMul"
    linear_output = True

    def analyse(self, node: ir.Node, weight_shape: tuple[int, ...], in_shape: tuple[int, ...] | None,
                out_shape: tuple[int, ...]) -> LayerShape | None:
        if len(weight_shape) != 2:
            return None
        bias, after = _bias_after(node)
        dot = weight_shape[0]
        return LayerShape(kernel_axis=1, kernels=weight_shape[1], groups=1, dot_length=int(dot),
                          macs=int(math.prod(out_shape[1:]) * dot), bias=bias, output=after.name)

    def geometry(self, node: onnx.NodeProto, weight_shape: Sequence[int], kernel_axis: int) -> LayerGeometry:
        return LayerGeometry("MatMul", tuple(weight_shape), kernel_axis)

    def kernel_square_norms(self, geometry: LayerGeometry, x: np.ndarray, dy: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if x.ndim == 2:
            x2 = x.reshape(n, -1).astype(np.float64)
            d2 = dy.reshape(n, -1).astype(np.float64)
            return 1.0 * d2 ** 2 * np.einsum("ni,ni->n", x2, x2)[:, None]
        xs = x.reshape(n, -1, x.shape[-1])
        ds = dy.reshape(n, -1, dy.shape[-1])
        g = np.matmul(xs.transpose(0, 2, 1), ds)
        return np.einsum("nik,nik->nk", g, g, dtype=np.float64)

    def emit_kernel_square_norms(self, norms: NormEmitter, geometry: LayerGeometry, x: str, dy: str,
                                 output: str) -> str:
        k_in, k_out = geometry.weight_shape
        xs = norms.op("Reshape", [x, norms.const([0, -1, k_in])])
        ds = norms.op("Reshape", [dy, norms.const([0, -1, k_out])])
        grad = norms.op("MatMul", [norms.op("Transpose", [xs], perm=[0, 2, 1]), ds])
        return norms.square_sum(grad, [0, 1], output)


def _bias_after(node: ir.Node) -> tuple[str | None, ir.Value]:
    out = node.outputs[0]
    consumers = list(out.consumers())
    if len(consumers) == 1 and consumers[0].op_type == "Add":
        add = consumers[0]
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        if other is not None and other.const_value is not None:
            return other.name, add.outputs[0]
    return None, out
