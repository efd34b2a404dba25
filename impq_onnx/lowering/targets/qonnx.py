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

from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.schemes import weight_scheme
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.passes.quantize_activations import activation_names
from impq_onnx.lowering.passes.quantize_weights import weight_names
from impq_onnx.lowering.passes.plan_pass import PlanPass

__all__ = ["ToQonnxPass", "qonnx_as_standard_ops", "QONNX_DOMAIN", "container_bits"]

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


def _node_named(graph: ir.Graph, name: str) -> ir.Node | None:
    return next((n for n in graph if n.name == name), None)


def _swap(graph: ir.Graph, old_nodes: list[ir.Node], new: ir.Node, old_out: ir.Value, name: str) -> None:
    graph.insert_before(old_nodes[0], new)
    old_out.replace_all_uses_with(new.outputs[0])
    graph.remove(list(reversed(old_nodes)), safe=True)
    new.outputs[0].name = name
    new.outputs[0].dtype = ir.DataType.FLOAT
    new.outputs[0].shape = old_out.shape


class ToQonnxPass(PlanPass):
    """Rewrite the QDQ weight and activation quantizers of a lowered model as QONNX ``Quant`` nodes."""

    def __init__(self, plan: PrecisionPlan, sites: SiteTable, channel_bitwidth: bool = True):
        super().__init__(plan, sites)
        self.channel_bitwidth = channel_bitwidth

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for layer in self.sites.layers:
            dq = _node_named(graph, f"{layer.node}/weight_dq")
            if dq is not None and dq.op_type == "DequantizeLinear":
                self._weight(graph, dq, layer)
                modified = True
        for site in self.sites.activations:
            q = _node_named(graph, f"{site.tensor}/quantize")
            if q is not None and q.op_type == "QuantizeLinear":
                self._activation(graph, site.tensor, q)
                modified = True
        if modified:
            model.opset_imports[QONNX_DOMAIN] = 1
        return ir.passes.PassResult(model, modified)

    def _weight(self, graph: ir.Graph, dq: ir.Node, layer) -> None:
        names = weight_names(layer.weight)
        codes = graph.initializers[names["codes"]].const_value.numpy()
        shape = [1] * codes.ndim
        shape[layer.kernel_axis] = -1
        scale = graph.initializers[names["scale"]].const_value.numpy().reshape(shape)
        grid = (codes.astype(np.float32) * scale).astype(np.float32)
        widths = [container_bits(b, self.plan.weight_scheme) for b in self.plan.weights[layer.node]]
        bitwidth = (np.array(widths, np.float32).reshape(shape) if self.channel_bitwidth
                    else np.array(max(widths), np.float32))
        inputs = [_register(graph, names["codes"], grid), _register(graph, names["scale"], scale),
                  _register(graph, names["zero_point"], np.array(0.0, np.float32)),
                  _register(graph, f"{layer.weight}_bitwidth", bitwidth)]
        quant = ir.node("Quant", inputs, {"signed": 1, "narrow": 1, "rounding_mode": "ROUND"},
                        domain=QONNX_DOMAIN, name=f"{layer.node}/weight_quant")
        _swap(graph, [dq], quant, dq.outputs[0], dq.outputs[0].name)

    def _activation(self, graph: ir.Graph, tensor: str, q: ir.Node) -> None:
        names = activation_names(tensor)
        chain = [q, *q.outputs[0].consumers()]
        clip = q.inputs[0].producer()
        if clip is not None and clip.name == f"{tensor}/clip":
            chain.insert(0, clip)
        x = chain[0].inputs[0]
        dq = chain[-1]
        bits = self.plan.activations[tensor]
        signed = self.plan.clips[tensor].signed
        inputs = [x, graph.initializers[names["scale"]],
                  _register(graph, names["zero_point"], np.array(0.0, np.float32)),
                  _register(graph, f"{tensor}_bitwidth", np.array(bits, np.float32))]
        quant = ir.node("Quant", inputs, {"signed": int(signed), "narrow": 0, "rounding_mode": "ROUND"},
                        domain=QONNX_DOMAIN, name=f"{tensor}/quant")
        _swap(graph, chain, quant, dq.outputs[0], names["quantized"])
        for key in ("clip_min", "clip_max"):
            if names[key] in graph.initializers and not graph.initializers[names[key]].uses():
                graph.initializers.pop(names[key])


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
            raise ValueError(f"{node.name}: only rounding_mode ROUND is supported")
        width = numpy_helper.to_array(inits[node.input[3]]).astype(np.float64)
        lo = np.where(signed, -(2.0 ** (width - 1)) + (1 if narrow else 0), 0.0).astype(np.float32)
        hi = np.where(signed, 2.0 ** (width - 1) - 1, 2.0**width - 1 - (1 if narrow else 0)).astype(np.float32)
        p = f"{node.name}/std"
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
