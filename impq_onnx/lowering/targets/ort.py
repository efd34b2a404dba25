"""onnxruntime deployment target: the QDQ shape onnxruntime fuses into QLinearConv / QGemm / QLinearMatMul.

From the QDQ-lowered graph (:mod:`impq_onnx.lowering.targets.qdq`'s input) it

1. refuses what onnxruntime cannot fuse, one line naming the tensor: an activation site quantized at
   other than 8 bits (the B-bit ``Clip`` in front of QuantizeLinear blocks fusion), weight codes stored
   wider than int8 (``midrise-max`` at 8 bits: odd codes up to ±255 need 9 bits; no zero point maps them
   onto int8 exactly), and a float-kernel ``Add`` behind the weight DequantizeLinear (a layer mixing
   float and quantized kernels);
2. folds each ``Conv -> BatchNormalization`` into the Conv: with ``m_k = gamma_k / sqrt(var_k + eps)`` the
   integer codes stay as they are and the per-kernel scale absorbs the multiplier, ``scale'_k = scale_k ·
   m_k``; the bias becomes ``b'_k = (b_k - mean_k) · m_k + beta_k`` (float32, :func:`fold_factors`);
   a float Conv's weight is multiplied by ``m`` instead;
3. stores the bias of every layer whose input and weight are both dequantized as int32 codes at scale
   ``s_x · s_w'_k`` behind a DequantizeLinear (what onnxruntime's QLinearConv / QGemm accumulate; a float
   bias is left out of fusion by onnxruntime 1.19 and re-quantized silently by >= 1.20).

4. adds an 8-bit ``QuantizeLinear -> DequantizeLinear`` (read by every consumer) behind each folded Conv
   with quantized input and weights whose output no site quantizes (a Conv before a residual ``Add`` or a
   ``GlobalAveragePool``): onnxruntime fuses a Conv only when a QuantizeLinear follows it (through a
   Relu). The range comes from the folded batch-norm, as ``PrecisionPlan.uniform`` takes site clips
   (:func:`output_quantizers`); the sidecar lists them under ``output_quantizers``;
5. lets every consumer of a quantized activation read its dequantized value, not only the site's layers
   (a residual ``Add`` then has quantized inputs and fuses to QLinearAdd; a Conv whose Relu also fed the
   shortcut fuses). Graph outputs stay float.

Activations keep the ``QuantizeLinear -> DequantizeLinear`` pair of the QDQ form (uint8 after Relu,
int8 otherwise, zero point 0). The result means exactly :func:`folded_reference`: the float model with
batch-norm folded, weights ``code · scale'`` and biases on their int32 grid, activations fake-quantized
at 8 bits (the plan's sites and the output quantizers). ``verify`` compares the two with graph optimizations
off (onnxruntime's fused integer kernels requantize in their own rounding order).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from impq_onnx.errors import InternalError, PlanError
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.naming import activation_names, activation_nodes, folded_names, weight_names
from impq_onnx.lowering.patterns import WeightQuantizer, activation_quantizers, weight_quantizers
from impq_onnx.lowering.targets.base import Lowered
from impq_onnx.lowering.targets.ort_reference import (
    ACTIVATION_BITS,
    bias_codes,
    fold_factors,
    folded_simulation,
    output_quantizers,
)
from impq_onnx.lowering.targets.qdq import QdqTarget
from impq_onnx.quant.plan import PrecisionPlan

__all__ = ["OrtTarget", "FoldBatchNormPass", "OutputQuantizersPass", "QuantizeBiasPass", "fold_factors", "bias_codes",
           "output_quantizers", "folded_reference", "ACTIVATION_BITS", "ShareSiteQuantizersPass"]



def _constant(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _array(value: ir.Value | None) -> np.ndarray:
    """The constant array of ``value``, which the matched pattern guarantees is an initializer."""
    array = _constant(value)
    if array is None:
        raise InternalError(f"format 'ort': tensor '{value.name if value is not None else ''}' has no constant "
                            "value where the matched pattern guarantees one")
    return array


def _name(item: ir.Value | ir.Node) -> str:
    """The name of a value or node in the graph (the graph names every one it holds)."""
    if item.name is None:
        raise InternalError(f"format 'ort': an unnamed {type(item).__name__} in the graph")
    return item.name


def _replace_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Initializer ``name`` holding ``array``: a new tensor on the existing value (the input model's tensors
    are shared with the clone, never written), or a new initializer."""
    tensor = ir.tensor(array, name=name)
    value = graph.initializers.get(name)
    if value is None:
        value = ir.Value(name=name, const_value=tensor)
        graph.register_initializer(value)
    value.const_value, value.dtype, value.shape = tensor, tensor.dtype, ir.Shape(array.shape)
    return value


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold every ``Conv -> BatchNormalization`` (constant parameters, Conv output used only there)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        weights = {m.layer.name: m for m in weight_quantizers(graph)}
        folded = False
        for bn in [n for n in graph if n.op_type == "BatchNormalization"]:
            x = bn.inputs[0]
            conv = x.producer() if x is not None else None
            params = [_constant(v) for v in bn.inputs[1:5]]
            if (x is None or conv is None or conv.op_type != "Conv" or len(bn.outputs) != 1
                    or any(p is None for p in params) or len(x.uses()) != 1 or x.is_graph_output()):
                continue
            self._fold(graph, conv, bn, [p for p in params if p is not None], weights.get(conv.name))
            folded = True
        return ir.passes.PassResult(model, folded)

    @staticmethod
    def _fold(graph: ir.Graph, conv: ir.Node, bn: ir.Node, params: list[np.ndarray],
              match: WeightQuantizer | None) -> None:
        eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        gamma, beta, mean, var = params
        m, b = fold_factors(gamma, beta, mean, var, eps, _constant(bias))
        if match is not None:
            scale = _array(match.scale)
            folded_scale = (scale.reshape(-1) * m).astype(np.float32).reshape(scale.shape)
            _replace_initializer(graph, _name(match.scale), folded_scale)
        else:
            old = conv.inputs[1]
            w = _constant(old)
            if old is None or w is None:
                raise PlanError(f"format 'ort': Conv '{conv.name}' has a weight that is not constant; cannot fold "
                                f"BatchNormalization '{bn.name}'")
            name = weight_names(_name(old))["weight"]
            folded_weight = (w * m.reshape(-1, 1, 1, 1)).astype(np.float32)
            conv.replace_input_with(1, _replace_initializer(graph, name, folded_weight))
            if old.name is not None and old.name in graph.initializers and not old.uses():
                graph.initializers.pop(old.name)
        names = folded_names(_name(conv))
        new_bias = _replace_initializer(graph, names["bias"], b)
        if bias is None:
            conv.resize_inputs(3)
        conv.replace_input_with(2, new_bias)
        out, result = bn.outputs[0], conv.outputs[0]
        out_name = out.name
        out.replace_all_uses_with(result, replace_graph_outputs=True)
        removed = [v for v in bn.inputs[1:5] if v is not None] + ([bias] if bias is not None else [])
        graph.remove(bn, safe=True)
        result.name = out_name
        for value in removed:
            if value.name is not None and value.name in graph.initializers and not value.uses():
                graph.initializers.pop(value.name)


