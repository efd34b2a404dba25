"""Gradients of seeded logits through onnxruntime-training (impq_onnx.engine.gradients)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from impq_onnx.engine.gradients import ForwardTensors, TensorGradients, inference_batchnorm
from impq_onnx.errors import ModelError
from impq_onnx.runtime import inference_session
from quant_models import CLASSES, SIZE, linear_classifier, quadrant_batch, tiny_cnn


def _with_trained_like_batchnorm(model: onnx.ModelProto, seed: int = 1) -> onnx.ModelProto:
    """Non-trivial running statistics so the affine rewrite is really tested."""
    rng = np.random.default_rng(seed)
    for t in model.graph.initializer:
        if t.name.startswith("bn"):
            a = numpy_helper.to_array(t)
            value = rng.uniform(0.5, 1.5, a.shape) if t.name.endswith(("scale", "var")) else rng.normal(0, 0.3, a.shape)
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), t.name))
    return model


def test_inference_batchnorm_keeps_outputs():
    model = _with_trained_like_batchnorm(tiny_cnn())
    x, _ = quadrant_batch(8, np.random.default_rng(0))
    before = inference_session(model.SerializeToString()).run(None, {"x": x})[0]
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert inference_batchnorm(rewritten) == 2
    assert not any(n.op_type == "BatchNormalization" for n in rewritten.graph.node)
    after = inference_session(rewritten.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    assert inference_batchnorm(rewritten) == 0  # a second run changes nothing


def test_training_mode_batchnorm_is_refused():
    model = tiny_cnn()
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    with pytest.raises(ModelError, match="training mode"):
        inference_batchnorm(model)


def test_linear_gradients_match_hand_derivation():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    seed = rng.standard_normal((5, 4)).astype(np.float32)
    grads = TensorGradients(linear_classifier(w, b), "logits", ["x", "W", "logits"])(x, seed)
    np.testing.assert_allclose(grads["x"], seed @ w, rtol=1e-5, atol=1e-6)  # d(sum s.(Wx+b))/dx
    np.testing.assert_allclose(grads["W"], seed.T @ x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["logits"], seed, rtol=1e-6)


def test_batch_gradients_are_per_sample_with_inference_batchnorm():
    model = _with_trained_like_batchnorm(tiny_cnn())
    x, _ = quadrant_batch(6, np.random.default_rng(1))
    seed = np.random.default_rng(2).standard_normal((6, CLASSES)).astype(np.float32)
    grads = TensorGradients(model, "logits", ["r1", "c2"])
    batched = grads(x, seed)
    for n in range(len(x)):
        single = grads(x[n : n + 1], seed[n : n + 1])
        for name in ("r1", "c2"):
            np.testing.assert_allclose(batched[name][n : n + 1], single[name], rtol=1e-4, atol=1e-6)


def test_forward_tensors_returns_logits_and_intermediates():
    model = tiny_cnn()
    x, _ = quadrant_batch(3, np.random.default_rng(3))
    logits, kept = ForwardTensors(model, "logits", ["r1", "f"])(x)
    expected = inference_session(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    assert kept["r1"].shape == (3, 8, SIZE, SIZE) and kept["f"].shape == (3, 12)
    assert (kept["r1"] >= 0).all()


def test_op_without_gradient_is_a_model_error():
    model = linear_classifier(np.ones((3, 2), np.float32), np.zeros(3, np.float32))
    model.graph.node.insert(0, helper.make_node("Round", ["x"], ["xr"], name="round"))
    model.graph.node[1].input[0] = "xr"
    with pytest.raises(ModelError, match="cannot differentiate"):
        TensorGradients(model, "logits", ["x"])


def _strided_conv(attrs: dict) -> onnx.ModelProto:
    w = np.random.default_rng(4).standard_normal((4, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", group=4, strides=[2, 2], **attrs),
         helper.make_node("ReduceMean", ["y"], ["logits"], axes=[2, 3], keepdims=0)],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_auto_pad_convs_get_explicit_pads_and_right_gradients():
    from impq_onnx.engine.gradients import explicit_conv_pads

    same = _strided_conv(dict(auto_pad="SAME_UPPER"))
    explicit = _strided_conv(dict(pads=[0, 0, 1, 1]))
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(same)
    assert explicit_conv_pads(rewritten) == 1 and explicit_conv_pads(rewritten) == 0
    pads = [helper.get_attribute_value(a) for a in rewritten.graph.node[0].attribute if a.name == "pads"]
    assert pads == [[0, 0, 1, 1]]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    seed = rng.standard_normal((2, 4)).astype(np.float32)
    # onnxruntime-training's ConvGrad is wrong for auto_pad convs; TensorGradients rewrites them first
    got = TensorGradients(same, "logits", ["x", "W"])(x, seed)
    want = TensorGradients(explicit, "logits", ["x", "W"])(x, seed)
    for name in ("x", "W"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def _conv(attrs: dict, weight_shape: tuple[int, ...], size: int = 9) -> onnx.ModelProto:
    """x[N, 4, size, size] -> Conv(attrs) -> mean over space: one logit per output channel."""
    w = np.random.default_rng(4).standard_normal(weight_shape).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", **attrs),
         helper.make_node("ReduceMean", ["y"], ["logits"], axes=[2, 3], keepdims=0)],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# (conv attributes, weight shape, the op that computes the input gradient once ConvGrad is replaced)
_INPUT_GRADIENT_CASES = {
    "plain 3x3": (dict(pads=[1, 1, 1, 1]), (6, 4, 3, 3), "Conv"),
    "asymmetric pads": (dict(pads=[0, 2, 1, 0]), (6, 4, 3, 3), "Conv"),
    "no pads, 1x2 kernel": (dict(kernel_shape=[1, 2]), (6, 4, 1, 2), "Conv"),
    "dilated": (dict(pads=[2, 2, 2, 2], dilations=[2, 2]), (6, 4, 3, 3), "Conv"),
    "depthwise": (dict(pads=[1, 1, 1, 1], group=4), (4, 1, 3, 3), "Conv"),
    "depthwise multiplier 2": (dict(pads=[1, 1, 1, 1], group=4), (8, 1, 3, 3), "ConvTranspose"),
    "grouped": (dict(pads=[1, 1, 1, 1], group=2), (6, 2, 3, 3), "ConvTranspose"),
    "strided": (dict(pads=[1, 1, 1, 1], strides=[2, 2]), (6, 4, 3, 3), "ConvTranspose"),
}


@pytest.mark.parametrize("attrs, weight_shape, op", _INPUT_GRADIENT_CASES.values(), ids=_INPUT_GRADIENT_CASES)
def test_input_gradient_only_replaces_conv_grad(attrs, weight_shape, op):
    from impq_onnx.frontend.ops.conv import conv_grad_as_transpose

    model = _conv(attrs, weight_shape)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 9, 9)).astype(np.float32)
    seed = rng.standard_normal((3, weight_shape[0])).astype(np.float32)
    with_weight = TensorGradients(model, "logits", ["x", "W"])  # ConvGrad computes dW: kept
    input_only = TensorGradients(model, "logits", ["x"])
    np.testing.assert_allclose(input_only(x, seed)["x"], with_weight(x, seed)["x"], rtol=1e-5, atol=1e-5)
    ops = [n.op_type for n in onnx.load_from_string(input_only._bytes).graph.node]
    assert "ConvGrad" in [n.op_type for n in onnx.load_from_string(with_weight._bytes).graph.node]
    assert "ConvGrad" not in ops and ops.count(op) == 1 + (op == "Conv")  # the forward Conv, and the input gradient
    assert conv_grad_as_transpose(onnx.ModelProto(), {}) == 0


def test_epilogue_outputs_replace_gradients():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    model = linear_classifier(w, np.zeros(3, np.float32))
    x = rng.standard_normal((5, 4)).astype(np.float32)
    seed = rng.standard_normal((5, 3)).astype(np.float32)

    def epilogue(graph, gradients, shapes):
        graph.node.append(helper.make_node("ReduceSumSquare", [gradients["x"]], ["sq"], keepdims=0))
        return ["sq"]

    result = TensorGradients(model, "logits", ["x"], epilogue=epilogue)(x, seed)
    assert set(result) == {"sq"}
    assert float(result["sq"]) == pytest.approx(float(np.sum((seed @ w) ** 2)), rel=1e-5)
