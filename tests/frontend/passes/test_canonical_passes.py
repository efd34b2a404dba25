"""Canonicalisation passes: op counts, numbers in onnxruntime before and after, idempotence."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from impq_onnx.frontend.passes import Float16ToFloat32Pass, NameNodesPass, StripClassifierHeadPass
from impq_onnx.runtime import inference_session
from tiny_models import Quirks, build, float_reference, sample_input


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    session = inference_session(ir.serde.serialize_model(model).SerializeToString())
    return session.run(None, {"image": x})


def test_float16_to_float32():
    q = Quirks(float16=True)
    model = ir.serde.deserialize_model(build(q))
    before = _ops(model)
    result = Float16ToFloat32Pass()(model)
    assert result.modified
    assert _ops(result.model) == before
    assert all(v.const_value.dtype == ir.DataType.FLOAT for v in result.model.graph.initializers.values())
    x = sample_input(q).astype(np.float32)
    reference = _run(ir.serde.deserialize_model(float_reference(q)), x)[0]
    assert np.max(np.abs(_run(result.model, x)[0] - reference)) <= 1e-5
    assert not Float16ToFloat32Pass()(result.model).modified


def test_float16_casts_are_retargeted():
    q = Quirks()
    proto = build(q)
    from onnx import TensorProto, helper

    proto.graph.node.insert(3, helper.make_node("Cast", ["r1"], ["r1h"], to=TensorProto.FLOAT16, name="to_half"))
    proto.graph.node.insert(4, helper.make_node("Cast", ["r1h"], ["r1f"], to=TensorProto.FLOAT, name="to_float"))
    for node in proto.graph.node:
        if node.name == "dwconv":
            node.input[0] = "r1f"
    model = ir.serde.deserialize_model(proto)
    assert Float16ToFloat32Pass()(model).modified
    casts = [n for n in model.graph if n.op_type == "Cast"]
    assert [n.attributes["to"].value for n in casts] == [ir.DataType.FLOAT, ir.DataType.FLOAT]
    x = sample_input(q)
    exact = _run(ir.serde.deserialize_model(build(q)), x)[0]
    assert np.max(np.abs(_run(model, x)[0] - exact)) <= 1e-6  # the float16 round trip is gone


def test_strip_classifier_head():
    q = Quirks(softmax=True, two_outputs=True)
    model = ir.serde.deserialize_model(build(q))
    before = _ops(model)
    result = StripClassifierHeadPass("probs")(model)
    assert result.modified
    after = _ops(result.model)
    assert before - after == collections.Counter({"Softmax": 1})
    assert [v.name for v in result.model.graph.outputs] == ["logits"]
    x = sample_input(q)
    reference = _run(ir.serde.deserialize_model(float_reference(q)), x)[0]
    assert np.array_equal(_run(result.model, x)[0], reference)
    assert not StripClassifierHeadPass("logits")(result.model).modified


def test_name_nodes():
    proto = build(Quirks())
    for node in proto.graph.node:
        if node.name in ("relu1", "pool"):
            node.name = ""
    model = ir.serde.deserialize_model(proto)
    result = NameNodesPass()(model)
    assert result.modified
    names = [n.name for n in result.model.graph]
    assert "Relu_2" in names and "GlobalAveragePool_5" in names and len(set(names)) == len(names)
    assert not NameNodesPass()(result.model).modified
