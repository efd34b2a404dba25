"""The simulation the ort target is verified against: the float model with batch-norm folded, on-grid weights
and biases, and 8-bit fake-quantized activations (the plan's sites and the target's output quantizers).

Built from the canonical model with numpy and protobuf edits, not with the target's graph rewrite; only
the formulas (:func:`fold_factors`, :func:`bias_codes`)
and the choice of output quantizers (:func:`output_quantizers`), defined here, are shared with the target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir

from impq_onnx.errors import InternalError, PlanError
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.naming import folded_names, weight_names
from impq_onnx.quant.plan import PrecisionPlan

__all__ = ["folded_simulation", "FloatInitializers", "fold_factors", "bias_codes", "output_quantizers",
           "ACTIVATION_BITS"]

ACTIVATION_BITS = 8
_INT32 = np.iinfo(np.int32)


def fold_factors(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float,
                 bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(m, b')`` of a batch-norm folded into the layer before it, in float32 (module docstring)."""
    f = np.float32
    m = (gamma.astype(f) / np.sqrt(var.astype(f) + f(eps))).astype(f)
    b = np.zeros_like(m) if bias is None else bias.astype(f)
    return m, ((b - mean.astype(f)) * m + beta.astype(f)).astype(f)


def bias_codes(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(int32 codes, float32 scale)`` of ``bias`` on the accumulator grid ``s_x · s_w``; None when out of int32."""
    scale = (np.float32(input_scale) * weight_scale.reshape(-1).astype(np.float32)).astype(np.float32)
    codes = np.rint(bias.astype(np.float32) / scale)
    if not np.all(np.isfinite(codes)) or codes.min() < _INT32.min or codes.max() > _INT32.max:
        return None
    return codes.astype(np.int32), scale


def output_quantizers(plan: PrecisionPlan, sites: SiteTable, output_of: Callable[[str], str],
                      consumers: Callable[[str], list[tuple[str, str]]],
                      adds: Iterable[tuple[str, list[str]]] = ()) -> list[tuple[str, float, bool]]:
    """``(tensor, clip, signed)`` of the 8-bit quantizers added behind folded Convs (the ort target docstring, 4).

    Read from the graph *after* folding: ``output_of(layer)`` is the layer's output tensor,
    ``consumers(tensor)`` the ``(op_type, output)`` of the nodes reading it (a graph output counts as
    ``("", "")``). A Conv qualifies when its weights and input are quantized and a folded batch-norm
    gives the range; the quantizer goes behind a sole Relu (unsigned, clip ``max_c(beta + 6|gamma|)``)
    or on the output itself (signed, clip ``max_c(|beta| + 6|gamma|)``), unless a site already is there.

    ``adds`` are the ``(output, inputs)`` of the graph's ``Add`` nodes: an Add whose inputs are all quantized
    (a site or a quantizer found above) and whose output no site quantizes (the last residual block, read by
    ``GlobalAveragePool``) gets one too, behind a sole Relu or on its output, with clip the sum of its inputs'
    clips (the range of the sum): QLinearAdd and QLinearGlobalAveragePool then fuse. This one rounds (at 8
    bits, over a range at most twice the inputs'); :func:`folded_simulation` has it too.
    """
    found = []
    for layer in sites.layers:
        if (layer.op_type != "Conv" or layer.batchnorm is None or plan.activations.get(layer.activation) is None
                or any(b is None for b in plan.weights[layer.node])):
            continue
        out = output_of(layer.node)
        users = consumers(out)
        tensor, signed = (users[0][1], False) if [u[0] for u in users] == ["Relu"] else (out, True)
        if (tensor in plan.activations or not consumers(tensor) or ("", "") in consumers(tensor)
                or (not signed and ("", "") in users)):
            continue
        stats = layer.batchnorm
        clip = (max(abs(b) + 6.0 * abs(g) for b, g in zip(stats.beta, stats.gamma)) if signed else stats.clip)
        found.append((tensor, float(clip), signed))
    clips = {tensor: clip for tensor, clip, _ in found}
    for output, inputs in adds:
        known = [clips.get(x, plan.clips[x].value if x in plan.clips and plan.activations.get(x) is not None
                           else None) for x in inputs]
        if not inputs or any(c is None for c in known):
            continue
        users = consumers(output)
        tensor, signed = (users[0][1], False) if [u[0] for u in users] == ["Relu"] else (output, True)
        if (tensor in plan.activations or tensor in clips or not consumers(tensor) or ("", "") in consumers(tensor)
                or ("", "") in users):
            continue
        clip = float(sum(abs(float(c)) for c in known if c is not None))
        found.append((tensor, clip, signed))
        clips[tensor] = clip
    return found



class FloatInitializers:
    """A graph's initializers by name: ``array(name)`` reads one, ``put(name, values)`` writes float32 values
    in place (or adds the initializer); ``name in it`` asks whether one exists."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.by_name = {t.name: t for t in graph.initializer}

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def array(self, name: str) -> np.ndarray:
        return onnx.numpy_helper.to_array(self.by_name[name])

    def put(self, name: str, values: np.ndarray) -> None:
        tensor = onnx.numpy_helper.from_array(values.astype(np.float32), name)
        if name in self.by_name:
            self.by_name[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.by_name[name] = self.graph.initializer[-1]


def folded_simulation(canonical: object, plan: PrecisionPlan, sites: SiteTable) -> onnx.ModelProto:
    """The simulation of the folded graph, built from the canonical model without the target's graph rewrite.

    Weight codes and scheme scales come from :class:`QuantizeWeightsPass` (tested bit for bit against the
    schemes); batch-norm is folded in numpy (:func:`fold_factors`), weights become ``code · (scale · m)``
    and the biases of layers with quantized input and weight their int32-grid values (:func:`bias_codes`),
    as float initializers of the same names; then :func:`~impq_onnx.quant.simulate.simulate` fake-quantizes
    the plan's activations (weights float: they are on their grids already).
    """
    from impq_onnx.lowering.passes.quantize_weights import QuantizeWeightsPass
    from impq_onnx.quant.quantizers import activation_grid
    from impq_onnx.quant.simulate import as_proto, simulate

    source = canonical.model if hasattr(canonical, "model") else canonical
    if not isinstance(source, ir.Model):
        raise InternalError(f"ort reference: expected a canonical or onnx_ir model, got {type(source).__name__}")
    quantized = source.clone()
    QuantizeWeightsPass(plan, sites)(quantized)
    proto = as_proto(source)
    graph = proto.graph
    inits = FloatInitializers(graph)
    array, put = inits.array, inits.put
    nodes = {n.name: n for n in graph.node}

    for layer in sites.layers:
        node = nodes[layer.node]
        quantized_layer = all(b is not None for b in plan.weights[layer.node])
        scale = None
        if quantized_layer:
            names = weight_names(layer.weight)
            codes = _initializer(quantized, names["codes"])
            scale = _initializer(quantized, names["scale"]).reshape(-1)
        bn = next((n for n in graph.node if n.op_type == "BatchNormalization" and n.input[0] == layer.output), None)
        users = [n for n in graph.node if layer.output in n.input]
        bias = array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if (bn is not None and layer.op_type == "Conv" and users == [bn]
                and layer.output not in {o.name for o in graph.output}):
            eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
            gamma, beta, mean, var = (array(name) for name in bn.input[1:5])
            m, bias = fold_factors(gamma, beta, mean, var, eps, bias)
            if scale is None:
                put(layer.weight, (array(layer.weight) * m.reshape(-1, 1, 1, 1)).astype(np.float32))
            else:
                scale = (scale * m).astype(np.float32)
            if len(node.input) < 3:
                node.input.append(folded_names(layer.node)["bias"])
            node.output[0] = bn.output[0]
            graph.node.remove(bn)
        if scale is not None:
            shape = [1] * codes.ndim
            shape[layer.kernel_axis] = -1
            put(layer.weight, (codes.astype(np.float32) * scale.reshape(shape)).astype(np.float32))
        bits = plan.activations.get(layer.activation)
        if (scale is not None and bias is not None and bits is not None and layer.op_type in ("Conv", "Gemm")
                and bias.size == scale.size):
            clip = plan.clips[layer.activation]
            if clip.value is None:  # what simulate() below raises for it
                raise PlanError(f"clips['{layer.activation}']: no clip value (no batch-norm before it); calibrate the "
                                "clips first")
            found = bias_codes(bias, activation_grid(bits, clip.value, clip.signed)[0], scale)
            if found is not None:
                bias = (found[0].astype(np.float32) * found[1]).astype(np.float32)
        if bias is not None and len(node.input) > 2:
            put(node.input[2], bias)
    _add_output_quantizers(proto, plan, sites)
    float_weights = plan.copy()
    float_weights.weights = {node: [None] * len(bits) for node, bits in plan.weights.items()}
    simulated = simulate(proto, float_weights, sites)
    _share_site_quantizers(simulated, plan, sites)
    return simulated


def _initializer(model: ir.Model, name: str) -> np.ndarray:
    """The array of initializer ``name``, which :class:`QuantizeWeightsPass` made."""
    tensor = model.graph.initializers[name].const_value
    if tensor is None:
        raise InternalError(f"ort reference: initializer '{name}' made by QuantizeWeightsPass has no value")
    return tensor.numpy()


def _add_output_quantizers(proto: onnx.ModelProto, plan: PrecisionPlan, sites: SiteTable) -> None:
    """Fake-quantize the target's output quantizer tensors at 8 bits, for every consumer."""
    from impq_onnx.quant.quantizers import GraphBuilder, build_activation_quantizer
    from impq_onnx.quant.simulate import SIMULATION_PREFIX

    graph = proto.graph
    nodes = {n.name: n for n in graph.node}
    outputs = {o.name for o in graph.output}

    def consumers(name: str) -> list[tuple[str, str]]:
        users = [(n.op_type, n.output[0]) for n in graph.node if name in n.input]
        return users + ([("", "")] if name in outputs else [])

    opset = next(e.version for e in proto.opset_import if e.domain in ("", "ai.onnx"))
    adds = [(n.output[0], list(n.input)) for n in graph.node if n.op_type == "Add"]
    for tensor, clip, signed in output_quantizers(plan, sites, lambda n: nodes[n].output[0], consumers, adds):
        users = [n for n in graph.node if tensor in n.input]
        g = GraphBuilder(f"{SIMULATION_PREFIX}/{tensor}", opset)
        q = build_activation_quantizer(g, tensor, ACTIVATION_BITS, clip, signed)
        for node in users:
            node.input[:] = [q if name == tensor else name for name in node.input]
        graph.node.extend(g.nodes)
        graph.initializer.extend(g.initializers)


def _share_site_quantizers(proto: onnx.ModelProto, plan: PrecisionPlan, sites: SiteTable) -> None:
    """Every consumer of a quantized site reads the fake-quantized value its layers read (graph outputs stay)."""
    from impq_onnx.quant.simulate import SIMULATION_PREFIX

    nodes = {n.name: n for n in proto.graph.node}
    for site in sites.activations:
        if plan.activations.get(site.tensor) is None:
            continue
        layer = sites.layer(site.layers[0])
        quantized = nodes[layer.node].input[layer.op.activation_input]
        own = f"{SIMULATION_PREFIX}/{site.tensor}/"
        for node in proto.graph.node:
            if not node.name.startswith(own):
                node.input[:] = [quantized if name == site.tensor else name for name in node.input]
