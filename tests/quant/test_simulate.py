"""The fake-quant graph: forward values equal the numpy reference quantizers, the gradient to the
shadow weight is the identity, 16-bit simulation predicts like the float model."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from impq_onnx.quant import quantizers
from impq_onnx.quant.schemes import weight_scheme
from impq_onnx.errors import PlanError
from impq_onnx.quant.plan import ActivationClip, PrecisionPlan
from impq_onnx.runtime import inference_session
from impq_onnx.quant.simulate import (MSE_SAMPLES, calibrate_clips, fit_clips_mse, mse_clip, quantized_weight_name,
                                      simulate)
from quant_models import SIZE, canonical_and_sites, quadrant_batch, quadrant_batches, tiny_cnn

SCHEMES = ("midrise-max", "symmetric-rms", "pow2-std")


@pytest.fixture(scope="module")
def tiny():
    return canonical_and_sites()


def _initializers(canonical) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in canonical.to_proto().graph.initializer}


def _mixed_plan(sites, scheme, seed=1) -> PrecisionPlan:
    plan = PrecisionPlan.uniform(sites, 4, None, weight_scheme=scheme)
    rng = np.random.default_rng(seed)
    for layer in sites.layers:
        plan.weights[layer.node] = [int(b) for b in rng.integers(1, 9, layer.kernels)]
    plan.weights["conv2"][3] = None  # a float kernel inside a quantized layer
    plan.weights["conv2"][0] = 1
    plan.weights["conv2"][1] = 8
    return plan


@pytest.mark.parametrize("scheme", SCHEMES)
def test_mixed_kernel_bits_take_at_most_2_to_the_b_values(tiny, scheme):
    canonical, sites = tiny
    plan = _mixed_plan(sites, scheme)
    sim = simulate(canonical, plan, sites, expose_weights=True)
    session = inference_session(sim.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    x, _ = quadrant_batch(2, np.random.default_rng(0))
    outputs = dict(zip(names, session.run(None, {canonical.input_name: x})))
    floats = _initializers(canonical)
    for layer in sites.layers:
        q = outputs[quantized_weight_name(layer.node)]
        w = floats[layer.weight]
        reference = weight_scheme(scheme).quantize(w, plan.weights[layer.node], layer.kernel_axis)
        if scheme != "symmetric-rms":  # pow2-std: sigma may differ by 1 ulp, the power-of-two step does not
            np.testing.assert_array_equal(q, reference)
        else:  # RMS: onnxruntime and numpy sum in different orders (1 ulp)
            np.testing.assert_allclose(q, reference, rtol=1e-6)
        for k, bits in enumerate(plan.weights[layer.node]):
            values = np.unique(np.take(q, k, axis=layer.kernel_axis))
            if bits is None:
                np.testing.assert_array_equal(np.take(q, k, axis=layer.kernel_axis), np.take(w, k, axis=layer.kernel_axis))
            else:
                assert len(values) <= 2**bits, (layer.node, k, bits, values)


def test_reference_grids_are_the_documented_ones():
    w = np.array([[-1.0, -0.3, 0.0, 0.2, 0.9]], np.float32)
    assert set(weight_scheme("midrise-max").quantize(w, [1], 0).ravel()) == {-0.5, 0.5}
    assert set(weight_scheme("midrise-max").quantize(w, [2], 0).ravel()) <= {-0.75, -0.25, 0.25, 0.75}
    rms = float(np.sqrt(np.mean(w**2)))
    np.testing.assert_allclose(sorted(set(weight_scheme("symmetric-rms").quantize(w, [1], 0).ravel())), [-rms, rms], rtol=1e-6)
    q3 = weight_scheme("symmetric-rms").quantize(w, [3], 0)  # step 4 rms / 3, levels -3..3
    step = 4 * rms / 3
    np.testing.assert_allclose(q3 / step, np.rint(q3 / step), atol=1e-5)
    assert 0.0 in q3
    w4 = np.array([[-1.0, 1.0] * 4], np.float32)  # sigma = 1
    step = 2.0 ** math.ceil(math.log2(4.12 / 8))  # the poster's 4-bit rule: 1.0
    assert set(weight_scheme("pow2-std").quantize(w4, [4], 0).ravel()) == {-step, step}
    assert set(weight_scheme("pow2-std").quantize(w4, [1], 0).ravel()) == {-4.0, 4.0}  # ±pow2(4.12)/2
    w2 = np.array([[-20.0, 20.0] + [0.0] * 6], np.float32)  # sigma = 10: step pow2(10 * 4.12 / 2) = 32
    assert set(weight_scheme("pow2-std").quantize(w2, [2], 0).ravel()) == {-32.0, 0.0, 32.0}
    x = np.linspace(-1, 5, 101).astype(np.float32)
    qa = quantizers.quantize_activation(x, 2, 4.0, signed=False)
    assert set(qa) == {0.0, 1.0, 2.0, 3.0}
    qs = quantizers.quantize_activation(x, 2, 4.0, signed=True)
    assert set(qs) == {0.0, 2.0}  # levels -4, -2, 0, 2; x in [-1, 5] reaches only these
    assert set(quantizers.quantize_activation(-x, 2, 4.0, signed=True)) == {-4.0, -2.0, 0.0}


def _run_weight_quantizer(w: np.ndarray, bits, axis: int, scheme: str, opset: int = 17):
    """The ONNX weight quantizer alone on ``w`` (a graph input): returns its output."""
    g = quantizers.GraphBuilder("q", opset)
    out = weight_scheme(scheme).build_quantizer(g, "w", w.shape, axis, list(bits))
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, list(w.shape))],
                              [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, list(w.shape))], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    return inference_session(model.SerializeToString()).run(None, {"w": w})[0]


def _is_pow2(x) -> bool:
    mantissa, _ = np.frexp(np.asarray(x, np.float32))
    return bool(np.all(mantissa == np.float32(0.5)))


def test_pow2_ceil_is_exact_in_numpy_and_onnx():
    powers = np.ldexp(np.float32(1), np.arange(-99, 100)).astype(np.float32)
    x = np.concatenate([powers, np.nextafter(powers, np.float32(0)), np.nextafter(powers, np.float32(np.inf)),
                        powers * np.float32(1.5), powers * np.float32(0.75),
                        np.random.default_rng(0).uniform(1e-6, 10, 1000).astype(np.float32)]).astype(np.float32)
    exact = np.array([v if math.frexp(v)[0] == 0.5 else 2.0 ** math.frexp(v)[1] for v in x.tolist()], np.float32)
    above = np.nextafter(powers, np.float32(np.inf))
    np.testing.assert_array_equal(quantizers.pow2_ceil(x), exact)
    g = quantizers.GraphBuilder("p", 17)
    out = g.pow2_ceil("x")
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [x.size])],
                              [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [x.size])], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    np.testing.assert_array_equal(inference_session(model.SerializeToString()).run(None, {"x": x})[0], exact)
    assert np.all(quantizers.pow2_ceil(powers) == powers) and np.all(quantizers.pow2_ceil(above) == 2 * powers)


def _sigma_hitting_a_power_of_two(bits: int) -> np.float32:
    """A float32 sigma whose ``sigma * factor`` rounds to exactly a power of two."""
    factor = np.float32(weight_scheme("pow2-std").grid(bits).factor)
    sigma = np.float32(0.125 / float(factor))
    for _ in range(64):
        if sigma * factor == np.float32(0.125):
            return sigma
        sigma = np.nextafter(sigma, np.float32(np.inf) if sigma * factor < np.float32(0.125) else np.float32(0))
    raise AssertionError("no sigma found")


@pytest.mark.parametrize("bits", range(1, 9))
def test_pow2_std_reference_equals_onnx_exactly(bits):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((6, 4, 3, 3)) * 0.3 + 0.05).astype(np.float32)
    kernel_bits = [bits, bits, max(1, bits - 1), None, min(8, bits + 1), bits]
    q = _run_weight_quantizer(w, kernel_bits, 0, "pow2-std")
    reference = weight_scheme("pow2-std").quantize(w, kernel_bits, 0)
    assert np.array_equal(q.view(np.int32), reference.view(np.int32))
    sigma = float(np.std(w.astype(np.float64)))
    for k, b in enumerate(kernel_bits):
        kernel = q[k]
        if b is None:
            np.testing.assert_array_equal(kernel, w[k])
            continue
        step = 2.0 ** math.ceil(math.log2(4.12 * sigma / 2 ** (b - 1)))
        assert len(np.unique(kernel)) <= 2**b
        codes = kernel / step if b > 1 else kernel / (step / 2)
        np.testing.assert_array_equal(codes, np.rint(codes))  # levels on the power-of-two grid
        if b == 1:
            assert set(np.unique(codes)) <= {-1.0, 1.0}
        else:
            assert codes.min() >= -(2 ** (b - 1)) and codes.max() <= 2 ** (b - 1) - 1
    # the trap: sigma * factor exactly a power of two gives that step (not twice it), in both
    sigma = _sigma_hitting_a_power_of_two(bits)
    w = np.array([[-sigma], [sigma]], np.float32)  # mean 0, population std exactly sigma
    assert weight_scheme("pow2-std").statistic(w, 0).item() == sigma
    q = _run_weight_quantizer(w, [bits, bits], 0, "pow2-std")
    reference = weight_scheme("pow2-std").quantize(w, [bits, bits], 0)
    assert np.array_equal(q.view(np.int32), reference.view(np.int32))
    expected = np.clip(np.rint(w / np.float32(0.125)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * np.float32(0.125)
    if bits == 1:
        expected = np.sign(w) * np.float32(0.0625)
    np.testing.assert_array_equal(reference, expected.astype(np.float32))


def _gradient(model: onnx.ModelProto, wrt: list[str], output: str, seed: int = 0):
    """d(sum(output * R))/d(wrt) with onnxruntime-training's gradient builder, and R."""
    from impq_onnx.engine import ort_training as _ort_training
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    _ort_training.load()
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    shape = None
    sess = inference_session(proto.SerializeToString())
    for out in sess.get_outputs():
        if out.name == output:
            shape = out.shape
    del proto.graph.output[:]
    r = np.random.default_rng(seed).standard_normal([d if isinstance(d, int) else 2 for d in shape]).astype(np.float32)
    proto.graph.initializer.append(numpy_helper.from_array(r, "test/R"))
    proto.graph.node.extend([
        helper.make_node("Mul", [output, "test/R"], ["test/prod"]),
        helper.make_node("ReduceSum", ["test/prod"], ["test/loss"], keepdims=0),
    ])
    proto.graph.output.append(helper.make_tensor_value_info("test/loss", onnx.TensorProto.FLOAT, []))
    builder = GradientGraphBuilder(proto.SerializeToString(), {"test/loss"}, set(wrt), "test/loss")
    builder.build()
    grad_model = onnx.load_from_string(builder.get_model())
    for name in wrt:
        grad_model.graph.output.append(helper.make_tensor_value_info(name + "_grad", onnx.TensorProto.FLOAT, None))
    session = inference_session(grad_model.SerializeToString())
    return session, r


