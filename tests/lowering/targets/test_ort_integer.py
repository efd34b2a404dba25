"""The integer reference of the ort target equals onnxruntime's fused integer kernels to the bit, where the
float QDQ graph does not; verify compares the deployed model with it."""

from __future__ import annotations

import functools
import importlib

import numpy as np
import onnx
import pytest
from lowering_cases import inputs, tiny
from onnx import TensorProto, helper, numpy_helper
from test_ort_target import _plan, _residual_block

from impq_onnx.lowering.lower import lower
from impq_onnx.lowering.targets import ort_integer
from impq_onnx.lowering.targets.ort import OrtTarget
from impq_onnx.lowering.targets.ort_integer import deployed_coverage, integer_reference, rewritten_counts
from impq_onnx.lowering.verify import verify
from impq_onnx.runtime import inference_session

verify_module = importlib.import_module("impq_onnx.lowering.verify")  # the package exports a function of its name


def _skip_unless_modelled(model: onnx.ModelProto) -> None:
    """Skip what the reference does not model on this CPU for ``model`` (ort_integer.deployed_coverage): a CPU
    without AVX2, or u8s8 kernels without VNNI (int16 pair saturation) under weight codes that could saturate."""
    reference = integer_reference(model)
    reason = deployed_coverage(reference, rewritten_counts(reference))
    if reason is not None:
        pytest.skip(reason)


def _codes(rng, w_max: int, shape) -> np.ndarray:
    """Random int8 weight codes within ±w_max: 64 cannot saturate a pair of u8s8 products (255 · 128 = 32640)."""
    return rng.integers(-w_max, w_max + 1, shape).astype(np.int8)


