"""The weight-scheme registry: every scheme's numpy reference equals its ONNX simulation bit for bit, and a
scheme defined only here (one class + ``register``) runs through simulate -> lower -> verify and the
sensitivity ``step`` weighting with no other change to the package."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from impq_onnx.compression import CompressConfig
from impq_onnx.errors import PlanError
from impq_onnx.lowering.lower import lower
from impq_onnx.lowering.passes.annotate_bits import read_plan_from_annotation
from impq_onnx.lowering.passes.quantize_weights import simulated_stats
from impq_onnx.lowering.verify import runnable, verify
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.quantizers import GraphBuilder
from impq_onnx.quant.schemes import SCHEMES, Grid, WeightScheme, register, weight_scheme
from impq_onnx.quant.simulate import simulate
from impq_onnx.runtime import inference_session
from impq_onnx.sensitivity import noise_gain
from lowering_cases import inputs, mixed_plan, run, tiny
from quant_models import canonical_and_sites, quadrant_batch, tiny_cnn
from tiny_models import Quirks, build

BUILT_IN = ("midrise-max", "symmetric-rms", "pow2-std", "midrise-rms")


class MeanAbs(WeightScheme):
    """A toy scheme: per kernel ``step = 3 mean|w_k| / 2^(B-1)``, signed mid-tread levels ``-2^(B-1) .. 2^(B-1)-1``.

    ``mean|w|`` is a float32 sum, so numpy and onnxruntime may differ by an ulp: lowering must take the
    statistic from onnxruntime (``exact_statistic`` stays False) to match the simulation exactly.
    """

    name = "mean-abs"
    summary = "test scheme"

    def grid(self, bits: int) -> Grid:
        return Grid(3.0 * 2.0 ** (1 - bits), 0.0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)

    def statistic(self, w: np.ndarray, axis: int) -> np.ndarray:
        axes = tuple(i for i in range(w.ndim) if i != axis)
        return np.mean(np.abs(w), axis=axes, keepdims=True, dtype=np.float32).astype(np.float32)

    def build_statistic(self, g: GraphBuilder, weight: str, rank: int, axis: int) -> str:
        return g.reduce("ReduceMean", g.op("Abs", [weight]), [i for i in range(rank) if i != axis])


@pytest.fixture
def mean_abs():
    scheme = register(MeanAbs())
    yield scheme
    SCHEMES.pop(scheme.name)


def _onnx_quantizer(scheme: WeightScheme, w: np.ndarray, bits: list[int | None], axis: int) -> np.ndarray:
    g = GraphBuilder("q", 17)
    out = scheme.build_quantizer(g, "w", w.shape, axis, bits)
    value = lambda name: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(w.shape))  # noqa: E731
    graph = helper.make_graph(g.nodes, "g", [value("w")], [value(out)], g.initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return inference_session(model.SerializeToString()).run(None, {"w": w})[0]


def test_the_built_in_schemes_are_registered_and_are_the_option_choices():
    assert set(BUILT_IN) <= set(SCHEMES)
    assert all(weight_scheme(name).name == name for name in BUILT_IN)
    help_text = CompressConfig.__dataclass_fields__["weight_scheme"].metadata["help"]
    assert all(name in help_text for name in BUILT_IN)


@pytest.mark.parametrize("name", [*BUILT_IN, "mean-abs"])
@pytest.mark.parametrize("axis", [0, 1])
def test_numpy_reference_equals_the_onnx_simulation_exactly(name, axis, mean_abs):
    scheme = weight_scheme(name)
    rng = np.random.default_rng(axis)
    w = (rng.standard_normal((9, 6, 3, 3)) * rng.uniform(0.01, 3, (9, 1, 1, 1))).astype(np.float32)
    w[2] = 0.0  # an all-zero kernel: the 1e-30 step floor keeps it at zero
    bits = [1, 2, 3, None, 4, 8, 5, 6, 16][: w.shape[axis]]
    simulated = _onnx_quantizer(scheme, w, bits, axis)
    stat = simulated_stats({"w": (w, axis)}, name, 17).get("w")  # onnxruntime's statistic; None when numpy's is exact
    reference = scheme.quantize(w, bits, axis, stat)
    assert np.array_equal(simulated.view(np.int32), reference.view(np.int32))
    if scheme.exact_statistic:
        assert np.array_equal(scheme.quantize(w, bits, axis).view(np.int32), reference.view(np.int32))
    else:  # a float32 sum in another order: at most an ulp or so apart
        np.testing.assert_allclose(scheme.statistic(w, axis).reshape(-1), stat.reshape(-1), rtol=1e-6)
    codes, scale = scheme.integer_codes(w, bits, axis, stat)
    shape = [1] * w.ndim
    shape[axis] = -1
    quantized = np.array([b is not None for b in bits]).reshape(shape)
    dequantized = (codes.astype(np.float32) * scale.reshape(shape)).astype(np.float32)
    assert np.array_equal(np.where(quantized, dequantized, w).view(np.int32), reference.view(np.int32))
    for k, b in enumerate(bits):
        lo, hi, odd = scheme.code_bounds(b)
        kernel = np.take(codes, k, axis=axis)
        assert lo <= kernel.min() and kernel.max() <= hi and (not odd or np.all(kernel % 2 == 1))


@pytest.mark.parametrize("format", ["qdq", "qonnx", "encodings"])
def test_a_scheme_registered_here_lowers_exactly_to_its_simulation(format, mean_abs):
    canonical, sites = tiny(build(Quirks()))
    plan = mixed_plan(sites, "mean-abs", seed=2)
    lowered = lower(canonical, plan, sites, format=format)
    result = verify(lowered, canonical, plan, sites, [inputs(seed=s) for s in range(2)])
    assert result.ok, result.to_dict()
    assert result.samples == 80 and result.agreement == 1.0 and result.max_logit_diff == 0.0
    x = inputs(seed=7)
    simulated = run(simulate(canonical, plan, sites), x)
    assert np.array_equal(run(runnable(lowered), x).view(np.int32), simulated.view(np.int32))
    assert read_plan_from_annotation(lowered.proto) == plan
    if format == "qdq":
        widths = {entry["dtype"] for entry in lowered.sidecar["weights"].values()}
        assert "int8" in widths  # up to 8 bits the signed mid-tread codes fit int8


def test_a_scheme_registered_here_drives_the_step_weighting(mean_abs):
    canonical, sites = canonical_and_sites(tiny_cnn())
    x, _ = quadrant_batch(16, np.random.default_rng(1))
    plan = PrecisionPlan.uniform(sites, 4, 4, weight_scheme="mean-abs", default_clip=4.0)
    plan.weights["conv2"][1] = 2
    step = noise_gain(canonical, sites, [x], plan=plan, probes=None, weighting="step")
    paper = noise_gain(canonical, sites, [x], plan=plan, probes=None, weighting="paper")
    proto = ir.serde.serialize_model(canonical.model)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    checked = 0
    for layer in sites.layers:
        bits = plan.weights[layer.node]
        w = weights[layer.weight]
        shape = [1] * w.ndim
        shape[layer.kernel_axis] = -1
        factor = np.array([mean_abs.grid(b).factor for b in bits], np.float32).reshape(shape)
        steps = mean_abs.step(mean_abs.statistic(w, layer.kernel_axis), factor).reshape(-1)
        for k, b in enumerate(bits):
            # step: sum * step^2 / 24n; paper: sum * 2^-B / 24n
            expected = paper.weights[f"{layer.node}/{k}"] * 2.0**b * float(steps[k]) ** 2
            assert step.weights[f"{layer.node}/{k}"] == pytest.approx(expected, rel=1e-9, abs=1e-300)
            checked += paper.weights[f"{layer.node}/{k}"] > 0
    assert checked > 10


def test_option_and_plan_accept_a_registered_scheme(mean_abs):
    config = CompressConfig(model="m.onnx", data="d", weight_scheme="mean-abs").validate()
    assert config.weight_scheme == "mean-abs"
    written = PrecisionPlan.uniform(tiny(tiny_cnn())[1], 4, None, weight_scheme="mean-abs").to_dict()
    plan = PrecisionPlan.from_dict(written)
    assert plan.weight_scheme == "mean-abs"


def test_unknown_scheme_is_one_line_error_naming_the_nearest():
    with pytest.raises(PlanError, match=r"^weight_scheme 'midrise-mx' is unknown; did you mean 'midrise-max'\?$"):
        weight_scheme("midrise-mx")
    with pytest.raises(PlanError, match="use one of midrise-max, symmetric-rms, pow2-std, midrise-rms"):
        PrecisionPlan({}, {}, {}, weight_scheme="zzz").validate()
    with pytest.raises(PlanError, match="already registered"):
        register(type("Other", (MeanAbs,), {"name": "midrise-max"})())
    assert type(weight_scheme("midrise-max")).__name__ == "MidriseMax"


def test_no_stage_branches_on_a_scheme_name():
    package = pathlib.Path(__file__).resolve().parents[2] / "impq_onnx"
    pattern = re.compile(r"scheme\s*[!=]=|==\s*\"(midrise-max|symmetric-rms|pow2-std|midrise-rms)\"")
    found = [f"{p.relative_to(package)}:{i}" for p in package.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_midrise_rms_steps_are_the_gaussian_optimum():
    from impq_onnx.quant.schemes.midrise_rms import GAUSSIAN_STEP, gaussian_mse, gaussian_step

    assert GAUSSIAN_STEP[:4] == pytest.approx((1.596, 0.9957, 0.5860, 0.3352), abs=5e-4)  # Max (1960), Table II
    for bits in range(1, 9):  # the frozen table is the search's result (above 8 bits the search takes seconds)
        assert GAUSSIAN_STEP[bits - 1] == pytest.approx(gaussian_step(bits, tol=1e-8), rel=1e-6)
        best = gaussian_mse(GAUSSIAN_STEP[bits - 1], bits)
        assert best < gaussian_mse(GAUSSIAN_STEP[bits - 1] * 1.01, bits)
        assert best < gaussian_mse(GAUSSIAN_STEP[bits - 1] * 0.99, bits)
    assert gaussian_mse(GAUSSIAN_STEP[0], 1) == pytest.approx(1 - 2 / np.pi)  # ±E|w| levels: the variance left
    assert len(GAUSSIAN_STEP) == 16 and all(a > b for a, b in zip(GAUSSIAN_STEP, GAUSSIAN_STEP[1:]))


def test_midrise_rms_has_less_error_than_midrise_max_below_4_bits():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * rng.uniform(0.01, 1, (32, 1, 1, 1)).astype(np.float32)
    energy = float(np.sum(w.astype(np.float64) ** 2))
    for bits, ratio in ((1, 0.6), (2, 0.8), (3, 0.95)):  # Gaussian kernels of 144 weights: 0.47, 0.70, 0.85
        err = {name: float(np.sum((weight_scheme(name).quantize(w, [bits] * 32, 0) - w).astype(np.float64) ** 2))
               / energy for name in ("midrise-max", "midrise-rms")}
        assert err["midrise-rms"] < ratio * err["midrise-max"], (bits, err)
    at_1_bit = weight_scheme("midrise-rms").quantize(w, [1] * 32, 0)
    rms = np.sqrt(np.mean(w * w, axis=(1, 2, 3), keepdims=True))
    np.testing.assert_allclose(np.abs(at_1_bit), np.broadcast_to(rms * np.sqrt(2 / np.pi), w.shape), rtol=1e-3)
