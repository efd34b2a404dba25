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

from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import calibrate_clips, simulate
from impq_onnx.search.budget import MAX_PASSES, affordable_end_steps, budget_groups
from impq_onnx.search.iteration import (
    EVAL_BATCH,
    derive_seed,
    fine_tune_steps,
    finish_iteration,
    guarded_fine_tune,
    labelled_batches,
    record_iteration,
    run_lr,
    with_values,
)
from impq_onnx.search.ptq import fitted_clips
from impq_onnx.search.schedule import parse_schedule
from impq_onnx.search.state import PHASE_ORDERS, IterationRecord, SearchContext, SearchState
from impq_onnx.sensitivity import noise_gain

# derive_seed, with_values, labelled_batches, EVAL_BATCH and PHASE_ORDERS live in .iteration and
# .state; importing them from here keeps working.
__all__ = ["EVAL_BATCH", "PHASE_ORDERS", "derive_seed", "labelled_batches", "pick_least_sensitive", "run_search",
           "with_values"]

logger = logging.getLogger(__name__)


# ---- groups --------------------------------------------------------------------------------------
def end_layers(sites) -> tuple[str, ...]:
    """The first and the last quantized layer, in graph order (``keep_ends``' layers)."""
    return tuple(dict.fromkeys((sites.layers[0].node, sites.layers[-1].node)))


def _held_sites(sites) -> set[str]:
    """The input activation sites of :func:`end_layers`."""
    return {sites.layer(node).activation for node in end_layers(sites)}


def _floors(cfg, sites, phase: str, groups: list[tuple[str, object]]) -> dict[str, int]:
    """Of the phase's ``(name, group)`` pairs, those with a floor above 1 bit and that floor (``keep_ends``: the
    end layers' kernels, or their input sites)."""
    if not cfg.keep_ends:
        return {}
    if phase == "weights":
        ends = end_layers(sites)
        return {name: cfg.keep_ends for name, g in groups if any(layer in ends for layer, _ in g.members)}
    held = _held_sites(sites)
    return {name: cfg.keep_ends for name, _ in groups if name in held}


def _reducible(plan: PrecisionPlan, sites, phase: str, cfg) -> list[tuple[str, object]]:
    """``(name, group)`` of the phase's groups that can still lose a bit (bits above 1 and above the group's
    floor, :func:`_floors`; not float)."""
    if phase == "weights":
        groups = [(g.name, g) for g in sites.weight_groups(cfg.granularity)]
        bits = {name: plan.group_bits(g) for name, g in groups}
    else:
        groups = [(s.tensor, s.tensor) for s in sites.activations]
        bits = {name: plan.activations[name] for name, _ in groups}
    floor = _floors(cfg, sites, phase, groups)
    return [(name, g) for name, g in groups if bits[name] is not None and bits[name] > max(1, floor.get(name, 1))]


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
        ends = end_layers(sites) if cfg.keep_ends else ()
        for layer in sites.layers:
            bits = max(cfg.start_bits, cfg.keep_ends) if layer.node in ends else cfg.start_bits
            plan.weights[layer.node] = [bits] * layer.kernels
        return plan
    held = _held_sites(sites) if cfg.keep_ends else set()
    for site in sites.activations:
        plan.activations[site.tensor] = max(cfg.start_act_bits, cfg.keep_ends) if site.tensor in held \
            else cfg.start_act_bits
    batches = train.batches(cfg.batch_size, shuffle=True, seed=derive_seed(cfg.seed, iteration, "calibrate"))
    plan = calibrate_clips(model, plan, sites, batches, threads=cfg.threads,
                           seed=derive_seed(cfg.seed, iteration, "calibrate-subset"))
    return fitted_clips(cfg, plan, model, sites, train, iteration, [site.tensor for site in sites.activations])


# ---- one iteration -------------------------------------------------------------------------------
def _phase_bits(plan: PrecisionPlan, phase: str, sites) -> float:
    return plan.weight_bits_effective(sites) if phase == "weights" else plan.activation_bits_effective(sites)


