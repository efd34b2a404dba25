"""QONNX target: the QDQ-lowered graph rewritten with QONNX ``Quant`` nodes (``qonnx.custom_op.general``).

``Quant(X, scale, zeropt, bitwidth; signed, narrow, rounding_mode)`` computes
``(round(clamp(X/scale + zeropt, min, max)) - zeropt) * scale`` (QONNX reference implementation).

Weights: the initializer ``<weight>_quantized`` holds the float values already on each kernel's grid
(``code · scale``, bit-identical to the QDQ DequantizeLinear output), followed by ``Quant`` with the
per-channel scale (shape broadcast along the kernel axis), zero point 0, ``signed=1, narrow=1`` and a
bit width per channel (``channel_bitwidth=True``, the op allows tensors) or the layer's largest
(``channel_bitwidth=False``, for consumers such as FINN that need a scalar). The width is the integer
*container*: ``B+1`` for ``midrise-max`` (odd codes up to ``±(2^B - 1)``), ``B`` for ``symmetric-rms``
(``2`` for its 1-bit ``±step/2`` grid), ``B+1`` for ``pow2-std`` (codes down to ``-2^(B-1)``, outside a
narrow ``B``-bit range; ``2`` at 1 bit). Quant re-quantizing on-grid values returns them exactly.

Activations: ``Quant(x, step, 0, B; signed, narrow=0, rounding_mode="ROUND")``; ROUND is half to even,
and clamping before rounding to integer bounds equals rounding then clamping, so this is the
simulation's quantizer exactly (the ``[Clip] → Q → DQ`` chain is replaced by one node).

Kept: every value the model computes, per-channel scales, per-kernel container widths (with
``channel_bitwidth``). Lost in the graph itself: the midrise "odd codes only / no zero level" property
(a ``B``-bit midrise kernel looks like a ``(B+1)``-bit narrow-range one) and, with a scalar width, the
per-kernel widths; both stay in ``impq.*`` annotations and the sidecar. Float kernels inside a quantized
layer are an ``Add`` of a float tensor after the Quant (their codes are 0). Runtimes without the QONNX
custom ops cannot run the file; :func:`qonnx_as_standard_ops` gives an equivalent standard-op graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from impq_onnx.errors import ModelError
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.naming import bitwidth, expansion_prefix, quant_node, weight_names, weight_nodes
from impq_onnx.lowering.patterns import ActivationQuantizer, WeightQuantizer, activation_quantizers, weight_quantizers
from impq_onnx.lowering.targets.base import Array, Lowered, Target, planned_layer
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.schemes import weight_scheme

__all__ = ["ToQonnxPass", "QonnxTarget", "qonnx_as_standard_ops", "QONNX_DOMAIN", "container_bits"]

QONNX_DOMAIN = "qonnx.custom_op.general"


def container_bits(bits: int | None, scheme: str) -> int:
    """Bit width of a signed narrow-range integer that holds the kernel's codes: the scheme's ``container_bits``."""
    return weight_scheme(scheme).container_bits(bits)


def _register(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name in graph.initializers:
        graph.initializers.pop(name)
    value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
    graph.register_initializer(value)
    return value


def _swap(graph: ir.Graph, old_nodes: list[ir.Node], new: ir.Node, old_out: ir.Value, name: str) -> None:
    graph.insert_before(old_nodes[0], new)
    output = old_out.is_graph_output()
    old_out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    graph.remove(list(reversed(old_nodes)), safe=True)
    new.outputs[0].name = old_out.name if output else name  # a model output keeps its name
    new.outputs[0].dtype = ir.DataType.FLOAT
    new.outputs[0].shape = old_out.shape


class ToQonnxPass(ir.passes.InPlacePass):
    """Rewrite every QDQ weight and activation quantizer (found by structure) as a QONNX ``Quant`` node.

    ``plan`` and ``sites`` (None for a model quantized by another tool) give each kernel's container
    width and the float weight's name; without them the width is the stored integer type's.
    """

    def __init__(self, plan: PrecisionPlan | None = None, sites: SiteTable | None = None,
                 channel_bitwidth: bool = True):
        super().__init__()
        self.plan, self.sites = plan, sites
        self.channel_bitwidth = channel_bitwidth

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        weights, activations = weight_quantizers(graph), activation_quantizers(graph)
        for weight in weights:
            self._weight(graph, weight)
        for activation in activations:
            self._activation(graph, activation)
        modified = bool(weights or activations)
        if modified:
            model.opset_imports[QONNX_DOMAIN] = 1
        return ir.passes.PassResult(model, modified)

    def _weight(self, graph: ir.Graph, match: WeightQuantizer) -> None:
        codes, scale, zero, shape = match.arrays()
        values = codes.astype(np.float32)
        if zero.any():  # as DequantizeLinear computes it: the integer difference, then float
            values = (codes.astype(np.int64) - zero).astype(np.float32)
        grid = (values * scale).astype(np.float32)
        layer = planned_layer(self.sites, match.layer)
        signed = bool(np.iinfo(codes.dtype).min < 0)
        if layer is not None and self.plan is not None:
            widths = [container_bits(b, self.plan.weight_scheme) for b in self.plan.weights[layer.node]]
            narrow = 1
        else:  # the stored type's range, narrow when the codes never reach its far end
            widths = [codes.dtype.itemsize * 8] * codes.shape[match.axis]
            narrow = int(codes.min() > -(2 ** (widths[0] - 1)) if signed else codes.max() < 2 ** widths[0] - 1)
        width = (np.array(widths, np.float32).reshape(shape) if self.channel_bitwidth
                 else np.array(max(widths), np.float32))
        zero = zero.astype(np.float32) if zero.any() else np.array(0.0, np.float32)
        inputs = [_register(graph, match.codes.name, grid), _register(graph, match.scale.name, scale),
                  _register(graph, match.zero_point.name if match.zero_point is not None
                            else weight_names(match.codes.name)["zero_point"], zero),
                  _register(graph, bitwidth(layer.weight if layer is not None else match.codes.name), width)]
        quant = ir.node("Quant", inputs, {"signed": int(signed), "narrow": narrow, "rounding_mode": "ROUND"},
                        domain=QONNX_DOMAIN, name=weight_nodes(match.layer.name)["quant"])
        dq = match.dequantize
        _swap(graph, [dq], quant, dq.outputs[0], dq.outputs[0].name)

    @staticmethod
    def _activation(graph: ir.Graph, match: ActivationQuantizer) -> None:
        x, q, dq = match.input, match.quantize, match.dequantize
        zero_name = q.inputs[2].name
        inputs = [x, q.inputs[1], _register(graph, zero_name, np.array(float(match.zero_point), np.float32)),
                  _register(graph, bitwidth(x.name), np.array(match.bits, np.float32))]
        quant = ir.node("Quant", inputs, {"signed": int(match.signed), "narrow": 0, "rounding_mode": "ROUND"},
                        domain=QONNX_DOMAIN, name=quant_node(x.name))
        clip_bounds = match.clip.inputs[1:] if match.clip is not None else []
        _swap(graph, match.nodes, quant, dq.outputs[0], q.outputs[0].name)
        for value in clip_bounds:
            if value is not None and value.name in graph.initializers and not value.uses():
                graph.initializers.pop(value.name)


class QonnxTarget(Target):
    name = "qonnx"
    help = "QONNX Quant nodes"
    stores_codes = False

    def rewrite(self, model: ir.Model, plan: PrecisionPlan | None, sites: SiteTable | None,
                **options: object) -> dict[str, dict]:
        ToQonnxPass(plan, sites, channel_bitwidth=bool(options.get("channel_bitwidth", True)))(model)
        return {}

    def as_standard_ops(self, lowered: Lowered) -> onnx.ModelProto:
        return qonnx_as_standard_ops(lowered.proto)

    def activation_range(self, lowered: Lowered, site: str, entry: dict,
                         array: Array) -> tuple[int, int, float] | None:
        producer = next((n for n in lowered.proto.graph.node if entry["tensor"] in n.output), None)
        if producer is None:
            return None
        scale = float(array(producer.input[1]).reshape(()))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in producer.attribute}
        width = int(array(producer.input[3]).reshape(()))
        if attrs.get("signed", 1):
            return -(2 ** (width - 1)) + int(attrs.get("narrow", 0)), 2 ** (width - 1) - 1, scale
        return 0, 2**width - 1 - int(attrs.get("narrow", 0)), scale


def qonnx_as_standard_ops(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a QONNX model with each ``Quant`` replaced by Div/Add/Min/Max/Round/Sub/Mul (same values).

    Used to run QONNX output in onnxruntime for verification; needs constant scale, zero point and width.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "Quant" or node.domain != QONNX_DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        signed, narrow = attrs.get("signed", 1), attrs.get("narrow", 0)
        if attrs.get("rounding_mode", b"ROUND") not in (b"ROUND", "ROUND"):
            raise ModelError(f"QONNX Quant node '{node.name}': rounding_mode {attrs['rounding_mode']!r} is not "
                             "supported; use ROUND")
        width = numpy_helper.to_array(inits[node.input[3]]).astype(np.float64)
        lo = np.where(signed, -(2.0 ** (width - 1)) + (1 if narrow else 0), 0.0).astype(np.float32)
        hi = np.where(signed, 2.0 ** (width - 1) - 1, 2.0**width - 1 - (1 if narrow else 0)).astype(np.float32)
        p = expansion_prefix(node.name, "std")
        graph.initializer.extend([numpy_helper.from_array(lo, f"{p}/lo"), numpy_helper.from_array(hi, f"{p}/hi")])
        x, scale, zp = node.input[0], node.input[1], node.input[2]
        nodes += [
            helper.make_node("Div", [x, scale], [f"{p}/div"], name=f"{p}/Div"),
            helper.make_node("Add", [f"{p}/div", zp], [f"{p}/shift"], name=f"{p}/Add"),
            helper.make_node("Min", [f"{p}/shift", f"{p}/hi"], [f"{p}/min"], name=f"{p}/Min"),
            helper.make_node("Max", [f"{p}/min", f"{p}/lo"], [f"{p}/max"], name=f"{p}/Max"),
            helper.make_node("Round", [f"{p}/max"], [f"{p}/round"], name=f"{p}/Round"),
            helper.make_node("Sub", [f"{p}/round", zp], [f"{p}/int"], name=f"{p}/Sub"),
            helper.make_node("Mul", [f"{p}/int", scale], [node.output[0]], name=f"{p}/Mul"),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    for i, entry in enumerate(out.opset_import):
        if entry.domain == QONNX_DOMAIN:
            del out.opset_import[i]
            break
    return out
