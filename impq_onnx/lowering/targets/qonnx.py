"""QONNX target: the QDQ-lowered graph rewritten with QONNX ``Quant`` nodes (``qonnx.custom_op.general``).

``Quant(X, scale, zeropt, bitwidth; signed, narrow, rounding_mode)`` computes
``(round(clamp(X/scale + zeropt, min, max)) - zeropt) * scale`` (QONNX reference implementation).

Weights: the initializer ``<weight>_quantized`` holds the float values already on each kernel's grid
(``code · scale``, bit-identical to the QDQ DequantizeLinear output), followed by ``Quant`` with the
per-channel scale (shape broadcast along the kernel axis), zero point 0, ``signed=1, narrow=1`` and a
scalar bit width: qonnx 1.0.0's ``execute_onnx`` and datatype inference need a scalar. Per-kernel widths
(``channel_bitwidth=True``, the default): the kernels of each width are gathered (``Gather`` of the
grid and of the scale along the kernel axis, constant indices), quantized by one ``Quant`` of that width
each, concatenated and put back in their order by one more ``Gather``; all of it moves values without
arithmetic, so the output is the QDQ weight bit for bit, and each group's Quant gets its own datatype
(``INT<w>``) in qonnx's inference. A layer whose kernels share one width has a single Quant. With
``channel_bitwidth=False`` the layer's largest width is the one scalar (a single Quant, for consumers
such as FINN that want one per layer); the values are the same. The width is the integer
*container*: ``B+1`` for ``midrise-max`` (odd codes up to ``±(2^B - 1)``), ``B`` for ``symmetric-rms``
(``2`` for its 1-bit ``±step/2`` grid), ``B+1`` for ``pow2-std`` (codes down to ``-2^(B-1)``, outside a
narrow ``B``-bit range; ``2`` at 1 bit). Quant re-quantizing on-grid values returns them exactly.

Static batch (target option ``static_batch``, ``impq-onnx lower --static-batch N``): the model's input and
output batch dimension become ``N`` (qonnx's cleanup and execution need static shapes; without it
``qonnx-cleanup --override-inpsize`` is needed).

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
from impq_onnx.lowering.naming import bitwidth, expansion_prefix, quant_node, weight_names, weight_nodes, width_group
from impq_onnx.lowering.patterns import ActivationQuantizer, WeightQuantizer, activation_quantizers, weight_quantizers
from impq_onnx.lowering.targets.base import Array, Lowered, Target, planned_layer
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.schemes import weight_scheme

__all__ = ["ToQonnxPass", "QonnxTarget", "qonnx_as_standard_ops", "QONNX_DOMAIN", "container_bits", "static_batch"]

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
        zero = zero.astype(np.float32) if zero.any() else np.array(0.0, np.float32)
        inputs = [_register(graph, match.codes.name, grid), _register(graph, match.scale.name, scale),
                  _register(graph, match.zero_point.name if match.zero_point is not None
                            else weight_names(match.codes.name)["zero_point"], zero)]
        attrs = {"signed": int(signed), "narrow": narrow, "rounding_mode": "ROUND"}
        dq = match.dequantize
        if self.channel_bitwidth and len(set(widths)) > 1 and not zero.shape:
            last = _width_groups(graph, dq, match, inputs, widths, attrs)
        else:
            width = np.array(max(widths), np.float32)
            inputs.append(_register(graph, bitwidth(layer.weight if layer is not None else match.codes.name), width))
            last = ir.node("Quant", inputs, attrs, domain=QONNX_DOMAIN, name=weight_nodes(match.layer.name)["quant"])
        _swap(graph, [dq], last, dq.outputs[0], dq.outputs[0].name)

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


def _width_groups(graph: ir.Graph, dq: ir.Node, match: WeightQuantizer, inputs: list[ir.Value], widths: list[int],
                  attrs: dict) -> ir.Node:
    """One scalar-width Quant per group of kernels of equal width, concatenated and reordered; returns the last node."""
    grid, scale, zero = inputs
    axis, order, parts = match.axis, [], []
    for width in sorted(set(widths)):
        names = width_group(match.layer.name, width)
        kernels = [k for k, w in enumerate(widths) if w == width]
        order += kernels
        indices = _register(graph, names["indices"], np.array(kernels, np.int64))
        values = ir.node("Gather", [grid, indices], {"axis": axis}, name=names["gather"])
        scales = ir.node("Gather", [scale, indices], {"axis": axis}, name=names["scale_gather"])
        quant = ir.node("Quant", [values.outputs[0], scales.outputs[0], zero,
                                  _register(graph, names["bitwidth"], np.array(width, np.float32))],
                        attrs, domain=QONNX_DOMAIN, name=names["quant"])
        for node in (values, scales, quant):
            graph.insert_before(dq, node)
        parts.append(quant.outputs[0])
    names = width_group(match.layer.name, 0)
    concat = ir.node("Concat", parts, {"axis": axis}, name=names["concat"])
    graph.insert_before(dq, concat)
    inverse = _register(graph, names["order"], np.argsort(np.array(order, np.int64)).astype(np.int64))
    return ir.node("Gather", [concat.outputs[0], inverse], {"axis": axis}, name=names["reorder"])


def static_batch(model: ir.Model, batch: int) -> None:
    """Fix the first dimension of the graph inputs and outputs to ``batch`` (qonnx needs static shapes)."""
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is not None and len(value.shape) > 0:
            value.shape = ir.Shape([batch, *list(value.shape)[1:]])


def _dynamic_batch(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The batch dimension symbolic again (verify feeds batches of any size); intermediate shapes dropped."""
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 0:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del proto.graph.value_info[:]
    return proto


class QonnxTarget(Target):
    name = "qonnx"
    help = "QONNX Quant nodes"
    stores_codes = False

    def rewrite(self, model: ir.Model, plan: PrecisionPlan | None, sites: SiteTable | None,
                **options: object) -> dict[str, dict | bytes]:
        ToQonnxPass(plan, sites, channel_bitwidth=bool(options.get("channel_bitwidth", True)))(model)
        if options.get("static_batch"):
            static_batch(model, int(options["static_batch"]))  # type: ignore[call-overload]
        return {}

    def options_of(self, lowered: Lowered) -> dict[str, object]:
        dims = lowered.proto.graph.input[0].type.tensor_type.shape.dim if lowered.proto.graph.input else []
        return {"static_batch": dims[0].dim_value} if dims and dims[0].dim_value > 0 else {}

    def as_standard_ops(self, lowered: Lowered) -> onnx.ModelProto:
        return _dynamic_batch(qonnx_as_standard_ops(lowered.proto))

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