def _lowering_step(cfg, plan, phase, model, sites, train, iteration, phase_step, progress=None, budget=None):
    """``budget``: ``(records, elapsed, phases_left)`` of the run, for :func:`budget_groups`."""
    candidates = _reducible(plan, sites, phase, cfg)
    schedule = parse_schedule(cfg.schedule if phase == "weights" else cfg.act_schedule)
    n = schedule.groups(phase_step, len(candidates))
    target = cfg.target_bits if phase == "weights" else cfg.target_act_bits
    goal = None  # with a budget that raised the count: the effective bits this step is meant to reach
    if budget is not None and cfg.time_budget is not None:
        records, elapsed, phases_left = budget
        everything = _lower(plan, phase, [name for name, _ in candidates], dict(candidates))
        now, all_lowered = _phase_bits(plan, phase, sites), _phase_bits(everything, phase, sites)
        needed = budget_groups(scheduled=n, reducible=len(candidates), bits_now=now, bits_all_lowered=all_lowered,
                               target=target, time_budget=cfg.time_budget, elapsed=elapsed, records=records,
                               phases_left=phases_left)
        if needed > n:
            logger.info("time budget: lowering %d groups this step instead of %d, to reach %s in the time left",
                        needed, n, target)
            n = needed
            # The count assumes groups of average size; the passes after the first pick the least sensitive
            # groups, often small ones, so the count alone can stop short (EfficientNet-Lite0: 4.0013 bits for
            # a target of 4 with one step left, and the run spent another iteration on the rest).
            goal = max(target, now - (now - all_lowered) * needed / len(candidates))
    batches = train.batches(EVAL_BATCH, shuffle=True, seed=derive_seed(cfg.seed, iteration, "sensitivity"))
    table = noise_gain(simulate(model, plan, sites), sites, batches, plan=plan, granularity=cfg.granularity,
                       runner_ups=cfg.runner_ups, weighting=cfg.weighting, method=cfg.sensitivity_method,
                       samples=cfg.sensitivity_samples, threads=cfg.threads,
                       seed=derive_seed(cfg.seed, iteration, "probes"), progress=progress)
    scores = dict(table.weights if phase == "weights" else table.activations)
    reducible, lowered, measured = len(candidates), 0, plan
    # n > reducible (a time budget short of steps): one pass per bit; past the count, passes go on in
    # sensitivity order until the budget's goal is reached (the last of them landing on it)
    for _ in range(MAX_PASSES + 1):
        short = goal is not None and _phase_bits(plan, phase, sites) > goal + 1e-9
        if not candidates or not (n > lowered or short):
            break
        picked = pick_least_sensitive(scores, [name for name, _ in candidates],
                                      n - lowered if n > lowered else len(candidates))
        if cfg.land_on_target or n <= lowered:
            picked = _landing(plan, phase, picked, dict(candidates), sites, target if n > lowered else goal)
        plan, lowered = _lower(plan, phase, picked, dict(candidates)), lowered + len(picked)
        if target is not None and _phase_bits(plan, phase, sites) <= target + 1e-9:
            break
        candidates = _reducible(plan, sites, phase, cfg)
    if phase == "activations":  # with act_clip mse, each lowered site's clip is refitted to its new bits
        lowered_sites = [site.tensor for site in sites.activations
                         if plan.activations[site.tensor] != measured.activations[site.tensor]]
        plan = fitted_clips(cfg, plan, model, sites, train, iteration, lowered_sites)
    return plan, lowered, reducible, table


def _landing(plan: PrecisionPlan, phase: str, picked: list, groups: dict, sites, target: float | None) -> list:
    """The groups of ``picked`` (least sensitive first) to lower when lowering all of them would pass
    ``target``: the set that lands closest to the target from below. All of ``picked`` when even that stays
    above it or there is no target.

    Two candidates, the one with the higher effective bits (at or below the target) wins, the prefix on a
    tie: the shortest prefix of ``picked`` that reaches the target (found by bisection: each lowering only
    removes bits), and the same prefix with its last group, the one that crosses the target, replaced by
    the smallest group of ``picked`` that still reaches it (:func:`_smallest_crossing`): a site with half of
    the activation elements takes 0.5 bit off B_a,eff at once, where a smaller one lands closer. Only that
    one group can differ from the sensitivity order."""
    if target is None or not picked:
        return picked

    def bits(chosen: list) -> float:
        lowered = _lower(plan, phase, chosen, groups)
        return lowered.weight_bits_effective(sites) if phase == "weights" else lowered.activation_bits_effective(sites)

    if bits(picked) > target + 1e-9:
        return picked
    lo, hi = 0, len(picked)  # bits(lo) > target (or lo == 0), bits(hi) <= target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bits(picked[:mid]) <= target + 1e-9:
            hi = mid
        else:
            lo = mid
    prefix = picked[:hi]
    now, after_all = bits([]), bits(picked)
    if now - after_all <= 0:
        return prefix
    if phase == "weights":
        size = {name: float(groups[name].params) for name in picked}
    else:
        elements = {site.tensor: site.elements for site in sites.activations}
        size = {name: float(elements[name]) for name in picked}
    unit = (now - after_all) / sum(size.values())  # bits removed per weight (element) lowered by one bit
    fit = _smallest_crossing(picked, prefix[:-1], size, (now - target) / unit)
    if fit is not None and bits(prefix) + 1e-9 < bits(fit) <= target + 1e-9:
        return fit
    return prefix


