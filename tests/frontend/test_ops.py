"""The layer-op registry, shown by the op added on it: ConvTranspose through every stage.

Each case builds a tiny model in code and checks ConvTranspose against loop-by-loop numpy
references (forward, input gradient, per-sample weight gradient) written from the ONNX definition,
and against onnxruntime: site analysis, simulation, per-sample sensitivity norms (numpy and graph
form), the gradient graph (onnxruntime-training 1.19.2 has no CPU kernel for ConvTransposeGrad; the
op replaces it), fine-tuning, and qdq lowering verified exact.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from impq_onnx.engine.gradients import TensorGradients
from impq_onnx.engine.training import fine_tune
from impq_onnx.frontend.canonical import from_proto
from impq_onnx.frontend.ops import LAYER_OPS, layer_op
from impq_onnx.frontend.ops.conv_transpose import ConvTransposeOp
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.lowering.lower import lower
from impq_onnx.lowering.verify import verify
from impq_onnx.quant.schemes import weight_scheme
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import quantized_weight_name, simulate
from impq_onnx.runtime import inference_session
from impq_onnx.sensitivity import noise_gain
from impq_onnx.sensitivity.per_sample import NormGraph, kernel_square_norms, layer_geometry

# (weight shape [C_in, C_out/group, kh, kw], attributes, expected kernel axis)
CASES = {
    "plain": ((3, 4, 3, 3), dict(strides=[2, 2], pads=[1, 0, 1, 1], output_padding=[1, 1]), 1),
    "grouped": ((4, 3, 3, 3), dict(group=2, dilations=[2, 2], pads=[1, 1, 1, 1]), 1),
    "depthwise": ((4, 1, 3, 3), dict(group=4, strides=[2, 2], output_padding=[1, 0]), 0),
    "wide-padding": ((3, 2, 2, 3), dict(strides=[3, 2], pads=[0, 1, 1, 0], output_padding=[2, 1]), 1),
}
SIZE = 5


def _attrs(w_shape, attrs):
    spatial = len(w_shape) - 2
    return (int(attrs.get("group", 1)), attrs.get("strides", [1] * spatial), attrs.get("dilations", [1] * spatial),
            attrs.get("pads", [0] * 2 * spatial), attrs.get("output_padding", [0] * spatial))


def _positions(x_size, w_shape, attrs):
    """Yield ``(p, i, q)``: input position ``p`` meets kernel offset ``i`` at output position ``q``."""
    _, strides, dilations, pads, _ = _attrs(w_shape, attrs)
    out = _out_size(x_size, w_shape, attrs)
    for p in itertools.product(*(range(n) for n in x_size)):
        for i in itertools.product(*(range(k) for k in w_shape[2:])):
            q = tuple(pp * s + ii * d - b for pp, ii, s, d, b in zip(p, i, strides, dilations, pads))
            if all(0 <= qq < o for qq, o in zip(q, out)):
                yield p, i, q


def _out_size(x_size, w_shape, attrs):
    _, strides, dilations, pads, extra = _attrs(w_shape, attrs)
    spatial = len(x_size)
    return tuple(s * (n - 1) + e + (k - 1) * d + 1 - pads[a] - pads[a + spatial]
                 for a, (n, k, s, d, e) in enumerate(zip(x_size, w_shape[2:], strides, dilations, extra)))


def _groups(w_shape, attrs):
    """``(input channel c, output channel o, weight column j)`` triples that the weight connects."""
    group = _attrs(w_shape, attrs)[0]
    c_group, o_group = w_shape[0] // group, w_shape[1]
    for c in range(w_shape[0]):
        for j in range(o_group):
            yield c, (c // c_group) * o_group + j, j


def _pairs(w_shape, attrs, x_size):
    return itertools.product(list(_groups(w_shape, attrs)), list(_positions(x_size, w_shape, attrs)))


def _forward(x, w, b, attrs):
    y = np.zeros((x.shape[0], w.shape[1] * _attrs(w.shape, attrs)[0]) + _out_size(x.shape[2:], w.shape, attrs))
    for (c, o, j), (p, i, q) in _pairs(w.shape, attrs, x.shape[2:]):
        y[(slice(None), o) + q] += x[(slice(None), c) + p] * w[(c, j) + i]
    return y + b.reshape(1, -1, *[1] * (x.ndim - 2))


def _weight_grad(x, dy, w_shape, attrs):
    """Per sample: ``dW_n[c, j, i] = sum_p x_n[c, p] * dy_n[o, q(p, i)]``."""
    grad = np.zeros((x.shape[0],) + tuple(w_shape))
    for (c, o, j), (p, i, q) in _pairs(w_shape, attrs, x.shape[2:]):
        grad[(slice(None), c, j) + i] += x[(slice(None), c) + p] * dy[(slice(None), o) + q]
    return grad


def _input_grad(dy, w, x_shape, attrs):
    grad = np.zeros(x_shape)
    for (c, o, j), (p, i, q) in _pairs(w.shape, attrs, x_shape[2:]):
        grad[(slice(None), c) + p] += w[(c, j) + i] * dy[(slice(None), o) + q]
    return grad


def _layer_model(w, b, attrs) -> onnx.ModelProto:
    """x -> ConvTranspose -> mean over space: ``logits`` are the per-channel means."""
    node = helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], name="up", **attrs)
    graph = helper.make_graph(
        [node, helper.make_node("ReduceMean", ["y"], ["logits"], axes=[2, 3], keepdims=0)], "convt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0], SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _network(w_shape, attrs, seed=0) -> onnx.ModelProto:
    """Conv(2->C_in) -> Relu -> ConvTranspose -> Relu -> GlobalAveragePool -> Flatten -> Gemm(-> 5 classes)."""
    rng = np.random.default_rng(seed)
    c_out = w_shape[1] * _attrs(w_shape, attrs)[0]

    def init(name, *shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("c.w", w_shape[0], 2, 3, 3, scale=0.4), init("c.b", w_shape[0], scale=0.1),
             init("t.w", *w_shape, scale=0.3), init("t.b", c_out, scale=0.1),
             init("fc.w", 5, c_out, scale=0.5), init("fc.b", 5, scale=0.1)]
    nodes = [helper.make_node("Conv", ["x", "c.w", "c.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ConvTranspose", ["r", "t.w", "t.b"], ["t"], name="up", **attrs),
             helper.make_node("Relu", ["t"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "convt_net",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_registry_holds_every_layer_op_and_only_default_domain_nodes():
    assert list(LAYER_OPS) == ["Conv", "Gemm", "MatMul", "ConvTranspose"]
    assert isinstance(layer_op("ConvTranspose"), ConvTransposeOp)
    assert layer_op(helper.make_node("ConvTranspose", ["x", "w"], ["y"])) is LAYER_OPS["ConvTranspose"]
    assert layer_op(helper.make_node("ConvTranspose", ["x", "w"], ["y"], domain="com.example")) is None
    assert layer_op("Relu") is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_site_analysis_kernel_axis_groups_and_macs(case):
    w_shape, attrs, axis = CASES[case]
    sites = find_sites(from_proto(_network(w_shape, attrs)), (1, 2, SIZE, SIZE))
    layer = sites.layer("up")
    group = _attrs(w_shape, attrs)[0]
    assert (layer.op_type, layer.kernel_axis, layer.conv_groups) == ("ConvTranspose", axis, group)
    assert layer.kernels == w_shape[axis] and layer.weight == "t.w" and layer.bias == "t.b" and layer.activation == "r"
    assert layer.macs == SIZE * SIZE * int(np.prod(w_shape))  # every input pixel meets every weight
    assert layer.params == int(np.prod(w_shape)) and layer.batchnorm is None
    # each kernel slice feeds whole output channels: its weights reach no channel another kernel reaches
    reached = [{o for c, o, j in _groups(w_shape, attrs) if (c, j)[axis] == k} for k in range(layer.kernels)]
    assert all(a.isdisjoint(b) for a, b in itertools.combinations(reached, 2))
    assert sites.activation_of(layer).unsigned and sites.activation_of(layer).shape == (w_shape[0], SIZE, SIZE)


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_forward_is_onnxruntimes(case):
    w_shape, attrs, _ = CASES[case]
    rng = np.random.default_rng(1)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[1] * _attrs(w_shape, attrs)[0]).astype(np.float32)
    x = rng.standard_normal((2, w_shape[0], SIZE, SIZE)).astype(np.float32)
    model = _layer_model(w, b, attrs)
    model.graph.output[0].name = "y"
    del model.graph.node[1:]
    got = inference_session(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _forward(x.astype(np.float64), w, b, attrs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_and_per_sample_norms_match_the_brute_force(case):
    w_shape, attrs, axis = CASES[case]
    rng = np.random.default_rng(2)
    w = rng.standard_normal(w_shape).astype(np.float32)
    c_out = w_shape[1] * _attrs(w_shape, attrs)[0]
    b = rng.standard_normal(c_out).astype(np.float32)
    model = _layer_model(w, b, attrs)
    x = rng.standard_normal((3, w_shape[0], SIZE, SIZE)).astype(np.float32)
    seed = rng.standard_normal((3, c_out)).astype(np.float32)
    grads = TensorGradients(model, "logits", ["x", "W", "B", "y"])  # builds ConvTransposeGrad, then replaces it
    g = grads(x, seed)
    dy = g["y"].astype(np.float64)
    per_sample = _weight_grad(x.astype(np.float64), dy, w_shape, attrs)
    np.testing.assert_allclose(g["x"], _input_grad(dy, w.astype(np.float64), x.shape, attrs), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g["W"], per_sample.sum(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g["B"], dy.sum(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    other = tuple(a + 1 for a in range(len(w_shape)) if a != axis)
    expected = (per_sample**2).sum(axis=other)  # [N, kernels]
    node = model.graph.node[0]
    geometry = layer_geometry(node, w_shape, axis)
    np.testing.assert_allclose(kernel_square_norms(geometry, x, g["y"]), expected, rtol=1e-4)
    for n in range(len(x)):  # one backward per sample: onnxruntime's weight gradient is the per-sample one
        np.testing.assert_allclose(grads(x[n : n + 1], seed[n : n + 1])["W"], per_sample[n], rtol=1e-4, atol=1e-6)

    for static in (False, True):  # slice ends from dy's shape at run time / constants from the known shapes
        used = []

        def epilogue(graph, gradients, shapes, static=static, used=used):
            known = shapes if static else None
            used.append(known is not None and gradients["y"] in known)
            NormGraph(graph, "norms", known).layer(geometry, "x", gradients["y"], "kernel_norms")
            return ["kernel_norms"]

        in_graph = TensorGradients(model, "logits", ["y"], epilogue=epilogue,
                                   input_shape=x.shape[1:] if static else None)(x, seed)["kernel_norms"]
        np.testing.assert_allclose(in_graph, expected.sum(0), rtol=1e-4)
        assert used == [static]


@pytest.mark.parametrize("case", ["plain", "grouped", "depthwise"])
def test_simulate_sensitivity_and_exact_qdq_lowering(case):
    w_shape, attrs, axis = CASES[case]
    canonical = from_proto(_network(w_shape, attrs))
    sites = find_sites(canonical, (1, 2, SIZE, SIZE))
    rng = np.random.default_rng(3)
    plan = PrecisionPlan.uniform(sites, 4, 6, default_clip=3.0)
    plan.weights["up"] = [int(bits) for bits in rng.integers(1, 9, sites.layer("up").kernels)]
    plan.weights["up"][0], plan.weights["up"][-1] = 1, 8
    plan.validate(sites)

    simulated = simulate(canonical, plan, sites, expose_weights=True)
    session = inference_session(simulated.SerializeToString())
    x = (rng.standard_normal((24, 2, SIZE, SIZE)) * 1.5).astype(np.float32)
    names = [o.name for o in session.get_outputs()]
    quantized = dict(zip(names, session.run(None, {"x": x})))[quantized_weight_name("up")]
    w = numpy_helper.to_array(next(t for t in canonical.to_proto().graph.initializer if t.name == "t.w"))
    reference = weight_scheme(plan.weight_scheme).quantize(w, plan.weights["up"], axis)
    np.testing.assert_array_equal(quantized, reference)

    exact = noise_gain(simulated, sites, [x], plan=plan, method="exact")
    fast = noise_gain(simulated, sites, [x], plan=plan, probes=None)
    kernels = [f"up/{k}" for k in range(sites.layer("up").kernels)]
    assert max(exact.weights[k] for k in kernels) > 0
    for name, value in exact.weights.items():
        assert fast.weights[name] == pytest.approx(value, rel=1e-4, abs=1e-9 * max(exact.weights.values()))

    lowered = lower(canonical, plan, sites)
    dq = next(n for n in lowered.proto.graph.node if n.op_type == "DequantizeLinear" and "t.w" in n.input[0])
    assert [a.i for a in dq.attribute if a.name == "axis"] == [axis]
    assert sum(n.op_type == "ConvTranspose" for n in lowered.proto.graph.node) == 1
    result = verify(lowered, canonical, plan, sites, [x])
    assert result.ok and result.max_logit_diff == 0.0 and result.agreement == 1.0


def test_fine_tuning_runs_through_the_replaced_gradient():
    w_shape, attrs, _ = CASES["grouped"]
    canonical = from_proto(_network(w_shape, attrs))
    sites = find_sites(canonical, (1, 2, SIZE, SIZE))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 2, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, 5, 16)
    trained = fine_tune(canonical, None, sites, [(x, y)] * 2, steps=2, lr=0.05, progress=False)
    w = numpy_helper.to_array(next(t for t in canonical.to_proto().graph.initializer if t.name == "t.w"))
    assert np.all(np.isfinite(trained.losses)) and not np.array_equal(trained.values["t.w"], w)
