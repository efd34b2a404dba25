"""recompute_batchnorm(): running statistics re-estimated as torch's update_bn does, checked in numpy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from impq_onnx.engine.batchnorm import recompute_batchnorm
from impq_onnx.errors import DataError

C, H = 3, 5
RNG = np.random.default_rng(7)
W1 = RNG.normal(size=(C, C)).astype(np.float32)
W2 = RNG.normal(size=(C, C)).astype(np.float32)
GAMMA = np.array([1.5, 0.5, 2.0], np.float32)
BETA = np.array([0.1, -0.3, 0.2], np.float32)


def _model(with_batchnorm: bool = True) -> onnx.ModelProto:
    """1x1 conv -> BN -> Relu -> 1x1 conv -> BN, with stale running statistics (0 and 1)."""
    inits = [numpy_helper.from_array(W1[:, :, None, None], "w1"), numpy_helper.from_array(W2[:, :, None, None], "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1")]
    if with_batchnorm:
        for i in (1, 2):
            inits += [numpy_helper.from_array(GAMMA, f"g{i}"), numpy_helper.from_array(BETA, f"b{i}"),
                      numpy_helper.from_array(np.zeros(C, np.float32), f"m{i}"),
                      numpy_helper.from_array(np.ones(C, np.float32), f"v{i}")]
        nodes += [helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["n1"], name="bn1"),
                  helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
                  helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
                  helper.make_node("BatchNormalization", ["c2", "g2", "b2", "m2", "v2"], ["y"], name="bn2")]
    else:
        nodes += [helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
                  helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, C, H, H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, C, H, H])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def _batch_stats(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return t.mean(axis=(0, 2, 3)), t.var(axis=(0, 2, 3))  # biased variance, as ONNX's training mode


def _reference(batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    sums = {k: np.zeros(C) for k in ("m1", "v1", "m2", "v2")}
    n = 0
    for x in batches:
        c1 = np.einsum("oc,nchw->nohw", W1, x.astype(np.float64))
        m1, v1 = _batch_stats(c1)
        n1 = GAMMA[None, :, None, None] * (c1 - m1[None, :, None, None]) / np.sqrt(v1 + 1e-5)[None, :, None, None]
        r1 = np.maximum(n1 + BETA[None, :, None, None], 0)
        m2, v2 = _batch_stats(np.einsum("oc,nchw->nohw", W2, r1))
        for k, v in (("m1", m1), ("v1", v1), ("m2", m2), ("v2", v2)):
            sums[k] += len(x) * v
        n += len(x)
    return {k: v / n for k, v in sums.items()}


def _inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_running_statistics_are_the_size_weighted_mean_of_batch_statistics():
    batches = [RNG.normal(2.0, 3.0, size=(n, C, H, H)).astype(np.float32) for n in (8, 5, 11)]
    model = _model()
    before = model.SerializeToString()
    result = _inits(recompute_batchnorm(model, [(x, None) for x in batches], threads=1))
    expected = _reference(batches)
    for name, value in expected.items():
        np.testing.assert_allclose(result[name], value, rtol=2e-4, atol=1e-4, err_msg=name)
    assert not np.allclose(result["v2"], 1.0)  # the stale statistics were replaced
    for name in ("w1", "w2", "g1", "b1", "g2", "b2"):
        np.testing.assert_array_equal(result[name], _inits(model)[name])
    assert model.SerializeToString() == before  # the input model is not modified


def test_max_batches_stops_after_that_many_and_list_batches_carry_labels():
    batches = [RNG.normal(1.0, 2.0, size=(n, C, H, H)).astype(np.float32) for n in (6, 9, 4)]
    result = _inits(recompute_batchnorm(_model(), [[x, np.zeros(len(x), np.int64)] for x in batches], threads=1,
                                        max_batches=2))
    for name, value in _reference(batches[:2]).items():
        np.testing.assert_allclose(result[name], value, rtol=2e-4, atol=1e-4, err_msg=name)


def test_model_without_batchnorm_comes_back_unchanged():
    model = _model(with_batchnorm=False)
    result = recompute_batchnorm(model, [RNG.normal(size=(4, C, H, H)).astype(np.float32)], threads=1)
    assert result.SerializeToString() == model.SerializeToString()


def test_no_batches_is_a_one_line_error():
    with pytest.raises(DataError, match="no batches"):
        recompute_batchnorm(_model(), [], threads=1)
