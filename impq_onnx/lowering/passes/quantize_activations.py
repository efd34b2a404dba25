"""Quantize every activation site with bits: ``[Clip] → QuantizeLinear → DequantizeLinear`` per layer input.

The simulation's activation quantizer (:mod:`impq_onnx.quant.quantizers`) is mid-tread with zero point 0::

    unsigned: step = c·2^-B,      q = step · clip(rint(clip(x, 0, c)/step), 0, 2^B - 1)
    signed:   step = c·2^-(B-1),  q = step · clip(rint(clip(x, -c, c)/step), -2^(B-1), 2^(B-1) - 1)

Lowered form: ``QuantizeLinear(scale=step, zero_point=0)`` to uint8 (unsigned) or int8 (signed), then
``DequantizeLinear`` with the same parameters. When ``B < 8`` the integer range is narrowed to
``[lo, hi]`` (the B-bit range) by a float ``Clip(x, lo·step, hi·step)`` *before* the QuantizeLinear,
so that Q and DQ stay adjacent (the form QDQ runtimes and toolchains pattern-match).

Why this equals the simulation exactly, value by value:

- Rounding: QuantizeLinear rounds half to even; the simulation's ``FakeQuant`` uses ``nearbyint``
  (half to even in the default rounding mode) and the numpy reference uses ``np.rint``. Both divide
  ``x / step`` in float32 with the same ``step`` (a float32 constant), so the integers agree.
- Range: ``c / step`` is exactly ``2^B`` (unsigned) or ``2^(B-1)`` (signed) because the step is the
  clip times a power of two. Inputs above ``(2^B - 1)·step`` give ``2^B - 1`` in both forms (the
  simulation rounds to at most ``2^B`` and then takes the top level down; the Clip caps the input at
  the top level, whose ratio to the step rounds to ``2^B - 1`` even if ``hi·step`` was rounded to
  float32). Below the range: uint8/int8 saturation or the Clip floor gives ``lo`` in both forms.
- For ``B == 8`` the int8/uint8 saturation range is already ``[lo, hi]``; no Clip is emitted.
- ``B > 8`` needs 16-bit QuantizeLinear (opset >= 21, int16/uint16); older opsets are refused.

The pass is idempotent: a site whose layers no longer read the original tensor is skipped.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from impq_onnx.errors import PlanError
from impq_onnx.quant.quantizers import activation_grid
from impq_onnx.lowering.naming import activation_names, activation_nodes
from impq_onnx.lowering.passes.plan_pass import PlanPass
from impq_onnx.lowering.passes.quantize_weights import default_opset

__all__ = ["QuantizeActivationsPass", "activation_dtype", "activation_names", "needs_clip"]

logger = logging.getLogger(__name__)

_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127),
           np.dtype(np.uint16): (0, 65535), np.dtype(np.int16): (-32768, 32767)}


def activation_dtype(bits: int, signed: bool, opset: int, tensor: str = "?") -> np.dtype:
    if bits <= 8:
        return np.dtype(np.int8 if signed else np.uint8)
    if opset >= 21:
        return np.dtype(np.int16 if signed else np.uint16)
    raise PlanError(f"activations['{tensor}']: {bits} bits need 16-bit QuantizeLinear (opset >= 21); "
                    f"the model has opset {opset}; use at most 8 bits or re-export with opset 21")


def needs_clip(bits: int, signed: bool, dtype: np.dtype) -> bool:
    _, lo, hi = activation_grid(bits, 1.0, signed)
    return (lo, hi) != _RANGES[np.dtype(dtype)]


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    for node in graph:
        for v in node.outputs:
            values[v.name] = v
    return values


class QuantizeActivationsPass(PlanPass):
    """Insert ``[Clip →] Q → DQ`` between each quantized activation site and the layers reading it."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = default_opset(model)
        values = _values_by_name(graph)
        order = {node.name: i for i, node in enumerate(graph)}
        nodes = {node.name: node for node in graph}
        modified = False
        for site in self.sites.activations:
            bits = self.plan.activations.get(site.tensor)
            if bits is None:
                continue
            clip = self.plan.clips[site.tensor]
            if clip.value is None:
                raise PlanError(f"clips['{site.tensor}']: no clip value; calibrate the clips before lowering")
            value = values.get(site.tensor)
            if value is None:
                raise PlanError(f"activations: tensor '{site.tensor}' is not in the model")
            readers = [(nodes[n], self.sites.layer(n).op.activation_input) for n in site.layers if n in nodes]
            readers = [(n, i) for n, i in readers if n.inputs[i] is value]
            if not readers:
                continue  # already lowered
            first = min((n for n, _ in readers), key=lambda n: order[n.name])
            out = self._insert(graph, first, value, bits, clip.value, clip.signed, opset)
            for reader, index in readers:
                reader.replace_input_with(index, out)
            modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _insert(graph: ir.Graph, before: ir.Node, x: ir.Value, bits: int, clip: float, signed: bool,
                opset: int) -> ir.Value:
        names = activation_names(x.name)
        node_names = activation_nodes(x.name)
        step, lo, hi = activation_grid(bits, clip, signed)
        dtype = activation_dtype(bits, signed, opset, x.name)
        scale = _const(graph, names["scale"], np.array(step, np.float32))
        zero = _const(graph, names["zero_point"], np.array(0, dtype))
        new_nodes = []
        source = x
        if needs_clip(bits, signed, dtype):
            low = _const(graph, names["clip_min"], np.array(np.float32(lo) * np.float32(step), np.float32))
            high = _const(graph, names["clip_max"], np.array(np.float32(hi) * np.float32(step), np.float32))
            clip_node = ir.node("Clip", [x, low, high], name=node_names["clip"])
            clip_node.outputs[0].name = names["clipped"]
            new_nodes.append(clip_node)
            source = clip_node.outputs[0]
        q = ir.node("QuantizeLinear", [source, scale, zero], name=node_names["quantize"])
        q.outputs[0].name = names["quantized"]
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=node_names["dequantize"])
        dq.outputs[0].name = names["dequantized"]
        new_nodes += [q, dq]
        for node in new_nodes:
            node.outputs[0].shape = x.shape
        q.outputs[0].dtype = ir.DataType.from_numpy(dtype)
        for node in new_nodes:
            if node is not q:
                node.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(before, new_nodes)
        logger.debug("%s: %d-bit %s activation, step %g", x.name, bits, "signed" if signed else "unsigned", step)
        return dq.outputs[0]
