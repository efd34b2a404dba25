"""Noise-gain sensitivity (impq_onnx.sensitivity): hand-derived cases, invariants, fast vs exact."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from impq_onnx.frontend.canonical import from_proto
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.sensitivity import SensitivityTable, noise_gain
from impq_onnx.sensitivity.margins import probe_seeds, rank_seeds, runner_ups
from impq_onnx.sensitivity.per_sample import kernel_square_norms, layer_geometry
from impq_onnx.frontend.site_analysis import find_sites
from quant_models import CLASSES, SIZE, canonical_and_sites, linear_classifier, quadrant_batch, tiny_cnn

D, C = 6, 5
FLOAT_BITS = 8


@pytest.fixture(scope="module")
def linear():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((C, D)).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    x = rng.standard_normal((12, D)).astype(np.float32)
    canonical = from_proto(linear_classifier(w, b))
    return canonical, find_sites(canonical, (1, D)), w, b, x


def _hand_linear(w, b, x, runner_count):
    """Z = W x + b: d(Z_i - Z_Y)/dW_k = (delta_ki - delta_kY) x, d(Z_i - Z_Y)/dx = W_i - W_Y."""
    z = x.astype(np.float64) @ w.T.astype(np.float64) + b
    kernels = np.zeros(C)
    act = 0.0
    for n in range(len(x)):
        y = int(np.argmax(z[n]))
        others = sorted((j for j in range(C) if j != y), key=lambda j: (z[n, y] - z[n, j], j))[:runner_count]
        for i in others:
            m2 = (z[n, i] - z[n, y]) ** 2
            for k in range(C):
                coef = (k == i) - (k == y)
                kernels[k] += coef**2 * float(x[n] @ x[n]) / (24 * m2)
            act += float(np.sum((w[i] - w[y]).astype(np.float64) ** 2)) / (24 * m2)
    scale = 2.0**-FLOAT_BITS / len(x)
    return kernels * scale, act * scale


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("runner_count", [2, 10])
def test_linear_classifier_matches_hand_derivation(linear, method, runner_count):
    canonical, sites, w, b, x = linear
    table = noise_gain(canonical, sites, [x], method=method, probes=None, runner_ups=runner_count)
    kernels, act = _hand_linear(w, b, x, runner_count)
    got = np.array([table.weights[f"fc/{k}"] for k in range(C)])
    np.testing.assert_allclose(got, kernels, rtol=1e-4)
    assert table.activations["x"] == pytest.approx(act, rel=1e-4)
    assert table.n_samples == len(x) and table.runner_ups == min(runner_count, C - 1)


def test_reference_weighting_on_linear_classifier(linear):
    canonical, sites, w, b, x = linear
    paper = noise_gain(canonical, sites, [x], method="fast", probes=None)
    ref = noise_gain(canonical, sites, [x], method="fast", probes=None, weighting="reference")
    for k in range(C):
        # reference = mean over the kernel (not sum, no 1/24) x mean|w| x 2^-B
        expected = paper.weights[f"fc/{k}"] * 24 / D * float(np.mean(np.abs(w[k])))
        assert ref.weights[f"fc/{k}"] == pytest.approx(expected, rel=1e-6)
    assert ref.activations["x"] == pytest.approx(paper.activations["x"] * 24 * 4.0, rel=1e-6)  # no BN: clip 4.0


def _hand_midrise(w: np.ndarray, bits: int) -> np.ndarray:
    """IMPQ-NOTES' reference weight quantizer, per row: step 2 max|w| / 2^B, levels (r + 1/2) step, no zero."""
    step = 2 * np.abs(w).max(axis=1, keepdims=True) / 2**bits
    return (np.clip(np.floor(w / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + 0.5) * step


def test_measured_weighting_on_linear_classifier(linear, monkeypatch):
    """measured = the paper's gradient sum x e / 2, e the mean squared error of the group's quantizer measured
    on its own weights (per kernel) or on the site's values over the first MEASURED_SAMPLES samples."""
    sensitivity = importlib.import_module("impq_onnx.sensitivity")  # the package attribute is the API function

    canonical, sites, w, b, x = linear
    bits, clip = 3, 1.5
    plan = PrecisionPlan.uniform(sites, bits, bits, default_clip=clip)
    assert plan.clips["x"].signed
    monkeypatch.setattr(sensitivity, "MEASURED_SAMPLES", 5)  # the first 5 of 12 samples, over two batches
    shifted = x.copy()
    shifted[8:] *= 100  # read only by the gradient sums, not by the measured activation error
    batches = [shifted[:3], shifted[3:]]
    paper = noise_gain(canonical, sites, batches, plan=plan, probes=None)
    measured = noise_gain(canonical, sites, batches, plan=plan, probes=None, weighting="measured")
    gradients = 24 * 2.0**bits  # the paper's factor, taken off its M
    errors = np.mean((_hand_midrise(w, bits).astype(np.float64) - w) ** 2, axis=1)
    for k in range(C):
        assert measured.weights[f"fc/{k}"] == pytest.approx(paper.weights[f"fc/{k}"] * gradients * errors[k] / 2,
                                                            rel=1e-5)
    step = clip / 2 ** (bits - 1)
    v = shifted[:5].astype(np.float64)
    q = step * np.clip(np.rint(np.clip(v, -clip, clip) / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    error = np.mean((q - v) ** 2)
    assert measured.activations["x"] == pytest.approx(paper.activations["x"] * gradients * error / 2, rel=1e-5)
    assert measured.weighting == "measured"


def test_measured_weighting_sees_the_values_a_site_has():
    """A site whose values all sit on its quantizer's grid (the pooled features after a ReLU that is off for every
    sample: exact zeros) measures M = 0 under ``measured``, while its gradients, and so ``step``, are not zero."""
    model = tiny_cnn()
    for t in model.graph.initializer:
        if t.name == "conv2.w":  # conv2 reads the ReLU's r1 >= 0 through weights <= 0: its own ReLU is off
            t.CopyFrom(numpy_helper.from_array(-np.abs(numpy_helper.to_array(t)), t.name))
        if t.name == "fc.b":  # distinct logits, so no margin is a tie
            t.CopyFrom(numpy_helper.from_array(np.arange(CLASSES, dtype=np.float32), t.name))
    canonical, sites = canonical_and_sites(model)
    x, _ = quadrant_batch(16, np.random.default_rng(1))
    plan = PrecisionPlan.uniform(sites, 4, 4, default_clip=4.0)
    step = noise_gain(canonical, sites, [x], plan=plan, probes=None, weighting="step")
    measured = noise_gain(canonical, sites, [x], plan=plan, probes=None, weighting="measured")
    assert step.activations["f"] > 0 and measured.activations["f"] == 0.0


def test_dead_channel_has_zero_sensitivity():
    model = tiny_cnn(seed=3)
    for t in model.graph.initializer:
        if t.name == "conv2.w":
            w = numpy_helper.to_array(t).copy()
            w[:, 5] = 0.0  # conv2 ignores conv1's channel 5
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    canonical, sites = canonical_and_sites(model)
    x, _ = quadrant_batch(16, np.random.default_rng(0))
    for method in ("exact", "fast"):
        table = noise_gain(canonical, sites, [x], method=method)
        assert table.weights["conv1/5"] == 0.0
        assert min(v for k, v in table.weights.items() if k.startswith("conv1/") and k != "conv1/5") > 0


def test_one_bit_less_doubles_the_metric():
    canonical, sites = canonical_and_sites()
    x, _ = quadrant_batch(16, np.random.default_rng(1))
    plan = PrecisionPlan.uniform(sites, 4, 4, default_clip=4.0)
    lower = plan.copy()
    lower.weights["conv2"][3] = 3
    lower.activations["r1"] = 3
    for weighting in ("paper", "reference"):
        a = noise_gain(canonical, sites, [x], plan=plan, probes=None, weighting=weighting)
        b = noise_gain(canonical, sites, [x], plan=lower, probes=None, weighting=weighting)
        if weighting == "paper":  # the reference weighting's mean|w_q| also moves with the bits
            assert b.weights["conv2/3"] == pytest.approx(2 * a.weights["conv2/3"], rel=1e-9)
        assert b.activations["r1"] == pytest.approx(2 * a.activations["r1"], rel=1e-9)
        assert b.weights["conv2/2"] == pytest.approx(a.weights["conv2/2"], rel=1e-9)
        assert b.activations["x"] == pytest.approx(a.activations["x"], rel=1e-9)
    # the "step" weighting uses the real step size: one bit less doubles the step, so M grows 4x
    a = noise_gain(canonical, sites, [x], plan=plan, probes=None, weighting="step")
    b = noise_gain(canonical, sites, [x], plan=lower, probes=None, weighting="step")
    assert b.weights["conv2/3"] == pytest.approx(4 * a.weights["conv2/3"], rel=1e-6)
    assert b.activations["r1"] == pytest.approx(4 * a.activations["r1"], rel=1e-6)


def test_layer_and_network_groups_sum_their_kernels():
    canonical, sites = canonical_and_sites()
    x, _ = quadrant_batch(8, np.random.default_rng(2))
    kernel = noise_gain(canonical, sites, [x], probes=None)
    layer = noise_gain(canonical, sites, [x], probes=None, granularity="layer")
    network = noise_gain(canonical, sites, [x], probes=None, granularity="network")
    for node in ("conv1", "conv2", "fc"):
        total = sum(v for k, v in kernel.weights.items() if k.startswith(node + "/"))
        assert layer.weights[node] == pytest.approx(total, rel=1e-9)
    assert network.weights["network"] == pytest.approx(sum(kernel.weights.values()), rel=1e-9)


def _spearman(a: dict, b: dict) -> float:
    keys = sorted(a)
    ra = np.argsort(np.argsort([a[k] for k in keys]))
    rb = np.argsort(np.argsort([b[k] for k in keys]))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_fast_path_agrees_with_exact_path_on_small_cnn():
    canonical, sites = canonical_and_sites(tiny_cnn(seed=5))
    x, _ = quadrant_batch(48, np.random.default_rng(4))
    batches = [x[:20], x[20:]]  # uneven batches, re-cut into chunks of 16
    exact = noise_gain(canonical, sites, batches, method="exact")
    ranks = noise_gain(canonical, sites, batches, method="fast", probes=None, chunk=16)
    for name, value in exact.weights.items():
        assert ranks.weights[name] == pytest.approx(value, rel=1e-4, abs=1e-12 * max(exact.weights.values()))
    for name, value in exact.activations.items():
        assert ranks.activations[name] == pytest.approx(value, rel=1e-4)
    probed = noise_gain(canonical, sites, batches, method="fast", probes=2, chunk=16)
    assert _spearman(exact.weights, probed.weights) > 0.9
    assert _spearman(exact.activations, probed.activations) > 0.9
    assert probed.method == "fast/probes=2" and exact.method == "exact"


def test_fast_path_norm_graph_has_constant_slice_ends(monkeypatch):
    """The input shape is known, so the per-sample norm nodes slice with constant ends: no ``Shape`` node is
    appended to the gradient graph (each costs session-opening time; ResNet-20's graph halved)."""
    import onnx

    import impq_onnx.engine.gradients as gradients

    opened = []
    session = gradients._session
    monkeypatch.setattr(gradients, "_session", lambda data, *a, **k: opened.append(data) or session(data, *a, **k))
    canonical, sites = canonical_and_sites(tiny_cnn(seed=5))
    x, _ = quadrant_batch(8, np.random.default_rng(4))
    noise_gain(canonical, sites, [x], probes=1, chunk=8, replicas=1)
    graphs = [onnx.load_from_string(data).graph for data in opened]
    norm_nodes = [n for g in graphs for n in g.node if n.name.startswith("impq.sens/norm")]
    assert any(n.op_type == "Slice" for n in norm_nodes)
    assert not [n.name for n in norm_nodes if n.op_type == "Shape"]


@pytest.mark.parametrize("rebuild", ["graph", "numpy"])
def test_replicas_measure_the_same_sums_as_one_session(rebuild):
    """Two sessions measuring halves of every chunk (the probe signs drawn for the whole chunk) give the
    one-session values up to float rounding, also for an odd chunk (parts of 5 and 4 samples)."""
    canonical, sites = canonical_and_sites(tiny_cnn(seed=5))
    x, _ = quadrant_batch(25, np.random.default_rng(7))
    one = noise_gain(canonical, sites, [x], probes=1, chunk=9, rebuild=rebuild, seed=3)
    two = noise_gain(canonical, sites, [x], probes=1, chunk=9, rebuild=rebuild, seed=3, replicas=2, threads=2)
    assert one.n_samples == two.n_samples == 25
    for name, value in one.weights.items():
        assert two.weights[name] == pytest.approx(value, rel=1e-5, abs=1e-12 * max(one.weights.values())), name
    for name, value in one.activations.items():
        assert two.activations[name] == pytest.approx(value, rel=1e-5), name


def test_samples_caps_the_data():
    canonical, sites = canonical_and_sites()
    x, _ = quadrant_batch(16, np.random.default_rng(5))
    table = noise_gain(canonical, sites, [(x, None), (x, None)], samples=20, chunk=8)
    assert table.n_samples == 20


def test_ties_are_skipped_without_nan():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((C, D)).astype(np.float32)
    w[1] = w[0]  # classes 0 and 1 always tie
    b = np.zeros(C, np.float32)
    x = rng.standard_normal((10, D)).astype(np.float32)
    x = x * np.sign(x @ w[0])[:, None]  # ...and are the prediction for every sample
    w[2:] *= 0.1
    canonical = from_proto(linear_classifier(w, b))
    sites = find_sites(canonical, (1, D))
    for method, probes in (("exact", None), ("fast", None), ("fast", 1)):  # fast with probes: runner-ups in the graph
        table = noise_gain(canonical, sites, [x], method=method, probes=probes, runner_ups=2)
        assert table.finite()
        assert table.ties == len(x)
        assert table.weights["fc/1"] == 0.0  # the tied class only appears in the skipped pairs
        assert table.weights["fc/0"] > 0 and table.activations["x"] > 0
        assert json.loads(table.to_json())["ties"] == len(x)


def test_runner_ups_and_seeds():
    z = np.array([[1.0, 3.0, 2.5, 3.0, -1.0]])
    ups = runner_ups(z, 10)
    assert ups.predicted.tolist() == [1]
    assert ups.classes.tolist() == [[3, 2, 0, 4]]  # closest first; class 3 ties with the prediction
    assert ups.inverse_margin[0].tolist() == [0.0, 2.0, 0.5, 0.25]
    assert ups.ties == 1
    assert rank_seeds(ups, 1).tolist() == [[0, -2.0, 2.0, 0, 0]]
    probe = probe_seeds(ups, np.random.default_rng(0))
    assert probe[0, 1] == pytest.approx(-(probe[0, 0] + probe[0, 2] + probe[0, 4]))
    assert np.allclose(np.abs(probe[0, [0, 2, 4]]), [0.5, 2.0, 0.25])


@pytest.mark.parametrize(
    "shape,kernel,attrs",
    [
        ((2, 4, 9, 7), (6, 4, 3, 3), dict(pads=[1, 0, 2, 1], strides=[2, 1])),
        ((2, 4, 9, 9), (4, 2, 3, 3), dict(group=2, dilations=[2, 2], pads=[2, 2, 2, 2])),
        ((2, 4, 8, 8), (4, 1, 3, 3), dict(group=4, strides=[2, 2], auto_pad="SAME_UPPER")),
        ((2, 4, 8, 8), (8, 1, 1, 1), dict(group=4)),
    ],
)
def test_per_sample_conv_weight_norms_match_onnxruntime(shape, kernel, attrs):
    from impq_onnx.engine.gradients import TensorGradients

    rng = np.random.default_rng(7)
    w = rng.standard_normal(kernel).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", **attrs)
    graph = helper.make_graph(
        [node, helper.make_node("ReduceMean", ["y"], ["logits"], axes=[2, 3], keepdims=0)], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape[1:]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal(shape).astype(np.float32)
    seed = rng.standard_normal((shape[0], kernel[0])).astype(np.float32)
    grads = TensorGradients(model, "logits", ["W", "y"])
    dy = grads(x, seed)["y"]
    norms = kernel_square_norms(layer_geometry(node, kernel, 0), x, dy)
    for n in range(shape[0]):
        dw = grads(x[n : n + 1], seed[n : n + 1])["W"].astype(np.float64)
        np.testing.assert_allclose(norms[n], (dw**2).reshape(kernel[0], -1).sum(1), rtol=1e-4)


def test_simulated_model_runs_through_quantizers():
    from impq_onnx.quant.simulate import simulate

    canonical, sites = canonical_and_sites()
    plan = PrecisionPlan.uniform(sites, 4, 4, default_clip=4.0)
    simulated = simulate(canonical, plan, sites)
    x, _ = quadrant_batch(12, np.random.default_rng(8))
    exact = noise_gain(simulated, sites, [x], plan=plan, method="exact")
    fast = noise_gain(simulated, sites, [x], plan=plan, probes=None)
    assert exact.finite() and max(exact.weights.values()) > 0
    for name, value in exact.weights.items():
        assert fast.weights[name] == pytest.approx(value, rel=1e-4, abs=1e-9 * max(exact.weights.values()))


def test_table_views():
    table = SensitivityTable({"a/0": 3.0, "a/1": 1.0, "b/0": 2.0, "b/1": 0.5}, {"x": 1.0, "r": 2.0}, "kernel",
                             "paper", "exact", 9, 4, 0.1)
    assert table.most_sensitive(2) == [("a/0", 3.0), ("b/0", 2.0)]
    assert table.least_sensitive(1, "activations") == [("x", 1.0)]
    assert table.least_sensitive(1, per_layer=True) == {"a": [("a/1", 1.0)], "b": [("b/1", 0.5)]}
    assert SensitivityTable.from_json(table.to_json()) == table
    rows = table.to_csv().splitlines()
    assert rows[0] == "kind,name,layer,sensitivity" and rows[1] == "weight,a/0,a,3.0" and len(rows) == 7
    with pytest.raises(TypeError):
        table.weights["a/0"] = 0.0  # frozen data


def test_bad_options_are_refused():
    canonical, sites = canonical_and_sites()
    x, _ = quadrant_batch(2, np.random.default_rng(9))
    for kw in (dict(weighting="magic"), dict(method="slow"), dict(granularity="channel"), dict(probes=0)):
        with pytest.raises(ValueError):
            noise_gain(canonical, sites, [x], **kw)
    assert math.isfinite(noise_gain(canonical, sites, [x]).seconds)
    assert CLASSES == 4 and SIZE == 8


@pytest.mark.parametrize("head", ["gemm", "matmul"])
def test_depthwise_and_matmul_layers_fast_matches_exact(head):
    import tiny_models

    quirks = tiny_models.Quirks(head=head, batchnorm=False)
    canonical = from_proto(tiny_models.build(quirks))
    sites = find_sites(canonical, (1, 3, tiny_models.H, tiny_models.W))
    x = np.random.default_rng(10).standard_normal((10, 3, tiny_models.H, tiny_models.W)).astype(np.float32)
    exact = noise_gain(canonical, sites, [x], method="exact")
    top = max(exact.weights.values())
    for rebuild in ("graph", "numpy"):
        fast = noise_gain(canonical, sites, [x], probes=None, rebuild=rebuild)
        for name, value in exact.weights.items():
            assert fast.weights[name] == pytest.approx(value, rel=1e-4, abs=1e-9 * top), (rebuild, name)
        for name, value in exact.activations.items():
            assert fast.activations[name] == pytest.approx(value, rel=1e-4), (rebuild, name)


def _in_graph_seeds(z: np.ndarray, count: int, signs: np.ndarray):
    """Run emit_probe_seeds alone on ``z`` (float32 logits) in onnxruntime: (seed, ties)."""
    import onnx

    from impq_onnx.runtime import inference_session
    from impq_onnx.sensitivity.margins import emit_probe_seeds

    n, c = z.shape
    graph = helper.make_graph([], "seeds", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", c]),
                                            helper.make_tensor_value_info("signs", TensorProto.DOUBLE, ["N", None])],
                              [])
    ties = emit_probe_seeds(graph, "z", c, count, "signs", "seed", "p")
    graph.output.extend([helper.make_tensor_value_info("seed", TensorProto.FLOAT, ["N", c]),
                         helper.make_tensor_value_info(ties, TensorProto.INT64, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    seed, tie_count = inference_session(model.SerializeToString()).run(None, {"z": z, "signs": signs})
    return seed, int(tie_count)


@pytest.mark.parametrize("count", [2, 4, 10])
def test_in_graph_seeds_are_numpys(count):
    """The gradient graph picks the runner-ups itself (no forward pass first): the same seeds as
    runner_ups + probe_seeds, bit for bit, for ties with the prediction, equal gaps among runner-ups
    (broken by class index) and random logits, with the signs drawn the way probe_seeds draws them."""
    rng = np.random.default_rng(11)
    z = np.concatenate([
        np.array([[1.0, 3.0, 2.5, 3.0, -1.0], [0.0, 1.0, 0.0, 0.0, 5.0], [2.0, 2.0, 2.0, 2.0, 2.0],
                  [1e-9, 0.0, -1e-9, 3e4, 3e4 * (1 - 1e-7)]]),
        rng.standard_normal((12, 5)) * 3]).astype(np.float32)
    ups = runner_ups(z, count)
    want = probe_seeds(ups, np.random.default_rng(5))
    signs = np.random.default_rng(5).choice(np.array([-1.0, 1.0]), size=ups.classes.shape)
    seed, ties = _in_graph_seeds(z, count, signs)
    assert seed.dtype == np.float32 and np.array_equal(seed, want)
    assert ties == ups.ties > 0


def test_fused_fast_path_runs_one_graph_and_matches_the_forward_pass_path(monkeypatch):
    """With probes and the norms in the graph, one session per replica (the gradient graph, reading the
    probe signs instead of a seed) measures what the forward-pass-first path (numpy norms) measures."""
    import onnx

    import impq_onnx.engine.gradients as gradients
    from impq_onnx.engine.gradients import SEED_INPUT

    opened = []
    session = gradients._session
    monkeypatch.setattr(gradients, "_session", lambda data, *a, **k: opened.append(data) or session(data, *a, **k))
    canonical, sites = canonical_and_sites(tiny_cnn(seed=5))
    x, _ = quadrant_batch(25, np.random.default_rng(7))
    fused = noise_gain(canonical, sites, [x], probes=2, chunk=9, rebuild="graph", seed=3)
    inputs = [[i.name for i in onnx.load_from_string(data).graph.input] for data in opened]
    assert len(opened) == 1 and SEED_INPUT not in inputs[0] and "impq.sens/signs" in inputs[0]
    two_pass = noise_gain(canonical, sites, [x], probes=2, chunk=9, rebuild="numpy", seed=3)
    assert len(opened) == 3  # the numpy path: a forward session, then the gradient session
    assert fused.n_samples == two_pass.n_samples == 25 and fused.ties == two_pass.ties
    top = max(two_pass.weights.values())
    for name, value in two_pass.weights.items():
        assert fused.weights[name] == pytest.approx(value, rel=1e-4, abs=1e-9 * top), name
    for name, value in two_pass.activations.items():
        assert fused.activations[name] == pytest.approx(value, rel=1e-4), name
