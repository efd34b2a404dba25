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

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from impq_onnx.data.dataset import derive_seed  # one definition: compress's validation subset uses it too
from impq_onnx.engine import EvalResult, FineTuneDiverged, TrainedWeights, evaluate, fine_tune
from impq_onnx.engine.evaluation import predicted_classes
from impq_onnx.events import Event, lowering_text
from impq_onnx.quant.quantizers import LEARNED_CLIP_GRADIENT_SCALE
from impq_onnx.search.state import IterationRecord, SearchContext, SearchState

__all__ = ["END_STEPS_FACTOR", "EVAL_BATCH", "FIXED_LR", "LR_PROBE_MIN_STEPS", "LR_PROBE_RATES", "LR_RETRY_DIVISOR",
           "GuardedFineTune", "decide", "derive_seed", "evaluate_values", "fine_tune_steps", "finish_iteration",
           "format_record", "guard_key", "guarded_fine_tune", "known_float_classes", "labelled_batches", "probe_lr",
           "record_iteration", "run_fine_tune", "run_lr", "train_batches", "with_values", "within_accuracy_drop"]

EVAL_BATCH = 64
LR_RETRY_DIVISOR = 10  # a diverging fine-tune is retried once at its learning rate divided by this
FIXED_LR = 0.005  # the rate of the methods that do not derive one (faq, activation-density) when --lr is not given
LR_PROBE_RATES = (0.005, 0.0015, 0.0005, 0.00015)  # the rates IMPQ's first fine-tune tries, largest first
LR_PROBE_MIN_STEPS = 5  # each try runs the iteration's steps / len(LR_PROBE_RATES), at least this (at most all)
# The fine-tune of the lowering that lands a phase on its target runs this many times the steps per iteration:
# it is the plan the phase (and the run) ends with. The main job (bench/results/candidates.md, issue 23): test
# top-1 over seeds 0-7 mean 86.8 -> 87.8 %, min 85.5 -> 86.5 % (float 88.0 %), for about 1.2x the time.
END_STEPS_FACTOR = 4.0
_EXPLODED = 1.5  # a fine-tune whose loss ends this many times above where it began has blown up

logger = logging.getLogger(__name__)


def with_values(base: Any, values: dict[str, np.ndarray]) -> Any:
    """``base`` (the float model) with the fine-tuned parameter ``values``; a copy."""
    if not values:
        return base
    return TrainedWeights(values, [], 0, 0, 0.0).apply_to(base)


