"""``--method uniform-ptq``: uniform bits, calibration only, no fine-tuning (the floor every method must beat).

One iteration (``kind: calibrate``, ``fine_tune_steps: 0``, ``fine_tune_loss: null``):

- every kernel at ``round(target_bits)`` bits (rounded half up, within 1..16; per output channel,
  ``weight_scheme``), every activation site at ``round(target_act_bits)`` bits; a target of ``none``
  keeps that side float, and a side not in ``phases`` stays float (``--phases weights``: weights only);
- every activation clip is the 99.9th percentile of the float model's values over 5 training batches
  (:func:`impq_onnx.quant.simulate.calibrate_clips` with ``only_missing=False``: batch-norm clips are not used),
  or with ``act_clip: mse`` the clip of least squared error at the site's bits (:func:`fit_clips_mse`);
- the float weights are left as they are.
"""

from __future__ import annotations

import math
import time
from typing import Any

from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import calibrate_clips, fit_clips_mse
from impq_onnx.search.iteration import derive_seed, finish_iteration, record_iteration
from impq_onnx.search.state import PHASE_ORDERS, SearchContext, SearchState

__all__ = ["calibrated_plan", "fitted_clips", "run_ptq", "uniform_bits"]


def uniform_bits(cfg: Any) -> tuple[int | None, int | None]:
    """(weight bits, activation bits) of the uniform baselines: the targets rounded, None for float."""
    phases = PHASE_ORDERS[cfg.phases]

    def bits(target: float | None, phase: str) -> int | None:
        if phase not in phases or target is None:
            return None
        return max(1, min(16, math.floor(target + 0.5)))

    return bits(cfg.target_bits, "weights"), bits(cfg.target_act_bits, "activations")


def calibrated_plan(cfg: Any, base: Any, sites: Any, train: Any, weight_bits: int | None, act_bits: int | None, *,
                    weight_scheme: str) -> PrecisionPlan:
    """The uniform plan with every clip calibrated (99.9th percentile, 5 batches, ``batch_size`` images each)."""
    plan = PrecisionPlan.uniform(sites, weight_bits, act_bits, weight_scheme=weight_scheme,
                                 granularity=cfg.granularity)
    batches = train.batches(cfg.batch_size, shuffle=True, seed=derive_seed(cfg.seed, 0, "calibrate"))
    plan = calibrate_clips(base, plan, sites, batches, percentile=99.9, max_batches=5, only_missing=False,
                           threads=cfg.threads, seed=derive_seed(cfg.seed, 0, "calibrate-subset"))
    return fitted_clips(cfg, plan, base, sites, train, 0, [site.tensor for site in sites.activations])


def fitted_clips(cfg: Any, plan: PrecisionPlan, model: Any, sites: Any, train: Any, iteration: int,
                 tensors: list[str]) -> PrecisionPlan:
    """With ``act_clip: mse`` (or ``learned``: its start), ``plan`` with the clips of ``tensors`` fitted to their
    bits on ``model`` (the current weights; the iteration's calibration batches and subset seed); with ``paper``
    (or None: a config whose derived defaults were not resolved), ``plan`` unchanged."""
    if getattr(cfg, "act_clip", "paper") not in ("mse", "learned") or not tensors:
        return plan
    batches = train.batches(cfg.batch_size, shuffle=True, seed=derive_seed(cfg.seed, iteration, "calibrate"))
    return fit_clips_mse(model, plan, sites, tensors, batches, threads=cfg.threads,
                         seed=derive_seed(cfg.seed, iteration, "calibrate-subset"))


def run_ptq(context: SearchContext, state: SearchState) -> SearchState:
    """The single calibration iteration (a resumed finished run returns its state unchanged)."""
    if state.stop is not None:
        return state
    started = time.perf_counter()
    cfg = context.config
    weight_bits, act_bits = uniform_bits(cfg)
    state.plan = calibrated_plan(cfg, context.base, context.sites, context.train, weight_bits, act_bits,
                                 weight_scheme=cfg.weight_scheme)
    record = record_iteration(context, state, started=started, phase="calibration", kind="calibrate")
    finish_iteration(context, state, record, end=lambda: "calibrated")
    return state