def _smallest_crossing(picked: list, kept: list, size: dict, need: float) -> list | None:
    """``kept`` plus the smallest other group of ``picked`` (the least sensitive of equal ones) that brings
    the sizes to ``need``, in ``picked``'s order; None when none does."""
    order = {name: i for i, name in enumerate(picked)}
    have, chosen = sum(size[name] for name in kept), set(kept)
    rest = [name for name in picked if name not in chosen and have + size[name] >= need * (1 - 1e-9)]
    if not rest:
        return None
    last = min(rest, key=lambda name: (size[name], order[name]))
    return sorted(chosen | {last}, key=order.__getitem__)


def _on_target(cfg, plan: PrecisionPlan, phase: str, sites) -> bool:
    """Whether ``plan`` has reached the phase's target (its last lowering: the fine-tune the phase ends with)."""
    target = cfg.target_bits if phase == "weights" else cfg.target_act_bits
    return target is not None and _phase_bits(plan, phase, sites) <= target + 1e-9


def _phase_end(context: SearchContext, state: SearchState, record: IterationRecord) -> str | None:
    """IMPQ's own end rule for :func:`~impq_onnx.search.iteration.decide`: whether the phase ends here
    (its target reached, nothing left to lower, or ``max_iterations`` steps done); the run ends with the
    last phase."""
    cfg, phases = context.config, context.phases
    phase = phases[state.phase]
    target = cfg.target_bits if phase == "weights" else cfg.target_act_bits
    bits = record.weight_bits_effective if phase == "weights" else record.activation_bits_effective
    end = None
    if target is not None and bits <= target + 1e-9:
        end = "target_bits" if phase == "weights" else "target_act_bits"
    elif not _reducible(state.plan, context.sites, phase, cfg):
        end = "all_groups_at_1_bit"  # or at their keep_ends floor: nothing left to lower
    elif state.phase_step >= cfg.max_iterations:
        end = "max_iterations"
    if end is None:
        return None
    record.phase_end = end
    state.phase, state.phase_started, state.phase_step = state.phase + 1, False, 0
    return end if state.phase >= len(phases) else None


def run_search(context: SearchContext, state: SearchState) -> SearchState:
    """Run iterations until a stop rule fires; return the final state (also committed in the work dir)."""
    cfg, sites, train = context.config, context.sites, context.train
    while state.stop is None:
        start = time.perf_counter()
        iteration = state.iteration + 1
        phase = context.phases[state.phase]
        model = with_values(context.base, state.values)
        table = None  # the sensitivity measured this iteration, kept for reports
        if not state.phase_started:
            kind, lowered, reducible = "start", 0, None
            state.plan = _start_phase(state.plan, phase, cfg, model, sites, train, iteration)
        else:
            kind = "lower"
            budget = (state.records, state.elapsed, len(context.phases) - state.phase)
            state.plan, lowered, reducible, table = _lowering_step(cfg, state.plan, phase, model, sites, train,
                                                                   iteration, state.phase_step,
                                                                   context.inner_progress(plain=False), budget)
        sensitivity_seconds = time.perf_counter() - start
        landing = kind == "lower" and _on_target(cfg, state.plan, phase, sites)  # the plan the phase ends with
        steps = fine_tune_steps(cfg, train, start=kind == "start", end=landing)
        if landing:  # the longer landing fine-tune, within what a time budget still holds
            steps = affordable_end_steps(steps=steps, base_steps=fine_tune_steps(cfg, train),
                                         time_budget=cfg.time_budget, elapsed=state.elapsed, records=state.records,
                                         phases_left=len(context.phases) - state.phase)
        lr, derived = run_lr(context, state, model, steps)
        tuned = guarded_fine_tune(context, state, model, steps, lr=lr)
        state.values, state.plan = tuned.values, state.plan.with_clips(tuned.clips)
        record = record_iteration(context, state, started=start, phase=phase, kind=kind, trained=tuned.trained,
                                  lowered=lowered, reducible=reducible, extra={**derived, **tuned.extra},
                                  result=tuned.result,
                                  sensitivity_seconds=sensitivity_seconds if kind == "lower" else 0.0)
        if kind == "lower":
            state.phase_step += 1
        finish_iteration(context, state, record, end=lambda: _phase_end(context, state, record), early=True,
                         sensitivity=table)
    return state
