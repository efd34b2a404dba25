"""Packed target: codes bit-packed at their true width reproduce the QDQ model's codes and weights exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from lowering_cases import SCHEMES, inputs, midrise, mixed_plan, ops, run, tiny
from onnx import numpy_helper
from tiny_models import Quirks, build

from impq_onnx.lowering.lower import convert, lower, read_lowered, write
from impq_onnx.lowering.packed_layout import widths_tensor
from impq_onnx.lowering.targets import PackedTarget
from impq_onnx.lowering.targets.packed import PACKED_DOMAIN, SUFFIX, UNPACK_NODE, grids, kernel_table, pack, unpack
from impq_onnx.lowering.verify import runnable, verify
from impq_onnx.quant.schemes import weight_scheme

TOOLS = Path(__file__).parents[3] / "tools" / "impq_unpack.py"


def _standalone() -> ModuleType:
    spec = importlib.util.spec_from_file_location("impq_unpack", TOOLS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("step", [1, 2])
def test_random_codes_round_trip_at_every_width(bits, step):
    rng = np.random.default_rng(bits * 10 + step)
    shape, axis = (5, 3, 3, 7), 1 if step == 2 else 0
    lo = -(1 << (bits - 1)) * step + (1 if step == 2 else 0)
    u = rng.integers(0, 1 << bits, size=shape)
    codes = (lo + step * u).astype(np.int32)
    kernel_bits = np.full(shape[axis], bits, np.uint8)
    code_min, code_step = [0] * bits + [lo], [1] * bits + [step]
    blob = pack(codes, axis, kernel_bits, code_min, code_step)
    n = codes.size // shape[axis]
    assert len(blob) == shape[axis] * ((n * bits + 7) // 8)  # the size tracks the bits (one byte pad per kernel)
    data = np.concatenate([np.zeros(3, np.uint8), blob])  # from an offset
    np.testing.assert_array_equal(unpack(data, 3, kernel_bits, code_min, code_step, shape, axis), codes)
    np.testing.assert_array_equal(
        _standalone().unpack(data.tobytes(), 3, kernel_bits, code_min, code_step, shape, axis), codes)


def test_layout_is_lsb_first_from_each_kernel_byte():
    codes = np.array([[1, 2, 3, 4, 5], [-1, 1, 1, -1, 1]], np.int8)  # kernel 0: 3-bit unsigned; kernel 1: 1-bit odd
    blob = pack(codes, 0, np.array([3, 1]), [0, -1, 0, 0], [1, 2, 1, 1])
    # kernel 0, stream 100 010 110 001 101 (each value LSB first): bytes 0b11010001, 0b01011000 (one pad bit);
    # kernel 1 starts on the next byte: u = 0,1,1,0,1 -> 0b10110
    assert blob.tolist() == [0b11010001, 0b01011000, 0b00010110]


def test_off_grid_code_is_refused_naming_the_kernel():
    with pytest.raises(ValueError, match="kernel 1: codes"):
        pack(np.array([[1, 3], [2, 3]], np.int8), 0, np.array([2, 2]), [0, 0, -3], [1, 1, 2])


def test_one_grid_per_width_or_a_clear_refusal():
    table = kernel_table([(-3, 3, True), (-1, 1, True), (0, 0, False), (-3, 3, True)])
    assert table[:, 0].tolist() == [2, 1, 0, 2]
    assert grids(table) == ([0, -1, -3], [1, 2, 2])  # width 0: code 0 (a float kernel)
    with pytest.raises(ValueError, match="kernel 1: 2-bit grid"):
        grids(kernel_table([(-3, 3, True), (-2, 1, False)]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_table_widths_are_the_true_bits(scheme):
    table = kernel_table([weight_scheme(scheme).code_bounds(b) for b in [1, 2, 3, 4, 5, 6, 7, 8, None]])
    assert table[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_packed_model_unpacks_to_the_qdq_model_bit_for_bit(scheme, tmp_path):
    canonical, sites = tiny(build(Quirks(head="matmul")))
    plan = mixed_plan(sites, scheme, seed=4)
    qdq = lower(canonical, plan, sites)
    packed = lower(canonical, plan, sites, format="packed")
    counts = ops(packed.proto)
    assert counts["UnpackBits"] == 1 and counts["DequantizeLinear"] == ops(qdq.proto)["DequantizeLinear"] - len(
        sites.layers)  # one node unpacks and scales every weight; the activations keep theirs
    codes = {e["tensor"] for e in qdq.sidecar["weights"].values()}
    assert not codes & {t.name for t in packed.proto.graph.initializer}  # codes only in the .packed data
    assert not packed.proto.graph.value_info and not packed.proto.graph.quantization_annotation
    total_bits = sum(int(np.prod(layer.weight_shape)) // layer.kernels * (b or 0)
                     for layer in sites.layers for b in plan.weights[layer.node])
    data = packed.attachments[SUFFIX]
    assert total_bits / 8 <= len(data) < total_bits / 8 + sum(layer.kernels for layer in sites.layers)
    standard = runnable(packed)
    assert not [n for n in standard.graph.node if n.domain == PACKED_DOMAIN]
    ours = {t.name: numpy_helper.to_array(t) for t in standard.graph.initializer}
    zero_points = {n.input[2] for n in qdq.proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in codes}
    qdq_inits = {t.name: numpy_helper.to_array(t) for t in qdq.proto.graph.initializer}
    zero_adds = {n.input[1] for n in qdq.proto.graph.node if n.op_type == "Add"
                 and n.input[1].endswith("_float_kernels") and not qdq_inits[n.input[1]].any()}
    assert bool(zero_adds) == midrise(scheme)  # 8-bit midrise codes are int32: their zero Add is left
    # out of the written model and put back (under another name) in the standard-op form
    for t in qdq.proto.graph.initializer:  # codes, scales, residuals: same dtype, same bits
        if t.name in zero_points | zero_adds:  # all 0: DequantizeLinear's default, or the zero Add's addend
            assert not numpy_helper.to_array(t).any() and t.name not in ours
            continue
        assert ours[t.name].dtype == numpy_helper.to_array(t).dtype
        np.testing.assert_array_equal(ours[t.name], numpy_helper.to_array(t))
    x = inputs()
    np.testing.assert_array_equal(run(standard, x), run(qdq.proto, x))
    paths = write(packed, tmp_path / "m.onnx")
    assert [p.name for p in paths] == ["m.onnx", "m.onnx.bits.json", "m.packed"]
    assert (tmp_path / "m.packed").read_bytes() == data
    again = read_lowered(tmp_path / "m.onnx")
    result = verify(again, canonical, plan, sites, [x])
    assert result.ok and result.max_logit_diff == 0.0, result.to_dict()


def test_rewrite_twice_changes_nothing():
    canonical, sites = tiny(build(Quirks()))
    plan = mixed_plan(sites, "midrise-max", seed=5)
    model = ir.serde.deserialize_model(lower(canonical, plan, sites, format="packed").proto)
    before = ir.serde.serialize_model(model).SerializeToString()
    assert PackedTarget().rewrite(model, plan, sites) == {SUFFIX: b""}
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_all_float_plan_writes_an_empty_packed_file_that_reads_back(tmp_path):
    canonical, sites = tiny(build(Quirks()))
    plan = mixed_plan(sites, "midrise-max", weights=False, activations=True)
    write(lower(canonical, plan, sites, format="packed"), tmp_path / "m.onnx")
    assert (tmp_path / "m.packed").read_bytes() == b""
    assert verify(read_lowered(tmp_path / "m.onnx"), canonical, plan, sites, [inputs()]).ok


def test_foreign_qdq_model_packs_at_its_stored_ranges():
    canonical, sites = tiny(build(Quirks()))
    plan = mixed_plan(sites, "symmetric-rms", seed=6, activations=False)
    qdq = lower(canonical, plan, sites)
    packed = convert(qdq.proto, "packed")
    assert packed.sidecar == {} and ops(packed.proto)["UnpackBits"] == 1
    assert [n.name for n in packed.proto.graph.node if n.op_type == "UnpackBits"] == [UNPACK_NODE]
    assert len(packed.proto.graph.node[0].output) == len(sites.layers)
    x = inputs()
    np.testing.assert_array_equal(run(runnable(packed), x), run(qdq.proto, x))


def test_standalone_script_reads_a_written_model(tmp_path, capsys):
    canonical, sites = tiny(build(Quirks()))
    write(lower(canonical, mixed_plan(sites, "midrise-max"), sites, format="packed"), tmp_path / "m.onnx")
    _standalone().main(str(tmp_path / "m.onnx"))
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(sites.layers) and all("bits [" in line for line in printed)


def test_widths_are_four_bits_each_or_a_byte_each_past_fifteen():
    widths = np.array([1, 2, 3, 8, 0], np.uint8)
    tensor = widths_tensor(widths)
    assert tensor.data_type == onnx.TensorProto.UINT4
    assert tensor.raw_data == bytes([0x21, 0x83, 0x00])  # the first width in the low nibble
    np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.uint8), widths)
    wide = widths_tensor(np.array([16, 2], np.uint8))  # 16 bits (the plan's most) does not fit 4 bits
    assert wide.data_type == onnx.TensorProto.UINT8 and numpy_helper.to_array(wide).tolist() == [16, 2]
