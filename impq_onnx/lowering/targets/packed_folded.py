"""Packed target with batch-norm folded (``--format packed-folded``): the smallest packed model.

The ``packed`` output with every ``Conv -> BatchNormalization`` folded into the Conv before the weights are
packed. The integer codes stay exactly as planned; with ``m_k = gamma_k / sqrt(var_k + eps)`` the kernel's
scale absorbs the multiplier, ``scale'_k = scale_k · m_k`` (float32, negative where ``gamma_k`` is: the
codes are never flipped, so every scheme's grid stays as it is), a float-kernel residual is multiplied by
``m`` and the bias becomes ``b'_k = (b_k - mean_k) · m_k + beta_k``
(:func:`~impq_onnx.lowering.targets.ort_reference.fold_factors`, the ort target's formula). Activations are
quantized where the plan says, at any width: no site lies between a Conv and its batch-norm, so folding
moves no quantizer. Layers without a batch-norm are the ``packed`` target's.

``verify`` compares it with :func:`folded_packed_reference`: the simulation of the plan on the float model
with batch-norm folded the same way in numpy (weights ``code · scale'`` plus ``m ·`` float kernels, biases
``b'``). The sidecar's ``scale`` lists are the folded scales (``scheme_scale`` keeps the scheme's).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from impq_onnx.errors import InternalError
from impq_onnx.frontend.ops.base import const_array as _constant
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.naming import folded_names, weight_names
from impq_onnx.lowering.passes.split_conv_bias import SplitConvBiasPass
from impq_onnx.lowering.patterns import WeightQuantizer, weight_quantizers
from impq_onnx.lowering.targets.base import Lowered
from impq_onnx.lowering.targets.batchnorm_fold import drop_folded_batchnorm, foldable_batchnorms
from impq_onnx.lowering.targets.ort_reference import FloatInitializers, fold_factors
from impq_onnx.lowering.targets.packed import PackedTarget, pack_weights
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.schemes import weight_scheme

__all__ = ["PackedFoldedTarget", "FoldBatchNormScalesPass", "folded_packed_reference"]


def _set(graph: ir.Graph, value: ir.Value | None, array: np.ndarray, name: str | None = None) -> ir.Value:
    """A new tensor ``array`` on initializer ``value`` (the input model's tensors are shared, never written), or
    a new initializer ``name``."""
    if value is None:
        if name is None:
            raise InternalError("format packed-folded: a new initializer without a name")
        value = ir.Value(name=name)
    tensor = ir.tensor(array, name=value.name)
    value.const_value, value.dtype, value.shape = tensor, tensor.dtype, ir.Shape(array.shape)
    if value.name not in graph.initializers:
        graph.register_initializer(value)
    return value


def _broadcast(m: np.ndarray, rank: int, axis: int) -> np.ndarray:
    return m.reshape([-1 if i == axis else 1 for i in range(rank)])


class FoldBatchNormScalesPass(ir.passes.InPlacePass):
    """Fold every ``Conv -> BatchNormalization`` (constant parameters, Conv output read only there) into the
    Conv's weight scales and bias (module docstring).

    ``bounds`` (by layer node) are each kernel's planned ``(code_min, code_max)``: a kernel with a negative
    multiplier has its codes negated when they stay within them. Without them (a QDQ model from another
    tool), or when a negated code would leave them, that layer keeps its batch-norm.
    """

    def __init__(self, bounds: dict[str, list[tuple[int, int]]] | None = None):
        super().__init__()
        self.bounds = bounds or {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        weights = {m.layer.name: m for m in weight_quantizers(graph)}
        folded = False
        for conv, bn, params in foldable_batchnorms(graph):
            bounds = self.bounds.get(conv.name or "")
            if not self._fold(graph, conv, bn, params, weights.get(conv.name), bounds):
                continue
            folded = True
        return ir.passes.PassResult(model, folded)

    @staticmethod
    def _fold(graph: ir.Graph, conv: ir.Node, bn: ir.Node, params: list[np.ndarray],
              match: WeightQuantizer | None, bounds: list[tuple[int, int]] | None) -> bool:
        eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        if bias is not None and _constant(bias) is None:
            return False  # a computed bias: leave the batch-norm
        gamma, beta, mean, var = params
        m, b = fold_factors(gamma, beta, mean, var, eps, _constant(bias))
        if match is not None:
            scale = _constant(match.scale)
            if scale is None or match.axis != 0:
                return False
            codes = _constant(match.codes)
            flip = m < 0
            if codes is None:
                return False
            if flip.any():
                flipped = _flipped(codes, flip, match.axis, bounds)
                if flipped is None:
                    return False  # a negated code would leave its grid: this batch-norm stays
                _set(graph, match.codes, flipped)
            _set(graph, match.scale, (scale.reshape(-1) * np.abs(m)).astype(np.float32).reshape(scale.shape))
            if match.residual is not None:
                residual = next((v for v in match.residual.inputs[1:] if _constant(v) is not None), None)
                values = _constant(residual)
                if residual is None or values is None:
                    return False
                _set(graph, residual, (values * _broadcast(m, values.ndim, 0)).astype(np.float32))
        else:
            old = conv.inputs[1]
            w = _constant(old)
            if old is None or w is None or old.name is None:
                return False  # a weight that is not constant: leave the batch-norm
            conv.replace_input_with(1, _set(graph, None, (w * _broadcast(m, w.ndim, 0)).astype(np.float32),
                                            weight_names(old.name)["weight"]))
            if old.name in graph.initializers and not old.uses():
                graph.initializers.pop(old.name)
        if conv.name is None:
            raise InternalError("format packed-folded: an unnamed Conv in the graph (the graph names every node)")
        drop_folded_batchnorm(graph, conv, bn, bias, _set(graph, None, b, folded_names(conv.name)["bias"]))
        return True


def _flipped(codes: np.ndarray, flip: np.ndarray, axis: int,
             bounds: list[tuple[int, int]] | None) -> np.ndarray | None:
    """``codes`` with the kernels where ``flip`` holds negated, or None when a negated code leaves its kernel's
    grid (``bounds``; the stored type's range without them)."""
    wide = codes.astype(np.int64) * _broadcast(np.where(flip, -1, 1), codes.ndim, axis)
    info = np.iinfo(codes.dtype)
    lo = np.array([b[0] for b in bounds]) if bounds is not None else np.full(len(flip), info.min)
    hi = np.array([b[1] for b in bounds]) if bounds is not None else np.full(len(flip), info.max)
    moved = np.moveaxis(wide, axis, 0).reshape(len(flip), -1)
    if bounds is None or np.any(moved.min(axis=1, initial=0) < lo) or np.any(moved.max(axis=1, initial=0) > hi):
        return None
    return wide.astype(codes.dtype)


class PackedFoldedTarget(PackedTarget):
    name = "packed-folded"
    help = "packed, with batch-norm folded into the weight scales and biases (smallest packed model)"

    def rewrite(self, model: ir.Model, plan: PrecisionPlan | None, sites: SiteTable | None,
                **options: object) -> dict[str, dict | bytes]:
        bounds = {}
        if plan is not None:
            scheme = weight_scheme(plan.weight_scheme)
            bounds = {node: [scheme.code_bounds(b)[:2] for b in bits] for node, bits in plan.weights.items()}
        FoldBatchNormScalesPass(bounds)(model)
        if plan is not None and sites is not None:
            SplitConvBiasPass(plan, sites)(model)
        return pack_weights(model, plan, sites)

    def finish_sidecar(self, sidecar: dict, model: ir.Model) -> None:
        """Scales in the sidecar are the folded ones; the scheme's own scale stays as ``scheme_scale``."""
        for entry in sidecar.get("weights", {}).values():
            scale = model.graph.initializers.get(weight_names(entry["source"])["scale"])
            array = _constant(scale)
            if array is not None:
                entry["scheme_scale"] = entry["scale"]
                entry["scale"] = [float(s) for s in array.reshape(-1)]

    def reference(self, canonical: object, plan: PrecisionPlan, sites: SiteTable, lowered: Lowered) -> onnx.ModelProto:
        return folded_packed_reference(canonical, plan, sites)


def folded_packed_reference(canonical: object, plan: PrecisionPlan, sites: SiteTable) -> onnx.ModelProto:
    """The simulation of ``plan`` on the float model with batch-norm folded as the target folds it, built with
    numpy and protobuf edits from the codes and scales of :class:`QuantizeWeightsPass`, not from the target's
    graph rewrite: weights ``code · (scale · m)`` (+ ``m ·`` float kernels), biases ``b'``; then
    :func:`~impq_onnx.quant.simulate.simulate` quantizes the plan's activations (weights are on their grids)."""
    from impq_onnx.lowering.passes.quantize_weights import QuantizeWeightsPass
    from impq_onnx.quant.simulate import as_proto, simulate

    source = canonical.model if hasattr(canonical, "model") else canonical
    if not isinstance(source, ir.Model):
        raise InternalError("packed-folded reference: expected a canonical or onnx_ir model, got "
                            f"{type(source).__name__}")
    quantized = source.clone()
    QuantizeWeightsPass(plan, sites)(quantized)
    made = quantized.graph.initializers
    proto = as_proto(source)
    graph = proto.graph
    inits = FloatInitializers(graph)
    array, put = inits.array, inits.put
    nodes = {n.name: n for n in graph.node}
    scheme = weight_scheme(plan.weight_scheme)

    for layer in sites.layers:
        node = nodes[layer.node]
        bn = next((n for n in graph.node if n.op_type == "BatchNormalization" and n.input[0] == layer.output), None)
        users = [n for n in graph.node if layer.output in n.input]
        fold = not (bn is None or layer.op_type != "Conv" or users != [bn]
                    or layer.output in {o.name for o in graph.output}
                    or (len(node.input) > 2 and node.input[2] and node.input[2] not in inits))
        names = weight_names(layer.weight)
        m, b = None, None
        if bn is not None and fold:
            eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
            bias = array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            gamma, beta, mean, var = (array(name) for name in bn.input[1:5])
            m, b = fold_factors(gamma, beta, mean, var, eps, bias)
            if names["codes"] in made and np.any(m < 0) and _flipped(
                    _made(made, names["codes"]), m < 0, layer.kernel_axis,
                    [scheme.code_bounds(bits)[:2] for bits in plan.weights[layer.node]]) is None:
                m, b = None, None  # as the target: a negated code would leave its grid, the batch-norm stays
        if names["codes"] in made:  # the weight as the lowered graph computes it: code · scale' (+ m · float kernels)
            codes = _made(made, names["codes"])
            scale = _made(made, names["scale"]).reshape(-1)
            if m is not None:
                scale = (scale * m).astype(np.float32)
            weight = (codes.astype(np.float32) * _broadcast(scale, codes.ndim, layer.kernel_axis)).astype(np.float32)
            if names["float_kernels"] in made:
                residual = _made(made, names["float_kernels"])
                if m is not None:
                    residual = (residual * _broadcast(m, residual.ndim, 0)).astype(np.float32)
                weight = (weight + residual).astype(np.float32)
            put(layer.weight, weight)
        elif m is not None:
            w = array(layer.weight)
            put(layer.weight, (w * _broadcast(m, w.ndim, 0)).astype(np.float32))
        if m is None or b is None or bn is None:
            continue
        if len(node.input) < 3:
            node.input.append(folded_names(layer.node)["bias"])
        put(node.input[2], b)
        node.output[0] = bn.output[0]
        graph.node.remove(bn)
    float_weights = plan.copy()
    float_weights.weights = {name: [None] * len(bits) for name, bits in plan.weights.items()}
    return simulate(proto, float_weights, sites)


def _made(initializers, name: str) -> np.ndarray:
    """The array of initializer ``name``, which :class:`QuantizeWeightsPass` made."""
    tensor = initializers[name].const_value
    if tensor is None:
        raise InternalError(f"packed-folded reference: initializer '{name}' made by QuantizeWeightsPass has no value")
    return tensor.numpy()
