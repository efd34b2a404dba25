"""ResNet-20 as an ONNX graph: the canonical size, a valid graph, and it runs in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from impq_onnx.architectures import resnet20


def _weight_params(model: onnx.ModelProto) -> int:
    """Conv and Gemm weights (input 1), the tensors quantization acts on."""
    inits = {t.name: t for t in model.graph.initializer}
    return sum(
        int(np.prod(inits[n.input[1]].dims)) for n in model.graph.node if n.op_type in ("Conv", "Gemm")
    )


def test_resnet20_has_the_canonical_parameter_count(count_trainable_params):
    model = resnet20()
    assert _weight_params(model) == 268_336
    assert count_trainable_params(model) == 269_722


def test_resnet20_macs_match_the_paper_scale(count_macs):
    macs = count_macs(resnet20())
    assert macs == 40_551_040
    assert 40.5e6 <= macs <= 41.0e6


def test_resnet20_is_a_valid_graph_with_readable_unique_names():
    model = resnet20()
    onnx.checker.check_model(model, full_check=True)
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names)) and all(names)
    assert {"layer1.0.conv1", "layer1.0.bn1", "layer3.2.conv2", "fc"} <= set(names)
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 19
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 19
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    assert model.graph.input[0].name == "input" and model.graph.output[0].name == "logits"
    fc = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert fc.name == "fc" and fc.output[0] == "logits"


def test_resnet20_runs_in_onnxruntime():
    session = ort.InferenceSession(resnet20().SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    (logits,) = session.run(["logits"], {"input": x})
    assert logits.shape == (2, 10)
    assert np.isfinite(logits).all()


def test_resnet20_shortcut_subsamples_and_zero_pads():
    """Option A: the projection-free shortcut keeps the input in the middle channels, zeros elsewhere."""
    model = resnet20()
    onnx.checker.check_model(model)
    probe = onnx.helper.make_tensor_value_info("layer2.0.shortcut.pad.out", onnx.TensorProto.FLOAT, None)
    src = onnx.helper.make_tensor_value_info("layer1.2.relu2.out", onnx.TensorProto.FLOAT, None)
    model.graph.output.extend([probe, src])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    shortcut, source = session.run([probe.name, src.name], {"input": x})
    assert shortcut.shape == (2, 32, 16, 16)
    np.testing.assert_array_equal(shortcut[:, 8:24], source[:, :, ::2, ::2])
    assert not shortcut[:, :8].any() and not shortcut[:, 24:].any()


def test_resnet20_seed_is_deterministic_and_num_classes_is_honoured():
    assert resnet20(seed=3).SerializeToString() == resnet20(seed=3).SerializeToString()
    assert resnet20(seed=3).SerializeToString() != resnet20(seed=4).SerializeToString()
    model = resnet20(num_classes=100)
    fc_weight = next(t for t in model.graph.initializer if t.name == "fc.weight")
    assert list(fc_weight.dims) == [100, 64]
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 100


def test_resnet20_init_is_kaiming_normal():
    inits = {t.name: numpy_helper.to_array(t) for t in resnet20(seed=0).graph.initializer}
    w = inits["layer3.1.conv1.weight"]
    assert w.std() == pytest.approx(np.sqrt(2.0 / (64 * 9)), rel=0.05)  # fan_out = 64*3*3
    assert abs(w.mean()) < 0.01
    assert (inits["layer3.1.bn1.weight"] == 1).all() and (inits["layer3.1.bn1.running_var"] == 1).all()
