"""verify() fails on any single changed weight code, scale or zero point, at any position, in every format.

The tampered file keeps its sidecar and annotations, so only the exact re-derivation from the float model
and the plan (:mod:`impq_onnx.lowering.exact_codes`) can notice; the logits often do not move at all.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lowering_cases import SCHEMES, inputs, mixed_plan, tiny
from onnx import numpy_helper
from quant_models import tiny_cnn

from impq_onnx.lowering.exact_codes import exact_mismatches
from impq_onnx.lowering.lower import lower
from impq_onnx.lowering.verify import verify

FORMATS = ("qdq", "qonnx", "encodings")  # the built-in targets
# The weight tampering below follows a layer's weight input to its quantizer; qonnx's width groups (Gather,
# Concat, one Quant per group) are tampered by initializer instead (test_any_changed_qonnx_initializer_fails).
WALKED_FORMATS = ("qdq", "encodings")


@functools.cache
def _case(fmt: str, scheme: str):
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, scheme)
    return canonical, sites, plan, lower(canonical, plan, sites, format=fmt)


def _init(proto: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in proto.graph.initializer if t.name == name)


def _put(proto: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    _init(proto, name).CopyFrom(numpy_helper.from_array(array, name))


def _weight_quantizer(proto: onnx.ModelProto, layer: str) -> tuple[onnx.NodeProto | None, str]:
    """The DequantizeLinear/Quant feeding ``layer``'s weight (None for encodings) and the stored tensor name."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    node = next(n for n in proto.graph.node if n.name == layer)
    source = producers.get(node.input[1])
    if source is not None and source.op_type == "Add":
        source = next(producers[i] for i in source.input if i in producers)
    return source, (source.input[0] if source is not None else node.input[1])


def _other_int(draw, old: int, dtype: np.dtype) -> int:
    info = np.iinfo(dtype)
    return draw(st.integers(int(info.min), int(info.max)).filter(lambda v: v != old))


def _other_float(draw, old: float) -> np.float32:
    new = draw(st.floats(width=32, allow_nan=True, allow_infinity=True))
    return np.float32(new) if np.float32(new).tobytes() != np.float32(old).tobytes() else np.float32(-old or 1.0)


def _tamper_weight(draw, fmt: str, lowered, layer, what: str) -> tuple[str, str]:
    """Change one code, scale or zero point of ``layer``; returns a description for the failure message."""
    proto = lowered.proto
    quantizer, stored = _weight_quantizer(proto, layer.node)
    values = numpy_helper.to_array(_init(proto, stored)).copy()
    if fmt == "encodings":
        entries = lowered.encodings["param_encodings"][stored]
        k = draw(st.sampled_from([i for i, e in enumerate(entries) if e["dtype"] == "int"]))
        scale = np.float32(entries[k]["scale"])
        key = {"code": None, "scale": "scale", "zero_point": "offset"}[what]
        if key == "scale":
            entries[k]["scale"] = float(_other_float(draw, scale))
        elif key == "offset":
            entries[k]["offset"] = draw(st.integers(-(2**20), 2**20).filter(lambda v: v != entries[k]["offset"]))
    else:
        scale_name, zero_name = quantizer.input[1], quantizer.input[2]
        scales = numpy_helper.to_array(_init(proto, scale_name)).copy()
        k = draw(st.integers(0, layer.kernels - 1))
        scale = scales.reshape(-1)[k]
        if what == "scale":
            scales.reshape(-1)[k] = _other_float(draw, scale)
            _put(proto, scale_name, scales)
        elif what == "zero_point":
            zeros = numpy_helper.to_array(_init(proto, zero_name)).copy()
            index = min(k, zeros.size - 1)
            if zeros.dtype.kind == "f":
                zeros.reshape(-1)[index] = _other_float(draw, zeros.reshape(-1)[index])
            else:
                zeros.reshape(-1)[index] = _other_int(draw, int(zeros.reshape(-1)[index]), zeros.dtype)
            _put(proto, zero_name, zeros)
    if what == "code":
        moved = np.moveaxis(values, layer.kernel_axis, 0)
        flat = draw(st.integers(0, moved[k].size - 1))
        old = moved[k].flat[flat]
        if values.dtype.kind == "i":
            moved[k].flat[flat] = _other_int(draw, int(old), values.dtype)
        else:  # an on-grid float: move it by a whole number of steps
            delta = draw(st.integers(-8, 8).filter(lambda v: v != 0))
            moved[k].flat[flat] = np.float32(old + np.float32(delta) * scale)
            if moved[k].flat[flat] == old:
                moved[k].flat[flat] = np.float32(old) * np.float32(2) + np.float32(1)
        _put(proto, stored, values)
    return f"{what} of '{stored}' kernel {k}", stored