@pytest.mark.parametrize("scheme", SCHEMES)
def test_weight_gradient_is_identity(tiny, scheme):
    canonical, sites = tiny
    plan = _mixed_plan(sites, scheme)
    sim = simulate(canonical, plan, sites, expose_weights=True)
    layer = sites.layer("conv2")
    session, r = _gradient(sim, [layer.weight], quantized_weight_name(layer.node))
    x, _ = quadrant_batch(2, np.random.default_rng(0))
    (grad,) = session.run([layer.weight + "_grad"], {canonical.input_name: x})
    np.testing.assert_allclose(grad, r, rtol=1e-6, atol=0)


@pytest.mark.parametrize("signed", [False, True])
def test_activation_gradient_is_clipped_identity(signed):
    x = np.linspace(-5, 5, 41).astype(np.float32).reshape(1, 41)
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 41])],
                              [], initializer=[])
    g = quantizers.GraphBuilder("q", 17)
    out = quantizers.build_activation_quantizer(g, "x", 3, 4.0, signed)
    graph.node.extend(g.nodes)
    graph.initializer.extend(g.initializers)
    graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [1, 41]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    forward = inference_session(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(forward, quantizers.quantize_activation(x, 3, 4.0, signed))
    assert len(np.unique(forward)) <= 8
    session, r = _gradient(model, ["x"], out)
    (grad,) = session.run(["x_grad"], {"x": x})
    low = -4.0 if signed else 0.0
    inside = (x > low) & (x < 4.0)
    np.testing.assert_allclose(grad[inside], r[inside], rtol=1e-6)
    assert np.all(grad[(x < low) | (x > 4.0)] == 0)


def test_16_bit_simulation_predicts_like_float():
    model = tiny_cnn(seed=3)
    canonical, sites = canonical_and_sites(model)
    plan = PrecisionPlan.uniform(sites, 16, None)
    float_session = inference_session(canonical.to_bytes())
    sim_session = inference_session(simulate(canonical, plan, sites).SerializeToString())
    x = np.random.default_rng(5).standard_normal((256, 3, SIZE, SIZE)).astype(np.float32)
    f = float_session.run(None, {"x": x})[0]
    s = sim_session.run(None, {"x": x})[0]
    assert np.mean(np.argmax(f, 1) == np.argmax(s, 1)) == 1.0
    np.testing.assert_allclose(s, f, atol=1e-3)


def test_float_plan_and_model_untouched(tiny):
    canonical, sites = tiny
    before = canonical.to_bytes()
    sim = simulate(canonical, PrecisionPlan.uniform(sites, None, None), sites)
    assert [n.op_type for n in sim.graph.node] == [n.op_type for n in canonical.to_proto().graph.node]
    plan = PrecisionPlan.uniform(sites, 4, 4, default_clip=3.0)
    sim = simulate(canonical, plan, sites)
    ops = [n.op_type for n in sim.graph.node]
    assert ops.count("FakeQuant") == len(sites.layers) + len(sites.activations)
    assert canonical.to_bytes() == before
    onnx.checker.check_model(sim)


def test_missing_clip_is_a_plan_error(tiny):
    canonical, sites = tiny
    plan = PrecisionPlan.uniform(sites, 4, 4)  # input 'x' has no batch-norm: clip unknown
    with pytest.raises(PlanError, match=r"clips\['x'\]: no clip value"):
        simulate(canonical, plan, sites)


def test_calibrate_fills_missing_clips_with_the_percentile(tiny):
    canonical, sites = tiny
    plan = PrecisionPlan.uniform(sites, 4, 4)
    calibrated = calibrate_clips(canonical, plan, sites, quadrant_batches(8, 16)())
    assert calibrated.clips["r1"] == plan.clips["r1"]  # known from the batch-norm
    xs = np.concatenate([x for x, _ in quadrant_batches(5, 16)()])
    assert calibrated.clips["x"] == ActivationClip(pytest.approx(float(np.percentile(np.abs(xs), 99.9)), rel=1e-6), True)
    sim = simulate(canonical, calibrated, sites)
    inference_session(sim.SerializeToString())


def _quant_error(v, bits, clip, signed):
    return float(np.mean(np.square(quantizers.quantize_activation(v, bits, clip, signed) - v, dtype=np.float64)))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 6])
