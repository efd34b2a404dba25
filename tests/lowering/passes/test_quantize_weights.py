"""QuantizeWeightsPass: integer codes + per-channel DequantizeLinear equal the simulated weights exactly."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from impq_onnx.quant.schemes import weight_scheme
from impq_onnx.lowering.passes import QuantizeWeightsPass
from impq_onnx.lowering.passes.quantize_weights import code_bounds, kernel_codes, storage_dtype
from impq_onnx.quant.simulate import simulate
from lowering_cases import SCHEMES, inputs, midrise, mixed_plan, ops, run, tiny
from quant_models import tiny_cnn
from tiny_models import Quirks, build

MODELS = {"cnn": lambda: tiny_cnn(), "dw-gemm": lambda: build(Quirks()), "dw-matmul": lambda: build(Quirks(head="matmul"))}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_weights_pass_counts_numbers_idempotence(name, scheme):
    canonical, sites = tiny(MODELS[name]())
    plan = mixed_plan(sites, scheme, activations=False)
    model = canonical.model.clone()
    before = ops(model)
    result = QuantizeWeightsPass(plan, sites)(model)
    assert result.modified
    added = ops(model) - before
    # an Add after the DequantizeLinear where a layer has a float kernel or codes wider than int8
    adds = sum(any(b is None or b >= (8 if midrise(scheme) else 9) for b in plan.weights[layer.node])
               for layer in sites.layers)
    assert added == {"DequantizeLinear": len(sites.layers), "Add": adds}
    assert not set(before) - set(ops(model))
    x = inputs()
    np.testing.assert_array_equal(run(model, x), run(simulate(canonical, plan, sites), x))
    assert not QuantizeWeightsPass(plan, sites)(model).modified
    assert ops(model) - before == added


@pytest.mark.parametrize("scheme", SCHEMES)
def test_codes_dequantize_to_the_reference_quantizer_bit_for_bit(scheme):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 5, 3, 3)) * rng.uniform(0.01, 3, (16, 1, 1, 1))).astype(np.float32)
    w[3] = 0.0  # an all-zero kernel
    bits = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, None, 8, 3, 16, 12, 9]
    codes = kernel_codes(w, bits, 0, scheme)
    reference = weight_scheme(scheme).quantize(w, bits, 0)
    assert np.array_equal(codes.dequantized().view(np.int32), reference.view(np.int32))
    for k, b in enumerate(bits):
        lo, hi, odd = code_bounds(b, scheme)
        kernel = codes.codes[k].astype(np.int64)
        assert lo <= kernel.min() and kernel.max() <= hi
        if odd:
            assert np.all(kernel % 2 == 1)
        if b is not None and b <= 8:  # small kernels use their whole grid or most of it
            assert len(np.unique(kernel)) <= 2**b


def test_pow2_std_codes_use_a_power_of_two_scale_and_the_simulated_sigma():
    """One sigma per layer (from onnxruntime, as the simulation): every scale is a power of two."""
    from impq_onnx.lowering.passes.quantize_weights import simulated_stats

    rng = np.random.default_rng(2)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.2 + 0.01).astype(np.float32)
    bits = [1, 2, 3, 4, 5, 6, 7, 8]
    stat = simulated_stats({"conv": (w, 0)}, "pow2-std", 13)["conv"]
    assert stat.size == 1
    codes = kernel_codes(w, bits, 0, "pow2-std", 13, stat)
    mantissa, _ = np.frexp(codes.scale)
    assert np.all(mantissa == np.float32(0.5)) and codes.codes.dtype == np.int8
    assert codes.codes[7].min() >= -128 and codes.codes[0].min() >= -1
    assert np.array_equal(codes.dequantized(), weight_scheme("pow2-std").quantize(w, bits, 0))


def test_gemm_and_matmul_kernels_are_output_columns():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 4)).astype(np.float32)  # MatMul [K, N]: kernels along axis 1
    codes = kernel_codes(w, [1, 2, 3, 8], 1, "midrise-max")
    np.testing.assert_array_equal(codes.dequantized(), weight_scheme("midrise-max").quantize(w, [1, 2, 3, 8], 1))
    assert codes.scale.shape == (4,)


def test_storage_type():
    assert storage_dtype(127, 13) == np.int8  # midrise <= 7 bits, symmetric <= 8 bits
    assert storage_dtype(255, 17) == np.int32  # 8-bit midrise before opset 21
    assert storage_dtype(255, 21) == np.int16
    assert storage_dtype(65535, 21) == np.int32
    assert code_bounds(8, "midrise-max") == (-255, 255, True)
    assert code_bounds(8, "symmetric-rms") == (-127, 127, False)
    assert code_bounds(1, "symmetric-rms") == (-1, 1, True)
    assert code_bounds(8, "pow2-std") == (-128, 127, False)  # int8's whole range
    assert code_bounds(1, "pow2-std") == (-1, 1, True)


@pytest.mark.parametrize("scheme,top,dtype", [("midrise-max", 7, np.int8), ("midrise-max", 8, np.int32),
                                              ("symmetric-rms", 8, np.int8), ("pow2-std", 8, np.int8)])
def test_initializer_type_follows_the_widest_kernel(scheme, top, dtype):
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, scheme, activations=False, float_kernel=False)
    for node, bits in plan.weights.items():
        plan.weights[node] = [min(b, top) for b in bits]
    model = canonical.model.clone()
    QuantizeWeightsPass(plan, sites)(model)
    for layer in sites.layers:
        assert model.graph.initializers[f"{layer.weight}_quantized"].const_value.numpy().dtype == dtype
        assert layer.weight not in model.graph.initializers  # the float weight is gone


def test_float_layers_are_untouched():
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, "midrise-max", activations=False)
    plan.weights["conv2"] = [None] * len(plan.weights["conv2"])
    model = canonical.model.clone()
    QuantizeWeightsPass(plan, sites)(model)
    assert "conv2.w" in model.graph.initializers
    assert ops(model)["DequantizeLinear"] == 2
    assert isinstance(model, ir.Model)
