"""The refit: the search's output plan fine-tuned once more, from the input model's float weights.

IMPQ's search fine-tunes a little after each lowering, so its last weights carry every earlier plan's
compromises. Issue 23 measured the alternative (``bench/results/candidates.md``, "The final plan alone"): the
plan a short search found, put on the float weights and fine-tuned once for many epochs, ends well above the
search's own weights (ResNet-20, 1.74 bits: 87.80 % as the 7-epoch search wrote it, 88.98 % after 30 epochs
from float). ``compress --refit-epochs N`` does that after any search: one fine-tune of ``N`` epochs over the
training split, with the run's options (learning rate, batch size, optimizer, batch-norm mode, distillation,
augmentation), a cosine schedule from the run's rate to 0, on the plan of the search's output iteration.

It runs in parts of whole epochs (at least ``PART_MIN_STEPS`` steps each) and checkpoints after each in
``<work_dir>/refit/``: ``weights-<step>.npz`` and ``velocity-<step>.npz`` (the SGD momentum) after ``<step>``
steps, then ``refit.json`` (the commit point, naming that step), then the previous part's files are removed. A
kill at any moment leaves ``refit.json`` naming files that are there and belong together; the refit resumes
after its last committed part and ends with the same bytes as an uninterrupted one
(:func:`impq_onnx.engine.fine_tune` computes the same in parts). AdamW keeps its state inside onnxruntime, so
with ``optimizer: adamw`` the refit is one part. The search's work directory is a prefix of
any refit: ``refit_epochs`` is not part of the run's identity, and a finished run resumed with a refit runs
only the refit. A refit folder written with other settings (epochs, rate, output iteration) is refused, not
overwritten.

With ``act_clip: learned`` the refit trains the activation steps too, starting from the plan's clips; each part's
learned clips go into ``refit.json`` (``clips``), the next part starts from them, and the output's plan has them.

With ``refit_average_epochs`` K (stochastic weight averaging, SWA), the warm-up + cosine runs over the first
N - K epochs and ends at ``AVERAGE_LR_FACTOR`` times the rate, the last K epochs run at that constant rate, and
the weights after each of their parts are averaged (a running mean, checkpointed with the part as
``average-<step>.npz``; learned clips too). With ``batchnorm: train`` the average's running statistics are
re-estimated on one epoch of training batches (:func:`impq_onnx.engine.batchnorm_statistics`, on the simulated
model). The refit's model is the average when it validates at least as well as the last weights (the guard's
comparison), else the last weights; ``refit.average`` in the report holds both figures.

The output is the refit when its validation result is at least the search's output iteration's (the guard's
comparison, :func:`~impq_onnx.search.iteration.guard_key`; with ``guard`` off, always); otherwise the search's,
and the report says which (``refit.kept``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import numpy as np

from impq_onnx.engine import EvalResult, FineTuneDiverged, batchnorm_statistics, fine_tune
from impq_onnx.errors import ConfigError
from impq_onnx.events import Event
from impq_onnx.files import write_atomic
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import simulate
from impq_onnx.search.checkpoint import read_values, values_to_bytes
from impq_onnx.search.iteration import (
    derive_seed,
    evaluate_values,
    guard_key,
    learn_clips,
    train_batches,
    with_values,
)
from impq_onnx.search.state import SearchContext, SearchState

__all__ = ["AVERAGE_LR_FACTOR", "PART_MIN_STEPS", "REFIT_ITERATION", "RefitResult", "refit", "refit_steps"]

# The iteration slot of the refit's seeds (data order per epoch, onnxruntime's seed), with the purposes below:
# those of bench/polish.py, whose runs measured the recipe, so compress reproduces its figures.
REFIT_ITERATION = 10_000
_DATA_PURPOSE, _TRAIN_PURPOSE, _BN_PURPOSE = "polish", "fine-tune", "average-batchnorm"
AVERAGE_LR_FACTOR = 0.2  # the averaging epochs' constant rate, a fraction of the run's (SWA's swa_lr)
PART_MIN_STEPS = 200  # a part is the fewest whole epochs with at least this many steps (each part rebuilds sessions)
_VERSION = 1
_OUTCOME_KEYS = ("diverged", "val_top1", "val_top5", "val_agreement", "val_n")


@dataclasses.dataclass
class RefitResult:
    """The refit's weights (base + these), its plan (the search's, with the clips it learned) and its report
    block (``record``)."""

    values: dict[str, np.ndarray]
    record: dict[str, Any]
    plan: PrecisionPlan

    @property
    def kept(self) -> bool:
        return bool(self.record["kept"])


def refit_steps(cfg: Any, train: Any) -> tuple[int, int]:
    """``(steps, steps per epoch)`` of a refit of ``cfg.refit_epochs`` epochs over ``train``."""
    per_epoch = max(1, len(train) // cfg.batch_size)
    return max(1, math.ceil(cfg.refit_epochs * per_epoch - 1e-9)), per_epoch


def _settings(cfg: Any, lr: float, final: int, steps: int) -> dict[str, Any]:
    settings = {"version": _VERSION, "from_iteration": final, "epochs": float(cfg.refit_epochs), "steps": steps,
                "lr": float(lr)}
    if cfg.refit_average_epochs:  # only then: refit folders written before the option keep their identity
        settings["average_epochs"] = int(cfg.refit_average_epochs)
    return settings


def _load(folder: Any, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The committed progress in ``folder`` (None: none), refused when it ran with other settings."""
    path = folder / "refit.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); remove {folder} to refit anew") from exc
    if not (isinstance(saved, dict) and isinstance(saved.get("done"), int) and isinstance(saved.get("losses"), list)
            and isinstance(saved.get("seconds"), (int, float)) and isinstance(saved.get("result"), (dict, type(None)))
            and isinstance(saved.get("clips", {}), dict) and isinstance(saved.get("averaged", 0), int)
            and isinstance(saved.get("average_clips", {}), dict)
            and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in saved.get("clips", {}).values())
            and 0 <= saved["done"] <= settings["steps"]):
        raise ConfigError(f"{path}: not a refit record impq-onnx wrote; remove {folder} to refit anew")
    differs = [key for key in dict.fromkeys([*settings, "average_epochs"]) if saved.get(key) != settings.get(key)]
    if differs:
        key = differs[0]
        raise ConfigError(f"{folder} holds a refit with {key} {saved.get(key)!r}, not {settings.get(key)!r}: give "
                          f"the same refit_epochs, refit_average_epochs and lr, or remove {folder} to refit anew")
    return dict(saved)