def test_mse_clip_is_as_good_as_a_dense_scan(bits, signed):
    """The grid search lands within 1 % of the best error that a dense scan of 4,000 clips finds, for a
    Gaussian, a heavy-tailed and a two-scale sample (ReLU-like or symmetric)."""
    rng = np.random.default_rng(bits)
    two_scale = np.concatenate([rng.standard_normal(19_000) * 0.05, rng.standard_normal(1_000) * 4])
    for v in (rng.standard_normal(20_000), rng.standard_t(3, 20_000), two_scale):
        v = (v if signed else np.maximum(v, 0)).astype(np.float32)
        clip = mse_clip(v, bits, signed)
        top = float(np.max(np.abs(v)))
        dense = min(_quant_error(v, bits, c, signed) for c in np.linspace(top / 400, top, 4000))
        assert _quant_error(v, bits, clip, signed) <= dense * 1.01
        assert isinstance(clip, float) and 0 < clip <= top


def test_mse_clip_of_values_at_or_below_zero_is_none():
    assert mse_clip(np.array([-1.0, 0.0, -3.0], np.float32), 4, signed=False) is None
    assert mse_clip(np.zeros(10, np.float32), 4, signed=True) is None
    assert mse_clip(np.array([np.nan, 2.0, np.inf], np.float32), 4, signed=False) == pytest.approx(2.0, rel=0.1)


