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
   shortcut fuses). Graph outputs stay float;
6. adds lossless ``QuantizeLinear -> DequantizeLinear`` pairs where values already lie on a quantizer's grid
   (:class:`RequantizePass`): behind a shortcut's ``Slice -> Pad`` in front of an ``Add`` (QLinearAdd), and in
   front of ``GlobalAveragePool -> Flatten -> QuantizeLinear`` (QLinearGlobalAveragePool where its input is
   quantized). They change no value, so the reference below has none of them;
7. stores signed activations as uint8 with zero point 128 (:class:`UnsignedActivationsPass`): the same grid
   and values as int8 with zero point 0, on onnxruntime's faster u8s8 kernels.

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
from impq_onnx.frontend.ops.base import const_array as _constant
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.naming import (
    activation_names,
    activation_nodes,
    folded_names,
    requantized_names,
    weight_names,
)
from impq_onnx.lowering.patterns import WeightQuantizer, activation_quantizers, weight_quantizers
from impq_onnx.lowering.targets.base import Lowered
from impq_onnx.lowering.targets.batchnorm_fold import drop_folded_batchnorm, foldable_batchnorms
from impq_onnx.lowering.targets.ort_integer import integer_reference
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
           "output_quantizers", "folded_reference", "ACTIVATION_BITS", "ShareSiteQuantizersPass", "RequantizePass"]



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


def _flipped(codes: np.ndarray, flip: np.ndarray, match: WeightQuantizer, conv: ir.Node) -> np.ndarray:
    """``codes`` with the kernels where ``flip`` holds negated (a symmetric grid: zero point 0)."""
    zero_point = _constant(match.zero_point)
    if zero_point is not None and np.any(zero_point != 0):
        raise PlanError(f"format 'ort': Conv '{conv.name}' has a negative batch-norm multiplier and weight zero "
                        "points other than 0; use a symmetric weight scheme")
    sign = np.where(flip, -1, 1).reshape([-1 if axis == match.axis else 1 for axis in range(codes.ndim)])
    wide = codes.astype(np.int64) * sign
    info = np.iinfo(codes.dtype)
    if wide.min() < info.min or wide.max() > info.max:
        raise PlanError(f"format 'ort': Conv '{conv.name}' has a negative batch-norm multiplier on a kernel whose "
                        f"codes reach {info.min}, which has no negation in {codes.dtype}; use a symmetric scheme")
    return wide.astype(codes.dtype)


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold every ``Conv -> BatchNormalization`` (constant parameters, Conv output used only there)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        weights = {m.layer.name: m for m in weight_quantizers(graph)}
        folded = False
        for conv, bn, params in foldable_batchnorms(graph):
            self._fold(graph, conv, bn, params, weights.get(conv.name))
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
            # A negative multiplier (gamma < 0) flips the kernel's codes, so every scale stays positive.
            flip = m < 0
            folded_scale = (scale.reshape(-1) * np.abs(m)).astype(np.float32).reshape(scale.shape)
            _replace_initializer(graph, _name(match.scale), folded_scale)
            if flip.any():
                _replace_initializer(graph, _name(match.codes), _flipped(_array(match.codes), flip, match, conv))
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
        drop_folded_batchnorm(graph, conv, bn, bias, _replace_initializer(graph, names["bias"], b))


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
        adds = [(_name(n.outputs[0]), [_name(x) for x in n.inputs if x is not None]) for n in graph
                if n.op_type == "Add"]
        for tensor, clip, signed in output_quantizers(self.plan, self.sites, lambda n: _name(nodes[n].outputs[0]),
                                                      consumers, adds):
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