def _part_files(folder: Any, done: int) -> tuple[Any, Any]:
    """The weights and velocity files of the part that ends after ``done`` steps."""
    return folder / f"weights-{done}.npz", folder / f"velocity-{done}.npz"


def _average_file(folder: Any, done: int) -> Any:
    return folder / f"average-{done}.npz"


def _commit(folder: Any, progress: dict[str, Any], values: dict[str, np.ndarray],
            velocity: dict[str, np.ndarray], average: dict[str, np.ndarray] | None = None) -> None:
    """The part's files first, ``refit.json`` (naming them) last, then any other part's files removed."""
    folder.mkdir(parents=True, exist_ok=True)
    weights, momentum = _part_files(folder, progress["done"])
    write_atomic(weights, values_to_bytes(values))
    write_atomic(momentum, values_to_bytes(velocity))
    keep = [weights, momentum]
    if progress.get("averaged"):
        keep.append(_average_file(folder, progress["done"]))
        write_atomic(keep[-1], values_to_bytes(average or {}))
    write_atomic(folder / "refit.json", json.dumps(progress, indent=1, sort_keys=True, allow_nan=True) + "\n")
    for old in sorted(folder.glob("*-*.npz")):
        if old not in keep:
            old.unlink(missing_ok=True)


def _schedule(cfg: Any, lr: float, steps: int, per_epoch: int, start: int) -> dict[str, Any]:
    """The ``fine_tune`` schedule arguments of the part that starts at step ``start`` of the refit, and
    ``end``, the step its phase ends at: one warm-up + cosine from ``lr`` to 0; with averaging, from ``lr``
    to ``AVERAGE_LR_FACTOR * lr`` over the first phase, then that rate constant."""
    if not cfg.refit_average_epochs:
        return {"steps": steps, "lr": lr, "offset": 0, "end": steps}
    first = max(1, steps - int(cfg.refit_average_epochs) * per_epoch)
    low = AVERAGE_LR_FACTOR * lr
    if start < first:
        return {"steps": first, "lr": lr, "final_lr": low, "offset": 0, "end": first}
    return {"steps": steps - first, "lr": low, "final_lr": low, "warmup_steps": 0, "offset": first, "end": steps}


def _running_statistics(context: SearchContext, plan: PrecisionPlan, values: dict[str, np.ndarray],
                        ) -> dict[str, np.ndarray]:
    """Batch-norm running statistics of base + ``values`` under ``plan``, re-estimated on one epoch of the
    refit's training batches (the simulated model: each layer sees its quantized inputs)."""
    cfg = context.config
    simulated = simulate(with_values(context.base, values), plan, context.sites)
    batches = train_batches(cfg, context.train, REFIT_ITERATION, _BN_PURPOSE)()
    return batchnorm_statistics(simulated, batches, threads=cfg.threads)