def test_fit_clips_mse_sets_only_the_named_sites_and_is_seeded(tiny):
    """Only the named sites with bits change; their clip is the mse_clip of the model's values there, the
    same for the same seed; the plan given is not modified."""
    canonical, sites = tiny
    plan = calibrate_clips(canonical, PrecisionPlan.uniform(sites, 4, 3), sites, quadrant_batches(8, 16)())
    before = plan.copy()
    fitted = fit_clips_mse(canonical, plan, sites, ["r1"], quadrant_batches(8, 16)(), seed=0)
    assert plan.clips == before.clips
    assert fitted.clips["x"] == plan.clips["x"]
    assert fitted.clips["r1"].signed == plan.clips["r1"].signed and fitted.clips["r1"] != plan.clips["r1"]
    again = fit_clips_mse(canonical, plan, sites, ["r1"], quadrant_batches(8, 16)(), seed=0)
    assert again.clips == fitted.clips
    proto = canonical.to_proto()
    proto.graph.output.append(helper.make_tensor_value_info("r1", onnx.TensorProto.FLOAT, None))
    session = inference_session(proto.SerializeToString())
    values = np.concatenate([session.run(["r1"], {"x": x})[0].reshape(-1) for x, _ in quadrant_batches(5, 16)()])
    assert values.size <= 5 * MSE_SAMPLES  # all of them kept: the fit saw exactly these
    assert fitted.clips["r1"].value == mse_clip(values, 3, plan.clips["r1"].signed)
    float_site = PrecisionPlan.uniform(sites, 4, None)
    assert fit_clips_mse(canonical, float_site, sites, ["r1"], quadrant_batches(8, 16)()).clips == float_site.clips
