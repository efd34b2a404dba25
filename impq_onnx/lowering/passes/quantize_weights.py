"""Store every quantized layer weight as integer codes followed by a per-channel DequantizeLinear.

For a layer with at least one quantized kernel the float weight initializer ``W`` is replaced by::

    W_quantized (int8 | int16 | int32) ─► DequantizeLinear(scale per kernel, zero point 0, axis) ─► layer
                                          [─► Add(W_float_kernels) when some kernels stay float]

The codes are the exact integers of each kernel's ``B``-bit grid, from the plan's scheme
(:meth:`impq_onnx.quant.schemes.WeightScheme.integer_codes`); for the built-in schemes:

- ``midrise-max``: the levels are ``(r + 1/2)·step``, ``r`` in ``-2^(B-1) .. 2^(B-1)-1``. Stored as the
  odd integers ``c = 2r + 1`` in ``[-(2^B - 1), 2^B - 1]`` at scale ``step / 2``; ``c · (step/2)`` and
  ``(r + 1/2) · step`` are the same real number, so float32 gives the same bits.
- ``symmetric-rms``, ``B >= 2``: ``c = r`` in ``[-(2^(B-1) - 1), 2^(B-1) - 1]`` at scale ``step``.
- ``symmetric-rms``, ``B == 1``: ``c`` in ``{-1, +1}`` at scale ``step / 2`` (the zero-free 1-bit grid).
- ``pow2-std``, ``B >= 2``: ``c = r`` in ``[-2^(B-1), 2^(B-1) - 1]`` at scale ``step`` (a power of two).
- ``pow2-std``, ``B == 1``: ``c`` in ``{-1, +1}`` at scale ``step / 2`` (mid-rise ``±step/2``).

Storage type (one per tensor): int8 when every code fits (midrise up to 7 bits, symmetric-rms and
pow2-std up to 8: ``-128 .. 127`` is int8's two's-complement range);
otherwise int16 when the model's opset is >= 21 (DequantizeLinear-21 takes int16), else int32
(DequantizeLinear takes int32 since opset 10; per-axis since 13). An 8-bit midrise kernel needs
9-bit codes (odd values up to ±255), so it never fits int8 without losing exactness.

The statistic (per kernel; per layer for ``pow2-std``) is computed as the simulation computes it
(:func:`simulated_stats`), so the DequantizeLinear output equals the simulated weight bit for bit for
every scheme.

Kernels with bits ``None`` keep their float values: their codes are 0 (scale 1), and the float values
of just those kernels (zeros elsewhere) are added after the DequantizeLinear; ``x + 0 == x`` exactly.
A tensor stored wider than int8 always goes through that ``Add`` (a per-channel zero tensor when no
kernel is float): onnxruntime (1.19 to at least 1.32) fuses ``DequantizeLinear -> Conv -> [Relu] ->
QuantizeLinear`` into ``QLinearConv`` without checking the weight type and then rejects the graph for
int32 weights; a layer whose weight is not a DequantizeLinear output is never fused. (A scalar zero
would be removed by its no-op elimination; a per-channel one is not.)

Batch-norm is kept as it is (not folded), so bits, scales and the simulated arithmetic are unchanged.

The pass is idempotent: a layer whose weight input is no longer a float initializer is skipped.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from impq_onnx.errors import PlanError
from impq_onnx.quant.schemes import weight_scheme
from impq_onnx.lowering.naming import weight_names, weight_nodes
from impq_onnx.lowering.passes.plan_pass import PlanPass

__all__ = ["QuantizeWeightsPass", "KernelCodes", "kernel_codes", "simulated_stats", "code_bounds", "storage_dtype",
           "weight_names"]

logger = logging.getLogger(__name__)


def code_bounds(bits: int | None, scheme: str) -> tuple[int, int, bool]:
    """``(lo, hi, odd)`` of one kernel's stored codes: :meth:`impq_onnx.quant.schemes.WeightScheme.code_bounds`."""
    return weight_scheme(scheme).code_bounds(bits)


def storage_dtype(max_code: int, opset: int) -> np.dtype:
    """The narrowest DequantizeLinear input type that holds ``-(max_code + 1) <= code <= max_code`` at ``opset``
    (two's complement: ``max_code`` 127 is int8's ``-128 .. 127``)."""
    if max_code <= 127:
        return np.dtype(np.int8)
    if max_code <= 32767 and opset >= 21:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


@dataclasses.dataclass(frozen=True)
class KernelCodes:
    """One layer weight as integer codes: ``W_q = codes · scale[k] (+ residual)`` along ``axis``."""

    codes: np.ndarray  # integer, the weight's shape
    scale: np.ndarray  # float32, one per kernel (1.0 for float kernels)
    bits: tuple[int | None, ...]
    axis: int
    scheme: str
    residual: np.ndarray | None  # float32 values of the float kernels, zeros elsewhere; None if there are none

    def dequantized(self) -> np.ndarray:
        shape = [1] * self.codes.ndim
        shape[self.axis] = -1
        q = (self.codes.astype(np.float32) * self.scale.reshape(shape)).astype(np.float32)
        return q if self.residual is None else (q + self.residual).astype(np.float32)


