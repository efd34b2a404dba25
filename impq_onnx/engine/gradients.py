"""Gradients of seeded logits with respect to any tensor, on onnxruntime-training's gradient builder.

This is the only module of the sensitivity code that touches onnxruntime-training. It turns a
forward classifier graph into one that computes, for a batch ``x`` and a per-sample seed matrix
``s`` (``[N, classes]``), the gradient of ``sum_n s_n . Z_n`` (``Z`` the logits) with respect to a
chosen set of tensors: intermediate activations, layer outputs or weights. With batch-norm in
inference mode the samples of a batch do not interact, so the gradient with respect to a
per-sample tensor (an activation, a layer output) is, row by row, the per-sample gradient of
``s_n . Z_n``: one backward pass serves a whole batch.

Per-op rewrites come from the layer-op registry (:mod:`impq_onnx.frontend.ops`): before the builder
runs, convolutions with ``auto_pad`` get explicit ``pads`` (:func:`explicit_conv_pads`;
onnxruntime-training 1.19's ``ConvGrad`` is wrong for ``auto_pad`` convs); after it, each op may
rewrite what the builder made (a ``ConvGrad`` that only computes the input gradient becomes a
``ConvTranspose``).

Batch-norm: onnxruntime-training registers no gradient for ``BatchNormalization``, and the
sensitivity needs inference mode anyway, so :func:`inference_batchnorm` rewrites every
batch-norm into the per-channel affine map it computes at inference (``x*a + c`` with
``a = gamma / sqrt(var + eps)``, ``c = beta - mean*a``) before the gradient graph is built.

The builder is ``onnxruntime.capi._pybind_state.GradientGraphBuilder`` (PLATFORM.md): it adds
``<name>_grad`` outputs for every tensor asked for. Sessions run on the CPU provider with a fixed
number of intra-op threads.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from impq_onnx.engine.differentiable import check_differentiable, concrete_image_size, make_differentiable
from impq_onnx.errors import ModelError
from impq_onnx.frontend.ops import LAYER_OPS, layer_op
from impq_onnx.runtime import resolve_threads

__all__ = ["SEED_INPUT", "LOSS_OUTPUT", "inference_batchnorm", "explicit_conv_pads", "graph_input_name",
           "TensorGradients", "ForwardTensors"]

logger = logging.getLogger(__name__)

SEED_INPUT = "impq.sens/seed"
LOSS_OUTPUT = "impq.sens/loss"
_PREFIX = "impq.sens/bn"
SPINNING = False  # busy-waiting idle threads halve throughput when other processes share the cores (measured)


def _session(model_bytes: bytes, threads: int | None, spinning: bool = SPINNING):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def graph_input_name(proto: onnx.ModelProto) -> str:
    """The one graph input that is not an initializer (the image input)."""
    initializers = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    if len(names) != 1:
        raise ModelError(f"expected one image input, found {len(names)} ({', '.join(names) or 'none'})")
    return names[0]


def inference_batchnorm(proto: onnx.ModelProto) -> int:
    """Replace every ``BatchNormalization`` of ``proto`` (in place) by its inference-mode affine map.

    Returns the number of nodes replaced. Running statistics and affine parameters must be
    initializers; a batch-norm in training mode (``training_mode=1``) is refused.
    """
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    replaced = 0
    for node in graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("training_mode", 0):
            raise ModelError(f"batch-norm '{node.name}' is in training mode; sensitivity needs inference mode")
        try:
            gamma, beta, mean, var = (numpy_helper.to_array(initializers[n]).astype(np.float64) for n in node.input[1:5])
        except KeyError as exc:
            raise ModelError(f"batch-norm '{node.name}': parameter {exc} is not an initializer") from exc
        scale = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        shift = beta - mean * scale
        base = f"{_PREFIX}/{node.name or node.output[0]}"
        shape = (-1,) + (1,) * max(_rank_hint(node, graph) - 2, 0)  # broadcast over axis 1 (channels)
        graph.initializer.append(numpy_helper.from_array(scale.reshape(shape).astype(np.float32), f"{base}/scale"))
        graph.initializer.append(numpy_helper.from_array(shift.reshape(shape).astype(np.float32), f"{base}/shift"))
        nodes.append(helper.make_node("Mul", [node.input[0], f"{base}/scale"], [f"{base}/scaled"], name=f"{base}/Mul"))
        nodes.append(helper.make_node("Add", [f"{base}/scaled", f"{base}/shift"], [node.output[0]], name=f"{base}/Add"))
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return replaced


def explicit_conv_pads(proto: onnx.ModelProto, input_shape: Sequence[int] | None = None) -> int:
    """Rewrite (in place) every layer whose op asks for it (Conv with ``auto_pad``) into explicit ``pads``.

    Needs the spatial size of each such layer's input: from shape inference, with the image input
    fixed to ``input_shape`` (per-sample shape, batch dimension included or not) when given.
    Returns the number of nodes rewritten.
    """
    todo = [(n, op) for n in proto.graph.node if (op := layer_op(n)) is not None and op.needs_explicit_pads(n)]
    if not todo:
        return 0
    shapes = _shapes(proto, input_shape)
    weights = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    for node, op in todo:
        op.make_pads_explicit(node, shapes, weights)
    return len(todo)


def _shapes(proto: onnx.ModelProto, input_shape: Sequence[int] | None) -> dict[str, list[int | None]]:
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.value_info[:]  # recorded for another (symbolic) size, they would mask the concrete one
    for node in probe.graph.node:  # onnx's inference does not know com.microsoft's FakeQuant: same shape
        if node.op_type == "FakeQuant" and node.domain == "com.microsoft":
            node.op_type, node.domain = "Identity", ""
            del node.input[1:], node.output[1:], node.attribute[:]
    if input_shape is not None:
        dims = probe.graph.input[[i.name for i in probe.graph.input].index(graph_input_name(probe))].type.tensor_type.shape.dim
        for dim, size in zip(dims[1:], list(input_shape)[-(len(dims) - 1):]):
            dim.Clear()
            dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
    except Exception:  # shapes are an optimisation here; without them nothing is rewritten
        return {}
    shapes = {t.name: list(t.dims) for t in inferred.graph.initializer}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
    return shapes


def _rank_hint(node: onnx.NodeProto, graph: onnx.GraphProto) -> int:
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        if info.name == node.input[0] and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return 4  # images: N, C, H, W


def _with_seeded_loss(proto: onnx.ModelProto, logits: str) -> onnx.ModelProto:
    graph = proto.graph
    graph.input.append(helper.make_tensor_value_info(SEED_INPUT, TensorProto.FLOAT, ["N", "classes"]))
    graph.node.append(helper.make_node("Mul", [logits, SEED_INPUT], [f"{LOSS_OUTPUT}/terms"], name=f"{LOSS_OUTPUT}/Mul"))
    graph.node.append(helper.make_node("ReduceSum", [f"{LOSS_OUTPUT}/terms"], [LOSS_OUTPUT], keepdims=0,
                                       name=f"{LOSS_OUTPUT}/ReduceSum"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LOSS_OUTPUT, TensorProto.FLOAT, []))
    return proto


_G = TypeVar("_G", bound="_SessionGraph")


class _SessionGraph:
    """A built graph (``_bytes``) run by an onnxruntime session (``_session``)."""

    _bytes: bytes
    _session: Any

    def copy(self: _G, threads: int | None) -> _G:
        """The same graph in a new session with ``threads`` intra-op threads (no rebuild: the replicas of
        the sensitivity's fast path)."""
        clone = copy.copy(self)
        clone._session = _session(self._bytes, threads)
        return clone


class ForwardTensors(_SessionGraph):
    """An inference session that returns the logits and any intermediate tensors of a batch."""

    def __init__(self, proto: onnx.ModelProto, logits: str, keep: Sequence[str], *, threads: int | None = None):
        model = onnx.ModelProto()
        model.CopyFrom(proto)
        inference_batchnorm(model)
        self.outputs = [logits] + [name for name in dict.fromkeys(keep) if name != logits]
        del model.graph.output[:]
        for name in self.outputs:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        self.input_name = graph_input_name(model)
        self._bytes = model.SerializeToString()
        self._session = _session(self._bytes, threads)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        values = self._session.run(self.outputs, {self.input_name: np.ascontiguousarray(x, np.float32)})
        return values[0], dict(zip(self.outputs[1:], values[1:]))


class TensorGradients(_SessionGraph):
    """``grads = TensorGradients(proto, logits, wrt)(x, seed)``: d(sum seed*logits)/d(each tensor in wrt).

    ``wrt`` may name graph tensors, initializers included; the result maps each name to an array
    of that tensor's shape. ``epilogue(graph, gradients, shapes)``, if given, may append nodes that read
    the gradient graph's tensors (``gradients`` maps each ``wrt`` name to its gradient tensor; ``shapes``
    holds the static shapes known of forward tensors and of those gradients) and
    returns the names of extra outputs; then the result holds those outputs and the gradients of
    ``returned`` only (default: none), so large gradients need not leave onnxruntime.
    ``seed_graph(graph, shapes)``, if given, appends the nodes that compute the seed (``SEED_INPUT``) from
    the graph's own tensors (its logits: one run instead of a forward pass, then a backward one) and
    returns ``(inputs, outputs)``: the graph inputs it reads in place of the seed, fed by ``inputs=`` of
    each call, and the extra outputs of the result; or None, and the seed stays an input
    (``seed_in_graph`` says which).
    Building costs about as much as one onnxruntime session.
    """

    def __init__(self, proto: onnx.ModelProto, logits: str, wrt: Iterable[str], *, threads: int | None = None,
                 input_shape: Sequence[int] | None = None,
                 epilogue: Callable[[onnx.GraphProto, dict[str, str], dict[str, list[int | None]]], list[str]]
                 | None = None,
                 returned: Iterable[str] = (),
                 seed_graph: Callable[[onnx.GraphProto, dict[str, list[int | None]]],
                                      tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]] | None]
                 | None = None):
        model = onnx.ModelProto()
        model.CopyFrom(proto)
        if input_shape is not None:  # pool gradients over unknown spatial sizes are wrong (see training)
            concrete_image_size(model, tuple(input_shape))
        inference_batchnorm(model)
        explicit_conv_pads(model, input_shape)
        make_differentiable(model)
        check_differentiable(model)
        shapes = _shapes(model, input_shape)
        self.input_name = graph_input_name(model)
        self.wrt = list(dict.fromkeys(wrt))
        _with_seeded_loss(model, logits)
        from onnxruntime.capi import _pybind_state as C

        from impq_onnx.engine.ort_training import require_training_runtime
        from impq_onnx.engine.training import _native_stderr_silenced

        require_training_runtime()

        try:
            with _native_stderr_silenced():  # the builder logs every unused initializer and transformer
                builder = C.GradientGraphBuilder(model.SerializeToString(), {LOSS_OUTPUT}, set(self.wrt), LOSS_OUTPUT)
                builder.build()
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1]
            raise ModelError(f"onnxruntime-training cannot differentiate the model: {reason}") from exc
        grad_model = onnx.load_from_string(builder.get_model())
        for op in LAYER_OPS.values():
            op.make_gradients_runnable(grad_model, shapes)
            op.speed_up_gradients(grad_model, shapes)
        gradients = {name: f"{name}_grad" for name in self.wrt}
        self._keys = list(returned) if epilogue is not None else list(self.wrt)
        self._names = [gradients[name] for name in self._keys]
        if epilogue is not None:
            known = dict(shapes)
            known.update({gradients[name]: shapes[name] for name in self.wrt if name in shapes})
            extra = epilogue(grad_model.graph, gradients, known)
            self._keys += extra
            self._names += extra
        made = seed_graph(grad_model.graph, shapes) if seed_graph is not None else None
        self.seed_in_graph = made is not None
        if made is not None:
            new_inputs, new_outputs = made
            kept_inputs = [i for i in grad_model.graph.input if i.name != SEED_INPUT]
            del grad_model.graph.input[:]
            grad_model.graph.input.extend(kept_inputs + list(new_inputs))
            grad_model.graph.output.extend(new_outputs)
            self._keys += [o.name for o in new_outputs]
            self._names += [o.name for o in new_outputs]
        present = {o.name for o in grad_model.graph.output}
        if epilogue is not None or made is not None:  # only what is asked for leaves the session
            kept = [o for o in grad_model.graph.output if o.name in self._names]
            del grad_model.graph.output[:]
            grad_model.graph.output.extend(kept)
            present = {o.name for o in kept}
        for name in self._names:
            if name not in present:
                grad_model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        self._bytes = grad_model.SerializeToString()
        self._session = _session(self._bytes, threads)

    def __call__(self, x: np.ndarray, seed: np.ndarray | None, inputs: dict[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:
        """``seed``: the ``[N, classes]`` seed, or None when ``seed_graph`` computes it (from ``inputs``)."""
        feeds = {self.input_name: np.ascontiguousarray(x, np.float32), **(inputs or {})}
        if seed is not None:
            feeds[SEED_INPUT] = np.ascontiguousarray(seed, np.float32)
        values = self._session.run(self._names, feeds)
        return dict(zip(self._keys, values))