def labelled_batches(dataset: Any, batch_size: int, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``dataset.batches(...)``; without labels the batches are ``(x, None)`` (distillation, agreement)."""
    for x, y in dataset.batches(batch_size, **kwargs):
        yield (x, y) if dataset.labelled else (x, None)


def train_batches(cfg: Any, train: Any, iteration: int, purpose: str = "train",
                  first_epoch: int = 0) -> Callable[[], Iterator[tuple[Any, Any]]]:
    """The per-epoch batch factory of iteration ``iteration``: data order derives from (seed, iteration,
    ``purpose``, epoch), the epochs counted from ``first_epoch`` (a fine-tune resumed in parts continues there)."""
    epoch = [first_epoch]

    def factory() -> Iterator[tuple[Any, Any]]:
        seed = derive_seed(cfg.seed, iteration, purpose, epoch[0])
        epoch[0] += 1
        return labelled_batches(train, cfg.batch_size, shuffle=True, seed=seed, augment=cfg.augment,
                                drop_last=len(train) >= cfg.batch_size)

    return factory


def fine_tune_steps(cfg: Any, train: Any, start: bool = False, end: bool = False) -> int:
    """Steps of one iteration: ``start_steps`` at a phase start (when set), ``epochs`` over the training
    split (when set), else ``steps``; with ``end`` (the lowering that reaches a phase's target) that times
    ``end_steps_factor`` (None: ``END_STEPS_FACTOR``; ``compress`` resolves it, see ``DERIVED``)."""
    if start and cfg.start_steps is not None:
        return int(cfg.start_steps)
    if cfg.epochs is not None:
        steps = max(1, math.ceil(cfg.epochs * max(1, len(train) // cfg.batch_size)))
    else:
        steps = int(cfg.steps)
    if end:
        factor = getattr(cfg, "end_steps_factor", None)
        steps = max(1, math.ceil(steps * (END_STEPS_FACTOR if factor is None else float(factor)) - 1e-9))
    return steps


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
                     progress=context.inner_progress() or False, learn_clips=learn_clips(cfg))


def learn_clips(cfg: Any) -> float:
    """The learned activation steps' gradient scale of the run's fine-tunes (``act_clip: learned``), else 0."""
    return LEARNED_CLIP_GRADIENT_SCALE if getattr(cfg, "act_clip", None) == "learned" else 0.0


def known_float_classes(context: SearchContext, classes: np.ndarray) -> None:
    """Give :func:`float_classes` what an evaluation of the float model on the validation batches (in
    evaluation order, ``evaluate(keep_classes=True)``) already found, so it is not run again."""
    context.cache["float_classes"] = classes


def float_classes(context: SearchContext) -> np.ndarray:
    """The float model's top-1 class of every validation image, in evaluation order, computed once per run:
    every evaluation's agreement compares with it instead of running the float model again."""
    if "float_classes" not in context.cache:
        context.cache["float_classes"] = predicted_classes(context.base, labelled_batches(context.val, EVAL_BATCH),
                                                           threads=context.config.threads)
    return context.cache["float_classes"]


def evaluate_values(context: SearchContext, plan: Any, values: dict[str, np.ndarray]) -> EvalResult:
    """The validation result of base + ``values`` under ``plan`` (top-1, and agreement with the float model)."""
    return evaluate(with_values(context.base, values), labelled_batches(context.val, EVAL_BATCH), plan=plan,
                    sites=context.sites, float_classes=float_classes(context), threads=context.config.threads,
                    progress=context.inner_progress(plain=False) or False, total=len(context.val))


def guard_key(cfg: Any, result: EvalResult) -> tuple[float, float]:
    """What the guard compares, larger is better: agreement with the float model, then top-1; top-1 first
    when ``max_accuracy_drop`` is set and reads top-1 (labelled data). A missing figure counts as -1."""
    top1 = -1.0 if result.top1 is None else result.top1
    agreement = -1.0 if result.agreement is None else result.agreement
    if cfg.max_accuracy_drop is not None and result.top1 is not None:
        return (top1, agreement)
    return (agreement, top1)


@dataclasses.dataclass
class GuardedFineTune:
    """An iteration's fine-tune after the guard: the values it keeps and their validation result.

    ``trained`` sums the attempts (steps and losses of the last one, seconds of all); ``extra`` is what the
    iteration's record holds about it (:func:`guarded_fine_tune`)."""

    values: dict[str, np.ndarray]
    result: EvalResult
    trained: TrainedWeights
    extra: dict[str, Any]
    clips: dict[str, float] = dataclasses.field(default_factory=dict)  # learned clips kept (act_clip: learned)


def _metrics(result: EvalResult | None) -> dict[str, Any] | None:
    return None if result is None else {"val_top1": result.top1, "val_agreement": result.agreement}


def _exploded(losses: list[float]) -> bool:
    """Whether the loss ended well above where it began (mean of the last vs the first tenth of the steps)."""
    if len(losses) < 2:
        return False
    k = max(1, len(losses) // 10)
    return float(np.mean(losses[-k:])) > _EXPLODED * float(np.mean(losses[:k]))


def _attempt(context: SearchContext, state: SearchState, model: Any, steps: int,
             lr: float) -> tuple[TrainedWeights, EvalResult | None]:
    """One fine-tune at ``lr`` and its validation result; None when it diverged (a non-finite loss or
    non-finite weights), with the steps it ran."""
    try:
        trained = run_fine_tune(context, state, model, steps, lr=lr)
    except FineTuneDiverged as exc:
        return TrainedWeights({}, exc.losses, exc.step, 0, exc.seconds), None
    if not all(np.isfinite(v).all() for v in trained.values.values()):
        return trained, None
    return trained, evaluate_values(context, state.plan.with_clips(trained.clips), {**state.values, **trained.values})


def guarded_fine_tune(context: SearchContext, state: SearchState, model: Any, steps: int, *,
                      lr: float) -> GuardedFineTune:
    """Fine-tune ``model`` (base + ``state.values``) under ``state.plan`` and keep what validates better.

    With ``guard`` (the default) the same plan is first evaluated without this fine-tune (calibration
    only for this plan: the values from before it), and the fine-tune is kept only when its
    :func:`guard_key` is at least that one's. A fine-tune that diverges (non-finite loss or weights), or
    that the guard rejects while its loss rose by half over the run, is retried once at
    ``lr / LR_RETRY_DIVISOR`` with the same seeds; one that diverges again is dropped (a warning says so).
    Everything here depends only on the seed and the committed state, so a resume replays it.
    ``extra``: ``fine_tune_kept``, ``fine_tune_lr`` (of the last attempt), ``fine_tune_retried``,
    ``before_fine_tune`` and ``after_fine_tune`` (``val_top1``, ``val_agreement``; None when not measured
    or diverged). With ``act_clip: learned`` the fine-tune's learned clips are evaluated with it and, when it is
    kept, returned in ``clips`` for the caller's plan."""
    cfg, iteration = context.config, state.iteration + 1
    before = evaluate_values(context, state.plan, state.values) if cfg.guard else None
    trained, after = _attempt(context, state, model, steps, lr)
    seconds, used, retried = trained.seconds, lr, False
    rejected = after is not None and before is not None and guard_key(cfg, after) < guard_key(cfg, before)
    if after is None or (rejected and _exploded(trained.losses)):
        why = ("diverged (non-finite loss)" if after is None else
               f"raised its loss from {np.mean(trained.losses[:max(1, len(trained.losses) // 10)]):.4g} "
               f"to {np.mean(trained.losses[-max(1, len(trained.losses) // 10):]):.4g}")
        used, retried = lr / LR_RETRY_DIVISOR, True
        logger.warning(f"iteration {iteration}: the fine-tune at lr {lr:g} {why}; retrying once at lr {used:g}")
        trained, after = _attempt(context, state, model, steps, used)
        seconds += trained.seconds
    if after is None:
        before = before if before is not None else evaluate_values(context, state.plan, state.values)
        logger.warning(f"iteration {iteration}: the fine-tune diverged at lr {lr:g} and {used:g}; the iteration "
                       "keeps the weights from before it (try a lower --lr)")
        kept = False
    else:
        kept = before is None or guard_key(cfg, after) >= guard_key(cfg, before)
    values = {**state.values, **trained.values} if kept else state.values
    result = after if kept else before
    assert result is not None
    summary = TrainedWeights({}, trained.losses, trained.steps, trained.images, seconds, trained.step_seconds)
    extra = {"fine_tune_kept": kept, "fine_tune_lr": used, "fine_tune_retried": retried,
             "before_fine_tune": _metrics(before), "after_fine_tune": _metrics(after)}
    return GuardedFineTune(values, result, summary, extra, trained.clips if kept else {})


def _probe_score(cfg: Any, trained: TrainedWeights, result: EvalResult | None) -> tuple[float, ...]:
    """Larger is better: the guard's validation key, then a lower training loss over the last half of the
    steps; a try that diverged scores below every other."""
    if result is None:
        return (-math.inf, -math.inf, -math.inf)
    half = trained.losses[len(trained.losses) // 2:] or trained.losses
    return (*guard_key(cfg, result), -float(np.mean(half)) if half else -math.inf)


def probe_lr(context: SearchContext, state: SearchState, model: Any, steps: int) -> tuple[dict[str, Any], float]:
    """The learning rate derived from the model: a short, seeded fine-tune at each of ``LR_PROBE_RATES``
    (``ceil(steps / len(LR_PROBE_RATES))`` steps, at least ``LR_PROBE_MIN_STEPS``, at most ``steps``: all
    tries together cost about one fine-tune; the iteration's data order and seeds, so every try sees the same
    batches), each scored on validation like the guard (agreement with the float model, or top-1 first
    under ``max_accuracy_drop``), ties broken by the lower training loss over the try's last half; a try
    that diverges scores lowest; of equal scores the larger rate wins. Nothing of the tries is kept.

    Returns the record's ``lr_derived`` (``lr``, the chosen rate; ``probe_steps``; ``tries``: per rate its
    ``lr``, ``val_agreement``, ``val_top1`` and ``loss``, None where it diverged) and the seconds it took."""
    n = max(1, min(int(steps), max(LR_PROBE_MIN_STEPS, math.ceil(steps / len(LR_PROBE_RATES)))))
    started = time.perf_counter()
    tries: list[dict[str, Any]] = []
    best: tuple[tuple[float, ...], float] | None = None
    for rate in LR_PROBE_RATES:
        trained, result = _attempt(context, state, model, n, rate)
        score = _probe_score(context.config, trained, result)
        half = trained.losses[len(trained.losses) // 2:] or trained.losses
        tries.append({"lr": rate, "val_agreement": None if result is None else result.agreement,
                      "val_top1": None if result is None else result.top1,
                      "loss": None if result is None or not half else float(np.mean(half))})
        if best is None or score > best[0]:
            best = (score, rate)
    assert best is not None
    return {"lr": best[1], "probe_steps": n, "tries": tries}, time.perf_counter() - started


def run_lr(context: SearchContext, state: SearchState, model: Any, steps: int) -> tuple[float, dict[str, Any]]:
    """The learning rate of this iteration's fine-tune and what its record adds: ``--lr`` when given
    (nothing added); else the rate a previous iteration of the run derived (its record's ``lr_derived``,
    so a resumed run uses the same one); else :func:`probe_lr` now, reported and returned as the record's
    ``lr_derived`` with its ``lr_probe_seconds``."""
    cfg = context.config
    if cfg.lr is not None:
        return float(cfg.lr), {}
    for record in state.records:
        if "lr_derived" in record.extra:
            return float(record.extra["lr_derived"]["lr"]), {}
    derived, seconds = probe_lr(context, state, model, steps)
    tried = ", ".join(f"{t['lr']:g}: " + ("diverged" if t["loss"] is None else
                                          f"agreement {_pct(t['val_agreement'])} loss {t['loss']:.4g}")
                      for t in derived["tries"])
    line = (f"learning rate {derived['lr']:g}, derived from the model ({derived['probe_steps']} steps at each "
            f"rate, validation: {tried}; --lr sets one)")
    if context.progress:
        context.progress(Event("message", "search", line, data={"lr_derived": derived}))
    else:
        logger.info(line)
    return float(derived["lr"]), {"lr_derived": derived, "lr_probe_seconds": seconds}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def record_iteration(context: SearchContext, state: SearchState, *, started: float, phase: str, kind: str,
                     trained: TrainedWeights | None = None, lowered: int = 0, reducible: int | None = None,
                     sensitivity_seconds: float = 0.0, extra: dict[str, Any] | None = None,
                     result: EvalResult | None = None) -> IterationRecord:
    """Evaluate ``state.values`` under ``state.plan`` on the validation split: the next iteration's record,
    not yet decided or committed. ``trained`` is the iteration's fine-tune (None: none, recorded as 0 steps
    and no loss); ``started`` the iteration's ``time.perf_counter()`` start; ``result`` that evaluation when
    the caller has it already (:func:`guarded_fine_tune`)."""
    if result is None:
        result = evaluate_values(context, state.plan, state.values)
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
        fine_tune_loss=float(np.mean(trained.losses[-10:])) if trained is not None and trained.losses else None,
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

    what = (lowering_text(record.lowered, record.reducible) if record.kind == "lower"
            else record.kind)  # the baseline strategies' kinds: fine-tune, density, calibrate
    line = (f"iter {record.iteration:3d} {record.phase:<11s} {what:<16s} "
            f"B_w {record.weight_bits_effective:.2f}  B_a {record.activation_bits_effective:.2f}  "
            f"C_C {record.gbitops:.4g} Gbit-OPs  CR {record.compression_ratio:.2f}x  "
            f"top-1 {pct(record.val_top1)} (float {pct(reference.get('top1'))})  "
            f"agree {pct(record.val_agreement)}  {record.seconds:.1f} s")
    kept, other = record.extra.get("fine_tune_kept"), None
    if kept is not None and record.extra.get("before_fine_tune") is not None:
        other = record.extra["before_fine_tune" if kept else "after_fine_tune"]
    if kept is False:
        line += ("  [fine-tune diverged: weights from before it]" if other is None else
                 f"  [fine-tune dropped: agree {pct(other['val_agreement'])} after it]")
    elif kept and other is not None:
        line += f"  [fine-tune kept: agree {pct(other['val_agreement'])} before it]"
    if record.extra.get("fine_tune_retried"):
        line += f"  [lr {record.extra['fine_tune_lr']:g} retry]"
    if record.phase_end:
        line += f"  [phase end: {record.phase_end}]"
    if record.stop:
        line += f"  [stop: {record.stop}]"
    return line
