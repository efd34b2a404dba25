"""Per-sample, per-kernel squared weight-gradient norms from a layer's input and output gradient.

A batched backward pass sums weight gradients over the batch; the sensitivity needs them per
sample (square first, then average). For a linear layer the per-sample weight gradient is a
function of that sample's layer input ``x_n`` and output gradient ``dy_n`` alone; each layer op
owns its rule (:mod:`impq_onnx.frontend.ops`: e.g. ``dW_n = x_n^T dy_n`` for Gemm/MatMul, a
per-kernel-offset batched matmul for Conv).

:func:`layer_geometry` reads what the rule needs from the ONNX node; :func:`kernel_square_norms`
returns ``[N, kernels]`` = ``sum over the kernel's weights of dW_n^2``.
:class:`NormGraph` builds the same sums as onnx nodes appended to the gradient graph (the fast
path's default); :func:`kernel_square_norms` is the numpy form (``rebuild="numpy"``) and the
reference the tests check the graph form against.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from impq_onnx.errors import ModelError
from impq_onnx.frontend.ops import LayerGeometry, LayerOp, layer_op

__all__ = ["LayerGeometry", "layer_geometry", "kernel_square_norms", "NormGraph"]


def _op(op_type: str, name: str) -> LayerOp:
    op = layer_op(op_type)
    if op is None:
        raise ModelError(f"layer '{name}': no per-sample weight gradient for {op_type}")
    return op


def layer_geometry(node: onnx.NodeProto, weight_shape: Sequence[int], kernel_axis: int) -> LayerGeometry:
    """What the per-sample weight gradient of ``node`` depends on (its op's :meth:`~LayerOp.geometry`)."""
    return _op(node.op_type, node.name).geometry(node, weight_shape, kernel_axis)


def kernel_square_norms(geometry: LayerGeometry, x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """``[N, kernels]``: per sample, the squared norm of each kernel's weight gradient."""
    return _op(geometry.op_type, geometry.op_type).kernel_square_norms(geometry, x, dy)


class NormGraph:
    """Appends to a gradient graph the nodes that sum per-sample squared gradient norms over a batch.

    The same quantities as :func:`kernel_square_norms` (summed over the batch), computed inside
    onnxruntime so that layer inputs and output gradients never leave it: per conv kernel offset a
    ``Slice`` of the padded (channels-last) input and one batched ``MatMul`` (MLAS, multi-threaded);
    a depthwise conv needs only ``Mul`` + ``ReduceSum``. Layer inputs and output gradients never
    leave onnxruntime (a few kilobytes per chunk come back instead of every activation twice), and
    onnxruntime's memory planner bounds the temporaries.
    """

    def __init__(self, graph: onnx.GraphProto, prefix: str, shapes: Mapping[str, list[int | None]] | None = None):
        """``shapes``: static shapes of the graph's tensors where known (they let slice ends be constants)."""
        self.graph = graph
        self.prefix = prefix
        self.shapes = shapes or {}
        self._count = 0
        self._consts: dict[tuple, str] = {}  # one initializer per distinct value: a smaller graph opens faster

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}/{self._count}"

    def const(self, values: Any, hint: str = "c") -> str:
        return self._const(np.asarray(values, np.int64), hint)

    def float_const(self, value: float, hint: str) -> str:
        return self._const(np.asarray(value, np.float32), hint)

    def _const(self, array: np.ndarray, hint: str) -> str:
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self._name(hint)
            self.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def shape(self, tensor: str) -> list[int | None] | None:
        return self.shapes.get(tensor)

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        output = output or self._name(op_type)
        self.graph.node.append(helper.make_node(op_type, inputs, [output], name=self._name(op_type + "_node"), **attrs))
        return output

    def square_sum(self, x: str, axes: list[int] | None, output: str | None = None) -> str:
        sq = self.op("Mul", [x, x])
        inputs = [sq] if axes is None else [sq, self.const(axes)]
        return self.op("ReduceSum", inputs, output, keepdims=0)

    def activation(self, grad: str, output: str) -> str:
        """Scalar: sum over the batch and the tensor of the squared gradient."""
        return self.square_sum(grad, None, output)

    def layer(self, geometry: LayerGeometry, x: str, dy: str, output: str) -> str:
        """``[kernels]``: sum over the batch of the per-sample squared kernel-gradient norms."""
        return _op(geometry.op_type, geometry.op_type).emit_kernel_square_norms(self, geometry, x, dy, output)
