"""Encodings target: a float model whose weights lie on their grids, plus an AIMET encodings JSON.

The JSON is what Qualcomm's converters read through ``--quantization_overrides``, in AIMET's version
0.6.1 (default), 1.0.0 or 2.0.0 (target option ``encodings_version``); the three layouts, how each
kernel's grid is stated in each, what is widened (weights, exactly) and what is refused (activation
widths a version cannot state, float kernels in a per-tensor encoding) are in
:mod:`impq_onnx.lowering.targets.encodings_versions`. The model's float weights are exactly
``code · scale``, so a converter that re-quantizes them with these encodings recovers them exactly.
Activations: unsigned sites ``[0, (2^B-1)·step]``, signed sites ``[-2^(B-1)·step, (2^(B-1)-1)·step]``;
scale = the step.

An activation site that also feeds something other than its quantized layers (a residual ``Add``, a
graph output) is split by an ``Identity`` named ``<tensor>_layer_input``, and the encoding is keyed by
that name, so only the layers see quantized values, as in the simulation.

Kept: all values (as encodings), per-channel scales. Lost: per-kernel ``B`` where a version widens it
(it is in the sidecar). Converters generally support only some widths (for example 4, 8, 16) and may
widen others; a tool that recomputes the scale from ``min``/``max`` (0.6.1) may differ from the exact
step by one float32 rounding. The graph has no quantization nodes: it is exact only together with the
JSON (:func:`apply_encodings` applies it for verification).
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
from impq_onnx.lowering.passes.quantize_weights import code_bounds
from impq_onnx.lowering.targets.base import Array, Lowered, Target, planned_layer
from impq_onnx.lowering.targets.encodings_versions import (ActivationGrid, Encoding, KernelGrid, activation_width,
                                                           read_version, write_version)
from impq_onnx.quant.plan import PrecisionPlan

__all__ = ["ToEncodingsPass", "EncodingsTarget", "encodings_of", "apply_encodings", "ENCODINGS_VERSION",
           "layer_input_name", "keeps_clip", "weight_axes"]

ENCODINGS_VERSION = "0.6.1"
SUFFIX = ".encodings"


def keeps_clip(match: ActivationQuantizer, version: str = ENCODINGS_VERSION) -> bool:
    """Whether ``version`` widens this activation, so the model keeps its B-bit Clip (see encodings_versions)."""
    return match.clip is not None and activation_width(version, match.bits) != match.bits


def layer_input_name(match: ActivationQuantizer, version: str = ENCODINGS_VERSION) -> str:
    """The tensor an activation encoding is keyed by (see the module docstring); QDQ-lowered graph."""
    x, head, out = match.input, match.nodes[0], match.dequantize.outputs[0]
    if out.is_graph_output():  # a quantized model output: the output itself carries the encoding
        return out.name
    if keeps_clip(match, version):  # the kept Clip's output, which only the layers read
        return layer_input(x.name)["value"]
    others = [n for n in x.consumers() if n is not head]
    return layer_input(x.name)["value"] if others or x.is_graph_output() else x.name


def _kernels(match: WeightQuantizer, plan: PrecisionPlan | None, sites: SiteTable | None) -> list[KernelGrid | None]:
    codes, scale, zero, _ = match.arrays()
    scales, zeros = scale.reshape(-1), np.broadcast_to(zero.reshape(-1), scale.reshape(-1).shape)
    layer = planned_layer(sites, match.layer)
    if layer is not None and plan is not None:
        kernels: list[KernelGrid | None] = []
        for b, s in zip(plan.weights[layer.node], scales, strict=True):
            lo, hi, odd = code_bounds(b, plan.weight_scheme)
            kernels.append(None if b is None else KernelGrid(float(s), lo, hi, odd))
        return kernels
    info = np.iinfo(codes.dtype)
    return [KernelGrid(float(s), int(info.min) - int(z), int(info.max) - int(z), stored_bits=info.bits,
                       stored_signed=bool(info.min < 0)) for s, z in zip(scales, zeros, strict=True)]


def encodings_of(qdq_model: ir.Model, plan: PrecisionPlan | None = None, sites: SiteTable | None = None,
                 version: str = ENCODINGS_VERSION) -> dict:
    """The encodings JSON (as a dict) of a QDQ model in AIMET ``version``; call before :class:`ToEncodingsPass`.

    With ``plan`` and ``sites`` a kernel's grid is its scheme's; without them (a model from another
    tool) it is the stored integer type with its zero point.
    """
    graph = qdq_model.graph
    params = {_folded_name(graph, m, sites): (_kernels(m, plan, sites), m.axis) for m in weight_quantizers(graph)}
    activations = {layer_input_name(m, version): ActivationGrid(m.scale, m.lo - m.zero_point, m.hi - m.zero_point,
                                                                m.bits, m.signed, m.zero_point)
                   for m in activation_quantizers(graph)}
    kernels = [k for ks, _ in params.values() for k in ks if k is not None]
    args = {"activation_bitwidth": max((a.bits for a in activations.values()), default=0),
            "param_bitwidth": max((k.width for k in kernels), default=0),
            "is_symmetric": all(k.symmetric for k in kernels),
            "quant_scheme": plan.weight_scheme if plan is not None else "qdq"}
    return write_version(version, params, activations, args)


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

    def __init__(self, plan: PrecisionPlan | None = None, sites: SiteTable | None = None,
                 version: str = ENCODINGS_VERSION):
        super().__init__()
        self.plan, self.sites, self.version = plan, sites, version

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

    def _activation(self, graph: ir.Graph, match: ActivationQuantizer) -> None:
        key = layer_input_name(match, self.version)
        chain, x = match.nodes, match.input
        scale, zero = match.quantize.inputs[1], match.quantize.inputs[2]
        bounds = match.clip.inputs[1:] if match.clip is not None else []
        replacement, out = x, chain[-1].outputs[0]
        if keeps_clip(match, self.version):
            assert match.clip is not None
            chain, bounds, replacement = [match.quantize, match.dequantize], [], match.clip.outputs[0]
            replacement.dtype, replacement.shape = out.dtype, out.shape
        elif key != x.name:
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
                **options: object) -> dict[str, dict | bytes]:
        version = str(options.get("encodings_version") or ENCODINGS_VERSION)
        encodings = encodings_of(model, plan, sites, version)
        ToEncodingsPass(plan, sites, version)(model)
        return {SUFFIX: encodings}

    def options_of(self, lowered: Lowered) -> dict[str, object]:
        version = (lowered.attachments.get(SUFFIX) or {}).get("version")
        return {"encodings_version": version} if isinstance(version, str) else {}

    def as_standard_ops(self, lowered: Lowered) -> onnx.ModelProto:
        weights = (lowered.sidecar or {}).get("weights")
        axes = ({e["tensor"]: e["axis"] for e in weights.values()} if weights is not None
                else weight_axes(lowered.proto))
        return apply_encodings(lowered.proto, lowered.attachments[SUFFIX], axes)

    def weight_scales(self, lowered: Lowered, entry: dict, array: Array) -> np.ndarray:
        found = read_version(lowered.attachments[SUFFIX]).get(entry["tensor"], [])
        # the sidecar's convention: codes · scale; a half-step grid (2.0.0 int2 midrise) has odd codes at step/2
        return np.array([1.0 if e is None else e.scale / 2 if e.shift else e.scale for e in found], np.float32)

    def activation_range(self, lowered: Lowered, site: str, entry: dict,
                         array: Array) -> tuple[int, int, float] | None:
        encodings = read_version(lowered.attachments[SUFFIX])
        key = site if site in encodings else layer_input(site)["value"]
        found = encodings.get(key)
        if not found or found[0] is None:
            return None
        e = found[0]
        lo, hi = e.lo, e.hi
        clip = next((n for n in lowered.proto.graph.node if key in n.output and n.op_type == "Clip"), None)
        if clip is not None:  # a widened activation keeps its B-bit Clip: the range is where both allow
            lo = max(lo, int(np.rint(float(array(clip.input[1]).reshape(())) / e.scale)))
            hi = min(hi, int(np.rint(float(array(clip.input[2]).reshape(())) / e.scale)))
        return lo, hi, e.scale


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


def _quantize(w: np.ndarray, e: Encoding) -> np.ndarray:
    s = np.float32(e.scale)
    if not e.shift:  # integer offsets: clamp the rounded ratio itself (no float shift to round)
        return np.clip(np.rint(w / s), e.lo, e.hi) * s
    shift = np.float32(e.shift)
    return (np.clip(np.rint(w / s - shift), e.lo, e.hi) + shift) * s


def apply_encodings(proto: onnx.ModelProto, encodings: dict, axes: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``proto`` with ``encodings`` applied as a converter would (for verification).

    Any of the versions of :mod:`.encodings_versions`; each encoding is ``(n + shift) · scale`` with
    ``n = clamp(round(x/scale - shift), lo, hi)``. Activations: in the graph, for every consumer (shift 0).
    Weights (``axes[weight]`` = channel axis): per channel, in numpy; float entries stay float.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    found = read_version(encodings)
    for init in graph.initializer:
        entries = found.pop(init.name, None)
        if entries is None:
            continue
        w = numpy_helper.to_array(init).astype(np.float32)
        moved = np.moveaxis(w, axes[init.name], 0).copy()
        for k, e in enumerate(entries):
            if e is not None:
                moved[k] = _quantize(moved[k], e)
        init.CopyFrom(numpy_helper.from_array(np.moveaxis(moved, 0, axes[init.name]).astype(np.float32), init.name))
    nodes = list(graph.node)
    outputs = {o.name for o in graph.output}
    for tensor, (e,) in found.items():
        p = expansion_prefix(tensor, "encoding")
        lo, hi = float(e.lo), float(e.hi)
        graph.initializer.extend([numpy_helper.from_array(np.array(v, np.float32), f"{p}/{k}")
                                  for k, v in (("scale", e.scale), ("lo", lo), ("hi", hi))])
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