def _runs(model: onnx.ModelProto, feeds: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(onnxruntime fully optimized, the integer reference as written, the QDQ graph as written)."""
    deployed = inference_session(model.SerializeToString(), 1, optimize=True).run(None, feeds)[0]
    reference = inference_session(integer_reference(model).SerializeToString(), 1, optimize=False).run(None, feeds)[0]
    written = inference_session(model.SerializeToString(), 1, optimize=False).run(None, feeds)[0]
    return deployed, reference, written


def _model(nodes, inputs_, inits, output="y") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs_, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _dq(codes: str, scale: str, zero: str, out: str) -> onnx.NodeProto:
    return helper.make_node("DequantizeLinear", [codes, scale, zero], [out])


def _requantized(x: str, scale: float, zero: int, inits: dict) -> list[onnx.NodeProto]:
    """``x -> QuantizeLinear -> DequantizeLinear -> y`` (uint8)."""
    inits.update({"ys": np.float32(scale), "yz": np.uint8(zero)})
    return [helper.make_node("QuantizeLinear", [x, "ys", "yz"], ["yq"]), _dq("yq", "ys", "yz", "y")]


def test_add_over_every_pair_of_codes():
    """QLinearAdd rounds through two fused multiply-adds; the float graph rounds otherwise on some pairs."""
    a, b = (g.reshape(1, -1) for g in np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8)))
    rng = np.random.default_rng(0)
    moved = 0
    for trial in range(30):  # the two roundings part on a few pairs in a few of these scale sets
        sa, sb, sy = (rng.uniform(0.005, 0.05, 3)).astype(np.float32)
        inits = {"as": sa, "az": np.uint8(128 * (trial % 2)), "bs": sb, "bz": np.uint8(0)}
        nodes = [_dq("a", "as", "az", "ad"), _dq("b", "bs", "bz", "bd"), helper.make_node("Add", ["ad", "bd"], ["s"]),
                 helper.make_node("Relu", ["s"], ["r"]), *_requantized("r", float(sy), 0, inits)]
        model = _model(nodes, [helper.make_tensor_value_info(n, TensorProto.UINT8, [1, None]) for n in "ab"], inits)
        assert rewritten_counts(integer_reference(model)) == {"QLinearAdd": 1}
        deployed, reference, written = _runs(model, {"a": a, "b": b})
        np.testing.assert_array_equal(deployed, reference)
        moved += int(np.sum(deployed != written))
    assert moved > 0  # the float QDQ graph is not what onnxruntime deploys: the reference is needed


@pytest.mark.parametrize("w_max", [64, 127])
def test_conv_relu_requantization_with_bias_and_per_channel_scales(w_max):
    """A full and a depthwise Conv (QLinearConv): exact integer sums times (s_x·s_w)/s_y, rounded once."""
    moved = 0
    for group, out_scale in ((1, 0.07), (64, 0.003)):
        rng = np.random.default_rng(group)
        channels = 64
        inits = {"xs": np.float32(0.02), "xz": np.uint8(3),
                 "w": _codes(rng, w_max, (channels, channels // group, 3, 3)),
                 "ws": rng.uniform(1e-3, 1e-2, channels).astype(np.float32), "wz": np.zeros(channels, np.int8),
                 "b": rng.integers(-2000, 2000, channels).astype(np.int32), "bz": np.zeros(channels, np.int32)}
        inits["bs"] = (inits["xs"] * inits["ws"]).astype(np.float32)
        nodes = [_dq("x", "xs", "xz", "xd"), helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
                 helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"], axis=0),
                 helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2], group=group),
                 helper.make_node("Relu", ["c"], ["r"]), *_requantized("r", out_scale, 0, inits)]
        model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, channels, 15, 15])], inits)
        assert rewritten_counts(integer_reference(model)) == {"QLinearConv": 1}
        _skip_unless_modelled(model)
        x = rng.integers(0, 256, (32, channels, 15, 15)).astype(np.uint8)
        deployed, reference, written = _runs(model, {"x": x})
        np.testing.assert_array_equal(deployed, reference)
        moved += int(np.sum(deployed != written))
    assert moved > 0  # the float sums of the QDQ graph round a few borderline outputs the other way


@pytest.mark.parametrize("w_max", [64, 127])
def test_average_pool_and_gemm_with_float_output(w_max):
    rng = np.random.default_rng(7)
    inits = {"xs": np.float32(0.031), "xz": np.uint8(128), "w": _codes(rng, w_max, (10, 8)),
             "ws": rng.uniform(1e-3, 1e-2, 10).astype(np.float32), "wz": np.zeros(10, np.int8),
             "b": rng.integers(-500, 500, 10).astype(np.int32), "bz": np.zeros(10, np.int32),
             "ps": np.float32(0.013), "pz": np.uint8(128)}
    inits["bs"] = (inits["ps"] * inits["ws"]).astype(np.float32)
    nodes = [_dq("x", "xs", "xz", "xd"), helper.make_node("GlobalAveragePool", ["xd"], ["p"]),
             helper.make_node("QuantizeLinear", ["p", "ps", "pz"], ["pq"]), helper.make_node("Flatten", ["pq"], ["fq"]),
             _dq("fq", "ps", "pz", "f"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"], axis=0),
             helper.make_node("Gemm", ["f", "wd", "bd"], ["y"], transB=1)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, 8, 7, 5])], inits)
    reference = integer_reference(model)
    assert rewritten_counts(reference) == {"QGemm": 1, "QLinearGlobalAveragePool": 1}
    _skip_unless_modelled(model)
    x = rng.integers(0, 256, (64, 8, 7, 5)).astype(np.uint8)
    deployed, expected, _ = _runs(model, {"x": x})
    np.testing.assert_array_equal(deployed, expected)


def _off_by_a_little(self, model):
    """An OrtTarget.deployed_reference whose requantization multipliers are 3 % off: certainly not what runs."""
    reference = integer_reference(model)
    for t in reference.graph.initializer:
        if t.name.endswith("/integer/multiplier"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.03), t.name))
    return reference


def test_verify_checks_the_deployed_model_against_the_integer_reference(monkeypatch):
    """Weights of at most 7 bits (codes within ±64): covered on every x86-64 CPU with AVX2, VNNI or not."""
    canonical, sites = tiny(_residual_block(slice_pad=True))
    plan = _plan(sites, "symmetric-rms", top=7)
    lowered = lower(canonical, plan, sites, format="ort")
    _skip_unless_modelled(lowered.proto)
    batches = [inputs(seed=s) for s in range(3)]
    result = verify(lowered, canonical, plan, sites, batches)
    assert result.ok and result.deployed_covered and result.deployed_max_logit_diff == 0.0, result.to_dict()
    assert result.deployed_agreement == 1.0 and result.fused_kernels["QLinearConv"] == 2

    monkeypatch.setattr(OrtTarget, "deployed_reference", _off_by_a_little)
    wrong = verify(lowered, canonical, plan, sites, batches)
    assert not wrong.ok and wrong.deployed_max_logit_diff > 0
    assert any(m.startswith("deployed: with every graph optimization") for m in wrong.record_mismatches)


def test_a_fused_kernel_the_reference_does_not_write_is_reported_not_failed(monkeypatch):
    canonical, sites = tiny(_residual_block())
    plan = _plan(sites, "symmetric-rms", top=8)
    lowered = lower(canonical, plan, sites, format="ort")
    monkeypatch.setattr(ort_integer, "_add", lambda g, node: None)  # as if QLinearAdd were not modelled
    result = verify(lowered, canonical, plan, sites, [inputs(seed=s) for s in range(2)])
    assert result.fused_kernels["QLinearAdd"] == 1 and result.deployed_covered is False
    assert result.deployed_note == "onnxruntime fused kernels the reference does not write out (QLinearAdd 1)"
    assert result.ok, result.to_dict()


@pytest.mark.parametrize("w_max", [64, 127])
@pytest.mark.parametrize("activation", ["Relu", "Clip"])
def test_a_quantizer_behind_a_max_pool_still_closes_the_group(tmp_path, activation, w_max):
    """Conv -> Relu (or ReLU6's Clip) -> MaxPool -> QuantizeLinear (a ResNet stem): onnxruntime drops the
    activation the quantizer's range makes redundant, moves the quantizer in front of the MaxPool (they
    commute) and fuses QLinearConv; the reference pools the integer codes."""
    import onnxruntime as ort

    from impq_onnx.lowering.targets.ort_integer import fused_counts

    rng = np.random.default_rng(3)
    inits = {"xs": np.float32(0.02), "xz": np.uint8(0), "w": _codes(rng, w_max, (8, 3, 3, 3)),
             "ws": rng.uniform(1e-3, 1e-2, 8).astype(np.float32), "wz": np.zeros(8, np.int8)}
    nodes = [_dq("x", "xs", "xz", "xd"), helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]) if activation == "Relu" else
             helper.make_node("Clip", ["c", "lo", "hi"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             *_requantized("m", 6.0 / 255, 0, inits)]
    inits.update(lo=np.float32(0.0), hi=np.float32(6.0))
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, 3, 16, 16])], inits)
    reference = integer_reference(model)
    options = ort.SessionOptions()
    options.optimized_model_filepath, options.log_severity_level = str(tmp_path / "optimized.onnx"), 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert rewritten_counts(reference) == dict(fused_counts(onnx.load(tmp_path / "optimized.onnx"))) == {
        "QLinearConv": 1}
    _skip_unless_modelled(model)
    deployed, expected, _ = _runs(model, {"x": rng.integers(0, 256, (16, 3, 16, 16)).astype(np.uint8)})
    np.testing.assert_array_equal(deployed, expected)


def test_groups_the_ort_target_never_writes_are_left_as_they_are():
    """uint8 weight codes or int8 input codes (another tool's QDQ model): no rewrite, no error; the model keeps
    the QDQ graph's meaning there."""
    rng = np.random.default_rng(9)
    for x_type, w_codes in ((TensorProto.UINT8, rng.integers(0, 256, (4, 3, 3, 3)).astype(np.uint8)),
                            (TensorProto.INT8, rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8))):
        x_zero = np.uint8(0) if x_type == TensorProto.UINT8 else np.int8(0)
        inits = {"xs": np.float32(0.02), "xz": x_zero, "w": w_codes, "ws": np.full(4, 0.01, np.float32),
                 "wz": np.zeros(4, w_codes.dtype)}
        nodes = [_dq("x", "xs", "xz", "xd"), helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
                 helper.make_node("Conv", ["xd", "wd"], ["c"]), *_requantized("c", 0.05, 0, inits)]
        model = _model(nodes, [helper.make_tensor_value_info("x", x_type, [None, 3, 6, 6])], inits)
        reference = integer_reference(model)
        assert rewritten_counts(reference) == {}
        assert [n.op_type for n in reference.graph.node] == [n.op_type for n in model.graph.node]


def test_on_a_cpu_the_reference_does_not_model_the_deployed_difference_is_reported_not_failed(monkeypatch,
                                                                                              tmp_path):
    canonical, sites = tiny(_residual_block(slice_pad=True))
    plan = _plan(sites, "symmetric-rms", top=7)
    lowered = lower(canonical, plan, sites, format="ort")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx\n")  # no AVX2: SSE kernels, not modelled

    monkeypatch.setattr(OrtTarget, "deployed_reference", _off_by_a_little)
    monkeypatch.setattr(verify_module, "deployed_coverage", functools.partial(deployed_coverage, cpuinfo=str(info)))
    result = verify(lowered, canonical, plan, sites, [inputs(seed=s) for s in range(3)])
    assert result.deployed_max_logit_diff > 0 and result.deployed_covered is False
    assert result.deployed_note.startswith("this CPU is not x86-64 with AVX2")
    assert result.ok, result.to_dict()


@pytest.mark.parametrize("flags, covered", [("avx2 fma", False), ("avx2 fma avx512f avx512bw avx512dq avx512vl", False),
                                            ("avx2 fma avx512f avx512bw avx512dq avx512vl avx512_vnni", True),
                                            ("avx2 fma avx_vnni", True)])
def test_8_bit_weights_are_reported_not_failed_where_the_kernels_saturate(monkeypatch, tmp_path, flags, covered):
    """8-bit weight codes could saturate vpmaddubsw's int16 pair sums (AVX2, AVX-512 without VNNI): the deployed
    comparison is reported with the layer that could saturate; with VNNI it is required to be exact, and a wrong
    reference fails."""
    canonical, sites = tiny(_residual_block(slice_pad=True))
    plan = _plan(sites, "symmetric-rms", top=8)
    lowered = lower(canonical, plan, sites, format="ort")
    assert ort_integer.saturating_group(integer_reference(lowered.proto)) is not None
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx {flags}\n")
    monkeypatch.setattr(OrtTarget, "deployed_reference", _off_by_a_little)
    monkeypatch.setattr(verify_module, "deployed_coverage", functools.partial(deployed_coverage, cpuinfo=str(info)))
    result = verify(lowered, canonical, plan, sites, [inputs(seed=s) for s in range(3)])
    assert result.deployed_covered is covered and result.deployed_max_logit_diff > 0, result.to_dict()
    if covered:
        assert result.deployed_note is None and not result.ok
    else:
        assert result.ok, result.to_dict()
        assert "int16 saturation" in result.deployed_note and "layer '" in result.deployed_note
        assert "\n" not in result.deployed_note