# Ops whose every output element is an input element (or a constant pad): values on a quantizer's grid stay on it.
_MOVES = ("Slice", "Pad", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool")
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
_FUSING = ("Add", "Mul", "Concat")  # onnxruntime's QLinearAdd / QLinearMul / QLinearConcat


class RequantizePass(ir.passes.InPlacePass):
    """Lossless QuantizeLinear -> DequantizeLinear pairs where onnxruntime needs one to fuse (module docstring, 6).

    - Forward: an input of an Add/Mul/Concat reached from a DequantizeLinear through :data:`_MOVES` (the
      ResNet shortcut ``Slice -> Pad``) gets the pair with that DequantizeLinear's parameters: its values are
      on that grid already (a Pad's constant too, checked), so the pair changes nothing and the op fuses.
    - Backward: an activation QuantizeLinear behind a chain of :data:`_RESHAPES` (``GlobalAveragePool ->
      Flatten -> QuantizeLinear``) gets a copy of itself in front of the chain: quantizing per tensor commutes
      with reshaping, and re-quantizing on the grid is the identity, so ``GlobalAveragePool`` is followed by a
      QuantizeLinear and fuses.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type in _FUSING:
                modified |= self._forward(graph, node)
        for node in list(graph):
            if node.op_type == "QuantizeLinear":
                modified |= self._backward(graph, node)
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _per_tensor(node: ir.Node) -> bool:
        scale = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
        zero = _constant(node.inputs[2]) if len(node.inputs) > 2 else None
        return scale is not None and scale.size == 1 and zero is not None and zero.size == 1

    @classmethod
    def _forward(cls, graph: ir.Graph, node: ir.Node) -> bool:
        produced = [x.producer() if x is not None else None for x in node.inputs]
        if not any(p is not None and p.op_type == "DequantizeLinear" for p in produced):
            return False  # nothing else of the op is quantized: it would not fuse
        modified = False
        for index, x in enumerate(node.inputs):
            producer = produced[index]
            if x is None or producer is None or producer.op_type not in _MOVES:
                continue
            chain = []
            while producer is not None and producer.op_type in _MOVES and producer.inputs[0] is not None:
                chain.append(producer)
                producer = producer.inputs[0].producer()
            if producer is None or producer.op_type != "DequantizeLinear" or not cls._per_tensor(producer):
                continue
            scale, zero = producer.inputs[1], producer.inputs[2]
            if not all(cls._pad_on_grid(p) for p in chain):
                continue
            dq = cls._insert(graph, x, scale, zero, chain[0])
            node.replace_input_with(index, dq)
            modified = True
        return modified

    @staticmethod
    def _pad_on_grid(node: ir.Node) -> bool:
        """A Pad whose new elements are on every grid: zero (the zero point's code) or copies of input elements."""
        if node.op_type != "Pad":
            return True
        mode = node.attributes["mode"].as_string() if "mode" in node.attributes else "constant"
        if mode != "constant":
            return mode in ("edge", "reflect")
        value = _constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(1)
        return value is not None and bool(np.all(value == 0))

    @classmethod
    def _backward(cls, graph: ir.Graph, q: ir.Node) -> bool:
        x = q.inputs[0]
        producer = x.producer() if x is not None else None
        if x is None or producer is None or producer.op_type not in _RESHAPES or not cls._per_tensor(q):
            return False
        first = producer
        while first.inputs[0] is not None and (above := first.inputs[0].producer()) is not None \
                and above.op_type in _RESHAPES and len(first.inputs[0].uses()) == 1:
            first = above
        source = first.inputs[0]
        origin = source.producer() if source is not None else None
        if source is None or origin is None or origin.op_type in ("DequantizeLinear", "QuantizeLinear"):
            return False  # already quantized there
        if any(u.op_type == "QuantizeLinear" for u, _ in source.uses()):
            return False  # done on an earlier run
        dq = cls._insert(graph, source, q.inputs[1], q.inputs[2], origin)
        first.replace_input_with(0, dq)
        return True

    @staticmethod
    def _insert(graph: ir.Graph, x: ir.Value, scale: ir.Value | None, zero: ir.Value | None,
                after: ir.Node) -> ir.Value:
        names = requantized_names(_name(x))
        quantize = ir.node("QuantizeLinear", [x, scale, zero], name=names["quantize"])
        dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], scale, zero], name=names["dequantize"])
        quantize.outputs[0].name, dequantize.outputs[0].name = names["quantized"], names["dequantized"]
        quantize.outputs[0].dtype = ir.DataType.from_numpy(_array(zero).dtype)
        if x.dtype is not None:  # the new value's dtype is None already
            dequantize.outputs[0].dtype = x.dtype
        quantize.outputs[0].shape = dequantize.outputs[0].shape = x.shape
        graph.insert_after(after, [quantize, dequantize])
        return dequantize.outputs[0]


