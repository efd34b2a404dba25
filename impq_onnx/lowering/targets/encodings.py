"""Encodings target: a float model whose weights lie on their grids, plus an encodings JSON.

The JSON follows the layout Qualcomm's converters read through ``--quantization_overrides``
(AIMET "0.6.1" style)::

    {"version": "0.6.1",
     "activation_encodings": {tensor: [{bitwidth, dtype, is_symmetric, min, max, offset, scale}]},
     "param_encodings":      {weight: [one entry per output channel, same keys]},
     "excluded_layers": [], "quantizer_args": {...}}

with ``real = (q + offset) · scale`` for ``q`` in ``0 .. 2^bitwidth - 1``, ``min = offset · scale`` and
``max = (offset + 2^bitwidth - 1) · scale``. Weights are symmetric signed integers (``offset =
-2^(bitwidth-1)``) of the container width (``B+1`` for ``midrise-max`` and ``pow2-std``, ``B`` for ``symmetric-rms``, see
:func:`impq_onnx.lowering.targets.qonnx.container_bits`); the model's float weights are exactly ``code · scale``,
so a converter that re-quantizes them with these encodings recovers the codes exactly. Activations:
unsigned sites ``offset 0, [0, (2^B-1)·step]``; signed sites ``offset -2^(B-1)``; scale = the step.

An activation site that also feeds something other than its quantized layers (a residual ``Add``, a
graph output) is split by an ``Identity`` named ``<tensor>_layer_input``, and the encoding is keyed by
that name, so only the layers see quantized values, as in the simulation.

Kept: all values (as encodings), per-channel scales and container widths. Lost: the midrise odd-code
property and the per-kernel ``B`` itself (the container width is ``B+1``; ``B`` is in the sidecar);
float kernels inside a quantized layer get ``{"dtype": "float", "bitwidth": 32}`` channel entries,
which converters may not accept in a per-channel list; converters generally support only some widths
(for example 4, 8, 16) and may widen others, and a tool that recomputes the scale from ``min``/``max``
may differ from the exact step by one float32 rounding. The graph has no quantization nodes: it is
exact only together with the JSON (:func:`apply_encodings` applies it for verification).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.naming import expansion_prefix, layer_input, weight_names
from impq_onnx.lowering.patterns import (ActivationQuantizer, NoMatch, WeightQuantizer, activation_quantizers,
                                         constant_dequantizers, dequantized_constant, weight_quantizers)
from impq_onnx.lowering.targets.base import Array, Lowered, Target, planned_layer
from impq_onnx.lowering.targets.qonnx import container_bits
from impq_onnx.quant.plan import PrecisionPlan

__all__ = ["ToEncodingsPass", "EncodingsTarget", "encodings_of", "apply_encodings", "ENCODINGS_VERSION",
           "layer_input_name", "weight_axes"]

ENCODINGS_VERSION = "0.6.1"
SUFFIX = ".encodings"


def layer_input_name(match: ActivationQuantizer) -> str:
    """The tensor an activation encoding is keyed by (see the module docstring); QDQ-lowered graph."""
    x, head, out = match.input, match.nodes[0], match.dequantize.outputs[0]
    if out.is_graph_output():  # a quantized model output: the output itself carries the encoding
        return out.name
    others = [n for n in x.consumers() if n is not head]
    return layer_input(x.name)["value"] if others or x.is_graph_output() else x.name


def _entry(bitwidth: int, offset: int, scale: float, symmetric: bool) -> dict:
    s = np.float32(scale)
    return {"bitwidth": int(bitwidth), "dtype": "int", "is_symmetric": str(symmetric),
            "min": float(np.float32(offset) * s), "max": float(np.float32(offset + 2**bitwidth - 1) * s),
            "offset": int(offset), "scale": float(s)}


def _weight_entries(match: WeightQuantizer, plan: PrecisionPlan | None, sites: SiteTable | None) -> list[dict]:
    codes, scale, zero, _ = match.arrays()
    scales, zeros = scale.reshape(-1), np.broadcast_to(zero.reshape(-1), scale.reshape(-1).shape)
    layer = planned_layer(sites, match.layer)
    if layer is not None and plan is not None:
        entries = []
        for b, s in zip(plan.weights[layer.node], scales):
            if b is None:
                entries.append({"bitwidth": 32, "dtype": "float"})
            else:
                width = container_bits(b, plan.weight_scheme)
                entries.append(_entry(width, -(2 ** (width - 1)), s, True))
        return entries
    width, signed = codes.dtype.itemsize * 8, bool(np.iinfo(codes.dtype).min < 0)
    low = -(2 ** (width - 1)) if signed else 0
    return [_entry(width, low - int(z), s, signed and z == 0) for s, z in zip(scales, zeros)]


def encodings_of(qdq_model: ir.Model, plan: PrecisionPlan | None = None, sites: SiteTable | None = None) -> dict:
    """The encodings JSON (as a dict) of a QDQ model; call before :class:`ToEncodingsPass`.

    With ``plan`` and ``sites`` a kernel's width is its container width (float kernels get float
    entries); without them (a model from another tool) it is the stored integer type's.
    """
    graph = qdq_model.graph
    params = {_folded_name(graph, m, sites): _weight_entries(m, plan, sites) for m in weight_quantizers(graph)}
    activations = {}
    for m in activation_quantizers(graph):
        activations[layer_input_name(m)] = [_entry(m.bits, m.lo - m.zero_point, m.scale,
                                                   m.signed and m.zero_point == 0)]
    return {"version": ENCODINGS_VERSION, "activation_encodings": activations, "param_encodings": params,
            "excluded_layers": [], "quantizer_args": {"activation_bitwidth": "per-tensor", "param_bitwidth": "per-channel",
                                                      "dtype": "int", "per_channel_quantization": True}}


def _folded_name(graph: ir.Graph, match: WeightQuantizer, sites: SiteTable | None) -> str:
    """The float weight's own name where it is free (the project's lowering), else the value the layer read."""
    layer = planned_layer(sites, match.layer)
    if layer is None:
        return match.output.name
    return layer.weight if layer.weight not in graph.initializers else weight_names(layer.weight)["weight"]


def _pop(graph: ir.Graph, *values: ir.Value | None) -> None:
    for value in values:
        if value is not None and value.name in graph.initializers and not graph.initializers[value.name].uses():
            graph.initializers.pop(value.name)


class ToEncodingsPass(ir.passes.InPlacePass):
    """Fold weight DequantizeLinear into on-grid float weights and drop the activation Q/DQ chains."""

    def __init__(self, plan: PrecisionPlan | None = None, sites: SiteTable | None = None):
        super().__init__()
        self.plan, self.sites = plan, sites

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        weights, activations = weight_quantizers(graph), activation_quantizers(graph)
        for weight in weights:
            self._weight(graph, weight)
        for activation in activations:
            self._activation(graph, activation)
        constants = constant_dequantizers(graph)  # none in the project's lowering; a bias another tool quantized
        for dq in constants:
            self._constant(graph, dq)
        return ir.passes.PassResult(model, bool(weights or activations or constants))

    @staticmethod
    def _constant(graph: ir.Graph, dq: ir.Node) -> None:
        out, values = dq.outputs[0], dequantized_constant(dq)
        assert not isinstance(values, NoMatch), values  # constant_dequantizers matched it
        folded = ir.Value(name=out.name, const_value=ir.tensor(values, name=out.name))
        out.replace_all_uses_with(folded, replace_graph_outputs=True)
        inputs = list(dq.inputs)
        graph.remove(dq, safe=True)
        graph.register_initializer(folded)
        _pop(graph, *inputs)

    def _weight(self, graph: ir.Graph, match: WeightQuantizer) -> None:
        codes, scale, zero, _ = match.arrays()
        values = codes.astype(np.float32)
        if zero.any():  # as DequantizeLinear computes it: the integer difference, then float
            values = (codes.astype(np.int64) - zero).astype(np.float32)
        w = (values * scale).astype(np.float32)
        residual = None
        if match.residual is not None:
            add = match.residual
            residual = add.inputs[1] if add.inputs[0] is match.dequantize.outputs[0] else add.inputs[0]
            w = (w + residual.const_value.numpy()).astype(np.float32)
        name = _folded_name(graph, match, self.sites)
        value = ir.Value(name=name, const_value=ir.tensor(w, name=name))
        match.output.replace_all_uses_with(value)
        graph.remove(list(reversed(match.nodes)), safe=True)
        graph.register_initializer(value)
        _pop(graph, match.codes, match.scale, match.zero_point, residual)

    @staticmethod
    def _activation(graph: ir.Graph, match: ActivationQuantizer) -> None:
        key = layer_input_name(match)
        chain, x = match.nodes, match.input
        scale, zero = match.quantize.inputs[1], match.quantize.inputs[2]
        bounds = match.clip.inputs[1:] if match.clip is not None else []
        replacement, out = x, chain[-1].outputs[0]
        if key != x.name:
            identity = ir.node("Identity", [x], name=layer_input(x.name)["node"])
            typed = out if key == out.name else x  # a model output has a declared type
            identity.outputs[0].dtype, identity.outputs[0].shape = typed.dtype, typed.shape
            graph.insert_before(chain[0], identity)
            replacement = identity.outputs[0]
            if key != out.name:
                replacement.name = key
        out.replace_all_uses_with(replacement, replace_graph_outputs=True)
        graph.remove(list(reversed(chain)), safe=True)
        replacement.name = key  # a model output keeps its name, now that the DequantizeLinear is gone
        _pop(graph, scale, zero, *bounds)


class EncodingsTarget(Target):
    name = "encodings"
    help = "float model + per-channel encodings JSON for --quantization_overrides"
    stores_codes = False
    attachments = (SUFFIX,)

    def rewrite(self, model: ir.Model, plan: PrecisionPlan | None, sites: SiteTable | None,
                **options: object) -> dict[str, dict]:
        encodings = encodings_of(model, plan, sites)
        ToEncodingsPass(plan, sites)(model)
        return {SUFFIX: encodings}

    def as_standard_ops(self, lowered: Lowered) -> onnx.ModelProto:
        weights = (lowered.sidecar or {}).get("weights")
        axes = ({e["tensor"]: e["axis"] for e in weights.values()} if weights is not None
                else weight_axes(lowered.proto))
        return apply_encodings(lowered.proto, lowered.attachments[SUFFIX], axes)

    def weight_scales(self, lowered: Lowered, entry: dict, array: Array) -> np.ndarray:
        params = lowered.attachments[SUFFIX]["param_encodings"].get(entry["tensor"], [])
        return np.array([e.get("scale", 1.0) for e in params], np.float32)

    def activation_range(self, lowered: Lowered, site: str, entry: dict,
                         array: Array) -> tuple[int, int, float] | None:
        encodings = lowered.attachments[SUFFIX]["activation_encodings"]
        found = encodings.get(site) or encodings.get(layer_input(site)["value"])
        if found is None:
            return None
        e = found[0]
        return e["offset"], e["offset"] + 2 ** e["bitwidth"] - 1, e["scale"]


def weight_axes(proto: onnx.ModelProto) -> dict[str, int]:
    """The output-channel axis of each layer weight, from the layer's op (for a model without a sidecar)."""
    axes = {}
    for node in proto.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1:
            axes[node.input[1]] = 0
        elif node.op_type == "Gemm" and len(node.input) > 1:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            axes[node.input[1]] = 0 if attrs.get("transB", 0) else 1
        elif node.op_type == "MatMul" and len(node.input) > 1:
            axes[node.input[1]] = -1
    return axes


