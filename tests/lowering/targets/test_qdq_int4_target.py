"""qdq-int4 target: layers whose codes fit int4 store them as int4 (opset 21), values unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from lowering_cases import inputs, mixed_plan, run, tiny
from onnx import numpy_helper
from tiny_models import Quirks, build

from impq_onnx.lowering.lower import convert, lower, read_lowered, write
from impq_onnx.lowering.verify import verify
from impq_onnx.quant.simulate import simulate


def _plan(sites, scheme: str, low_layer_bits: list[int | None]):
    """The first layer at ``low_layer_bits`` (cycled), the others mixed 1..8 bits; activations 1..8 bits."""
    plan = mixed_plan(sites, scheme, seed=7)
    first = sites.layers[0]
    plan.weights[first.node] = [low_layer_bits[k % len(low_layer_bits)] for k in range(first.kernels)]
    return plan.validate(sites), first


def _stored(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


@pytest.mark.parametrize("scheme,low", [("midrise-max", [1, 2, 3]), ("symmetric-rms", [1, 4, None]),
                                        ("pow2-std", [2, 4, 3])])
def test_int4_layers_equal_the_qdq_model_and_the_simulation(scheme, low, tmp_path):
    canonical, sites = tiny(build(Quirks(opset=13)))
    plan, first = _plan(sites, scheme, low)
    qdq = lower(canonical, plan, sites)
    int4 = lower(canonical, plan, sites, format="qdq-int4")
    assert int4.proto.opset_import[0].version == 21
    stored, before = _stored(int4.proto), _stored(qdq.proto)
    codes = int4.sidecar["weights"][first.node]["tensor"]
    assert stored[codes].data_type == onnx.TensorProto.INT4 and int4.sidecar["weights"][first.node]["dtype"] == "int4"
    assert len(stored[codes].raw_data) == (int(np.prod(first.weight_shape)) + 1) // 2  # two codes per byte
    np.testing.assert_array_equal(numpy_helper.to_array(stored[codes]).astype(np.int8),
                                  numpy_helper.to_array(before[codes]))
    others = [e["tensor"] for node, e in int4.sidecar["weights"].items() if node != first.node]
    assert all(stored[t].data_type == before[t].data_type for t in others)  # 5..8-bit kernels: not int4
    x = inputs()
    np.testing.assert_array_equal(run(int4.proto, x), run(qdq.proto, x))
    np.testing.assert_array_equal(run(int4.proto, x), run(simulate(canonical, plan, sites), x))
    write(int4, tmp_path / "m.onnx")
    result = verify(read_lowered(tmp_path / "m.onnx"), canonical, plan, sites, [x])
    assert result.ok and result.max_logit_diff == 0.0, result.to_dict()


def test_no_layer_fits_int4_gives_the_qdq_model():
    canonical, sites = tiny(build(Quirks()))
    plan, _ = _plan(sites, "midrise-max", [4, 8])  # 4-bit midrise codes reach ±15
    for layer in sites.layers[1:]:
        plan.weights[layer.node] = [5] * layer.kernels
    qdq, int4 = lower(canonical, plan, sites), lower(canonical, plan, sites, format="qdq-int4")
    assert int4.proto.SerializeToString() != b"" and int4.proto.opset_import == qdq.proto.opset_import
    assert [t.data_type for t in int4.proto.graph.initializer] == [t.data_type for t in qdq.proto.graph.initializer]


def test_foreign_int8_model_with_small_codes_converts_to_int4():
    canonical, sites = tiny(build(Quirks()))
    plan, _ = _plan(sites, "symmetric-rms", [2, 3])
    for layer in sites.layers[1:]:
        plan.weights[layer.node] = [4] * layer.kernels
    qdq = lower(canonical, plan, sites)
    converted = convert(qdq.proto, "qdq-int4")
    kinds = {t.name: t.data_type for t in converted.proto.graph.initializer}
    assert all(kinds[e["tensor"]] == onnx.TensorProto.INT4 for e in qdq.sidecar["weights"].values())
    x = inputs()
    np.testing.assert_array_equal(run(converted.proto, x), run(qdq.proto, x))