def kernel_codes(w: np.ndarray, bits: list[int | None], axis: int, scheme: str, opset: int = 13,
                 stat: np.ndarray | None = None) -> KernelCodes:
    """The integer codes of the scheme's ``quantize`` (same float32 arithmetic), stored in the narrowest type.

    ``stat`` (per kernel, or one value for ``pow2-std``) overrides the numpy statistic; see :func:`simulated_stats`.
    """
    w = np.asarray(w, np.float32)
    codes, scale = weight_scheme(scheme).integer_codes(w, bits, axis, stat)
    residual = None
    if any(b is None for b in bits):
        shape = [1] * w.ndim
        shape[axis] = w.shape[axis]
        floating = np.array([b is None for b in bits]).reshape(shape)
        residual = np.where(floating, w, np.float32(0)).astype(np.float32)
    max_code = max((max(-a - 1, b) for a, b, _ in (code_bounds(x, scheme) for x in bits)), default=0)
    codes = codes.astype(storage_dtype(max_code, opset))
    return KernelCodes(codes, scale, tuple(bits), axis, scheme, residual)


def simulated_stats(weights: dict[str, tuple[np.ndarray, int]], scheme: str, opset: int) -> dict[str, np.ndarray]:
    """Per-kernel (``pow2-std``: per-layer) statistics computed by the same onnxruntime ops the simulation uses;
    empty for a scheme whose numpy statistic is already exact (``exact_statistic``: ``midrise-max``).

    ``max|w|`` is exact in any order, so numpy gives the simulation's value. ``RMS(w)`` and the layer's
    standard deviation are sums, and numpy and onnxruntime sum in different orders (up to 1 ulp apart);
    running the simulation's ops (the scheme's ``build_statistic``) in onnxruntime gives
    the statistic the simulated model used, bit for bit.
    """
    if not weights or weight_scheme(scheme).exact_statistic:
        return {}
    from onnx import TensorProto, helper

    from impq_onnx.quant.quantizers import GraphBuilder
    from impq_onnx.runtime import inference_session

    g = GraphBuilder("stat", max(opset, 13))
    outputs = []
    for name, (w, axis) in weights.items():
        inp = g.const(w, "w")
        outputs.append(helper.make_tensor_value_info(weight_scheme(scheme).build_statistic(g, inp, w.ndim, axis),
                                                     TensorProto.FLOAT, None))
    graph = helper.make_graph(g.nodes, "stats", [], outputs, g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", g.opset)])
    proto.ir_version = 8
    values = inference_session(proto.SerializeToString(), threads=1).run(None, {})
    return dict(zip(weights, values))


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


class QuantizeWeightsPass(PlanPass):
    """Replace the float weights of quantized layers by integer codes + DequantizeLinear."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = default_opset(model)
        nodes = {node.name: node for node in graph}
        todo = []
        for layer in self.sites.layers:
            bits = self.plan.weights[layer.node]
            if all(b is None for b in bits):
                continue
            node = nodes.get(layer.node)
            if node is None:
                raise PlanError(f"weights: layer '{layer.node}' is not a node of the model")
            weight = node.inputs[layer.op.weight_input]
            if weight is None or weight.const_value is None or weight.const_value.dtype != ir.DataType.FLOAT:
                continue  # already lowered
            todo.append((node, weight, bits, layer.kernel_axis))
        for node, weight, bits, axis in todo:  # one layer at a time: peak memory stays one layer's worth
            stat = simulated_stats({node.name: (weight.const_value.numpy(), axis)}, self.plan.weight_scheme, opset)
            self._lower_layer(graph, node, weight, bits, axis, opset, stat.get(node.name))
        return ir.passes.PassResult(model, bool(todo))

    def _lower_layer(self, graph: ir.Graph, node: ir.Node, weight: ir.Value, bits, axis: int, opset: int,
                     stat: np.ndarray | None) -> None:
        codes = kernel_codes(weight.const_value.numpy(), bits, axis, self.plan.weight_scheme, opset, stat)
        names = weight_names(weight.name)
        node_names = weight_nodes(node.name)
        inputs = [
            _initializer(graph, names["codes"], codes.codes),
            _initializer(graph, names["scale"], codes.scale),
            _initializer(graph, names["zero_point"], np.zeros(codes.scale.shape, codes.codes.dtype)),
        ]
        residual = codes.residual
        if residual is None and codes.codes.dtype != np.int8:
            shape = [1] * codes.codes.ndim
            shape[axis] = codes.codes.shape[axis]
            residual = np.zeros(shape, np.float32)  # see the module docstring: keeps wide codes out of int8 kernels
        last_name = names["dequantized"] if residual is not None else names["weight"]
        dq = ir.node("DequantizeLinear", inputs, {"axis": axis}, name=node_names["dequantize"])
        dq.outputs[0].name = last_name
        new_nodes = [dq]
        if residual is not None:
            residual = _initializer(graph, names["float_kernels"], residual)
            add = ir.node("Add", [dq.outputs[0], residual], name=node_names["float_kernels"])
            add.outputs[0].name = names["weight"]
            new_nodes.append(add)
        out = new_nodes[-1].outputs[0]
        out.dtype = ir.DataType.FLOAT
        out.shape = ir.Shape(codes.codes.shape)
        graph.insert_before(node, new_nodes)
        node.replace_input_with(list(node.inputs).index(weight), out)
        if not weight.uses() and weight.name in graph.initializers and not weight.is_graph_input():
            graph.initializers.pop(weight.name)
        logger.debug("%s: %s codes for %d kernels", node.name, codes.codes.dtype, len(bits))
