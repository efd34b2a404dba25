"""The IMPQ loop (IMPQ-NOTES, Algorithm 1) over a precision plan, checkpointed after every iteration.

One *iteration* is either a phase start (every group of the phase at the start bits, a fine-tune)
or a lowering step (sensitivity, the N least sensitive groups with bits > 1 lowered by one bit, a
fine-tune); each ends with an evaluation on the held-out split, a record, the stop decision and a
commit to the work directory (:mod:`impq_onnx.search.checkpoint`).

Reproducibility: every random choice is drawn from a seed derived from ``(seed, iteration, purpose)``
(:func:`derive_seed`): the training data order of each epoch, the sensitivity samples and probes, the
clip calibration samples, onnxruntime's seed. The model is always rebuilt as *base model + saved
parameter values*, so a resumed run starts an iteration from exactly the bytes an uninterrupted run
had. The only wall-clock input is ``time_budget``: after each iteration the committed wall time is
added up, and the decision to stop is written into the same ``state.json`` commit as the iteration.
A resume therefore replays a recorded decision; the time a killed process spent on an iteration it
did not commit is not counted (the resumed process times that iteration afresh).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np

from impq_onnx.data.dataset import derive_seed
from impq_onnx.engine import TrainedWeights
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import calibrate_clips, simulate
from impq_onnx.search.checkpoint import WorkDir
from impq_onnx.search.schedule import parse_schedule

__all__ = ["PHASE_ORDERS", "derive_seed", "run_search", "with_values", "initial_state", "pick_least_sensitive",
           "labelled_batches", "format_record"]

logger = logging.getLogger(__name__)

PHASE_ORDERS = {
    "weights-activations": ("weights", "activations"),
    "activations-weights": ("activations", "weights"),
    "weights": ("weights",),
    "activations": ("activations",),
}
EVAL_BATCH = 64


def with_values(base, values: dict[str, np.ndarray]):
    """``base`` (the float model) with the fine-tuned parameter ``values``; a copy."""
    if not values:
        return base
    return TrainedWeights(values, [], 0, 0, 0.0).apply_to(base)


def labelled_batches(dataset, batch_size: int, **kwargs):
    """``dataset.batches(...)``; without labels the batches are ``(x, None)`` (distillation, agreement)."""
    for x, y in dataset.batches(batch_size, **kwargs):
        yield (x, y) if dataset.labelled else (x, None)


def initial_state(reference: dict) -> dict:
    return {
        "iteration": -1,  # last committed iteration
        "phase": 0,  # index into the phase order
        "phase_started": False,
        "phase_step": 0,  # lowering steps done in the current phase
        "elapsed": 0.0,  # committed wall seconds
        "last_good": None,  # latest iteration within max_accuracy_drop
        "final": None,  # the iteration the outputs come from
        "stop": None,  # why the run ended; None while it goes on
        "reference": reference,  # the float model on the validation split
        "records": [],
    }


# ---- groups --------------------------------------------------------------------------------------
def _reducible(plan: PrecisionPlan, sites, phase: str, granularity: str) -> list[tuple[str, object]]:
    """``(name, group)`` of the phase's groups that can still lose a bit (bits > 1, not float)."""
    if phase == "weights":
        groups = [(g.name, g) for g in sites.weight_groups(granularity)]
        bits = {name: plan.group_bits(g) for name, g in groups}
    else:
        groups = [(s.tensor, s.tensor) for s in sites.activations]
        bits = {name: plan.activations[name] for name, _ in groups}
    return [(name, g) for name, g in groups if bits[name] is not None and bits[name] > 1]


def pick_least_sensitive(scores: dict[str, float], names: list[str], n: int) -> list[str]:
    """The ``n`` names with the smallest score (ties by name; a NaN or missing score sorts last)."""

    def key(name):
        value = scores.get(name, math.inf)
        return (math.inf if value is None or not math.isfinite(value) else value, name)

    return sorted(names, key=key)[:n]


def _lower(plan: PrecisionPlan, phase: str, picked: list, groups: dict) -> PrecisionPlan:
    plan = plan.copy()
    for name in picked:
        if phase == "weights":
            group = groups[name]
            plan.set_group_bits(group, plan.group_bits(group) - 1)
        else:
            plan.activations[name] -= 1
    return plan


