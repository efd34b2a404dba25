"""Tiny classifiers built in code with the interface quirks real exporters emit (issue 24).

Each builder returns an ``onnx.ModelProto`` of the same small CNN as :mod:`tiny_models`
(3x8x8 input, 5 classes), changed in one way a published model is: a static batch of 1 with the
batch baked into a Reshape, HardSigmoid/HardSwish activations, opset-7 Dropout, tails after the logits,
a fixed-batch second output, weights reached through Reshape/Transpose/Cast of an initializer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from tiny_models import CLASSES, H, Quirks, W, build

__all__ = ["static_batch", "with_activation", "with_dropout7", "with_tail", "with_fixed_batch_output",
           "with_folded_fc_weight", "image_folder", "CLASSES", "H", "W"]


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set_batch(value: onnx.ValueInfoProto, batch: int) -> None:
    dim = value.type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = batch


def static_batch(batch: int = 1, reshape: bool = True, quirks: Quirks | None = None) -> onnx.ModelProto:
    """Input ``[batch, 3, 8, 8]``; with ``reshape`` the Flatten is ``Reshape(pool, [batch, 4])`` (torch's view)."""
    model = build(quirks if quirks is not None else Quirks())
    _set_batch(model.graph.input[0], batch)
    _set_batch(model.graph.output[0], batch)
    if reshape:
        flatten = _node(model, "flatten")
        flatten.op_type = "Reshape"
        del flatten.attribute[:]
        flatten.input.append("flat_shape")
        model.graph.initializer.append(numpy_helper.from_array(np.array([batch, 4], np.int64), "flat_shape"))
    return model


def batch_baked_into_features() -> onnx.ModelProto:
    """:func:`static_batch` (1) with ``Reshape(features [1,4] -> [4,1] -> [1,4])`` before ``fc``: the second
    Reshape bakes the batch into axis 1, so it cannot be freed by copying axis 0."""
    model = static_batch(1)
    fc = _node(model, "fc")
    position = list(model.graph.node).index(fc)
    model.graph.initializer.extend([numpy_helper.from_array(np.array([4, 1], np.int64), "cols"),
                                    numpy_helper.from_array(np.array([1, 4], np.int64), "rows")])
    model.graph.node.insert(position, helper.make_node("Reshape", ["features", "cols"], ["as_cols"], name="to_cols"))
    model.graph.node.insert(position + 1, helper.make_node("Reshape", ["as_cols", "rows"], ["as_rows"], name="to_rows"))
    fc.input[0] = "as_rows"
    return model


def with_activation(op: str, opset: int = 14) -> onnx.ModelProto:
    """``relu1`` and ``relu2`` replaced by ``op`` (HardSigmoid, HardSwish, ...)."""
    model = build(Quirks(opset=opset))
    for name in ("relu1", "relu2"):
        node = _node(model, name)
        node.op_type = op
        if op == "HardSigmoid":
            node.attribute.extend([helper.make_attribute("alpha", 0.2), helper.make_attribute("beta", 0.5)])
    return model


def with_dropout7() -> onnx.ModelProto:
    """An opset-7 Dropout (one output, ``is_test`` gone) before the classifier, as in ONNX-zoo SqueezeNet."""
    model = build(Quirks(opset=7))
    fc = _node(model, "fc")
    fc.input[0] = "dropped"
    position = list(model.graph.node).index(fc)
    model.graph.node.insert(position, helper.make_node("Dropout", ["features"], ["dropped"], ratio=0.5, name="drop"))
    return model


def with_tail(ops: list[str], *, logits_4d: bool = False) -> onnx.ModelProto:
    """Logits followed by ``ops`` (Identity, Softmax, LogSoftmax, Flatten, Squeeze); ``logits_4d``: the
    classifier is a 1x1 Conv on the pooled features, so the logits are ``[N, 5, 1, 1]``."""
    model = build(Quirks())
    graph = model.graph
    current = "logits"
    if logits_4d:
        fc = _node(model, "fc")
        graph.node.remove(fc)
        graph.node.remove(_node(model, "flatten"))
        w = numpy_helper.to_array(next(t for t in graph.initializer if t.name == "fc.w"))
        graph.initializer.append(numpy_helper.from_array(w.reshape(CLASSES, 4, 1, 1), "fc.w4"))
        graph.node.append(helper.make_node("Conv", ["pool", "fc.w4", "fc.b"], ["logits"], kernel_shape=[1, 1],
                                           name="fc_conv"))
    for i, op in enumerate(ops):
        out = f"tail{i}"
        if op == "Squeeze":
            graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), "squeeze_axes"))
            graph.node.append(helper.make_node(op, [current, "squeeze_axes"], [out], name=f"tail_{op}_{i}"))
        elif op in ("Softmax", "LogSoftmax"):
            graph.node.append(helper.make_node(op, [current], [out], axis=1, name=f"tail_{op}_{i}"))
        else:
            graph.node.append(helper.make_node(op, [current], [out], name=f"tail_{op}_{i}"))
        current = out
    rank = 4 if logits_4d and not any(op in ("Flatten", "Squeeze") for op in ops) else 2
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", CLASSES, 1, 1][:rank]))
    return model


