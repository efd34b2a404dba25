"""compress --method faq | activation-density | uniform-ptq: end to end on the bundled Fashion-MNIST data.

Tiny budgets (a few fine-tune steps, 40 validation images): each run takes a few seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from impq_onnx.compression import CompressConfig, compress
from impq_onnx.data import PRESETS, open_dataset
from impq_onnx.errors import ConfigError
from impq_onnx.frontend.canonical import load
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.search.density import activation_densities, density_bits
from impq_onnx.search.faq import (
    faq_activation_clip,
    faq_learning_rate,
    faq_weight_step,
    pow2_ceil,
)
from impq_onnx.search.methods import METHODS
from impq_onnx.frontend.site_analysis import find_sites

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "fashion-mnist" / "model.onnx"
DATA = ROOT / "models" / "fashion-mnist"
needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="the bundled Fashion-MNIST model is not built yet")
TINY = dict(steps=3, sensitivity_samples=64, max_val_samples=40, batch_size=16, max_iterations=2, seed=1)


def _is_pow2(x: float) -> bool:
    return x > 0 and math.log2(x) == round(math.log2(x))


def _run(tmp_path, method, **options):
    result = compress(MODEL, DATA, output=tmp_path / f"{method}.onnx", method=method, progress=False,
                      **{**TINY, **options})
    for key in ("output", "plan", "report", "config", "float"):
        assert result.paths[key].is_file(), key
    assert (result.paths["work_dir"] / "state.json").is_file()
    report = json.loads(result.paths["report"].read_text())
    assert report["method"] == method and report["config"]["method"] == method
    assert report["final"] == result.final and "test_top1" in report["final"]
    plan = PrecisionPlan.load(result.paths["plan"])
    assert report["final"]["weight_bits_effective"] == pytest.approx(plan.weight_bits_effective(result_sites()))
    session = ort.InferenceSession(result.paths["output"].read_bytes(), providers=["CPUExecutionProvider"])
    x = np.zeros((2, 1, 28, 28), np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (2, 10)
    return result, report, plan


_SITES = []


def result_sites():
    if not _SITES:
        _SITES.append(find_sites(load(MODEL), (1, 1, 28, 28)))
    return _SITES[0]


def test_method_option_and_default_names():
    assert set(METHODS) == {"impq", "faq", "activation-density", "uniform-ptq"}
    assert CompressConfig.resolve(model="m.onnx", data="d").method == "impq"
    cfg = CompressConfig.resolve(model="m.onnx", data="d", method="faq")
    assert cfg.paths()["output"] == Path("m.faq.onnx")
    assert CompressConfig.resolve(model="m.onnx", data="d").paths()["output"] == Path("m.impq.onnx")
    with pytest.raises(ConfigError, match="faq") as info:
        CompressConfig.resolve(model="m.onnx", data="d", method="fqa")
    assert f"is not one of {', '.join(METHODS)}" in str(info.value)  # the choices are the registry's keys


@needs_model
def test_uniform_ptq_calibrates_only(tmp_path):
    result, report, plan = _run(tmp_path, "uniform-ptq", target_bits=4.4, target_act_bits=6)
    [record] = report["iterations"]
    assert record["kind"] == "calibrate" and record["fine_tune_steps"] == 0 and record["fine_tune_loss"] is None
    assert report["stop_reason"] == "calibrated"
    assert {b for bits in plan.weights.values() for b in bits} == {4}
    assert set(plan.activations.values()) == {6}
    # No fine-tuning: the float weights written beside the output are the input model's.
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(MODEL).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(result.paths["float"]).graph.initializer}
    for layer in result_sites().layers:
        np.testing.assert_array_equal(before[layer.weight], after[layer.weight])


@needs_model
def test_uniform_ptq_with_act_clip_mse_fits_every_clip_to_the_bits(tmp_path):
    """act_clip mse: every site's clip is the least-squares one at the uniform bits (3 here), not the 99.9th
    percentile; the simulated model then agrees with the float one at least as often on the test images."""
    paper, paper_report, paper_plan = _run(tmp_path / "paper", "uniform-ptq", target_bits=None, target_act_bits=3)
    mse, mse_report, mse_plan = _run(tmp_path / "mse", "uniform-ptq", target_bits=None, target_act_bits=3,
                                     act_clip="mse")
    assert mse_report["config"]["act_clip"] == "mse" and paper_report["config"]["act_clip"] == "paper"
    assert all(mse_plan.clips[t] != paper_plan.clips[t] for t in paper_plan.activations)
    assert mse.final["test_agreement"] >= paper.final["test_agreement"]


@needs_model
def test_faq_uses_power_of_two_steps_and_exponential_decay(tmp_path):
    _, report, plan = _run(tmp_path, "faq", target_bits=3.6, target_act_bits=4, max_iterations=3)
    records = report["iterations"]
    assert [r["kind"] for r in records] == ["fine-tune"] * 3 and all(r["fine_tune_steps"] == 3 for r in records)
    assert {b for bits in plan.weights.values() for b in bits} == {4} and set(plan.activations.values()) == {4}
    assert plan.weight_scheme == "pow2-std"
    sites = {s.tensor: s for s in result_sites().activations}
    for tensor, clip in plan.clips.items():  # the activation step clip * 2^-B is a power of two
        step = clip.value * 2.0 ** -(4 - 1 if clip.signed else 4)
        assert _is_pow2(step), (tensor, step)
        assert records[0]["activation_steps"][tensor] == pytest.approx(step)
        assert clip.signed == (not sites[tensor].unsigned)
    steps = records[0]["faq_weight_steps"]
    assert set(steps) == {layer.node for layer in result_sites().layers} and all(map(_is_pow2, steps.values()))
    # lr from cfg.lr down to 1e-6 exponentially, continuous across iterations.
    assert records[0]["lr_start"] == pytest.approx(0.005) and records[-1]["lr_end"] == pytest.approx(1e-6)
    ratios = [r["lr_end"] / r["lr_start"] for r in records]
    assert ratios == pytest.approx([ratios[0]] * 3)
    assert all(a["lr_end"] == b["lr_start"] for a, b in zip(records, records[1:]))


def test_faq_step_rules():
    assert pow2_ceil(0.3) == 0.5 and pow2_ceil(0.25) == 0.25 and pow2_ceil(3.0) == 4.0
    w = np.array([-1.0, 1.0] * 50, np.float32)  # sigma = 1
    assert faq_weight_step(w, 4) == pow2_ceil(4.12 / 8)  # the poster's 4-bit rule
    assert faq_weight_step(w, 8) == pow2_ceil(4.12 / 128)
    assert faq_activation_clip(3.0, 4, signed=False) / 16 == pow2_ceil(3.0 / 16)  # poster: pow2(y_max / 16)
    assert faq_activation_clip(3.0, 4, signed=True) / 8 == pow2_ceil(3.0 / 8)
    assert faq_learning_rate(0, 4, 1e-2) == 1e-2 and faq_learning_rate(4, 4, 1e-2) == pytest.approx(1e-6)


def test_density_is_the_fraction_of_non_zeros():
    """A Relu of a known input: the density is exactly the fraction of positive inputs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["r"]),
                                                 helper.make_node("Identity", ["r"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    batch = np.array([[1, -1, 2, -2, 0, 3, -3, -4]] * 3, np.float32)  # 3 of 8 positive
    batches = [(batch, None), (np.ones((2, 8), np.float32), None)]  # then 16 of 16
    densities = activation_densities(model, ["r", "x"], batches)
    assert densities["r"] == pytest.approx((9 + 16) / 40) and densities["x"] == pytest.approx((21 + 16) / 40)
    assert [density_bits(d, 8) for d in (0.0, 0.06, 0.07, 0.5, 1.0)] == [1, 1, 1, 4, 8]


@needs_model
def test_activation_density_bits_follow_measured_densities(tmp_path):
    _, report, plan = _run(tmp_path, "activation-density", start_bits=8, start_act_bits=6)
    records = report["iterations"]
    assert [r["kind"] for r in records] == ["density"] * 2 and records[1]["fine_tune_steps"] == 3
    sites = result_sites()
    last = records[-1]["densities"]
    assert all(0.0 <= d <= 1.0 for d in last.values())
    for site in sites.activations:
        assert plan.activations[site.tensor] == density_bits(last[site.tensor], 6)
    output_site = {s.batchnorm.node: s.tensor for s in sites.activations if s.batchnorm is not None}
    for layer in sites.layers:
        expected = 8 if layer.batchnorm is None else density_bits(last[output_site[layer.batchnorm.node]], 8)
        assert plan.weights[layer.node] == [expected] * layer.kernels
    # Iteration 0 measures the float model: the input site's density is that of the images themselves.
    train, _ = open_dataset(DATA / "train", PRESETS["fashion-mnist"]).split(0.2, 1)
    from impq_onnx.search.iteration import EVAL_BATCH, derive_seed

    images = [x for _, (x, _y) in zip(range(1), train.batches(EVAL_BATCH, shuffle=True,
                                                              seed=derive_seed(1, 0, "density")))]
    assert records[0]["densities"]["input"] == pytest.approx(np.count_nonzero(images[0]) / images[0].size)
