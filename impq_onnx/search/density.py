"""``--method activation-density``: bits from the fraction of non-zero activations (Vasquez et al., 2021).

The paper sets each layer's bit width proportional to its activation density (AD: the fraction of
non-zero values of the layer's output activations), recomputes it during training and fine-tunes.
Our exact rule, each iteration ``i = 0 .. max_iterations-1``:

1. Measure AD(s) of every activation site s: run the current model in onnxruntime (iteration 0: the
   float model; later: the simulated model under the current plan with the fine-tuned weights) on
   ``sensitivity_samples`` training images (seeded, batches of 64) and count the non-zeros of the
   site tensor (the float value entering the site's quantizer): ``AD = nnz / size``.
2. ``bits(s) = clamp(floor(AD(s) · B_max,a + 0.5), 1, B_max,a)`` with ``B_max,a = start_act_bits``.
3. Weights, one width per layer l: the AD of the layer's *output* site (the site produced through the
   batch-norm that follows it), ``bits(l) = clamp(floor(AD · B_max,w + 0.5), 1, B_max,w)`` with
   ``B_max,w = start_bits``; a layer whose output is no activation site (the classifier) keeps B_max,w.
4. Fine-tune ``steps`` (or ``epochs``) steps with the run's schedule (warm-up + cosine) at ``lr``.

A side not in ``phases`` stays float. Clips: batch-norm clips where there is one, else calibrated
(99.9th percentile), as in IMPQ. ``target_bits`` / ``target_act_bits`` are not used: B_max sets the
budget. The output is the last iteration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper

from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import as_proto, calibrate_clips, simulate
from impq_onnx.search.iteration import (
    EVAL_BATCH,
    FIXED_LR,
    derive_seed,
    fine_tune_steps,
    finish_iteration,
    record_iteration,
    run_fine_tune,
    with_values,
)
from impq_onnx.search.state import SearchContext, SearchState

__all__ = ["activation_densities", "density_bits", "density_plan", "output_site", "run_density"]


def activation_densities(model: onnx.ModelProto, tensors: list[str], batches: Iterable, *,
                         max_batches: int | None = None, threads: int | None = None) -> dict[str, float]:
    """Fraction of non-zero values of each tensor in ``tensors`` over ``batches`` (``(x, y)`` or ``x``)."""
    from impq_onnx.runtime import inference_session

    proto = as_proto(model)
    present = {o.name for o in proto.graph.output}
    for name in tensors:
        if name not in present:
            proto.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = inference_session(proto.SerializeToString(), threads)
    input_name = session.get_inputs()[0].name
    nonzero = dict.fromkeys(tensors, 0)
    total = dict.fromkeys(tensors, 0)
    for n, batch in enumerate(batches):
        if max_batches is not None and n >= max_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        for name, out in zip(tensors, session.run(tensors, {input_name: np.asarray(x, np.float32)})):
            nonzero[name] += int(np.count_nonzero(out))
            total[name] += int(np.size(out))
    return {name: nonzero[name] / total[name] if total[name] else 1.0 for name in tensors}


def density_bits(density: float, max_bits: int) -> int:
    """``clamp(floor(AD · B_max + 0.5), 1, B_max)``."""
    return max(1, min(max_bits, math.floor(density * max_bits + 0.5)))


def output_site(layer, sites):
    """The activation site that ``layer`` produces through its batch-norm (None: it has none)."""
    if layer.batchnorm is None:
        return None
    return next((s for s in sites.activations if s.batchnorm is not None and s.batchnorm.node == layer.batchnorm.node),
                None)


def density_plan(plan: PrecisionPlan, sites, densities: dict[str, float], *, weight_max: int | None,
                 act_max: int | None) -> PrecisionPlan:
    """``plan`` with bits from ``densities`` (rules 2 and 3 of the module docstring; None: that side float)."""
    plan = plan.copy()
    for site in sites.activations:
        plan.activations[site.tensor] = None if act_max is None else density_bits(densities[site.tensor], act_max)
    for layer in sites.layers:
        out = output_site(layer, sites)
        bits = None if weight_max is None else (
            weight_max if out is None else density_bits(densities[out.tensor], weight_max))
        plan.weights[layer.node] = [bits] * layer.kernels
    return plan


def run_density(context: SearchContext, state: SearchState) -> SearchState:
    """Measure densities, set bits, fine-tune; ``max_iterations`` times, each iteration checkpointed."""
    cfg, base, sites, train = context.config, context.base, context.sites, context.train
    weight_max = cfg.start_bits if "weights" in context.phases else None
    act_max = cfg.start_act_bits if "activations" in context.phases else None
    n = max(1, cfg.max_iterations)
    tensors = [s.tensor for s in sites.activations]
    while state.stop is None:
        started = time.perf_counter()
        i = state.iteration + 1
        model = with_values(base, state.values)
        if i == 0:
            plan = PrecisionPlan.uniform(sites, None, None, weight_scheme=cfg.weight_scheme,
                                         granularity=cfg.granularity)
            batches = train.batches(cfg.batch_size, shuffle=True, seed=derive_seed(cfg.seed, 0, "calibrate"))
            state.plan = calibrate_clips(base, plan, sites, batches, threads=cfg.threads,
                                         seed=derive_seed(cfg.seed, 0, "calibrate-subset"))
            measured = as_proto(base)
        else:
            measured = simulate(model, state.plan, sites)
        batches = train.batches(EVAL_BATCH, shuffle=True, seed=derive_seed(cfg.seed, i, "density"))
        densities = activation_densities(measured, tensors, batches, threads=cfg.threads,
                                         max_batches=max(1, math.ceil(cfg.sensitivity_samples / EVAL_BATCH)))
        state.plan = density_plan(state.plan, sites, densities, weight_max=weight_max, act_max=act_max)
        trained = run_fine_tune(context, state, model, fine_tune_steps(cfg, train),
                                lr=FIXED_LR if cfg.lr is None else cfg.lr)
        state.values = {**state.values, **trained.values}
        record = record_iteration(context, state, started=started, phase="density", kind="density", trained=trained,
                                  extra={"densities": densities})
        finish_iteration(context, state, record, end=lambda: "max_iterations" if i + 1 >= n else None)
    return state