def _start_phase(plan: PrecisionPlan, phase: str, cfg, model, sites, train, iteration: int) -> PrecisionPlan:
    plan = plan.copy()
    if phase == "weights":
        for layer in sites.layers:
            plan.weights[layer.node] = [cfg.start_bits] * layer.kernels
        return plan
    for site in sites.activations:
        plan.activations[site.tensor] = cfg.start_act_bits
    batches = train.batches(cfg.batch_size, shuffle=True, seed=derive_seed(cfg.seed, iteration, "calibrate"))
    return calibrate_clips(model, plan, sites, batches, threads=cfg.threads,
                           seed=derive_seed(cfg.seed, iteration, "calibrate-subset"))


# ---- one iteration -------------------------------------------------------------------------------
def train_batches(cfg, train, iteration: int):
    """The per-epoch batch factory of iteration ``iteration``: data order derives from (seed, iteration, epoch)."""
    epoch = [0]

    def factory():
        seed = derive_seed(cfg.seed, iteration, "train", epoch[0])
        epoch[0] += 1
        return labelled_batches(train, cfg.batch_size, shuffle=True, seed=seed, augment=cfg.augment,
                                drop_last=len(train) >= cfg.batch_size)

    return factory


def fine_tune_steps(cfg, train, start: bool = False) -> int:
    """Steps of one iteration: ``start_steps`` at a phase start (when set), ``epochs`` over the training
    split (when set), else ``steps``."""
    if start and cfg.start_steps is not None:
        return cfg.start_steps
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * max(1, len(train) // cfg.batch_size)))
    return cfg.steps


def _lowering_step(cfg, plan, phase, model, sites, train, iteration, phase_step):
    from impq_onnx.sensitivity import noise_gain

    candidates = _reducible(plan, sites, phase, cfg.granularity)
    schedule = parse_schedule(cfg.schedule if phase == "weights" else cfg.act_schedule)
    n = schedule.groups(phase_step, len(candidates))
    batches = train.batches(EVAL_BATCH, shuffle=True, seed=derive_seed(cfg.seed, iteration, "sensitivity"))
    table = noise_gain(simulate(model, plan, sites), sites, batches, plan=plan, granularity=cfg.granularity,
                       runner_ups=cfg.runner_ups, weighting=cfg.weighting, method=cfg.sensitivity_method,
                       samples=cfg.sensitivity_samples, threads=cfg.threads,
                       seed=derive_seed(cfg.seed, iteration, "probes"))
    scores = dict(table.weights if phase == "weights" else table.activations)
    picked = pick_least_sensitive(scores, [name for name, _ in candidates], n)
    if cfg.land_on_target:
        picked = _landing(plan, phase, picked, dict(candidates), sites,
                          cfg.target_bits if phase == "weights" else cfg.target_act_bits)
    return _lower(plan, phase, picked, dict(candidates)), len(picked), len(candidates), table


def _landing(plan: PrecisionPlan, phase: str, picked: list, groups: dict, sites, target: float | None) -> list:
    """The shortest prefix of ``picked`` (least sensitive first) whose lowering brings the phase's
    effective bits to ``target`` or below; all of ``picked`` when even that stays above it or there is
    no target. Each lowering only removes bits, so the effective bits fall with the prefix length and
    a bisection finds it."""
    if target is None or not picked:
        return picked

    def bits(k: int) -> float:
        lowered = _lower(plan, phase, picked[:k], groups)
        return lowered.weight_bits_effective(sites) if phase == "weights" else lowered.activation_bits_effective(sites)

    if bits(len(picked)) > target + 1e-9:
        return picked
    lo, hi = 0, len(picked)  # bits(lo) > target (or lo == 0), bits(hi) <= target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bits(mid) <= target + 1e-9:
            hi = mid
        else:
            lo = mid
    return picked[:hi]


def _decide(state: dict, record: dict, cfg, plan, sites, phases) -> None:
    """The stop rules; they read only the record and the committed wall time."""
    from impq_onnx.search.iteration import within_accuracy_drop

    iteration = record["iteration"]
    within = within_accuracy_drop(cfg, record, state["reference"])
    record["within_accuracy_drop"] = within
    if within:
        state["last_good"] = iteration
    stop = None if within else "max_accuracy_drop"
    if stop is None and cfg.target_gbitops is not None and record["gbitops"] <= cfg.target_gbitops:
        stop = "target_gbitops"
    if stop is None:
        phase = phases[state["phase"]]
        target = cfg.target_bits if phase == "weights" else cfg.target_act_bits
        bits = record["weight_bits_effective"] if phase == "weights" else record["activation_bits_effective"]
        end = None
        if target is not None and bits <= target + 1e-9:
            end = "target_bits" if phase == "weights" else "target_act_bits"
        elif not _reducible(plan, sites, phase, cfg.granularity):
            end = "all_groups_at_1_bit"
        elif state["phase_step"] >= cfg.max_iterations:
            end = "max_iterations"
        if end is not None:
            record["phase_end"] = end
            state.update(phase=state["phase"] + 1, phase_started=False, phase_step=0)
            if state["phase"] >= len(phases):
                stop = end
    if stop is None and cfg.time_budget is not None and state["elapsed"] >= cfg.time_budget:
        stop = "time_budget"
    record["stop"] = stop
    if stop is not None:
        state["stop"] = stop
        state["final"] = state["last_good"] if state["last_good"] is not None else iteration


def run_search(cfg, base, sites, train, val, workdir: WorkDir, state: dict, plan: PrecisionPlan,
               values: dict[str, np.ndarray], *, other_float_bytes: float = 0.0,
               progress: Callable[[str], None] | None = None) -> dict:
    """Run iterations until a stop rule fires; return the final state (also committed in ``workdir``)."""
    from impq_onnx.search.iteration import (  # iteration builds on this module
        evaluate_record,
        run_fine_tune,
        save_record,
    )

    phases = PHASE_ORDERS[cfg.phases]
    inner = (lambda message: progress("  " + message)) if progress else False
    while state["stop"] is None:
        start = time.perf_counter()
        iteration = state["iteration"] + 1
        phase = phases[state["phase"]]
        model = with_values(base, values)
        table = None  # the sensitivity measured this iteration, kept for reports
        if not state["phase_started"]:
            kind, lowered, reducible = "start", 0, None
            plan = _start_phase(plan, phase, cfg, model, sites, train, iteration)
        else:
            kind = "lower"
            plan, lowered, reducible, table = _lowering_step(cfg, plan, phase, model, sites, train, iteration,
                                                             state["phase_step"])
        sensitivity_seconds = time.perf_counter() - start
        steps = fine_tune_steps(cfg, train, kind == "start")
        trained = run_fine_tune(cfg, model, plan, sites, train, iteration, steps, lr=cfg.lr, teacher=base,
                                progress=inner)
        values = {**values, **trained.values}
        record = evaluate_record(cfg, base, sites, val, state, plan, values, started=start, phase=phase, kind=kind,
                                 trained=trained, lowered=lowered, reducible=reducible,
                                 sensitivity_seconds=sensitivity_seconds if kind == "lower" else 0.0,
                                 other_float_bytes=other_float_bytes)
        state.update(iteration=iteration, phase_started=True, elapsed=record["elapsed"])
        if kind == "lower":
            state["phase_step"] += 1
        _decide(state, record, cfg, plan, sites, phases)
        save_record(workdir, state, record, plan, values, sensitivity=table, progress=progress)
    return state


def format_record(record: dict, reference: dict) -> str:
    """The one-line summary of an iteration."""

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    what = (f"-1 bit on {record['lowered']}/{record['reducible']}" if record["kind"] == "lower"
            else record["kind"])  # the baseline strategies' kinds: fine-tune, density, calibrate
    line = (f"iter {record['iteration']:3d} {record['phase']:<11s} {what:<16s} "
            f"B_w {record['weight_bits_effective']:.2f}  B_a {record['activation_bits_effective']:.2f}  "
            f"C_C {record['gbitops']:.4g} Gbit-OPs  CR {record['compression_ratio']:.2f}x  "
            f"top-1 {pct(record['val_top1'])} (float {pct(reference.get('top1'))})  "
            f"agree {pct(record['val_agreement'])}  {record['seconds']:.1f} s")
    if record.get("phase_end"):
        line += f"  [phase end: {record['phase_end']}]"
    if record.get("stop"):
        line += f"  [stop: {record['stop']}]"
    return line