def _search_key(cfg: Any, record: Any) -> tuple[float, float]:
    return guard_key(cfg, EvalResult(record.val_top1, record.val_top5, record.val_agreement, record.val_n, 0.0))


def _choose_average(context: SearchContext, plan: PrecisionPlan, values: dict[str, np.ndarray], result: EvalResult,
                    average: dict[str, np.ndarray], progress: dict[str, Any], lr: float,
                    ) -> tuple[dict[str, np.ndarray], PrecisionPlan, EvalResult, dict[str, Any]]:
    """The average's model (its batch-norm statistics re-estimated with ``batchnorm: train``) when it validates at
    least as well as the last weights (``values``, ``result``), else those; with the report's ``average`` block."""
    cfg = context.config
    averaged_plan = plan.with_clips(progress.get("average_clips", {}))
    averaged = dict(average)
    if cfg.batchnorm == "train":
        averaged.update(_running_statistics(context, averaged_plan, averaged))
    averaged_result = evaluate_values(context, averaged_plan, averaged)
    used = guard_key(cfg, averaged_result) >= guard_key(cfg, result)
    block = {"epochs": int(cfg.refit_average_epochs), "parts": int(progress["averaged"]),
             "lr": float(AVERAGE_LR_FACTOR * lr), "val_top1": averaged_result.top1,
             "val_agreement": averaged_result.agreement, "last_val_top1": result.top1,
             "last_val_agreement": result.agreement, "used": used}
    if context.progress:
        context.progress(Event("message", "refit", f"refit: the average of {block['parts']} parts validates at "
                               f"agreement {100 * (averaged_result.agreement or 0):.2f}% against the last weights' "
                               f"{100 * (result.agreement or 0):.2f}%: " + ("used" if used else "not used"),
                               data=block))
    if used:
        return averaged, averaged_plan, averaged_result, block
    return values, plan, result, block


