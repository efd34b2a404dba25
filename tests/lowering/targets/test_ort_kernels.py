"""onnxruntime's u8s8 kernels without VNNI add adjacent pairs of u8·s8 products with int16 saturation
(vpmaddubsw): the integer reference then models a model only where no pair can leave int16."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from test_ort_integer import _dq, _model, _requantized

from impq_onnx.lowering.targets import ort_kernels
from impq_onnx.lowering.targets.ort_integer import (
    deployed_coverage,
    integer_reference,
    rewritten_counts,
    saturating_group,
)
from impq_onnx.lowering.targets.ort_kernels import SATURATING, pair_overflow, u8s8_kernels
from impq_onnx.runtime import inference_session

_CORE = "avx512f avx512bw avx512dq avx512vl"


@pytest.mark.parametrize("flags, kernels", [
    ("sse2 avx", None), ("sse2 avx avx2", None), ("avx avx2 fma", "avx2"), (f"avx2 fma {_CORE}", "avx512core"),
    (f"avx2 fma {_CORE} avx512_vnni", "avx512vnni"), ("avx2 fma avx_vnni", "avxvnni"),
    (f"avx2 fma avx_vnni {_CORE}", "avx512core"),  # platform.cpp: the AVX-512 core kernels replace AVX-VNNI's
    ("avx2 fma avx512f avx512_vnni", "avx2"),  # no AVX-512 core set: the AVX2 kernels
])
def test_the_kernels_are_read_from_the_cpu_flags(tmp_path, flags, kernels):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nvendor_id\t: x\nflags\t\t: fpu sse {flags}\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert u8s8_kernels(str(info)) == kernels
    assert ort_kernels.modelled_cpu(str(info)) == (kernels in ("avx512vnni", "avxvnni"))
    assert (kernels in SATURATING) == (kernels is not None and not ort_kernels.modelled_cpu(str(info)))


def test_unreadable_cpu_flags_are_not_modelled(tmp_path):
    assert u8s8_kernels(str(tmp_path / "missing")) is None  # not Linux: unknown, so not modelled
    (tmp_path / "empty").write_text("processor\t: 0\n")
    assert u8s8_kernels(str(tmp_path / "empty")) is None


def test_the_pair_bound_is_the_two_largest_codes_of_one_sign():
    assert pair_overflow(np.array([[64, 64, -64, -64, 3]], np.int8), 255) is None  # 255 · 128 = 32640
    assert pair_overflow(np.array([[127, -128, 0]], np.int8), 255) is None  # one sign each: no pair adds up
    assert pair_overflow(np.array([[-128, 0, 0]], np.int8), 255) is None  # -32640
    assert pair_overflow(np.array([[1, 2], [65, 64]], np.int8), 255) == (
        "output channel 1: weight codes 65 and 64 times activation code 255 sum to 32895, past int16")
    assert pair_overflow(np.array([[-128, -1, 5]], np.int8), 255) == (
        "output channel 0: weight codes -128 and -1 times activation code 255 sum to -32895, past int16")
    assert pair_overflow(np.array([[127, 127]], np.int8), 128) is None  # 128 · 254 = 32512
    assert pair_overflow(np.array([[127]], np.int8), 255) is None  # a single product fits int16


def _conv(w: np.ndarray, group: int = 1, x_zero: int = 3):
    """uint8 x -> Conv (3x3, pad 1, stride 2, bias) -> QuantizeLinear (zero point 128)."""
    channels = len(w)
    rng = np.random.default_rng(len(w))
    inits = {"xs": np.float32(0.02), "xz": np.uint8(x_zero), "w": w,
             "ws": rng.uniform(1e-3, 1e-2, channels).astype(np.float32), "wz": np.zeros(channels, np.int8),
             "b": rng.integers(-2000, 2000, channels).astype(np.int32), "bz": np.zeros(channels, np.int32)}
    inits["bs"] = (inits["xs"] * inits["ws"]).astype(np.float32)
    nodes = [_dq("x", "xs", "xz", "xd"), helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1] * 4, strides=[2, 2], group=group,
                              name="conv"),
             *_requantized("c", 0.07, 128, inits)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, w.shape[1] * group, 15, 15])],
                   inits)
    return model, inits


def _gemm(w: np.ndarray):
    """uint8 x -> Gemm (transB, bias) with a float output (QGemm)."""
    rng = np.random.default_rng(7)
    inits = {"xs": np.float32(0.031), "xz": np.uint8(128), "w": w,
             "ws": rng.uniform(1e-3, 1e-2, len(w)).astype(np.float32),
             "wz": np.zeros(len(w), np.int8), "b": rng.integers(-500, 500, len(w)).astype(np.int32),
             "bz": np.zeros(len(w), np.int32)}
    inits["bs"] = (inits["xs"] * inits["ws"]).astype(np.float32)
    nodes = [_dq("x", "xs", "xz", "xd"), helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"], axis=0),
             helper.make_node("Gemm", ["xd", "wd", "bd"], ["y"], transB=1, name="fc")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, w.shape[1]])], inits), inits


def test_the_reference_names_the_first_layer_whose_pairs_could_saturate(tmp_path):
    rng = np.random.default_rng(0)
    full = rng.integers(-127, 128, (16, 16, 3, 3)).astype(np.int8)
    reference = integer_reference(_conv(full)[0])
    assert saturating_group(reference).startswith("layer 'conv' (QLinearConv) could saturate: output channel 0: ")
    assert saturating_group(integer_reference(_conv(np.clip(full, -64, 64))[0])) is None
    assert saturating_group(integer_reference(_gemm(full.reshape(16, -1))[0])).startswith("layer 'fc' (QGemm)")
    # a depthwise Conv widens the codes to int32 before multiplying (MLAS's depthwise kernels): never saturates
    assert saturating_group(integer_reference(_conv(full[:, :1], group=16)[0])) is None

    avx2, vnni = tmp_path / "avx2", tmp_path / "vnni"
    avx2.write_text("flags\t\t: sse2 avx avx2 fma\n")
    vnni.write_text(f"flags\t\t: sse2 avx avx2 fma {_CORE} avx512_vnni\n")
    fused = rewritten_counts(reference)
    assert deployed_coverage(reference, fused, str(avx2)) == (
        "this CPU's u8s8 kernels (avx2, without VNNI) add pairs of products with int16 saturation (vpmaddubsw), and "
        + saturating_group(reference))
    assert deployed_coverage(reference, fused, str(vnni)) is None
    assert deployed_coverage(integer_reference(_conv(np.clip(full, -64, 64))[0]), fused, str(avx2)) is None


def _saturated_sums(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``Σ x·w`` over the last axis of ``x`` (uint8, ..., K) and the first of ``w`` (int8, K, N), adding each
    adjacent pair of products (K index 2i, 2i+1) into an int16 with saturation first, as vpmaddubsw does."""
    if x.shape[-1] % 2:
        x, w = np.concatenate([x, np.zeros((*x.shape[:-1], 1), x.dtype)], -1), np.concatenate([w, w[:1] * 0])
    x, w = x.astype(np.int32), w.astype(np.int32)
    pairs = x[..., 0::2, None] * w[0::2] + x[..., 1::2, None] * w[1::2]
    return np.clip(pairs, -32768, 32767).sum(-2)


