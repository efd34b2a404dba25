"""What every search strategy does at the end of an iteration: evaluate, record, decide, commit.

The baseline strategies (:mod:`~impq_onnx.search.faq`, :mod:`~impq_onnx.search.density`,
:mod:`~impq_onnx.search.ptq`) run a fixed number of iterations; each one ends here, so their work
directories, records and report lines have the same form as the IMPQ loop's
(:func:`impq_onnx.search.impq.run_search`) and ``compress`` reads them the same way. A resumed run
continues after ``state['iteration']``, the last committed iteration.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from impq_onnx.engine import evaluate, fine_tune
from impq_onnx.search.checkpoint import WorkDir
from impq_onnx.search.impq import (
    EVAL_BATCH,
    derive_seed,
    fine_tune_steps,
    format_record,
    labelled_batches,
    train_batches,
    with_values,
)

__all__ = ["commit_iteration", "evaluate_record", "fine_tune_steps", "run_fine_tune", "save_record", "train_batches",
           "within_accuracy_drop"]


def run_fine_tune(cfg, model, plan, sites, train, iteration: int, steps: int, *, lr: float, final_lr: float = 0.0,
                  warmup_steps: int | None = None, lr_schedule: str = "cosine", teacher=None, progress=None):
    """``fine_tune`` with the run's optimizer options and the iteration's seeds. ``teacher`` (the input
    float model) gives the logits to match when ``cfg.distill`` is set or the data has no labels."""
    return fine_tune(model, plan, sites, train_batches(cfg, train, iteration), steps=steps, lr=lr, final_lr=final_lr,
                     warmup_steps=warmup_steps, lr_schedule=lr_schedule, optimizer=cfg.optimizer, momentum=cfg.momentum,
                     weight_decay=cfg.weight_decay, threads=cfg.threads, replicas=cfg.replicas,
                     distill=True if cfg.distill else None, teacher=teacher,
                     seed=derive_seed(cfg.seed, iteration, "fine-tune"), progress=progress or False)


def evaluate_record(cfg, base, sites, val, state: dict, plan, values: dict, *, started: float, phase: str,
                    kind: str, trained=None, lowered: int = 0, reducible: int | None = None,
                    sensitivity_seconds: float = 0.0, other_float_bytes: float = 0.0,
                    extra: dict | None = None) -> dict:
    """Evaluate ``values`` under ``plan`` on ``val`` and return the iteration's record (not yet committed).

    ``trained`` is the fine-tune's :class:`~impq_onnx.engine.TrainedWeights` (None: no fine-tuning,
    recorded as 0 steps and no loss); ``started`` the iteration's ``time.perf_counter()`` start.
    """
    model = with_values(base, values)
    result = evaluate(model, labelled_batches(val, EVAL_BATCH), plan=plan, sites=sites, float_model=base,
                      threads=cfg.threads)
    seconds = time.perf_counter() - started
    summary = plan.summary(sites)
    return {
        "iteration": state["iteration"] + 1, "phase": phase, "kind": kind, "lowered": lowered,
        "reducible": reducible, **summary, "model_bytes": summary["weight_bytes"] + other_float_bytes,
        "val_top1": result.top1, "val_top5": result.top5, "val_agreement": result.agreement, "val_n": result.n,
        "fine_tune_steps": trained.steps if trained is not None else 0,
        "fine_tune_loss": float(np.mean(trained.losses[-10:])) if trained is not None else None,
        "sensitivity_seconds": sensitivity_seconds, "fine_tune_seconds": trained.seconds if trained is not None else 0.0,
        "seconds": seconds, "elapsed": state["elapsed"] + seconds, **(extra or {}),
    }


def within_accuracy_drop(cfg, record: dict, reference: dict) -> bool:
    """Whether ``record`` is within ``max_accuracy_drop`` of float: top-1, or agreement without labels."""
    if cfg.max_accuracy_drop is None:
        return True
    if record["val_top1"] is not None and reference.get("top1") is not None:
        value, ref = record["val_top1"], reference["top1"]
    else:
        value, ref = record["val_agreement"], 1.0
    return value is None or (ref - value) * 100.0 <= cfg.max_accuracy_drop + 1e-9


def save_record(workdir: WorkDir, state: dict, record: dict, plan, values: dict, *, sensitivity=None,
                progress: Callable[[str], None] | None = None) -> None:
    """Append ``record`` to ``state`` and commit the iteration (plan, weights, record, state) atomically."""
    iteration = record["iteration"]
    state["records"].append(record)
    workdir.save_iteration(iteration, plan, values, record, sensitivity=sensitivity)
    workdir.commit(state)
    workdir.prune({iteration, state["last_good"]})
    if progress:
        progress(format_record(record, state["reference"]))


def commit_iteration(cfg, base, sites, val, workdir: WorkDir, state: dict, plan, values: dict, *, started: float,
                     phase: str, kind: str, trained=None, last: bool, stop_reason: str = "max_iterations",
                     other_float_bytes: float = 0.0, extra: dict | None = None,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate, record and commit one iteration of a fixed-length strategy.

    ``last`` ends the run with ``stop_reason``; the output is then the last iteration within
    ``max_accuracy_drop`` (the last iteration when none is set).
    """
    record = evaluate_record(cfg, base, sites, val, state, plan, values, started=started, phase=phase, kind=kind,
                             trained=trained, other_float_bytes=other_float_bytes, extra=extra)
    iteration = record["iteration"]
    within = within_accuracy_drop(cfg, record, state["reference"])
    record["within_accuracy_drop"] = within
    state.update(iteration=iteration, phase_started=True, elapsed=record["elapsed"])
    if within:
        state["last_good"] = iteration
    stop = None
    if last:
        stop = stop_reason
    elif cfg.time_budget is not None and state["elapsed"] >= cfg.time_budget:
        stop = "time_budget"
    record["stop"] = stop
    if stop is not None:
        state["stop"] = stop
        state["final"] = state["last_good"] if state["last_good"] is not None else iteration
    save_record(workdir, state, record, plan, values, progress=progress)
    return record
