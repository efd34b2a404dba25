"""``--method faq``: Finetuning After Quantization (McKinstry et al., IBM, 2019; the poster).

Bits: uniform, ``round(target_bits)`` (half up) for every weight kernel and ``round(target_act_bits)`` for every
activation site (``none``, or a side not in ``phases``: float), as :func:`.ptq.uniform_bits`.

Step sizes (``pow2(x) = 2^ceil(log2 x)``). The poster gives the 4-bit rules
``Δ_w = pow2(4.12 σ_l / 8)`` (σ_l the standard deviation of layer l's weights) and
``Δ_a = pow2(y_max / 16)`` (y_max the 99.9th percentile of the layer's activations over 5 training
batches). Both have the form "clip range / number of levels", and we generalise them to B bits that
way, keeping the poster's constant 4.12 at every B (the poster gives no other)::

    weights:      Δ_w(l) = pow2(4.12 σ_l / 2^(B-1))        signed, levels k Δ_w, k = -2^(B-1) .. 2^(B-1)-1
    activations:  Δ_a(s) = pow2(y_max(s) / 2^B)             unsigned sites, levels 0 .. (2^B-1) Δ_a
                  Δ_a(s) = pow2(y_max(s) / 2^(B-1))         signed sites (|y|), levels -2^(B-1) .. 2^(B-1)-1

Activations are exact: the plan's clip of site s is set to ``Δ_a(s) * 2^B`` (``2^(B-1)`` signed),
so the ``uniform-clip`` quantizer's step ``clip * 2^-B`` is the power of two ``Δ_a(s)``.

Weights are exact too: the plan's weight scheme is ``pow2-std`` (:mod:`impq_onnx.quant.schemes.pow2_std`), which
recomputes σ_l (population standard deviation of the layer's float shadow weights, float32) at every
step and quantizes with ``Δ_w(l) = pow2(4.12 σ_l / 2^(B-1))``, ``2^B`` signed levels (1 bit: the
mid-rise ``±Δ_w/2``), the lowered model bit-identical to the simulation. Each run records the initial
weight steps Δ_w(l) (``faq_weight_steps`` in the first iteration's record; the training moves σ_l).

Fine-tuning: one long fine-tune with an exponential learning-rate decay from ``lr`` to the poster's
final 1e-6, run as ``max_iterations`` iterations of ``steps`` (or ``epochs``) steps each, so the
total equals IMPQ's lowering-step budget ``steps × max_iterations``. Iteration i (of n) decays
exponentially (``fine_tune(lr_schedule="exponential")``, a constant factor per step, no warm-up) from
``lr·r^(i/n)`` to ``lr·r^((i+1)/n)`` with ``r = 1e-6 / lr``, so the n iterations together follow one
unbroken exponential curve from ``lr`` to 1e-6. SGD momentum restarts at each
iteration (each is a separate fine-tune). Every iteration is checkpointed; the output is the last.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from impq_onnx.quant.plan import ActivationClip, PrecisionPlan
from impq_onnx.search.iteration import (
    FIXED_LR,
    fine_tune_steps,
    finish_iteration,
    record_iteration,
    run_fine_tune,
    with_values,
)
from impq_onnx.search.ptq import calibrated_plan, uniform_bits
from impq_onnx.search.state import SearchContext, SearchState

__all__ = [
    "FAQ_FINAL_LR",
    "FAQ_WEIGHT_RANGE",
    "FAQ_WEIGHT_SCHEME",
    "faq_activation_clip",
    "faq_learning_rate",
    "faq_weight_step",
    "pow2_ceil",
    "run_faq",
]

FAQ_WEIGHT_RANGE = 4.12  # the poster's weight clip in standard deviations (given for 4 bits); = quant.schemes.pow2_std.POW2_STD_RANGE
FAQ_FINAL_LR = 1e-6  # the poster's final learning rate
FAQ_WEIGHT_SCHEME = "pow2-std"  # FAQ's per-layer power-of-two weight step, exactly (see the module docstring)


def pow2_ceil(x: float) -> float:
    """``2^ceil(log2 x)`` (the poster's rounding of a step size up to a power of two)."""
    if not x > 0 or not math.isfinite(x):
        raise ValueError(f"a step size must be positive and finite, not {x}")
    return float(2.0 ** math.ceil(math.log2(x)))


def faq_weight_step(w: np.ndarray, bits: int) -> float:
    """FAQ's weight step of one layer: ``pow2(4.12 σ / 2^(B-1))``, as the ``pow2-std`` quantizer computes it."""
    from impq_onnx.quant.schemes import weight_scheme

    scheme = weight_scheme(FAQ_WEIGHT_SCHEME)
    w = np.asarray(w, np.float32)
    return float(scheme.step(scheme.statistic(w, 0), np.float32(scheme.grid(bits).factor)).reshape(-1)[0])


def faq_activation_clip(y_max: float, bits: int, signed: bool) -> float:
    """The clip whose ``uniform-clip`` step is FAQ's ``pow2(y_max / levels)``."""
    levels = 2.0 ** (bits - 1 if signed else bits)
    return pow2_ceil(max(y_max, 1e-30) / levels) * levels


def faq_learning_rate(i: int, n: int, lr: float) -> float:
    """The exponential curve at iteration boundary ``i`` of ``n``: ``lr · (1e-6 / lr)^(i / n)``."""
    if lr <= FAQ_FINAL_LR or n <= 0:
        return lr
    return lr * (FAQ_FINAL_LR / lr) ** (i / n)


def _faq_plan(cfg: Any, base: Any, sites: Any, train: Any) -> tuple[PrecisionPlan, dict[str, Any]]:
    weight_bits, act_bits = uniform_bits(cfg)
    plan = calibrated_plan(cfg, base, sites, train, weight_bits, act_bits, weight_scheme=FAQ_WEIGHT_SCHEME)
    extra: dict[str, Any] = {"faq_weight_steps": {}, "activation_steps": {}}
    if act_bits is not None:
        for site in sites.activations:
            clip = plan.clips[site.tensor]
            plan.clips[site.tensor] = ActivationClip(faq_activation_clip(clip.value, act_bits, clip.signed),
                                                     clip.signed)
            extra["activation_steps"][site.tensor] = plan.clips[site.tensor].value * 2.0 ** -(
                act_bits - 1 if clip.signed else act_bits)
    if weight_bits is not None:
        initial = {t.name: t for t in base.to_proto().graph.initializer} if hasattr(base, "to_proto") else {}
        from onnx import numpy_helper

        for layer in sites.layers:
            if layer.weight in initial:
                w = numpy_helper.to_array(initial[layer.weight])
                extra["faq_weight_steps"][layer.node] = faq_weight_step(w, weight_bits)
    return plan, extra


def run_faq(context: SearchContext, state: SearchState) -> SearchState:
    """Quantize once, then the exponentially decaying fine-tune, one checkpointed iteration at a time."""
    cfg = context.config
    n = max(1, cfg.max_iterations)
    while state.stop is None:
        started = time.perf_counter()
        i = state.iteration + 1
        extra: dict[str, Any] = {}
        if i == 0:
            state.plan, extra = _faq_plan(cfg, context.base, context.sites, context.train)
        lr_start, lr_end = faq_learning_rate(i, n, FIXED_LR if cfg.lr is None else cfg.lr), faq_learning_rate(
            i + 1, n, FIXED_LR if cfg.lr is None else cfg.lr)
        trained = run_fine_tune(context, state, with_values(context.base, state.values),
                                fine_tune_steps(cfg, context.train), lr=lr_start, final_lr=lr_end, warmup_steps=0,
                                lr_schedule="exponential" if lr_end > 0 else "cosine")
        state.values = {**state.values, **trained.values}
        record = record_iteration(context, state, started=started, phase="fine-tune", kind="fine-tune",
                                  trained=trained, extra={"lr_start": lr_start, "lr_end": lr_end, **extra})
        finish_iteration(context, state, record, end=lambda: "max_iterations" if i + 1 >= n else None)
    return state