class OutputQuantizersPass(ir.passes.InPlacePass):
    """``tensor -> QuantizeLinear -> DequantizeLinear -> every consumer`` at 8 bits for :func:`output_quantizers`."""

    def __init__(self, plan: PrecisionPlan, sites: SiteTable):
        super().__init__()
        self.plan, self.sites = plan, sites

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from impq_onnx.quant.quantizers import activation_grid

        graph = model.graph
        nodes = {n.name: n for n in graph}
        values = {v.name: v for n in graph for v in n.outputs}

        def consumers(name: str) -> list[tuple[str, str]]:
            value = values.get(name)
            if value is None:
                return []
            users = [(n.op_type, _name(n.outputs[0])) for n, _ in value.uses()]
            return users + ([("", "")] if value.is_graph_output() else [])

        modified = False
        for tensor, clip, signed in output_quantizers(self.plan, self.sites, lambda n: _name(nodes[n].outputs[0]),
                                                      consumers):
            x = values[tensor]
            if any(n.op_type == "QuantizeLinear" for n, _ in x.uses()):
                continue  # quantized on an earlier run
            users = list(x.uses())  # before the QuantizeLinear below becomes one
            step = activation_grid(ACTIVATION_BITS, clip, signed)[0]
            names, node_names = activation_names(tensor), activation_nodes(tensor)
            scale = _replace_initializer(graph, names["scale"], np.array(step, np.float32))
            zero = _replace_initializer(graph, names["zero_point"], np.zeros((), np.int8 if signed else np.uint8))
            q = ir.node("QuantizeLinear", [x, scale, zero], name=node_names["quantize"])
            dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=node_names["dequantize"])
            q.outputs[0].name, dq.outputs[0].name = names["quantized"], names["dequantized"]
            q.outputs[0].dtype = ir.DataType.INT8 if signed else ir.DataType.UINT8
            if x.dtype is not None:  # the new value's dtype is None already
                dq.outputs[0].dtype = x.dtype
            q.outputs[0].shape, dq.outputs[0].shape = x.shape, x.shape
            producer = x.producer()
            if producer is None:
                raise InternalError(f"format 'ort': output quantizer tensor '{tensor}' has no producer")
            graph.insert_after(producer, [q, dq])
            for user, index in users:
                user.replace_input_with(index, dq.outputs[0])
            modified = True
        return ir.passes.PassResult(model, modified)


