"""Runner-up classes, margins and the seed vectors that turn one backward pass into margin gradients.

For sample ``n`` with logits ``Z`` and prediction ``Yhat = argmax Z`` the runner-up set ``S`` is the
``R`` classes other than ``Yhat`` with the smallest ``|Z_i - Z_Yhat|`` (ties in that order broken by
class index). A margin counts as a *tie* when ``|Z_i - Z_Yhat|`` is below the float32 resolution of
the two logits (``TIE_RELATIVE * max(|Z_i|, |Z_Yhat|)``, exact equality included): the term
``1/|margin|^2`` is then rounding noise (the reference code divided by zero there and poisoned a
layer with NaN), so the pair gets weight 0 and is skipped.

The seed of pair ``(n, i)`` is ``(e_i - e_Yhat) / |Z_i - Z_Yhat|``: the gradient of ``seed . Z``
is ``d(Z_i - Z_Yhat)/d(.) / |margin|``, whose square is the paper's summand without the 1/24.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["TIE_RELATIVE", "RunnerUps", "runner_ups", "rank_seeds", "probe_signs", "probe_seeds", "emit_probe_seeds"]

TIE_RELATIVE = float(np.finfo(np.float32).eps)


@dataclasses.dataclass(frozen=True)
class RunnerUps:
    """Per sample: the prediction, the runner-up classes and ``1/|margin|`` (0 for a tie)."""

    predicted: np.ndarray  # [N] int
    classes: np.ndarray  # [N, R] int, closest runner-up first
    inverse_margin: np.ndarray  # [N, R] float64, 0 where the pair is a tie
    num_classes: int

    @property
    def ties(self) -> int:
        return int(np.count_nonzero(self.inverse_margin == 0))


def runner_ups(logits: np.ndarray, count: int) -> RunnerUps:
    """Pick the ``count`` runner-ups of every row of ``logits`` (capped at classes - 1)."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be [samples, classes >= 2], got shape {z.shape}")
    n, c = z.shape
    r = max(1, min(int(count), c - 1))
    predicted = np.argmax(z, axis=1)
    top = z[np.arange(n), predicted]
    gap = top[:, None] - z  # >= 0
    gap[np.arange(n), predicted] = np.inf
    classes = np.argsort(gap, axis=1, kind="stable")[:, :r]
    margin = np.take_along_axis(gap, classes, axis=1)
    scale = np.maximum(np.abs(top)[:, None], np.abs(np.take_along_axis(z, classes, axis=1)))
    tie = ~np.isfinite(margin) | (margin <= TIE_RELATIVE * scale)
    inverse = np.where(tie, 0.0, 1.0 / np.where(tie, 1.0, margin))
    return RunnerUps(predicted, classes, inverse, c)


def rank_seeds(ups: RunnerUps, rank: int) -> np.ndarray:
    """``[N, classes]`` seeds for the ``rank``-th runner-up of every sample."""
    n = len(ups.predicted)
    seed = np.zeros((n, ups.num_classes), np.float64)
    rows = np.arange(n)
    w = ups.inverse_margin[:, rank]
    seed[rows, ups.classes[:, rank]] += w
    seed[rows, ups.predicted] -= w
    return seed.astype(np.float32)


def probe_signs(rng: np.random.Generator, samples: int, runner_ups: int) -> np.ndarray:
    """``[samples, runner_ups]`` independent random signs (float64 -1 / +1): one probe's draw from ``rng``."""
    return rng.choice(np.array([-1.0, 1.0]), size=(samples, runner_ups))


def probe_seeds(ups: RunnerUps, rng: np.random.Generator) -> np.ndarray:
    """One Rademacher probe: ``sum_r eps_r * seed_r`` with independent random signs ``eps``.

    For any linear map ``g`` of the seed, ``E|g(probe)|^2 = sum_r |g(seed_r)|^2``: the cross terms
    have zero mean because the signs are independent.
    """
    n, r = ups.classes.shape
    w = probe_signs(rng, n, r) * ups.inverse_margin
    seed = np.zeros((n, ups.num_classes), np.float64)
    rows = np.repeat(np.arange(n), r)
    np.add.at(seed, (rows, ups.classes.reshape(-1)), w.reshape(-1))
    seed[np.arange(n), ups.predicted] -= w.sum(axis=1)
    return seed.astype(np.float32)


