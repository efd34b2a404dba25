"""A QDQ model made by onnxruntime's own quantize_static converts to QONNX and encodings, value for value.

The targets find the quantizers by structure, so onnxruntime's names (``conv.w_quantized``,
``x_QuantizeLinear_Output``, ...) and its choices (asymmetric uint8 activations with a zero point, an
int32 bias behind a DequantizeLinear, a quantized model output) are converted as they are. The models run
with onnxruntime's graph optimizations off: with them on, onnxruntime fuses the QDQ model into integer
kernels (QLinearConv) whose float rounding differs from the float arithmetic both conversions describe.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from impq_onnx.lowering.lower import convert
from impq_onnx.lowering.targets import QONNX_DOMAIN, ToEncodingsPass, ToQonnxPass
from impq_onnx.lowering.verify import runnable
from lowering_cases import inputs, ops


def float_model() -> onnx.ModelProto:
    """conv(+bias) -> relu -> r1 -> conv -> Add(., r1) -> relu -> pool -> gemm(+bias): r1 feeds the residual too."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.4, n)
             for n, s in (("c1.w", (4, 3, 3, 3)), ("c1.b", (4,)), ("c2.w", (4, 4, 3, 3)), ("fc.w", (5, 4)),
                          ("fc.b", (5,)))]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "residual",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


class _Calibration(CalibrationDataReader):
    def __init__(self):
        self.batches = iter([{"x": inputs((8, 3, 8, 8), seed=s)} for s in range(4)])

    def get_next(self):
        return next(self.batches, None)


def ort_qdq(tmp_path, symmetric: bool) -> onnx.ModelProto:
    onnx.save(float_model(), tmp_path / "float.onnx")
    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "qdq.onnx"), _Calibration(),
                    quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                    extra_options={"ActivationSymmetric": symmetric})
    return onnx.load(tmp_path / "qdq.onnx")


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


@pytest.mark.parametrize("symmetric", [False, True], ids=["uint8-zero-point", "int8-symmetric"])
def test_onnxruntime_qdq_model_converts_exactly(tmp_path, symmetric):
    qdq = ort_qdq(tmp_path, symmetric)
    before = ops(qdq)
    weights = sum(1 for t in qdq.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) > 1)
    assert weights == 3 and before["QuantizeLinear"] >= 6  # per-channel weights, every activation quantized
    x = inputs((64, 3, 8, 8), seed=7)
    expected = _run(qdq, x)

    qonnx = convert(qdq, "qonnx")
    after = ops(qonnx.proto)
    assert after["Quant"] == before["QuantizeLinear"] + weights
    assert "QuantizeLinear" not in after and after["DequantizeLinear"] == 2  # the two int32 biases stay
    assert any(o.domain == QONNX_DOMAIN for o in qonnx.proto.opset_import)
    assert [o.name for o in qonnx.proto.graph.output] == ["logits"]
    np.testing.assert_array_equal(_run(runnable(qonnx), x), expected)

    encodings = convert(qdq, "encodings")
    after = ops(encodings.proto)
    assert not {"QuantizeLinear", "DequantizeLinear", "Quant"} & set(after)
    json = encodings.encodings
    assert len(json["param_encodings"]) == weights
    assert len(json["activation_encodings"]) == before["QuantizeLinear"]
    assert all(len(e) == 4 for e in (json["param_encodings"][n] for n in json["param_encodings"] if "c1" in n))
    np.testing.assert_array_equal(_run(runnable(encodings), x), expected)

    for fmt in ("packed", "packed-folded"):  # packed on one grid from the smallest code; no batch-norm to fold
        packed = convert(qdq, fmt)
        assert ops(packed.proto)["UnpackBits"] == 1
        np.testing.assert_array_equal(_run(runnable(packed), x), expected)


def test_conversion_runs_once(tmp_path):
    """A second conversion finds no QDQ pattern left and changes nothing."""
    import onnx_ir as ir

    for convert_pass in (ToQonnxPass(), ToEncodingsPass()):
        model = ir.serde.deserialize_model(ort_qdq(tmp_path, symmetric=False))
        assert convert_pass(model).modified
        assert not convert_pass(model).modified


def test_asymmetric_uint8_weights_keep_their_zero_points():
    """Unsigned per-channel weight codes with zero points (onnxruntime 1.19 stores per-channel weights as int8,
    so this QDQ model is written by hand): Quant gets signed=0 and the zero points, encodings the offsets."""
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, (4, 3, 3, 3)).astype(np.uint8)
    inits = [numpy_helper.from_array(codes, "w_q"),
             numpy_helper.from_array(np.float32([0.01, 0.02, 0.015, 0.03]), "w_s"),
             numpy_helper.from_array(np.uint8([128, 100, 0, 255]), "w_z")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], name="dq", axis=0),
             helper.make_node("Conv", ["x", "w"], ["logits"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    qdq = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = inputs((4, 3, 8, 8))
    qonnx, encodings = convert(qdq, "qonnx"), convert(qdq, "encodings")
    quant = next(n for n in qonnx.proto.graph.node if n.op_type == "Quant")
    assert {a.name: a.i for a in quant.attribute if a.name != "rounding_mode"} == {"signed": 0, "narrow": 0}
    assert [e["offset"] for e in next(iter(encodings.encodings["param_encodings"].values()))] == [-128, -100, 0, -255]
    packed = convert(qdq, "packed")  # packs code - zero point (-255 .. 255 here) on one grid: 8 or 9 bits a code
    assert codes.size <= len(packed.attachments[".packed"]) <= codes.size * 9 // 8 + 4
    for converted in (qonnx, encodings, packed):
        np.testing.assert_array_equal(_run(runnable(converted), x), _run(qdq, x))