def refit(context: SearchContext, state: SearchState, plan: PrecisionPlan, lr: float) -> RefitResult | None:
    """Refit ``plan`` (that of ``state.final``) from the float weights for ``refit_epochs`` epochs at ``lr`` (the
    run's resolved rate), resuming ``<work_dir>/refit``; None when ``refit_epochs`` is 0."""
    cfg = context.config
    if not cfg.refit_epochs or state.final is None:
        return None
    folder = context.workdir.path / "refit"
    steps, per_epoch = refit_steps(cfg, context.train)
    part = steps if cfg.optimizer != "sgd" else per_epoch * max(1, math.ceil(PART_MIN_STEPS / per_epoch))
    settings = _settings(cfg, lr, state.final, steps)
    progress = _load(folder, settings) or dict(settings, done=0, seconds=0.0, losses=[], result=None)
    unknown = sorted(set(progress.get("clips", {})) - set(plan.activations))
    if unknown:
        raise ConfigError(f"{folder / 'refit.json'}: clips of '{unknown[0]}', not an activation site of the plan; "
                          f"remove {folder} to refit anew")
    plan = plan.with_clips(progress.get("clips", {}))
    values: dict[str, np.ndarray] = {}
    velocity: dict[str, np.ndarray] = {}
    average: dict[str, np.ndarray] = {}
    if progress["done"]:
        fix = f"remove {folder} to refit anew"
        weights, momentum = _part_files(folder, progress["done"])
        values = read_values(weights, context.workdir.path, fix)
        velocity = read_values(momentum, context.workdir.path, fix)
        if progress.get("averaged"):
            average = read_values(_average_file(folder, progress["done"]), context.workdir.path, fix)
    report = context.progress
    if report:
        resumed = ("" if not progress["done"] else ", finished: its result is read back"
                   if progress["result"] is not None else f", resuming after step {progress['done']}")
        text = (f"refit: the plan of iteration {state.final} from the float weights, {cfg.refit_epochs:g} epochs "
                f"({steps} steps) at lr {lr:g}{resumed}")
        report(Event("message", "refit", text, progress["done"], steps, data={"steps": steps, "lr": lr}))
    while progress["done"] < steps and progress["result"] is None:
        start, tick = progress["done"], time.perf_counter()
        phase = _schedule(cfg, lr, steps, per_epoch, start)
        stop = min(phase["end"], start + part)
        try:
            batches = train_batches(cfg, context.train, REFIT_ITERATION, _DATA_PURPOSE, start // per_epoch)
            trained = fine_tune(with_values(context.base, values), plan, context.sites, batches,
                                steps=phase["steps"], lr=phase["lr"], final_lr=phase.get("final_lr", 0.0),
                                warmup_steps=phase.get("warmup_steps"),
                                optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                batchnorm=cfg.batchnorm, threads=cfg.threads, replicas=cfg.replicas,
                                distill=True if cfg.distill else None, teacher=context.base,
                                seed=derive_seed(cfg.seed, REFIT_ITERATION, _TRAIN_PURPOSE),
                                start_step=start - phase["offset"], stop_step=stop - phase["offset"],
                                velocity=velocity if cfg.optimizer == "sgd" else None,
                                progress=context.inner_progress() or False, learn_clips=learn_clips(cfg))
        except FineTuneDiverged as exc:  # recorded: a resume writes the search's output, not the same divergence
            progress["result"] = {"diverged": str(exc), "kept": False}
            _commit(folder, progress, values, velocity, average)
            break
        values, plan = {**values, **trained.values}, plan.with_clips(trained.clips)
        if trained.clips:
            progress["clips"] = {**progress.get("clips", {}), **trained.clips}
        if phase["offset"]:  # an averaging part: the running mean of the weights (and clips) after each
            seen = progress.get("averaged", 0)
            average = {key: (value if key not in average else
                             (average[key] * np.float32(seen) + value) / np.float32(seen + 1)).astype(value.dtype)
                       for key, value in values.items()}
            clips = progress.get("average_clips", {})
            progress["average_clips"] = {site: clip if site not in clips else (clips[site] * seen + clip) / (seen + 1)
                                         for site, clip in progress.get("clips", {}).items()}
            progress["averaged"] = seen + 1
        progress.update(done=stop, seconds=progress["seconds"] + time.perf_counter() - tick,
                        losses=progress["losses"] + [float(np.mean(trained.losses))])
        _commit(folder, progress, values, velocity, average)
        if report:
            left = (steps - stop) * progress["seconds"] / stop  # at the rate so far, resumed parts included
            report(Event("message", "refit", f"refit: step {stop}/{steps} (epoch {stop / per_epoch:g}), mean loss "
                         f"{progress['losses'][-1]:.4f}, {progress['seconds'] / 60:.0f} min"
                         + (f", about {left / 60:.0f} min left" if stop < steps else ""), stop, steps,
                         data={"loss": progress["losses"][-1], "seconds": progress["seconds"],
                               "seconds_left": left}))
    search = state.record(state.final)
    if progress["result"] is None:
        result = evaluate_values(context, plan, values)
        last, averaging = values, None
        if progress.get("averaged"):
            values, plan, result, averaging = _choose_average(context, plan, values, result, average, progress, lr)
            if averaging["used"]:
                average = values  # its re-estimated statistics: a resume reads the output back from it
        kept = not cfg.guard or guard_key(cfg, result) >= _search_key(cfg, search)
        outcome_now: dict[str, Any] = {"val_top1": result.top1, "val_top5": result.top5,
                                       "val_agreement": result.agreement, "val_n": result.n, "kept": kept}
        if averaging is not None:
            outcome_now["average"] = averaging
        progress["result"] = outcome_now
        _commit(folder, progress, last, velocity, average)
    elif progress["result"].get("average", {}).get("used"):  # read back: the output is the average
        values, plan = average, plan.with_clips(progress.get("average_clips", {}))
    outcome = progress["result"]
    kept = bool(outcome.get("kept", False))
    # in this order whether the outcome was computed now or read back from refit.json (sorted): report.json's bytes
    record = {"from_iteration": state.final, "epochs": float(cfg.refit_epochs), "steps": steps, "lr": float(lr),
              "seconds": progress["seconds"], **{key: outcome[key] for key in _OUTCOME_KEYS if key in outcome},
              "kept": kept, "search_val_top1": search.val_top1, "search_val_agreement": search.val_agreement}
    if "average" in outcome:
        record["average"] = dict(sorted(outcome["average"].items()))  # as refit.json reads back
    if report:
        if "diverged" in outcome:
            text = f"refit: diverged ({outcome['diverged']}); the output is the search's iteration {state.final}"
        else:
            top1 = "n/a" if outcome["val_top1"] is None else f"{100 * outcome['val_top1']:.1f}%"
            text = (f"refit: validation top-1 {top1}, agreement with float {100 * (outcome['val_agreement'] or 0):.1f}"
                    f"% vs the search's {100 * (search.val_agreement or 0):.1f}%: "
                    + ("kept" if kept else f"not kept, the output is the search's iteration {state.final}"))
        report(Event("message", "refit", text, steps, steps, data=record))
    return RefitResult(values if kept else {}, record, plan)