def emit_probe_seeds(graph: onnx.GraphProto, logits: str, num_classes: int, count: int, signs: str, seed: str,
                     prefix: str) -> str:
    """Append to ``graph`` the nodes of :func:`runner_ups` + :func:`probe_seeds` on ``logits``.

    The gradient graph then needs no separate forward pass to pick the runner-ups: ``signs`` (an input,
    ``[N, R]`` float64, ``R = min(count, num_classes - 1)``, from :func:`probe_signs`) and
    the graph's own logits make ``seed`` (``[N, classes]`` float32). The arithmetic is numpy's, in float64
    (``TopK`` breaks equal gaps by the lower class index, as the stable argsort does), so the seeds are
    the same numbers. Returns the name of an int64 scalar: the ties skipped in the batch.
    """
    r = max(1, min(int(count), int(num_classes) - 1))
    nodes: list[onnx.NodeProto] = []
    consts: list[onnx.TensorProto] = []

    def op(op_type: str, inputs: list[str], **attrs) -> str:
        out = f"{prefix}/{op_type}/{len(nodes)}"
        nodes.append(helper.make_node(op_type, inputs, [out], name=f"{out}/node", **attrs))
        return out

    def const(value, dtype) -> str:
        name = f"{prefix}/const/{len(consts)}"
        consts.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    z = op("Cast", [logits], to=TensorProto.DOUBLE)
    predicted = op("ArgMax", [z], axis=1, keepdims=1)  # [N, 1], the first of equal maxima, as np.argmax
    top = op("GatherElements", [z, predicted], axis=1)  # [N, 1]
    is_predicted = op("Equal", [const(np.arange(num_classes)[None, :], np.int64), predicted])  # [N, C]
    gap = op("Where", [is_predicted, const(np.inf, np.float64), op("Sub", [top, z])])
    negative, classes = f"{prefix}/negative_margin", f"{prefix}/classes"
    nodes.append(helper.make_node("TopK", [op("Neg", [gap]), const([r], np.int64)], [negative, classes],
                                  name=f"{prefix}/TopK", axis=1, largest=1, sorted=1))
    margin = op("Neg", [negative])  # [N, R], closest runner-up first
    scale = op("Max", [op("Abs", [top]), op("Abs", [op("GatherElements", [z, classes], axis=1)])])
    finite = op("Equal", [op("Sub", [margin, margin]), const(0.0, np.float64)])  # inf - inf, NaN: NaN
    tie = op("Or", [op("Not", [finite]), op("LessOrEqual", [margin, op("Mul", [const(TIE_RELATIVE, np.float64),
                                                                                 scale])])])
    one, zero = const(1.0, np.float64), const(0.0, np.float64)
    inverse = op("Where", [tie, zero, op("Div", [one, op("Where", [tie, one, margin])])])
    w = op("Mul", [signs, inverse])  # [N, R]
    picked = op("Cast", [op("Equal", [op("Unsqueeze", [classes, const([2], np.int64)]),
                                      const(np.arange(num_classes)[None, None, :], np.int64)])],
                to=TensorProto.DOUBLE)  # [N, R, C]
    axis1 = const([1], np.int64)  # ReduceSum's axes are an input from opset 13 (the canonical form's least)
    up = op("ReduceSum", [op("Mul", [picked, op("Unsqueeze", [w, const([2], np.int64)])]), axis1], keepdims=0)
    down = op("Mul", [op("Cast", [is_predicted], to=TensorProto.DOUBLE), op("ReduceSum", [w, axis1], keepdims=1)])
    nodes.append(helper.make_node("Cast", [op("Sub", [up, down])], [seed], name=f"{prefix}/seed", to=TensorProto.FLOAT))
    ties = f"{prefix}/ties"
    nodes.append(helper.make_node("ReduceSum", [op("Cast", [tie], to=TensorProto.INT64)], [ties], name=f"{ties}/node",
                                  keepdims=0))
    graph.initializer.extend(consts)
    graph.node.extend(nodes)
    return ties