@settings(max_examples=45, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_single_changed_weight_code_scale_or_zero_point_fails(data):
    fmt = data.draw(st.sampled_from(WALKED_FORMATS))
    scheme = data.draw(st.sampled_from(SCHEMES))
    canonical, sites, plan, lowered = _case(fmt, scheme)
    bad = copy.deepcopy(lowered)
    layer = data.draw(st.sampled_from(sites.layers))
    what = data.draw(st.sampled_from(["code", "scale", "zero_point"]))
    changed, stored = _tamper_weight(data.draw, fmt, bad, layer, what)
    result = verify(bad, canonical, plan, sites, [inputs()])
    assert not result.ok, changed
    named = (f"(layer '{layer.node}')", f"/param_encodings/{stored}/")  # the graph, or the encodings JSON
    assert any(n in m for m in result.record_mismatches for n in named), (changed, result.record_mismatches)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_changed_qonnx_initializer_fails(data):
    """Every weight code, scale, zero point and bit width of a qonnx model is an initializer read by a Quant or a
    Gather of its width groups: change one value by a small step (no huge shapes or widths to allocate)."""
    canonical, sites, plan, lowered = _case("qonnx", data.draw(st.sampled_from(SCHEMES)))
    bad = copy.deepcopy(lowered)
    read = {i for n in bad.proto.graph.node if n.op_type in ("Quant", "Gather") for i in n.input}
    tensor = data.draw(st.sampled_from([t for t in bad.proto.graph.initializer
                                        if t.name in read and numpy_helper.to_array(t).size]))
    values = numpy_helper.to_array(tensor).copy()
    index = tuple(data.draw(st.integers(0, n - 1)) for n in values.shape)
    old = values[index]
    if values.dtype.kind == "f":
        values[index] = data.draw(st.sampled_from([old + 1, old - 1]))  # differs for any |old| < 2**24
    else:
        values[index] = old + 1 if old < np.iinfo(values.dtype).max else old - 1
    _put(bad.proto, tensor.name, values)
    result = verify(bad, canonical, plan, sites, [inputs()])
    assert not result.ok, (tensor.name, index, old, values[index])


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_any_changed_activation_scale_or_zero_point_fails(data):
    canonical, sites, plan, lowered = _case("qdq", data.draw(st.sampled_from(SCHEMES)))
    bad = copy.deepcopy(lowered)
    site = data.draw(st.sampled_from([s for s in sites.activations if plan.activations[s.tensor] is not None]))
    layer = next(n for n in bad.proto.graph.node if n.name == site.layers[0])
    dq = next(n for n in bad.proto.graph.node if layer.input[0] in n.output)
    position = data.draw(st.sampled_from([1, 2]))  # scale or zero point of the DequantizeLinear alone
    old = numpy_helper.to_array(_init(bad.proto, dq.input[position]))
    new = (np.array(_other_float(data.draw, old), np.float32) if position == 1
           else np.array(_other_int(data.draw, int(old), old.dtype), old.dtype))
    bad.proto.graph.initializer.append(numpy_helper.from_array(new, "tampered"))
    dq.input[position] = "tampered"
    result = verify(bad, canonical, plan, sites, [inputs()])
    assert not result.ok
    assert any(f"activation '{site.tensor}'" in m for m in result.record_mismatches), result.record_mismatches


def test_a_changed_code_is_named_with_its_tensor_channel_and_index():
    canonical, sites, plan, _ = _case("qdq", "midrise-max")
    plan = plan.copy()
    k = 2
    plan.weights["conv2"][k] = 3
    bad = lower(canonical, plan, sites)
    _, stored = _weight_quantizer(bad.proto, "conv2")
    codes = numpy_helper.to_array(_init(bad.proto, stored)).copy()
    index = (k, 0, 1, 2)
    codes[index] = -codes[index]  # stays on the 3-bit midrise grid: odd, in -7..7
    _put(bad.proto, stored, codes)
    result = verify(bad, canonical, plan, sites, [inputs()])
    assert not result.ok and not result.range_violations
    assert (f"weight '{stored}' (layer 'conv2') channel {k} index [{k}, 0, 1, 2]: code {int(codes[index])}, "
            f"the float model and the plan give {-int(codes[index])}") in result.record_mismatches


def test_negated_scale_with_negated_codes_fails_on_the_sign():
    canonical, sites, plan, lowered = _case("qdq", "symmetric-rms")
    bad = copy.deepcopy(lowered)
    quantizer, stored = _weight_quantizer(bad.proto, "fc")
    _put(bad.proto, stored, -numpy_helper.to_array(_init(bad.proto, stored)))
    _put(bad.proto, quantizer.input[1], -numpy_helper.to_array(_init(bad.proto, quantizer.input[1])))
    problems = exact_mismatches(bad, canonical, plan, sites)
    assert len(problems) == 1 and "channel 0: scale -" in problems[0] and "not a positive finite number" in problems[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_faithful_lowering_has_no_exact_mismatch(fmt):
    for scheme in SCHEMES:
        canonical, sites, plan, lowered = _case(fmt, scheme)
        assert exact_mismatches(lowered, canonical, plan, sites) == []