class ShareSiteQuantizersPass(ir.passes.InPlacePass):
    """Every consumer of a quantized activation reads its dequantized value (module docstring, 5)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for match in activation_quantizers(model.graph):
            x, out = match.input, match.dequantize.outputs[0]
            for user, index in list(x.uses()):
                if user not in match.nodes:
                    user.replace_input_with(index, out)
                    modified = True
        return ir.passes.PassResult(model, modified)


class QuantizeBiasPass(ir.passes.InPlacePass):
    """Store the float bias of each layer with dequantized input and weight as int32 codes + DequantizeLinear."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {a.dequantize.outputs[0]: a.scale for a in activation_quantizers(graph)}
        modified = False
        for match in weight_quantizers(graph):
            layer = match.layer
            if layer.op_type not in ("Conv", "Gemm") or len(layer.inputs) < 3 or layer.inputs[0] not in inputs:
                continue
            bias = layer.inputs[2]
            values = _constant(bias)
            if (bias is None or values is None or bias.name is None or bias.name not in graph.initializers
                    or len(bias.uses()) != 1):
                continue  # already dequantized, not constant, or shared
            if layer.op_type == "Gemm" and values.size != _array(match.scale).size:
                continue  # a broadcast Gemm C is not a per-output bias
            found = bias_codes(values, inputs[layer.inputs[0]], _array(match.scale))
            if found is None:
                continue  # onnxruntime leaves such a layer in float; so does the reference
            codes, scale = found
            names = folded_names(_name(layer))
            dq = ir.node("DequantizeLinear", [
                _replace_initializer(graph, names["bias_codes"], codes),
                _replace_initializer(graph, names["bias_scale"], scale),
                _replace_initializer(graph, names["bias_zero_point"], np.zeros_like(codes))],
                attributes={"axis": 0}, name=names["bias_dequantize"])
            dq.outputs[0].name, dq.outputs[0].dtype = names["bias_dequantized"], ir.DataType.FLOAT
            dq.outputs[0].shape = ir.Shape([codes.size])
            graph.insert_before(layer, dq)
            layer.replace_input_with(2, dq.outputs[0])
            if not bias.uses():
                graph.initializers.pop(bias.name)
            modified = True
        return ir.passes.PassResult(model, modified)


def _refuse_unfusable(model: ir.Model, plan: PrecisionPlan | None) -> None:
    if plan is not None:
        for tensor, bits in plan.activations.items():
            if bits is not None and bits != ACTIVATION_BITS:
                raise PlanError(f"format 'ort': activation '{tensor}' has {bits} bits; onnxruntime's integer kernels "
                                f"need {ACTIVATION_BITS}-bit activations (plan them at 8 or use --format qdq)")
    for match in weight_quantizers(model.graph):
        layer = match.layer.name
        dtype = _array(match.codes).dtype
        if dtype != np.int8:
            raise PlanError(f"format 'ort': weights of layer '{layer}' need {dtype} codes (midrise-max at 8 bits has "
                            "odd codes up to ±255); onnxruntime fuses int8 only: plan midrise-max at <= 7 bits or use "
                            "symmetric-rms / pow2-std")
        if match.residual is not None:
            raise PlanError(f"format 'ort': layer '{layer}' mixes float and quantized kernels; quantize all of its "
                            "kernels or none, or use --format qdq")


class OrtTarget(QdqTarget):
    name = "ort"
    help = "onnxruntime deployment: batch-norm folded, int8 weights, 8-bit activations (fuses to QLinearConv/QGemm)"
    stores_codes = True
    optimize_when_verifying = False

    def rewrite(self, model: ir.Model, plan: PrecisionPlan | None, sites: SiteTable | None,
                **options: object) -> dict[str, dict | bytes]:
        _refuse_unfusable(model, plan)
        FoldBatchNormPass()(model)
        if plan is not None and sites is not None:
            OutputQuantizersPass(plan, sites)(model)
        ShareSiteQuantizersPass()(model)
        QuantizeBiasPass()(model)
        return {}

    def finish_sidecar(self, sidecar: dict, model: ir.Model) -> None:
        """Scales in the sidecar are the folded ones; the scheme's own scale stays as ``scheme_scale``."""
        graph = model.graph
        sites = sidecar.get("activations", {})
        added = {}
        for node in graph:
            x = node.inputs[0] if node.op_type == "QuantizeLinear" else None
            if x is None or x.name in sites or x.name in {e["tensor"] for e in sites.values()}:
                continue
            step = float(_array(node.inputs[1]))
            signed = _array(node.inputs[2]).dtype == np.int8
            lo, hi = (-128, 127) if signed else (0, 255)
            added[_name(x)] = {"bits": ACTIVATION_BITS, "clip": float(np.float32(step) * np.float32(hi + 1)),
                               "signed": bool(signed), "scale": step, "zero_point": 0,
                               "dtype": "int8" if signed else "uint8", "code_min": lo, "code_max": hi}
        sidecar["output_quantizers"] = added  # not in the plan: added so the layer in front fuses
        for entry in sidecar.get("weights", {}).values():
            scale = graph.initializers.get(weight_names(entry["source"])["scale"])
            if scale is not None:
                entry["scheme_scale"] = entry["scale"]
                entry["scale"] = [float(s) for s in _array(scale).reshape(-1)]

    def reference(self, canonical: object, plan: PrecisionPlan, sites: SiteTable, lowered: Lowered) -> onnx.ModelProto:
        return folded_reference(canonical, plan, sites)


def folded_reference(canonical: object, plan: PrecisionPlan, sites: SiteTable) -> onnx.ModelProto:
    """The simulation of the folded graph (:func:`impq_onnx.lowering.targets.ort_reference.folded_simulation`)."""
    return folded_simulation(canonical, plan, sites)
