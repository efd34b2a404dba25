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

from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.quantizers import activation_grid
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.passes.quantize_activations import activation_names
from impq_onnx.lowering.passes.quantize_weights import weight_names
from impq_onnx.lowering.passes.plan_pass import PlanPass
from impq_onnx.lowering.targets.qonnx import container_bits

__all__ = ["ToEncodingsPass", "encodings_of", "apply_encodings", "ENCODINGS_VERSION", "layer_input_name"]

ENCODINGS_VERSION = "0.6.1"


def _node_named(graph: ir.Graph, name: str) -> ir.Node | None:
    return next((n for n in graph if n.name == name), None)


def layer_input_name(graph: ir.Graph, tensor: str) -> str:
    """The tensor an activation encoding is keyed by (see the module docstring); QDQ-lowered graph."""
    head = _node_named(graph, f"{tensor}/clip") or _node_named(graph, f"{tensor}/quantize")
    if head is None:
        return tensor
    x = head.inputs[0]
    others = [n for n in x.consumers() if n is not head]
    return f"{tensor}_layer_input" if others or x.is_graph_output() else tensor


def _entry(bitwidth: int, offset: int, scale: float, symmetric: bool) -> dict:
    s = np.float32(scale)
    return {"bitwidth": int(bitwidth), "dtype": "int", "is_symmetric": str(symmetric),
            "min": float(np.float32(offset) * s), "max": float(np.float32(offset + 2**bitwidth - 1) * s),
            "offset": int(offset), "scale": float(s)}


def encodings_of(qdq_model: ir.Model, plan: PrecisionPlan, sites: SiteTable) -> dict:
    """The encodings JSON (as a dict) of a QDQ-lowered model; call before :class:`ToEncodingsPass`."""
    graph = qdq_model.graph
    params = {}
    for layer in sites.layers:
        bits = plan.weights[layer.node]
        names = weight_names(layer.weight)
        if names["scale"] not in graph.initializers:
            continue
        scales = graph.initializers[names["scale"]].const_value.numpy().reshape(-1)
        entries = []
        for b, s in zip(bits, scales):
            if b is None:
                entries.append({"bitwidth": 32, "dtype": "float"})
            else:
                width = container_bits(b, plan.weight_scheme)
                entries.append(_entry(width, -(2 ** (width - 1)), s, True))
        params[_encoded_weight_name(graph, layer.weight)] = entries
    activations = {}
    for site in sites.activations:
        bits = plan.activations.get(site.tensor)
        if bits is None:
            continue
        clip = plan.clips[site.tensor]
        step, lo, _ = activation_grid(bits, clip.value, clip.signed)
        activations[layer_input_name(graph, site.tensor)] = [_entry(bits, lo, step, clip.signed)]
    return {"version": ENCODINGS_VERSION, "activation_encodings": activations, "param_encodings": params,
            "excluded_layers": [], "quantizer_args": {"activation_bitwidth": "per-tensor", "param_bitwidth": "per-channel",
                                                      "dtype": "int", "per_channel_quantization": True}}


def _encoded_weight_name(graph: ir.Graph, weight: str) -> str:
    return weight if weight not in graph.initializers else weight_names(weight)["weight"]


def _pop(graph: ir.Graph, *names: str) -> None:
    for name in names:
        if name in graph.initializers and not graph.initializers[name].uses():
            graph.initializers.pop(name)


class ToEncodingsPass(PlanPass):
    """Fold weight DequantizeLinear into on-grid float weights and drop the activation Q/DQ chains."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for layer in self.sites.layers:
            dq = _node_named(graph, f"{layer.node}/weight_dq")
            if dq is not None:
                self._weight(graph, dq, layer)
                modified = True
        for site in self.sites.activations:
            q = _node_named(graph, f"{site.tensor}/quantize")
            if q is not None:
                self._activation(graph, site.tensor, q)
                modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _weight(graph: ir.Graph, dq: ir.Node, layer) -> None:
        names = weight_names(layer.weight)
        codes = graph.initializers[names["codes"]].const_value.numpy()
        shape = [1] * codes.ndim
        shape[layer.kernel_axis] = -1
        scale = graph.initializers[names["scale"]].const_value.numpy().reshape(shape)
        w = (codes.astype(np.float32) * scale).astype(np.float32)
        chain = [dq]
        add = _node_named(graph, f"{layer.node}/weight_float_kernels")
        if add is not None:
            w = (w + graph.initializers[names["float_kernels"]].const_value.numpy()).astype(np.float32)
            chain.append(add)
        name = _encoded_weight_name(graph, layer.weight)
        value = ir.Value(name=name, const_value=ir.tensor(w, name=name))
        chain[-1].outputs[0].replace_all_uses_with(value)
        graph.remove(list(reversed(chain)), safe=True)
        graph.register_initializer(value)
        _pop(graph, names["codes"], names["scale"], names["zero_point"], names["float_kernels"])

    @staticmethod
    def _activation(graph: ir.Graph, tensor: str, q: ir.Node) -> None:
        names = activation_names(tensor)
        key = layer_input_name(graph, tensor)
        chain = [q, *q.outputs[0].consumers()]
        clip = q.inputs[0].producer()
        if clip is not None and clip.name == f"{tensor}/clip":
            chain.insert(0, clip)
        x = chain[0].inputs[0]
        replacement = x
        if key != tensor:
            identity = ir.node("Identity", [x], name=f"{tensor}/layer_input")
            identity.outputs[0].name = key
            identity.outputs[0].dtype, identity.outputs[0].shape = x.dtype, x.shape
            graph.insert_before(chain[0], identity)
            replacement = identity.outputs[0]
        chain[-1].outputs[0].replace_all_uses_with(replacement)
        graph.remove(list(reversed(chain)), safe=True)
        _pop(graph, names["scale"], names["zero_point"], names["clip_min"], names["clip_max"])


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
    for tensor, (e,) in encodings["activation_encodings"].items():
        p = f"{tensor}/encoding"
        lo, hi = float(e["offset"]), float(e["offset"] + 2 ** e["bitwidth"] - 1)
        graph.initializer.extend([numpy_helper.from_array(np.array(v, np.float32), f"{p}/{k}")
                                  for k, v in (("scale", e["scale"]), ("lo", lo), ("hi", hi))])
        for node in nodes:
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = f"{p}/out"
        new = [helper.make_node("Div", [tensor, f"{p}/scale"], [f"{p}/div"], name=f"{p}/Div"),
               helper.make_node("Round", [f"{p}/div"], [f"{p}/round"], name=f"{p}/Round"),
               helper.make_node("Max", [f"{p}/round", f"{p}/lo"], [f"{p}/max"], name=f"{p}/Max"),
               helper.make_node("Min", [f"{p}/max", f"{p}/hi"], [f"{p}/int"], name=f"{p}/Min"),
               helper.make_node("Mul", [f"{p}/int", f"{p}/scale"], [f"{p}/out"], name=f"{p}/Mul")]
        producer = next((i for i, n in enumerate(nodes) if tensor in n.output), -1)
        nodes[producer + 1:producer + 1] = new
    del graph.node[:]
    graph.node.extend(nodes)
    return out
