"""Data-parallel fine-tuning inside one process, and the SGD update shared with :mod:`.training`.

Replicas (``replicas=R > 1``, data-parallel inside one process): onnxruntime's intra-op parallelism
is inefficient for small convolutions (ConvGrad loops over the images of the batch with small GEMMs,
each split over the thread pool), while R single-threaded runs on R parts of the batch scale well.
``Module.train_step`` keeps the GIL for the whole step (its 1.19 binding does not release it:
measured, a Python thread gets ~3 % of its solo rate beside it), so R Modules in R Python threads
would run one after the other. ``InferenceSession.run`` releases the GIL, and the forward+backward
graph of the training artifacts is an ordinary graph once its ``InPlaceAccumulatorV2`` nodes (the
gradient buffers) are dropped and the gradients made graph outputs (:func:`gradient_graph`); so each
replica is an InferenceSession on that graph (``max(1, threads // R)`` intra-op threads), the
parameters live in numpy and are fed to every replica (one shared copy: every replica always sees the
same values), the batch is split with ``np.array_split``, and each part's gradient, loss and
batch-norm running statistics are weighted by its share of the batch: without batch-norm the step
is the full batch's up to float rounding. Batch-norm normalises with each part's own batch
statistics (data-parallel training without SyncBN), and the running statistics become the weighted
mean of the parts' updates: the running mean moves exactly as with the full batch, the running
variance toward the mean of the parts' (biased) variances, which lacks the spread of the part means.
AdamW (onnxruntime's Optimizer, bound to one Module and its gradient buffers) is not available with
replicas: ``replicas > 1`` needs SGD.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import onnx
from onnx import helper

from impq_onnx.errors import InternalError

__all__ = ["Replicas", "gradient_graph", "sgd_update"]


def sgd_update(name: str, w: np.ndarray, g: np.ndarray, velocity: dict[str, np.ndarray], lr: float,
               momentum: float, weight_decay: float) -> np.ndarray:
    """torch's SGD on one parameter: ``g += wd*w; v = mu*v + g; w - lr*v`` (``velocity`` updated)."""
    if weight_decay:
        g = g + weight_decay * w
    if momentum:
        v = velocity.get(name)
        v = g if v is None else momentum * v + g
        velocity[name] = v
        g = v
    return (w - lr * g).astype(np.float32)


_ACCUMULATOR = "InPlaceAccumulatorV2"
_BUFFER_SUFFIX = "_grad.accumulation.buffer"


