"""What every search strategy does in an iteration: seeded data, fine-tune, evaluate, decide, commit.

Every strategy (:mod:`~impq_onnx.search.impq`, :mod:`~impq_onnx.search.faq`,
:mod:`~impq_onnx.search.density`, :mod:`~impq_onnx.search.ptq`) changes the plan and values of a
:class:`~impq_onnx.search.state.SearchState`, then ends the iteration here: :func:`record_iteration`
evaluates it into an :class:`~impq_onnx.search.state.IterationRecord` and :func:`finish_iteration`
takes the one stop decision (:func:`decide`) and commits, so every method's work directory, records
and report lines have the same form and ``compress`` reads them the same way. A resumed run continues
after ``state.iteration``, the last committed iteration.

Reproducibility: every random choice is drawn from a seed derived from ``(seed, iteration, purpose)``
(:func:`derive_seed`), and the model is always rebuilt as *base model + saved parameter values*
(:func:`with_values`), so a resumed run starts an iteration from exactly the bytes an uninterrupted
run had. The only wall-clock input is ``time_budget``; its decision is committed with the iteration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from impq_onnx.data.dataset import derive_seed  # one definition: compress's validation subset uses it too
from impq_onnx.engine import TrainedWeights, evaluate, fine_tune
from impq_onnx.events import Event
from impq_onnx.search.state import IterationRecord, SearchContext, SearchState

__all__ = ["EVAL_BATCH", "decide", "derive_seed", "fine_tune_steps", "finish_iteration", "format_record",
           "labelled_batches", "record_iteration", "run_fine_tune", "train_batches", "with_values",
           "within_accuracy_drop"]

EVAL_BATCH = 64


def with_values(base: Any, values: dict[str, np.ndarray]) -> Any:
    """``base`` (the float model) with the fine-tuned parameter ``values``; a copy."""
    if not values:
        return base
    return TrainedWeights(values, [], 0, 0, 0.0).apply_to(base)


def labelled_batches(dataset: Any, batch_size: int, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``dataset.batches(...)``; without labels the batches are ``(x, None)`` (distillation, agreement)."""
    for x, y in dataset.batches(batch_size, **kwargs):
        yield (x, y) if dataset.labelled else (x, None)


def train_batches(cfg: Any, train: Any, iteration: int) -> Callable[[], Iterator[tuple[Any, Any]]]:
    """The per-epoch batch factory of iteration ``iteration``: data order derives from (seed, iteration, epoch)."""
    epoch = [0]

    def factory() -> Iterator[tuple[Any, Any]]:
        seed = derive_seed(cfg.seed, iteration, "train", epoch[0])
        epoch[0] += 1
        return labelled_batches(train, cfg.batch_size, shuffle=True, seed=seed, augment=cfg.augment,
                                drop_last=len(train) >= cfg.batch_size)

    return factory


