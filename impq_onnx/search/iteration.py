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

from ..engine import evaluate, fine_tune
from .checkpoint import WorkDir
from .impq import (EVAL_BATCH, derive_seed, fine_tune_steps, format_record, labelled_batches, train_batches,
                   with_values)

__all__ = ["commit_iteration", "fine_tune_steps", "run_fine_tune", "train_batches"]


def run_fine_tune(cfg, model, plan, sites, train, iteration: int, steps: int, *, lr: float, final_lr: float = 0.0,
                  warmup_steps: int | None = None, lr_schedule: str = "cosine", progress=None):
    """``fine_tune`` with the run's optimizer options and the iteration's seeds."""
    return fine_tune(model, plan, sites, train_batches(cfg, train, iteration), steps=steps, lr=lr, final_lr=final_lr,
                     warmup_steps=warmup_steps, lr_schedule=lr_schedule, optimizer=cfg.optimizer, momentum=cfg.momentum,
                     weight_decay=cfg.weight_decay, threads=cfg.threads,
                     seed=derive_seed(cfg.seed, iteration, "fine-tune"), progress=progress or False)


def commit_iteration(cfg, base, sites, val, workdir: WorkDir, state: dict, plan, values: dict, *, started: float,
                     phase: str, kind: str, trained=None, last: bool, stop_reason: str = "max_iterations",
                     other_float_bytes: float = 0.0, extra: dict | None = None,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate ``values`` under ``plan`` on ``val``, append the record and commit the iteration.

    ``trained`` is the fine-tune's :class:`~impq_onnx.engine.TrainedWeights` (None: no fine-tuning,
    recorded as 0 steps and no loss). ``last`` ends the run with ``stop_reason``; the output is then
    the last iteration within ``max_accuracy_drop`` (the last iteration when none is set).
    """
    iteration = state["iteration"] + 1
    model = with_values(base, values)
    result = evaluate(model, labelled_batches(val, EVAL_BATCH), plan=plan, sites=sites, float_model=base,
                      threads=cfg.threads)
    seconds = time.perf_counter() - started
    summary = plan.summary(sites)
    record = {
        "iteration": iteration, "phase": phase, "kind": kind, "lowered": 0, "reducible": None,
        **summary, "model_bytes": summary["weight_bytes"] + other_float_bytes,
        "val_top1": result.top1, "val_top5": result.top5, "val_agreement": result.agreement, "val_n": result.n,
        "fine_tune_steps": trained.steps if trained is not None else 0,
        "fine_tune_loss": float(np.mean(trained.losses[-10:])) if trained is not None else None,
        "sensitivity_seconds": 0.0, "fine_tune_seconds": trained.seconds if trained is not None else 0.0,
        "seconds": seconds, "elapsed": state["elapsed"] + seconds, **(extra or {}),
    }
    reference = state["reference"]
    value, ref = ((record["val_top1"], reference["top1"]) if record["val_top1"] is not None
                  and reference.get("top1") is not None else (record["val_agreement"], 1.0))
    within = cfg.max_accuracy_drop is None or value is None or (ref - value) * 100.0 <= cfg.max_accuracy_drop + 1e-9
    record["within_accuracy_drop"] = within
    state.update(iteration=iteration, phase_started=True, elapsed=state["elapsed"] + seconds)
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
    state["records"].append(record)
    workdir.save_iteration(iteration, plan, values, record)
    workdir.commit(state)
    workdir.prune({iteration, state["last_good"]})
    if progress:
        progress(format_record(record, reference))
    return record
