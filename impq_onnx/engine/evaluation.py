"""Accuracy of a (float or simulated) model with plain onnxruntime inference sessions."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import time
from typing import Iterable, Iterator

import numpy as np

from impq_onnx.data.prefetch import Prefetch
from impq_onnx.errors import DataError
from impq_onnx.events import Event, Progress, progress_callback
from impq_onnx.runtime import MIN_EVAL_PART, inference_session, lap, resolve_threads
from impq_onnx.quant.simulate import as_proto, simulate
from impq_onnx.quant.standard_rounding import for_inference

__all__ = ["EvalResult", "evaluate", "predicted_classes", "predict_logits", "nonfinite_initializers"]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Top-1/top-5 accuracy (None without labels), agreement with the float model (None without one)."""

    top1: float | None
    top5: float | None
    agreement: float | None  # fraction of samples whose top-1 class equals the float model's
    n: int
    images_per_second: float
    classes: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)  # keep_classes

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "classes"}


def _topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int(np.sum(np.any(top == labels[:, None], axis=1)))


MAX_EVAL_SESSIONS = 4  # by default; a batch of 64 splits into parts of at least MIN_EVAL_PART images anyway


class _Sessions:
    """``replicas`` sessions of one model, the threads shared among them [default: one single-threaded session
    per thread, at most ``MAX_EVAL_SESSIONS``]: onnxruntime's intra-op threading is poor on the small
    convolutions of a batch (on 2 cores two 1-thread sessions evaluate ResNet-20 about twice as fast as one
    2-thread session). Each batch is split over them; the logits are the same as one session's."""

    def __init__(self, proto, threads: int | None, replicas: int | None):
        count = min(resolve_threads(threads), MAX_EVAL_SESSIONS) if replicas is None else max(1, int(replicas))
        per = max(1, resolve_threads(threads) // count)
        data = proto.SerializeToString()
        self.sessions = [inference_session(data, per) for _ in range(count)]
        self.pool = concurrent.futures.ThreadPoolExecutor(count) if count > 1 else None
        self.input_name = self.sessions[0].get_inputs()[0].name
        self.output_name = self.sessions[0].get_outputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        """``[len(x), classes]`` logits (run() releases the GIL, so the parts run side by side)."""
        fixed = self.sessions[0].get_inputs()[0].shape[0]
        unit = fixed if isinstance(fixed, int) and fixed > 0 else MIN_EVAL_PART
        count = min(len(self.sessions), max(1, -(-len(x) // unit)))
        if self.pool is None or count == 1:
            return _run(self.sessions[0], self.output_name, self.input_name, x).reshape(len(x), -1)
        edges = np.linspace(0, -(-len(x) // unit), count + 1).astype(int) * unit  # whole chunks of a fixed batch
        parts = [x[a:b] for a, b in zip(edges[:-1], np.minimum(edges[1:], len(x))) if a < len(x)]
        outs = self.pool.map(lambda session, part: _run(session, self.output_name, self.input_name, part),
                             self.sessions, parts)
        return np.concatenate([o.reshape(len(p), -1) for o, p in zip(outs, parts)])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def evaluate(model, batches: Iterable, *, plan=None, sites=None, float_model=None,
             float_classes: np.ndarray | None = None, threads: int | None = None, replicas: int | None = None,
             max_batches: int | None = None, progress: bool | Progress = False,
             total: int | None = None, keep_classes: bool = False) -> EvalResult:
    """Run ``model`` (float, or simulated under ``plan`` given ``sites``) over ``(x, y)`` batches.

    ``float_model`` (when given) runs on the same batches for the agreement figure; its time is not
    counted in ``images_per_second``. ``float_classes`` instead gives the float model's top-1 class of every
    image of ``batches`` in order (:func:`predicted_classes`), so a search that evaluates the same validation
    images every iteration runs the float model once. ``y`` may be None (unlabelled): top-1/top-5 are then
    None. ``replicas``: sessions the batches are split over [default: one single-threaded session per
    thread, at most ``MAX_EVAL_SESSIONS``]. ``progress`` gets a ``step`` event per batch (``step``: images so
    far, of ``total`` when given). ``keep_classes``: the result also holds the top-1 class of every image
    (``classes``, as :func:`predicted_classes` gives them), so the float model's evaluation serves as its
    ``float_classes`` later.
    """
    proto = for_inference(simulate(model, plan, sites)) if plan is not None else as_proto(model)
    session = _Sessions(proto, threads, replicas)
    reference = _Sessions(as_proto(float_model), threads, replicas) if float_model is not None else None
    lap("evaluation graph + sessions")
    compared = reference is not None or float_classes is not None  # an agreement figure is counted
    report = progress_callback(progress)
    n = top1 = top5 = agree = labelled = 0
    seconds = 0.0
    kept: list[np.ndarray] = []
    if report:
        report(Event("phase_start", "evaluate", "", 0, total))
    try:
        for index, batch in enumerate(_prefetched(batches, max_batches)):
            if max_batches is not None and index >= max_batches:
                break
            x, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
            x = np.ascontiguousarray(x, np.float32)
            start = time.perf_counter()
            logits = session.run(x)
            seconds += time.perf_counter() - start
            predicted = np.argmax(logits, axis=1)
            if keep_classes:
                kept.append(predicted.astype(np.int64))
            if y is not None:
                y = np.asarray(y, np.int64).reshape(-1)
                known = y >= 0  # -1: unlabelled (a flat image folder, an .npz without y); not counted as wrong
                top1 += int(np.sum(predicted[known] == y[known]))
                top5 += _topk_hits(logits[known], y[known], 5) if known.any() else 0
                labelled += int(known.sum())
            if reference is not None:
                agree += int(np.sum(predicted == np.argmax(reference.run(x), axis=1)))
            elif float_classes is not None:
                agree += int(np.sum(predicted == np.asarray(float_classes)[n:n + len(x)]))
            n += len(x)
            if report:
                report(_event("step", n, total, top1, labelled, agree if compared else None, seconds))
    finally:
        session.close()
        if reference is not None:
            reference.close()
    lap("evaluation")
    if n == 0:
        raise DataError("evaluation got no batches")
    if float_classes is not None and reference is None and len(float_classes) != n:
        raise DataError(f"evaluation: {len(float_classes)} float-model classes given for {n} images")
    if report:
        report(_event("phase_end", n, total, top1, labelled, agree if compared else None, seconds))
    return EvalResult(
        top1=top1 / labelled if labelled else None,
        top5=top5 / labelled if labelled else None,
        agreement=agree / n if compared else None,
        n=n,
        images_per_second=n / seconds if seconds > 0 else 0.0,
        classes=np.concatenate(kept) if keep_classes else None,
    )


def predicted_classes(model, batches: Iterable, *, threads: int | None = None,
                      replicas: int | None = None) -> np.ndarray:
    """The top-1 class of ``model`` for every image of ``(x, y)`` / ``x`` batches, in order (int64)."""
    sessions = _Sessions(as_proto(model), threads, replicas)
    try:
        classes = [np.argmax(sessions.run(np.ascontiguousarray(b[0] if isinstance(b, (tuple, list)) else b,
                                                               np.float32)), axis=1)
                   for b in _prefetched(batches, None)]
    finally:
        sessions.close()
    lap("evaluation")
    return np.concatenate(classes).astype(np.int64) if classes else np.zeros(0, np.int64)


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