def gradient_graph(path: str) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The training artifact's graph as a plain function ``(inputs, parameters) -> (outputs, gradients)``.

    onnxruntime-training accumulates each gradient into a buffer input with an ``InPlaceAccumulatorV2``
    node (``buffer, gradient, lazy_reset_grad -> buffer.out``); those nodes, the buffer inputs, the reset
    flag and the ``.out`` outputs are removed and the gradients themselves become graph outputs, so an
    ordinary InferenceSession computes them. Returns the graph and {parameter: gradient output}.
    """
    proto = onnx.load(path)
    graph = proto.graph
    accumulators = [n for n in graph.node if n.op_type == _ACCUMULATOR]
    gradients: dict[str, str] = {}
    dropped_inputs, replaced_outputs = set(), {}
    for node in accumulators:
        buffer, gradient, reset = node.input[0], node.input[1], node.input[2]
        if not buffer.endswith(_BUFFER_SUFFIX):
            raise InternalError(f"unexpected gradient buffer name '{buffer}' in the training artifact")
        gradients[buffer[: -len(_BUFFER_SUFFIX)]] = gradient
        dropped_inputs.update((buffer, reset))
        replaced_outputs[node.output[0]] = gradient
    kept = [n for n in graph.node if n.op_type != _ACCUMULATOR]
    del graph.node[:]
    graph.node.extend(kept)
    inputs = [i for i in graph.input if i.name not in dropped_inputs]
    del graph.input[:]
    graph.input.extend(inputs)
    outputs = [o if o.name not in replaced_outputs
               else helper.make_tensor_value_info(replaced_outputs[o.name], onnx.TensorProto.FLOAT, None)
               for o in graph.output]
    del graph.output[:]
    graph.output.extend(outputs)
    return proto, gradients


def distillation_target(teacher_logits: np.ndarray, labels: np.ndarray | None, label_mix: float,
                        temperature: float) -> np.ndarray:
    """The logits the distillation loss reads as its target: the teacher's; with ``label_mix`` a > 0 and
    labels, logits whose softmax at ``temperature`` T is (1 - a) softmax(teacher / T) + a onehot(label), so the
    soft cross-entropy becomes (1 - a) distillation + a label cross-entropy (both on the student's logits / T)."""
    if label_mix <= 0 or labels is None:
        return teacher_logits
    z = teacher_logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p *= (1.0 - label_mix) / p.sum(axis=-1, keepdims=True)
    p[np.arange(len(p)), np.asarray(labels, np.int64).reshape(-1)] += label_mix
    # exp(-69) is 1e-30: a class with no share gets no weight, and no -inf reaches the graph
    return (temperature * np.log(np.maximum(p, 1e-30))).astype(np.float32)


def training_target(teacher, input_name: str, x: np.ndarray, y: np.ndarray | None, label_mix: float,
                    temperature: float) -> np.ndarray | None:
    """The target a training step feeds with images ``x``: the labels ``y`` without a ``teacher`` (session),
    else the teacher's logits on ``x``, mixed with ``y`` by ``label_mix`` (:func:`distillation_target`)."""
    if teacher is None:
        return y
    return distillation_target(teacher.run(None, {input_name: x})[0], y, label_mix, temperature)


class Replicas:
    """``count`` InferenceSessions on the gradient graph, each training on one part of every batch in its
    own Python thread (``InferenceSession.run`` releases the GIL); the parameters are numpy arrays here."""

    def __init__(self, training_model: str, state, trainable: list[str], running: dict[str, str],
                 session_options: list, teacher, input_name: str, profiled: bool = False,
                 label_mix: float = 0.0, temperature: float = 1.0):
        """One replica per entry of ``session_options``; ``profiled``: they profile, end it in :meth:`close`.
        ``teacher`` (None: train on the labels): the session whose logits, mixed with the labels by
        ``label_mix`` (:func:`training_target`), are the target."""
        import onnxruntime as ort

        proto, gradients = gradient_graph(training_model)
        self.running = running  # {statistic output: running-statistic parameter}
        self.trainable = [name for name in trainable if name in gradients]
        self.params = {name: np.array(state.parameters[name].data, np.float32)
                       for name in trainable + sorted(set(running.values()))}
        self.user_inputs = [i.name for i in proto.graph.input if i.name not in self.params]
        if len(self.user_inputs) != 2:
            raise InternalError(f"the training graph has inputs {self.user_inputs}, expected the model input and the target")
        self.outputs = [proto.graph.output[0].name] + list(running) + [gradients[name] for name in self.trainable]
        self.stat_feeds = sorted(set(running.values()))
        blob = proto.SerializeToString()
        self.sessions = [ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
                         for options in session_options]
        self.profiled = profiled
        self.teacher, self.input_name = teacher, input_name
        self.label_mix, self.temperature = label_mix, temperature
        self.grads: dict[str, np.ndarray] = {}

    def _run(self, index: int, x: np.ndarray, y: np.ndarray | None) -> list[np.ndarray]:
        target = training_target(self.teacher, self.input_name, x, y, self.label_mix, self.temperature)
        feeds = dict(zip(self.user_inputs, (x, target)))
        for name in self.trainable:
            feeds[name] = self.params[name]  # read-only, shared by the replicas
        for name in self.stat_feeds:
            feeds[name] = self.params[name].copy()  # batch-norm may update its running statistics in place
        return self.sessions[index].run(self.outputs, feeds)

    def forward_backward(self, x: np.ndarray, y: np.ndarray | None) -> float:
        """Run every part (with a teacher: distil from it, ``y`` mixed in by ``label_mix``); keep the weighted
        gradients and running statistics; return the weighted loss (= the full batch's mean loss)."""
        parts = [i for i in np.array_split(np.arange(len(x)), len(self.sessions)) if len(i)]
        slices = [slice(int(i[0]), int(i[-1]) + 1) for i in parts]
        # A pool per step (R thread starts are nothing beside a training step) leaves no thread behind on errors.
        with concurrent.futures.ThreadPoolExecutor(len(slices), thread_name_prefix="impq-replica") as pool:
            futures = [pool.submit(self._run, k, x[s], None if y is None else y[s]) for k, s in enumerate(slices)]
            results = [f.result() for f in futures]  # in part order: the sums below are deterministic
        shares = [(s.stop - s.start) / len(x) for s in slices]
        loss = float(sum(share * float(np.asarray(out[0])) for share, out in zip(shares, results)))
        stats, grads = len(self.running), {}
        for j, name in enumerate(self.running):
            self.params[self.running[name]] = _weighted(shares, [out[1 + j] for out in results])
        for j, name in enumerate(self.trainable):
            grads[name] = _weighted(shares, [out[1 + stats + j] for out in results])
        self.grads = grads
        return loss

    def sgd_step(self, velocity: dict[str, np.ndarray], lr: float, momentum: float, weight_decay: float) -> None:
        for name in self.trainable:
            self.params[name] = sgd_update(name, self.params[name], self.grads[name], velocity, lr, momentum,
                                           weight_decay)
        self.grads = {}

    def close(self) -> None:
        if self.profiled:
            for session in self.sessions:
                session.end_profiling()


def _weighted(shares: list[float], values: list[np.ndarray]) -> np.ndarray:
    if len(values) == 1:
        return np.asarray(values[0], np.float32)
    total = shares[0] * np.asarray(values[0], np.float32)
    for share, value in zip(shares[1:], values[1:]):
        total += share * np.asarray(value, np.float32)
    return total.astype(np.float32)