class UnsignedActivationsPass(ir.passes.InPlacePass):
    """Signed activations stored as uint8 with zero point 128 instead of int8 with 0 (module docstring, 7).

    The same grid (code ``q + 128`` for ``q``, the same saturation), so the same values; onnxruntime's
    integer kernels are fastest on uint8 activations with int8 weights (MLAS's u8s8 path).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in graph:
            if node.op_type != "QuantizeLinear" or len(node.inputs) < 3 or node.inputs[2] is None:
                continue
            zero = node.inputs[2]
            value = _constant(zero)
            if value is None or value.dtype != np.int8 or value.size != 1 or np.any(value != 0) or zero.name is None:
                continue
            if any(u.op_type not in ("QuantizeLinear", "DequantizeLinear") for u, _ in zero.uses()):
                continue
            _replace_initializer(graph, zero.name, np.full(value.shape, 128, np.uint8))
            for user, _ in zero.uses():
                if user.op_type == "QuantizeLinear":
                    user.outputs[0].dtype = ir.DataType.UINT8
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

    def rewrite(self, model: ir.Model, plan: PrecisionPlan | None, sites: SiteTable | None,
                **options: object) -> dict[str, dict | bytes]:
        _refuse_unfusable(model, plan)
        FoldBatchNormPass()(model)
        if plan is not None and sites is not None:
            OutputQuantizersPass(plan, sites)(model)
        ShareSiteQuantizersPass()(model)
        QuantizeBiasPass()(model)
        RequantizePass()(model)  # after: the bias pass reads each layer's input quantizer by its pattern
        UnsignedActivationsPass()(model)
        return {}

    def finish_sidecar(self, sidecar: dict, model: ir.Model) -> None:
        """Scales in the sidecar are the folded ones; the scheme's own scale stays as ``scheme_scale``."""
        graph = model.graph
        sites = sidecar.get("activations", {})
        added = {}
        for node in graph:
            x = node.inputs[0] if node.op_type == "QuantizeLinear" else None
            if (x is None or x.name in sites or x.name in {e["tensor"] for e in sites.values()}
                    or node.name == requantized_names(_name(x))["quantize"]):
                continue  # a site's, or a lossless requantization
            step = float(_array(node.inputs[1]))
            zero = _array(node.inputs[2])
            signed = zero.dtype == np.int8 or int(zero.reshape(-1)[0]) == 128  # UnsignedActivationsPass
            lo, hi = (-128, 127) if signed else (0, 255)
            added[_name(x)] = {"bits": ACTIVATION_BITS, "clip": float(np.float32(step) * np.float32(hi + 1)),
                               "signed": bool(signed), "scale": step, "zero_point": 0,
                               "dtype": "int8" if signed else "uint8", "code_min": lo, "code_max": hi}
        sidecar["output_quantizers"] = added  # not in the plan: added so the layer in front fuses
        for entry in [*sites.values(), *added.values()]:
            if entry.get("dtype") == "int8":  # UnsignedActivationsPass
                entry.update(dtype="uint8", zero_point=128, code_min=0, code_max=255)
        for entry in sidecar.get("weights", {}).values():
            scale = graph.initializers.get(weight_names(entry["source"])["scale"])
            if scale is not None:
                entry["scheme_scale"] = entry["scale"]
                entry["scale"] = [float(s) for s in _array(scale).reshape(-1)]

    def reference(self, canonical: object, plan: PrecisionPlan, sites: SiteTable, lowered: Lowered) -> onnx.ModelProto:
        return folded_reference(canonical, plan, sites)

    def deployed_reference(self, model: onnx.ModelProto) -> onnx.ModelProto | None:
        """onnxruntime's fused integer kernels' arithmetic (:mod:`impq_onnx.lowering.targets.ort_integer`)."""
        return integer_reference(model)


def folded_reference(canonical: object, plan: PrecisionPlan, sites: SiteTable) -> onnx.ModelProto:
    """The simulation of the folded graph (:func:`impq_onnx.lowering.targets.ort_reference.folded_simulation`)."""
    return folded_simulation(canonical, plan, sites)