def with_fixed_batch_output(batch: int = 128) -> onnx.ModelProto:
    """A second output (the features) declared with a fixed batch, as some exports do."""
    model = build(Quirks(two_outputs=True))
    _set_batch(model.graph.output[1], batch)
    return model


def with_folded_fc_weight(path: str) -> onnx.ModelProto:
    """The Gemm's weight reached through ``path``: "reshape", "transpose", "cast", "identity", "constant"
    (foldable) or "computed" (a Mul: not foldable, the layer stays float)."""
    model = build(Quirks())
    graph = model.graph
    fc = _node(model, "fc")
    w = numpy_helper.to_array(next(t for t in graph.initializer if t.name == "fc.w"))
    graph.initializer.remove(next(t for t in graph.initializer if t.name == "fc.w"))
    position = list(graph.node).index(fc)
    if path == "reshape":  # CNTK stores the FC weight flat
        graph.initializer.extend([numpy_helper.from_array(w.reshape(-1), "fc.w.flat"),
                                  numpy_helper.from_array(np.array(w.shape, np.int64), "fc.w.shape")])
        made = helper.make_node("Reshape", ["fc.w.flat", "fc.w.shape"], ["fc.w.r"], name="fc_w_reshape")
    elif path == "transpose":
        graph.initializer.append(numpy_helper.from_array(w.T.copy(), "fc.w.t"))
        made = helper.make_node("Transpose", ["fc.w.t"], ["fc.w.r"], perm=[1, 0], name="fc_w_transpose")
    elif path == "cast":
        graph.initializer.append(numpy_helper.from_array(w.astype(np.float16), "fc.w.h"))
        made = helper.make_node("Cast", ["fc.w.h"], ["fc.w.r"], to=TensorProto.FLOAT, name="fc_w_cast")
    elif path == "constant":  # a Constant node reshaped by a Constant shape (old exporters)
        graph.node.insert(position, helper.make_node("Constant", [], ["fc.w.c"], name="fc_w_const",
                                                     value=numpy_helper.from_array(w.reshape(-1), "fc.w.c")))
        graph.node.insert(position + 1, helper.make_node("Constant", [], ["fc.w.cs"], name="fc_w_shape",
                                                         value=numpy_helper.from_array(np.array(w.shape, np.int64))))
        position += 2
        made = helper.make_node("Reshape", ["fc.w.c", "fc.w.cs"], ["fc.w.r"], name="fc_w_reshape")
    elif path == "computed":  # not foldable: the weight is scaled in the graph
        graph.initializer.extend([numpy_helper.from_array(w * 2, "fc.w.2"), numpy_helper.from_array(
            np.array(0.5, np.float32), "half")])
        made = helper.make_node("Mul", ["fc.w.2", "half"], ["fc.w.r"], name="fc_w_scale")
    elif path == "identity":
        graph.initializer.append(numpy_helper.from_array(w, "fc.w.i"))
        made = helper.make_node("Identity", ["fc.w.i"], ["fc.w.r"], name="fc_w_identity")
    else:
        raise ValueError(path)
    graph.node.insert(position, made)
    fc.input[1] = "fc.w.r"
    return model


def image_folder(root: Path, per_class: int = 6, seed: int = 0, names: list[str] | None = None) -> Path:
    """``root/<class>/<i>.png``: random 8x8 RGB images, ``per_class`` per class, one folder per class."""
    rng = np.random.default_rng(seed)
    for name in names or [f"c{i}" for i in range(CLASSES)]:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root
