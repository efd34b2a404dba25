"""The QDQ patterns match by op type and structure, and say why when they do not."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from impq_onnx.lowering.passes import QuantizeActivationsPass, QuantizeWeightsPass
from impq_onnx.lowering.patterns import (NoMatch, activation_quantizer, activation_quantizers, weight_quantizer,
                                         weight_quantizers)
from impq_onnx.quant.quantizers import activation_grid
from lowering_cases import mixed_plan, tiny
from quant_models import tiny_cnn


def test_the_project_lowering_matches_once_per_layer_and_site():
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, "midrise-max")
    model = canonical.model.clone()
    QuantizeWeightsPass(plan, sites)(model)
    QuantizeActivationsPass(plan, sites)(model)
    weights = weight_quantizers(model.graph)
    assert [m.layer.name for m in weights] == [layer.node for layer in sites.layers]
    wide_or_float = [None in plan.weights[layer.node] or m.codes.dtype != ir.DataType.INT8
                     for layer, m in zip(sites.layers, weights)]
    assert [m.residual is not None for m in weights] == wide_or_float  # the Add of float kernels
    assert [m.axis for m in weights] == [layer.kernel_axis for layer in sites.layers]
    activations = activation_quantizers(model.graph)
    assert [m.input.name for m in activations] == [s.tensor for s in sites.activations]
    for m in activations:
        bits, clip = plan.activations[m.input.name], plan.clips[m.input.name]
        step, lo, hi = activation_grid(bits, clip.value, clip.signed)
        assert (m.bits, m.lo, m.hi, m.signed, m.zero_point) == (bits, lo, hi, clip.signed, 0)
        assert np.float32(m.scale) == np.float32(step)
        assert (m.clip is not None) == (bits != 8)  # the Clip that narrows to B bits is part of the quantizer


def _model(nodes, inits, outputs=("y",)) -> ir.Model:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


_QPARAMS = {"s": np.float32(0.1), "z": np.uint8(0), "z2": np.uint8(0)}


def test_weight_pattern_reasons():
    codes = np.ones((2, 2, 1, 1), np.int8)
    model = _model([helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], name="dq", axis=0),
                    helper.make_node("Conv", ["wf", "w2"], ["y"], name="conv")],
                   {"w": codes, "ws": np.ones(2, np.float32), "wz": np.zeros(2, np.int8),
                    "w2": np.ones((2, 2, 1, 1), np.float32)})
    assert "as data, not as its weight" in weight_quantizer(_node(model, "dq")).reason
    model = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
                    helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="dq")], _QPARAMS)
    found = weight_quantizer(_node(model, "dq"))
    assert isinstance(found, NoMatch) and not found and "not an integer initializer" in found.reason


def test_activation_pattern_keeps_a_model_clip_and_names_mismatches():
    relu6 = {**_QPARAMS, "lo": np.float32(0), "hi": np.float32(6)}
    model = _model([helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="relu6"),
                    helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="q"),
                    helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["y"], name="dq")], relu6)
    m = activation_quantizer(_node(model, "q"))
    assert m and m.clip is None and m.input.name == "c" and (m.bits, m.lo, m.hi) == (8, 0, 255)  # ReLU6 stays
    narrow = {**_QPARAMS, "lo": np.float32(0), "hi": np.float32(np.float32(15) * np.float32(0.1))}
    model = _model([helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clip"),
                    helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="q"),
                    helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["y"], name="dq")], narrow)
    m = activation_quantizer(_node(model, "q"))
    assert m and m.clip is not None and m.input.name == "x" and (m.bits, m.lo, m.hi) == (4, 0, 15)
    model = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
                    helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="dq1"),
                    helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y2"], name="dq2")], _QPARAMS, ("y", "y2"))
    assert "exactly one DequantizeLinear" in activation_quantizer(_node(model, "q")).reason
    model = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
                    helper.make_node("DequantizeLinear", ["xq", "s", "z2"], ["y"], name="dq"),
                    helper.make_node("DequantizeLinear", ["xq2", "s", "z"], ["y2"], name="other")],
                   {**_QPARAMS, "xq2": np.zeros(3, np.uint8)}, ("y", "y2"))
    assert "zero point is shared" in activation_quantizer(_node(model, "q")).reason
