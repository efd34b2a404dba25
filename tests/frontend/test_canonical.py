"""The frontend on every export quirk: the site table is right and the canonical model computes
what the original computes (onnxruntime, max abs diff <= 1e-5)."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import impq_onnx
from impq_onnx.errors import ModelError
from impq_onnx.runtime import inference_session
from tiny_models import CLASSES, EXPECTED_LAYERS, Quirks, build, float_reference, sample_input, two_heads

QUIRKS = {
    "plain": Quirks(),
    "constant-weights": Quirks(weights="constant"),
    "weights-as-graph-inputs-ir3": Quirks(weights="graph_input", opset=7),
    "folded-batchnorm": Quirks(batchnorm=False),
    "matmul-add": Quirks(head="matmul"),
    "nhwc-transpose": Quirks(nhwc=True),
    "float16": Quirks(float16=True),
    "two-outputs": Quirks(two_outputs=True),
    "trailing-softmax": Quirks(softmax=True),
    "opset7": Quirks(opset=7),
    "opset21": Quirks(opset=21),
    "dynamic-hw": Quirks(dynamic_hw=True),
    "softmax-two-outputs-opset11": Quirks(softmax=True, two_outputs=True, opset=11),
}


def _run(proto_or_bytes, x: np.ndarray) -> list[np.ndarray]:
    data = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
    session = inference_session(data)
    return session.run(None, {session.get_inputs()[0].name: x})


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("name", sorted(QUIRKS))
def test_canonical_model_computes_the_original_logits(name, tmp_path):
    q = QUIRKS[name]
    path = tmp_path / "model.onnx"
    onnx.save(build(q), path)
    canonical = impq_onnx.load(path)

    graph = canonical.model.graph
    assert len(graph.outputs) == 1 and graph.outputs[0].name == canonical.logits == "logits"
    assert canonical.head == ("Softmax" if q.softmax else None)
    assert all(node.op_type != "Constant" for node in graph)
    assert [v.name for v in graph.inputs] == ["image"]
    assert all(v.const_value.dtype == onnx.TensorProto.FLOAT for v in graph.initializers.values())
    assert canonical.input_layout == ("NHWC" if q.nhwc else "NCHW")
    assert canonical.model.opset_imports[""] >= 13

    x = sample_input(q)
    logits = _run(canonical.to_bytes(), x.astype(np.float32))[0]
    assert logits.dtype == np.float32 and logits.shape == (3, CLASSES)
    reference = _run(float_reference(q), x.astype(np.float32))[0]
    assert np.max(np.abs(logits - reference)) <= 1e-5
    original = _run(build(q), x)[0].astype(np.float32)
    if q.softmax:
        logits = _softmax(logits)
    tolerance = 2e-2 if q.float16 else 1e-5  # float16 arithmetic in the original
    assert np.max(np.abs(logits - original)) <= tolerance


@pytest.mark.parametrize("name", sorted(QUIRKS))
def test_site_table_is_right_for_every_quirk(name):
    q = QUIRKS[name]
    table = impq_onnx.find_sites(impq_onnx.from_proto(build(q)), (1, 8, 8, 3) if q.nhwc else (1, 3, 8, 8))
    got = [(layer.op_type, layer.kernels, layer.params, layer.macs, layer.dot_length) for layer in table.layers]
    expected = [(op or ("Gemm" if q.head == "gemm" else "MatMul"), *rest) for op, *rest in EXPECTED_LAYERS]
    assert got == expected
    conv1, dwconv, fc = table.layers
    assert conv1.kernel_axis == 0 and dwconv.conv_groups == 4 and conv1.conv_groups == 1
    assert fc.kernel_axis == (0 if q.head == "gemm" else 1)
    assert fc.bias == "fc.b"
    assert (conv1.batchnorm is not None) == q.batchnorm
    assert conv1.bias == (None if q.batchnorm else "conv1.b")
    sites = {site.tensor: site for site in table.activations}
    assert len(sites) == 3
    first = sites[conv1.activation]
    assert not first.unsigned and first.elements == 3 * 8 * 8
    second = sites[dwconv.activation]
    assert second.unsigned and second.elements == 4 * 8 * 8
    assert (second.batchnorm is not None) == q.batchnorm
    if q.batchnorm:
        w = build(Quirks()).graph.initializer
        scale = next(numpy_helper.to_array(t) for t in w if t.name == "bn.scale").astype(np.float64)
        bias = next(numpy_helper.to_array(t) for t in w if t.name == "bn.bias").astype(np.float64)
        expected_clip = float(np.max(bias + 6 * np.abs(scale)))
        assert second.batchnorm.clip == pytest.approx(expected_clip, rel=1e-3 if q.float16 else 1e-6)
    assert sites[fc.activation].unsigned and sites[fc.activation].elements == 4


def test_weight_groups_at_each_granularity():
    table = impq_onnx.find_sites(impq_onnx.from_proto(build(Quirks())))
    kernels = table.weight_groups("kernel")
    assert len(kernels) == 4 + 4 + 5
    assert kernels[0].name == "conv1/0" and kernels[0].params == 27 and kernels[0].macs == 8 * 8 * 27
    layers = table.weight_groups("layer")
    assert [g.name for g in layers] == ["conv1", "dwconv", "fc"]
    assert sum(g.params for g in layers) == table.total_params == sum(g.params for g in kernels)
    (network,) = table.weight_groups("network")
    assert network.macs == table.total_macs and len(network.members) == 13
    with pytest.raises(ValueError, match="granularity"):
        table.weight_groups("channel")


def test_dynamic_height_width_uses_the_stated_input_size():
    canonical = impq_onnx.from_proto(build(Quirks(dynamic_hw=True)))
    small = impq_onnx.find_sites(canonical, (1, 3, 8, 8))
    large = impq_onnx.find_sites(canonical, (1, 3, 16, 16))
    assert large.layers[0].macs == 4 * small.layers[0].macs
    assert impq_onnx.find_sites(canonical).input_shape == (1, 3, 224, 224)


def test_stated_input_shape_must_fit_fixed_dimensions():
    with pytest.raises(ModelError, match="fixes it to 8"):
        impq_onnx.find_sites(impq_onnx.from_proto(build(Quirks())), (1, 3, 16, 16))


def test_output_option_picks_the_logits_among_several_outputs():
    q = Quirks(two_outputs=True)
    canonical = impq_onnx.from_proto(build(q), output="logits")
    assert canonical.logits == "logits"
    with pytest.raises(ModelError, match="no tensor named 'nope'.*logits, features"):
        impq_onnx.from_proto(build(q), output="nope")


def test_ambiguous_outputs_ask_for_output_option():
    proto = two_heads()  # a second classifier head on the features: two outputs look like logits
    with pytest.raises(ModelError, match="2 outputs \\(logits, aux\\).*--logits NAME"):
        impq_onnx.from_proto(proto)
    assert impq_onnx.from_proto(proto, output="aux").logits == "aux"


def test_input_file_is_never_written(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(build(Quirks(float16=True, weights="constant", softmax=True)), path)
    before = hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns
    impq_onnx.load(path)
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_canonicalising_twice_changes_nothing():
    once = impq_onnx.from_proto(build(Quirks(weights="constant", softmax=True, float16=True)))
    twice = impq_onnx.from_proto(once.to_proto())
    assert twice.to_bytes() == once.to_bytes()


def test_same_input_gives_byte_identical_canonical_models():
    q = Quirks(weights="graph_input", opset=7, two_outputs=True)
    assert impq_onnx.from_proto(build(q)).to_bytes() == impq_onnx.from_proto(build(q)).to_bytes()


def test_float16_dtypes_are_all_widened():
    canonical = impq_onnx.from_proto(build(dataclasses.replace(Quirks(float16=True), weights="constant")))
    proto = canonical.to_proto()
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for vi in proto.graph.value_info)
