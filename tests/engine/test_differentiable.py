"""Training/gradient-graph rewrites for ops onnxruntime-training 1.19 cannot differentiate (issue 24):
exact forward equality, gradients against numpy, and one-line refusals for what is left."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.version_converter
import pytest
from onnx import TensorProto, helper, numpy_helper

from impq_onnx.engine.differentiable import DIFFERENTIABLE_OPS, check_differentiable, make_differentiable
from impq_onnx.engine.gradients import TensorGradients
from impq_onnx.errors import ModelError
from impq_onnx.runtime import inference_session

# Breakpoints of every op included (HardSwish at +-3, HardSigmoid(0.2, 0.5) at +-2.5, zero).
X = np.concatenate([np.linspace(-4, 4, 33), [-3.0, 3.0, -2.5, 2.5, 0.0, -0.0, 1e-7, -1e-7]]).astype(np.float32)
X = np.stack([X, -X * 0.7])  # [2, 41]


def _one_op(op: str, attrs: dict | None = None, extra: dict[str, np.ndarray] | None = None,
            outputs: int = 1, opset: int = 17) -> onnx.ModelProto:
    extra = extra or {}
    names = ["y"] + [f"y{i}" for i in range(1, outputs)]
    node = helper.make_node(op, ["x", *extra], names, name="the_op", **(attrs or {}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", X.shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in extra.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, x: np.ndarray = X) -> np.ndarray:
    session = inference_session(model.SerializeToString())
    return session.run(["y"], {"x": x})[0]


CASES = {
    "HardSigmoid": dict(op="HardSigmoid", attrs=dict(alpha=0.2, beta=0.5)),
    "HardSigmoid-default": dict(op="HardSigmoid"),
    "HardSwish": dict(op="HardSwish"),
    "Dropout-opset7": dict(op="Dropout", attrs=dict(ratio=0.3), opset=7),
    "Dropout-mask-opset13": dict(op="Dropout", outputs=2, opset=13),
    "PRelu": dict(op="PRelu", extra={"slope": np.linspace(-0.5, 0.5, X.shape[1]).astype(np.float32)}),
    "Sum": dict(op="Sum", extra={"b": np.full(X.shape[1], 0.25, np.float32),
                                 "c": np.full(X.shape[1], -1.5, np.float32)}),
    "LayerNormalization": dict(op="LayerNormalization",
                               extra={"s": np.linspace(0.5, 1.5, X.shape[1]).astype(np.float32),
                                      "b": np.full(X.shape[1], 0.1, np.float32)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rewrite_computes_the_same_and_is_differentiable(case: str) -> None:
    model = _one_op(**CASES[case])
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert make_differentiable(rewritten) == 1
    assert not any(n.op_type == CASES[case]["op"] and n.op_type not in DIFFERENTIABLE_OPS for n in rewritten.graph.node)
    np.testing.assert_allclose(_run(rewritten), _run(model), rtol=1e-6, atol=1e-7)
    check_differentiable(rewritten)
    with pytest.raises(ModelError) if CASES[case]["op"] not in DIFFERENTIABLE_OPS else _nothing():
        check_differentiable(model)
    if CASES[case].get("opset", 17) < 13:  # what the canonical form does to old files (Dropout-7 -> 13, no mask)
        model = onnx.version_converter.convert_version(model, 13)
    grads = TensorGradients(model, "y", ["x"])(X, np.ones_like(X))  # rewrites inside, then the builder
    assert grads["x"].shape == X.shape and np.isfinite(grads["x"]).all()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def _hard_sigmoid_grad(x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    z = alpha * x + beta
    return np.where((z > 0) & (z < 1), alpha, 0.0)


@pytest.mark.parametrize("op", ["HardSigmoid", "HardSwish", "PRelu"])
def test_gradients_match_numpy(op: str) -> None:
    """d(sum seed*y)/dx away from the kinks, against the closed form."""
    x = X[:, np.abs(X[0]) > 0.01].copy()
    x = x[:, (np.abs(np.abs(x[0]) - 3) > 0.01) & (np.abs(np.abs(x[0]) - 2.5) > 0.01)]
    seed = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    extra = {"slope": np.full(x.shape[1], 0.25, np.float32)} if op == "PRelu" else None
    model = _one_op(op, dict(alpha=0.2, beta=0.5) if op == "HardSigmoid" else None, extra)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = x.shape[1]
    got = TensorGradients(model, "y", ["x"])(x, seed)["x"]
    if op == "HardSigmoid":
        local = _hard_sigmoid_grad(x, 0.2, 0.5)
    elif op == "HardSwish":
        local = np.where(x < -3, 0.0, np.where(x > 3, 1.0, (2 * x + 3) / 6))
    else:
        local = np.where(x > 0, 1.0, 0.25)
    np.testing.assert_allclose(got, seed * local, rtol=1e-5, atol=1e-6)


def test_op_without_gradient_is_refused_in_one_line() -> None:
    model = _one_op("Elu")
    with pytest.raises(ModelError, match=r"cannot differentiate node 'the_op' \(Elu\): it has no gradient") as info:
        check_differentiable(model, "m.onnx")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match=r"\(Elu\): it has no gradient"):
        TensorGradients(model, "y", ["x"])  # before the native builder, not a C++ traceback


def test_shape_paths_are_not_on_the_gradient_path() -> None:
    """Shape -> Reshape: Shape has no gradient, but no gradient flows through an int64 tensor."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    check_differentiable(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
