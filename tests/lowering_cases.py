"""Shared pieces of the lowering tests: tiny models, mixed plans with per-kernel bits 1-8, runners."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir

from impq_onnx.frontend.canonical import from_proto
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.schemes import weight_scheme
from impq_onnx.runtime import inference_session
from impq_onnx.frontend.site_analysis import find_sites

SCHEMES = ("midrise-max", "symmetric-rms", "pow2-std", "midrise-rms")


def midrise(scheme: str) -> bool:
    """Whether ``scheme`` has the zero-free midrise grid at every width (odd codes: 8 bits need 9-bit codes)."""
    return weight_scheme(scheme).grid(8).offset != 0


def tiny(model: onnx.ModelProto, shape=(1, 3, 8, 8)):
    canonical = from_proto(model)
    return canonical, find_sites(canonical, shape)


def mixed_plan(sites, scheme: str, *, weights: bool = True, activations: bool = True, seed: int = 0,
               float_kernel: bool = True) -> PrecisionPlan:
    """Per-kernel bits drawn from 1..8 (both ends forced), one float kernel, activations 1..8 cycled."""
    plan = PrecisionPlan.uniform(sites, None, None, weight_scheme=scheme, default_clip=2.5)
    rng = np.random.default_rng(seed)
    if weights:
        for i, layer in enumerate(sites.layers):
            bits = [int(b) for b in rng.integers(1, 9, layer.kernels)]
            bits[0], bits[-1] = 1, 8
            if float_kernel and i == 1 and layer.kernels > 2:
                bits[1] = None
            plan.weights[layer.node] = bits
    if activations:
        for i, site in enumerate(sites.activations):
            plan.activations[site.tensor] = [3, 8, 1, 5, 2, 7, 4, 6][(i + seed) % 8]
    return plan.validate(sites)


def ops(model) -> collections.Counter:
    if isinstance(model, onnx.ModelProto):
        return collections.Counter(node.op_type for node in model.graph.node)
    return collections.Counter(node.op_type for node in model.graph)


def run(model, x: np.ndarray) -> np.ndarray:
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    session = inference_session(proto.SerializeToString())
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def inputs(shape=(40, 3, 8, 8), seed: int = 3) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 1.5).astype(np.float32)