def _deployed_and_reference(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(onnxruntime fully optimized, the integer reference as written) on ``x``."""
    deployed = inference_session(model.SerializeToString(), 1, optimize=True).run(None, {"x": x})[0]
    reference = inference_session(integer_reference(model).SerializeToString(), 1, optimize=False)
    return deployed, reference.run(None, {"x": x})[0]


@pytest.mark.skipif(u8s8_kernels() not in SATURATING, reason="this CPU's u8s8 kernels do not use vpmaddubsw")
@pytest.mark.parametrize("channels", [16, 5])  # 16: MLAS's ConvSym kernel; 5: its im2col GEMM (K = 45, odd)
def test_full_range_weights_saturate_in_vpmaddubsw_pairs(channels):
    """Where the kernels saturate, onnxruntime's QLinearConv and QGemm differ from the integer reference on
    full-range 8-bit codes, and equal a model that saturates each adjacent pair of the K order (kernel position
    outer, input channel inner) on every output: the cause, pinned down."""
    rng = np.random.default_rng(channels)
    w = rng.integers(-127, 128, (channels, channels, 3, 3)).astype(np.int8)
    model, inits = _conv(w)
    x = rng.integers(0, 256, (8, channels, 15, 15)).astype(np.uint8)
    deployed, reference = _deployed_and_reference(model, x)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=3)  # padding: the zero point's code
    cols = np.stack([xp[:, :, i:i + 16:2, j:j + 16:2] for i in range(3) for j in range(3)], -1)  # n, c, 8, 8, kernel
    cols = cols.transpose(0, 2, 3, 4, 1).reshape(8, 8, 8, -1)  # K order: kernel position, then input channel
    wk = w.transpose(2, 3, 1, 0).reshape(-1, channels)
    acc = _saturated_sums(cols, wk) - 3 * wk.astype(np.int32).sum(0) + inits["b"]
    multiplier = ((inits["xs"] * inits["ws"]).astype(np.float32) / np.float32(0.07)).astype(np.float32)
    codes = np.clip(np.round(acc.astype(np.float32) * multiplier) + np.float32(128), 0, 255)
    modelled = ((codes.astype(np.int32) - 128).astype(np.float32) * np.float32(0.07)).transpose(0, 3, 1, 2)
    assert np.sum(deployed != reference) > deployed.size // 10
    np.testing.assert_array_equal(deployed, modelled)

    w = rng.integers(-127, 128, (10, 9 * channels)).astype(np.int8)
    model, inits = _gemm(w)
    x = rng.integers(0, 256, (64, 9 * channels)).astype(np.uint8)
    deployed, reference = _deployed_and_reference(model, x)
    acc = _saturated_sums(x, w.T) - 128 * w.astype(np.int32).sum(1) + inits["b"]
    assert np.sum(deployed != reference) > 0
    np.testing.assert_array_equal(deployed, acc.astype(np.float32) * (inits["xs"] * inits["ws"]).astype(np.float32))