def apply_encodings(proto: onnx.ModelProto, encodings: dict, axes: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``proto`` with ``encodings`` applied as a converter would (for verification).

    Activations: ``x -> clamp(round(x/scale), offset, offset + 2^bw - 1) · scale`` for every consumer.
    Weights (``axes[weight]`` = channel axis): the same per channel, in numpy; float entries stay float.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    for init in graph.initializer:
        entries = encodings["param_encodings"].get(init.name)
        if entries is None:
            continue
        w = numpy_helper.to_array(init).astype(np.float32)
        moved = np.moveaxis(w, axes[init.name], 0).copy()
        for k, e in enumerate(entries):
            if e.get("dtype") == "int":
                s = np.float32(e["scale"])
                moved[k] = np.clip(np.rint(moved[k] / s), e["offset"], e["offset"] + 2 ** e["bitwidth"] - 1) * s
        init.CopyFrom(numpy_helper.from_array(np.moveaxis(moved, 0, axes[init.name]).astype(np.float32), init.name))
    nodes = list(graph.node)
    outputs = {o.name for o in graph.output}
    for tensor, (e,) in encodings["activation_encodings"].items():
        p = expansion_prefix(tensor, "encoding")
        lo, hi = float(e["offset"]), float(e["offset"] + 2 ** e["bitwidth"] - 1)
        graph.initializer.extend([numpy_helper.from_array(np.array(v, np.float32), f"{p}/{k}")
                                  for k, v in (("scale", e["scale"]), ("lo", lo), ("hi", hi))])
        source, result = tensor, f"{p}/out"
        if tensor in outputs:  # a quantized model output keeps its name: the last new node writes it
            source, result = f"{p}/in", tensor
            for node in nodes:
                node.output[:] = [source if name == tensor else name for name in node.output]
        for node in nodes:
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = result
        new = [helper.make_node("Div", [source, f"{p}/scale"], [f"{p}/div"], name=f"{p}/Div"),
               helper.make_node("Round", [f"{p}/div"], [f"{p}/round"], name=f"{p}/Round"),
               helper.make_node("Max", [f"{p}/round", f"{p}/lo"], [f"{p}/max"], name=f"{p}/Max"),
               helper.make_node("Min", [f"{p}/max", f"{p}/hi"], [f"{p}/int"], name=f"{p}/Min"),
               helper.make_node("Mul", [f"{p}/int", f"{p}/scale"], [result], name=f"{p}/Mul")]
        producer = next((i for i, n in enumerate(nodes) if source in n.output), -1)
        nodes[producer + 1:producer + 1] = new
    del graph.node[:]
    graph.node.extend(nodes)
    return out