def fine_tune_steps(cfg: Any, train: Any, start: bool = False) -> int:
    """Steps of one iteration: ``start_steps`` at a phase start (when set), ``epochs`` over the training
    split (when set), else ``steps``."""
    if start and cfg.start_steps is not None:
        return int(cfg.start_steps)
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * max(1, len(train) // cfg.batch_size)))
    return int(cfg.steps)


def run_fine_tune(context: SearchContext, state: SearchState, model: Any, steps: int, *, lr: float,
                  final_lr: float = 0.0, warmup_steps: int | None = None,
                  lr_schedule: str = "cosine") -> TrainedWeights:
    """Fine-tune ``model`` (base + ``state.values``) under ``state.plan`` for the next iteration, with the
    run's optimizer options and the iteration's seeds. The float model gives the logits to match when
    ``distill`` is set or the data has no labels."""
    cfg, iteration = context.config, state.iteration + 1
    return fine_tune(model, state.plan, context.sites, train_batches(cfg, context.train, iteration), steps=steps,
                     lr=lr, final_lr=final_lr, warmup_steps=warmup_steps, lr_schedule=lr_schedule,
                     optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                     batchnorm=cfg.batchnorm,
                     threads=cfg.threads, replicas=cfg.replicas, distill=True if cfg.distill else None,
                     teacher=context.base, seed=derive_seed(cfg.seed, iteration, "fine-tune"),
                     progress=context.inner_progress() or False)


def record_iteration(context: SearchContext, state: SearchState, *, started: float, phase: str, kind: str,
                     trained: TrainedWeights | None = None, lowered: int = 0, reducible: int | None = None,
                     sensitivity_seconds: float = 0.0, extra: dict[str, Any] | None = None) -> IterationRecord:
    """Evaluate ``state.values`` under ``state.plan`` on the validation split: the next iteration's record,
    not yet decided or committed. ``trained`` is the iteration's fine-tune (None: none, recorded as 0 steps
    and no loss); ``started`` the iteration's ``time.perf_counter()`` start."""
    model = with_values(context.base, state.values)
    result = evaluate(model, labelled_batches(context.val, EVAL_BATCH), plan=state.plan, sites=context.sites,
                      float_model=context.base, threads=context.config.threads,
                      progress=context.inner_progress(plain=False) or False, total=len(context.val))
    seconds = time.perf_counter() - started
    summary = state.plan.summary(context.sites)
    return IterationRecord(
        iteration=state.iteration + 1, phase=phase, kind=kind, lowered=lowered, reducible=reducible,
        weight_bits_effective=summary["weight_bits_effective"],
        activation_bits_effective=summary["activation_bits_effective"],
        compression_ratio=summary["compression_ratio"], weight_bytes=summary["weight_bytes"],
        gbitops=summary["gbitops"], model_bytes=summary["weight_bytes"] + context.other_float_bytes,
        val_top1=result.top1, val_top5=result.top5, val_agreement=result.agreement, val_n=result.n,
        fine_tune_steps=trained.steps if trained is not None else 0,
        fine_tune_loss=float(np.mean(trained.losses[-10:])) if trained is not None else None,
        sensitivity_seconds=sensitivity_seconds, fine_tune_seconds=trained.seconds if trained is not None else 0.0,
        seconds=seconds, elapsed=state.elapsed + seconds, extra=dict(extra or {}),
    )


def within_accuracy_drop(cfg: Any, record: IterationRecord, reference: dict[str, Any]) -> bool:
    """Whether ``record`` is within ``max_accuracy_drop`` of float: top-1, or agreement without labels."""
    if cfg.max_accuracy_drop is None:
        return True
    value: float | None
    if record.val_top1 is not None and reference.get("top1") is not None:
        value, ref = record.val_top1, reference["top1"]
    else:
        value, ref = record.val_agreement, 1.0
    return value is None or (ref - value) * 100.0 <= cfg.max_accuracy_drop + 1e-9


def decide(context: SearchContext, state: SearchState, record: IterationRecord, *,
           end: Callable[[], str | None], early: bool = False) -> None:
    """The stop decision of every strategy, written into ``record`` and ``state`` (committed together).

    The first rule that fires wins: with ``early`` (the IMPQ search) the iteration beyond
    ``max_accuracy_drop`` and then ``target_gbitops``; then the strategy's own ``end()`` (IMPQ: the last
    phase ended; a baseline: its last iteration), called only when no earlier rule fired; then
    ``time_budget``. The rules read only the record and the committed wall time, so a resume replays a
    recorded decision. The output is the last iteration within ``max_accuracy_drop`` (the last
    iteration when none is)."""
    cfg = context.config
    within = within_accuracy_drop(cfg, record, context.reference)
    record.within_accuracy_drop = within
    if within:
        state.last_good = record.iteration
    stop = None
    if early and not within:
        stop = "max_accuracy_drop"
    elif early and cfg.target_gbitops is not None and record.gbitops <= cfg.target_gbitops:
        stop = "target_gbitops"
    if stop is None:
        stop = end()
    if stop is None and cfg.time_budget is not None and state.elapsed >= cfg.time_budget:
        stop = "time_budget"
    record.stop = stop
    if stop is not None:
        state.stop = stop
        state.final = state.last_good if state.last_good is not None else record.iteration


def finish_iteration(context: SearchContext, state: SearchState, record: IterationRecord, *,
                     end: Callable[[], str | None], early: bool = False, sensitivity: Any = None) -> None:
    """Advance ``state`` to ``record``'s iteration, :func:`decide`, and commit the iteration (plan,
    values, record, then ``state.json``) atomically. ``sensitivity`` (a SensitivityTable, when one was
    measured) is kept for reports."""
    state.iteration, state.phase_started, state.elapsed = record.iteration, True, record.elapsed
    decide(context, state, record, end=end, early=early)
    state.records.append(record)
    workdir = context.workdir
    workdir.save_iteration(record.iteration, state.plan, state.values, record.to_dict(), sensitivity=sensitivity)
    state.commit(workdir, context.reference)
    workdir.prune({i for i in (record.iteration, state.last_good) if i is not None})
    if context.progress:
        context.progress(Event("iteration", "search", format_record(record, context.reference), record.iteration,
                               None, {**record.to_dict(), "float_top1": context.reference.get("top1")}))


def format_record(record: IterationRecord, reference: dict[str, Any]) -> str:
    """The one-line summary of an iteration."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    what = (f"-1 bit on {record.lowered}/{record.reducible}" if record.kind == "lower"
            else record.kind)  # the baseline strategies' kinds: fine-tune, density, calibrate
    line = (f"iter {record.iteration:3d} {record.phase:<11s} {what:<16s} "
            f"B_w {record.weight_bits_effective:.2f}  B_a {record.activation_bits_effective:.2f}  "
            f"C_C {record.gbitops:.4g} Gbit-OPs  CR {record.compression_ratio:.2f}x  "
            f"top-1 {pct(record.val_top1)} (float {pct(reference.get('top1'))})  "
            f"agree {pct(record.val_agreement)}  {record.seconds:.1f} s")
    if record.phase_end:
        line += f"  [phase end: {record.phase_end}]"
    if record.stop:
        line += f"  [stop: {record.stop}]"
    return line
