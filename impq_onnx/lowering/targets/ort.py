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

Activations keep the ``QuantizeLinear -> DequantizeLinear`` pair of the QDQ form (uint8 after Relu,
int8 otherwise, zero point 0). The result means exactly :func:`folded_reference`: the float model with
batch-norm folded, weights ``code · scale'`` and biases on their int32 grid, activations fake-quantized
at 8 bits. ``verify`` compares the two with graph optimizations off (onnxruntime's fused integer
kernels requantize in their own rounding order).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from impq_onnx.errors import PlanError
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.naming import folded_names, weight_names
from impq_onnx.lowering.patterns import WeightQuantizer, activation_quantizers, weight_quantizers
from impq_onnx.lowering.targets.base import Lowered
from impq_onnx.lowering.targets.qdq import QdqTarget
from impq_onnx.quant.plan import PrecisionPlan

__all__ = ["OrtTarget", "FoldBatchNormPass", "fold_factors", "bias_codes", "folded_reference", "ACTIVATION_BITS"]

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


def _constant(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _replace_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Initializer ``name`` holding ``array``: a new tensor on the existing value (the input model's tensors
    are shared with the clone, never written), or a new initializer."""
    tensor = ir.tensor(array, name=name)
    value = graph.initializers.get(name)
    if value is None:
        value = ir.Value(name=name, const_value=tensor)
        graph.register_initializer(value)
    value.const_value, value.dtype, value.shape = tensor, tensor.dtype, ir.Shape(tensor.shape)
    return value


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold every ``Conv -> BatchNormalization`` (constant parameters, Conv output used only there)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        weights = {m.layer.name: m for m in weight_quantizers(graph)}
        folded = False
        for bn in [n for n in graph if n.op_type == "BatchNormalization"]:
            conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
            params = [_constant(v) for v in bn.inputs[1:5]]
            if (conv is None or conv.op_type != "Conv" or len(bn.outputs) != 1 or any(p is None for p in params)
                    or len(bn.inputs[0].uses()) != 1 or bn.inputs[0].is_graph_output()):
                continue
            self._fold(graph, conv, bn, params, weights.get(conv.name))
            folded = True
        return ir.passes.PassResult(model, folded)

    @staticmethod
    def _fold(graph: ir.Graph, conv: ir.Node, bn: ir.Node, params: list, match: WeightQuantizer | None) -> None:
        eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        m, b = fold_factors(*params, eps, _constant(bias))
        if match is not None:
            scale = match.scale.const_value.numpy()
            _replace_initializer(graph, match.scale.name, (scale.reshape(-1) * m).astype(np.float32).reshape(scale.shape))
        else:
            w = _constant(conv.inputs[1])
            if w is None:
                raise PlanError(f"format 'ort': Conv '{conv.name}' has a weight that is not constant; cannot fold "
                                f"BatchNormalization '{bn.name}'")
            name = weight_names(conv.inputs[1].name)["weight"]
            old = conv.inputs[1]
            conv.replace_input_with(1, _replace_initializer(graph, name, (w * m.reshape(-1, 1, 1, 1)).astype(np.float32)))
            if old.name in graph.initializers and not old.uses():
                graph.initializers.pop(old.name)
        names = folded_names(conv.name)
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
            if value.name in graph.initializers and not value.uses():
                graph.initializers.pop(value.name)


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
            if values is None or bias.name not in graph.initializers or len(bias.uses()) != 1:
                continue  # already dequantized, not constant, or shared
            if layer.op_type == "Gemm" and values.size != match.scale.const_value.numpy().size:
                continue  # a broadcast Gemm C is not a per-output bias
            found = bias_codes(values, inputs[layer.inputs[0]], match.scale.const_value.numpy())
            if found is None:
                continue  # onnxruntime leaves such a layer in float; so does the reference
            codes, scale = found
            names = folded_names(layer.name)
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
        dtype = match.codes.const_value.numpy().dtype
        if dtype != np.int8:
            raise PlanError(f"format 'ort': weights of layer '{layer}' need {dtype} codes (midrise-max at 8 bits has odd "
                            "codes up to ±255); onnxruntime fuses int8 only: plan midrise-max at <= 7 bits or use "
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
                **options: object) -> dict[str, dict]:
        _refuse_unfusable(model, plan)
        FoldBatchNormPass()(model)
        QuantizeBiasPass()(model)
        return {}

    def finish_sidecar(self, sidecar: dict, model: ir.Model) -> None:
        """Scales in the sidecar are the folded ones; the scheme's own scale stays as ``scheme_scale``."""
        graph = model.graph
        for entry in sidecar.get("weights", {}).values():
            scale = graph.initializers.get(weight_names(entry["source"])["scale"])
            if scale is not None:
                entry["scheme_scale"] = entry["scale"]
                entry["scale"] = [float(s) for s in scale.const_value.numpy().reshape(-1)]

    def reference(self, canonical, plan: PrecisionPlan, sites: SiteTable, lowered: Lowered) -> onnx.ModelProto:
        return folded_reference(canonical, plan, sites)


def folded_reference(canonical, plan: PrecisionPlan, sites: SiteTable) -> onnx.ModelProto:
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
    quantized = source.clone()
    QuantizeWeightsPass(plan, sites)(quantized)
    proto = as_proto(source)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    array = lambda name: onnx.numpy_helper.to_array(inits[name])  # noqa: E731
    nodes = {n.name: n for n in graph.node}

    def put(name: str, values: np.ndarray) -> None:
        tensor = onnx.numpy_helper.from_array(values.astype(np.float32), name)
        if name in inits:
            inits[name].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
            inits[name] = graph.initializer[-1]

    for layer in sites.layers:
        node = nodes[layer.node]
        quantized_layer = all(b is not None for b in plan.weights[layer.node])
        scale = None
        if quantized_layer:
            names = weight_names(layer.weight)
            codes = quantized.graph.initializers[names["codes"]].const_value.numpy()
            scale = quantized.graph.initializers[names["scale"]].const_value.numpy().reshape(-1)
        bn = next((n for n in graph.node if n.op_type == "BatchNormalization" and n.input[0] == layer.output), None)
        users = [n for n in graph.node if layer.output in n.input]
        bias = array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if (bn is not None and layer.op_type == "Conv" and users == [bn]
                and layer.output not in {o.name for o in graph.output}):
            eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
            m, bias = fold_factors(*(array(name) for name in bn.input[1:5]), eps, bias)
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
            found = bias_codes(bias, activation_grid(bits, clip.value, clip.signed)[0], scale)
            if found is not None:
                bias = (found[0].astype(np.float32) * found[1]).astype(np.float32)
        if bias is not None and len(node.input) > 2:
            put(node.input[2], bias)
    float_weights = plan.copy()
    float_weights.weights = {node: [None] * len(bits) for node, bits in plan.weights.items()}
    return simulate(proto, float_weights, sites)
