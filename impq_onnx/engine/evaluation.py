"""Accuracy of a (float or simulated) model with plain onnxruntime inference sessions."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Iterable, Iterator

import numpy as np

from impq_onnx.data.prefetch import Prefetch
from impq_onnx.errors import DataError
from impq_onnx.events import Event, Progress, progress_callback
from impq_onnx.runtime import inference_session, lap
from impq_onnx.quant.simulate import as_proto, simulate
from impq_onnx.quant.standard_rounding import for_inference

__all__ = ["EvalResult", "evaluate", "predict_logits", "nonfinite_initializers"]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Top-1/top-5 accuracy (None without labels), agreement with the float model (None without one)."""

    top1: float | None
    top5: float | None
    agreement: float | None  # fraction of samples whose top-1 class equals the float model's
    n: int
    images_per_second: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int(np.sum(np.any(top == labels[:, None], axis=1)))


def evaluate(model, batches: Iterable, *, plan=None, sites=None, float_model=None, threads: int | None = None,
             max_batches: int | None = None, progress: bool | Progress = False,
             total: int | None = None) -> EvalResult:
    """Run ``model`` (float, or simulated under ``plan`` given ``sites``) over ``(x, y)`` batches.

    ``float_model`` (when given) runs on the same batches for the agreement figure; its time is not
    counted in ``images_per_second``. ``y`` may be None (unlabelled): top-1/top-5 are then None.
    ``progress`` gets a ``step`` event per batch (``step``: images so far, of ``total`` when given).
    """
    proto = for_inference(simulate(model, plan, sites)) if plan is not None else as_proto(model)
    session = inference_session(proto.SerializeToString(), threads)
    reference = inference_session(as_proto(float_model).SerializeToString(), threads) if float_model is not None else None
    lap("evaluation graph + sessions")
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    report = progress_callback(progress)
    n = top1 = top5 = agree = labelled = 0
    seconds = 0.0
    if report:
        report(Event("phase_start", "evaluate", "", 0, total))
    for index, batch in enumerate(_prefetched(batches, max_batches)):
        if max_batches is not None and index >= max_batches:
            break
        x, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
        x = np.ascontiguousarray(x, np.float32)
        start = time.perf_counter()
        logits = _run(session, output_name, input_name, x)
        seconds += time.perf_counter() - start
        logits = logits.reshape(len(x), -1)
        predicted = np.argmax(logits, axis=1)
        if y is not None:
            y = np.asarray(y, np.int64).reshape(-1)
            known = y >= 0  # -1: unlabelled (a flat image folder, an .npz without y); not counted as wrong
            top1 += int(np.sum(predicted[known] == y[known]))
            top5 += _topk_hits(logits[known], y[known], 5) if known.any() else 0
            labelled += int(known.sum())
        if reference is not None:
            ref = _run(reference, reference.get_outputs()[0].name, reference.get_inputs()[0].name, x).reshape(len(x), -1)
            agree += int(np.sum(predicted == np.argmax(ref, axis=1)))
        n += len(x)
        if report:
            report(_event("step", n, total, top1, labelled, agree if reference is not None else None, seconds))
    lap("evaluation")
    if n == 0:
        raise DataError("evaluation got no batches")
    if report:
        report(_event("phase_end", n, total, top1, labelled, agree if reference is not None else None, seconds))
    return EvalResult(
        top1=top1 / labelled if labelled else None,
        top5=top5 / labelled if labelled else None,
        agreement=agree / n if reference is not None else None,
        n=n,
        images_per_second=n / seconds if seconds > 0 else 0.0,
    )


def _event(kind: str, n: int, total: int | None, top1: int, labelled: int, agree: int | None,
           seconds: float) -> Event:
    accuracy, speed = top1 / max(labelled, 1), n / max(seconds, 1e-9)
    data = {"images": n, "top1": top1 / labelled if labelled else None,
            "agreement": None if agree is None else agree / max(n, 1), "images_per_second": speed}
    return Event(kind, "evaluate", f"evaluate {n} images, top-1 {accuracy:.4f}, {speed:.0f} img/s", n, total, data)


def _prefetched(batches: Iterable, limit: int | None) -> Iterator:
    """``batches`` (at most ``limit``) prepared ahead in a thread while the session runs (same order)."""
    with Prefetch(itertools.islice(batches, limit)) as ahead:
        yield from ahead


def predict_logits(model, x: np.ndarray, *, plan=None, sites=None, threads: int | None = None) -> np.ndarray:
    """Logits of one batch (a convenience for tests and checks)."""
    proto = for_inference(simulate(model, plan, sites)) if plan is not None else as_proto(model)
    session = inference_session(proto.SerializeToString(), threads)
    return session.run(None, {session.get_inputs()[0].name: np.asarray(x, np.float32)})[0]


def _run(session, output: str, input_name: str, x: np.ndarray) -> np.ndarray:
    """One batch; a model whose batch stays static (its graph bakes it in) runs in chunks of that size,
    the last one padded with zeros whose outputs are dropped."""
    fixed = session.get_inputs()[0].shape[0]
    if not isinstance(fixed, int) or fixed < 1 or fixed == len(x):
        return session.run([output], {input_name: x})[0]
    parts = []
    for start in range(0, len(x), fixed):
        chunk = x[start : start + fixed]
        if len(chunk) < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - len(chunk), *x.shape[1:]), x.dtype)])
        parts.append(session.run([output], {input_name: chunk})[0])
    return np.concatenate(parts)[: len(x)]


def nonfinite_initializers(model) -> list[tuple[str, int]]:
    """``(name, count)`` of every float initializer holding NaN or infinite values, in graph order."""
    from onnx import numpy_helper

    found = []
    for tensor in as_proto(model).graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f":
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                found.append((tensor.name, bad))
    return found
