"""Free a static batch dimension, so every internal batch size runs.

Many exports declare their input as ``[1, 3, H, W]``. Evaluation (64 images), sensitivity (64) and
fine-tuning (32) need other batch sizes, so the canonical form declares the batch as ``N``. Where
the graph bakes the batch into a shape constant (``Reshape(x, [1, -1])`` after the pool), that
constant's batch entry becomes ``0`` ("copy the input's dimension"), which is the same value as long
as the reshaped tensor carries the batch on axis 0 (checked on the inferred static shapes).
:func:`batch_is_free` then checks numerically that a batch of ``2B`` gives, row for row, what batches
of ``B`` give; where it does not, the caller keeps the static model.

The written model keeps the interface the user declared: :func:`restore_declared_batch` puts the
static batch back on the input and outputs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["DynamicBatchPass", "BATCH_SYMBOL", "declared_batch", "batch_is_free", "restore_declared_batch"]

logger = logging.getLogger(__name__)

BATCH_SYMBOL = "N"
_PROBE_SIZE = 224  # stands for a dynamic non-batch dimension in the numerical check


def declared_batch(value: ir.Value) -> int | None:
    """The static batch size ``value`` declares on axis 0, or None where it is dynamic or unknown."""
    shape = value.shape
    if shape is None or len(shape) == 0 or not isinstance(shape[0], int):
        return None
    return int(shape[0])


class DynamicBatchPass(ir.passes.InPlacePass):
    """Declare the image input's batch (and every output's) as ``N``; rewrite batch-baked Reshape shapes.

    Needs the graph's value shapes inferred with the static batch (for the Reshape check).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        batch = declared_batch(graph.inputs[0])
        if batch is None:
            return ir.passes.PassResult(model, False)
        for value in [graph.inputs[0], *graph.outputs]:
            if declared_batch(value) == batch and value.shape is not None:
                value.shape = ir.Shape([BATCH_SYMBOL, *list(value.shape)[1:]])
        rewritten = [node.name or node.op_type for node in graph if _copy_batch_in_reshape(graph, node, batch)]
        if rewritten:
            logger.debug("reshape shapes with the batch %d baked in now copy it: %s", batch, ", ".join(rewritten))
        return ir.passes.PassResult(model, True)


def _copy_batch_in_reshape(graph: ir.Graph, node: ir.Node, batch: int) -> bool:
    if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    data, shape = node.inputs[0], node.inputs[1]
    if shape is None or shape.const_value is None or data is None or declared_batch(data) != batch:
        return False
    target = shape.const_value.numpy()
    if target.ndim != 1 or target.size == 0 or int(target[0]) != batch:
        return False
    allowzero = node.attributes.get("allowzero")
    if allowzero is not None and allowzero.value:
        if (target == 0).any():
            return False  # a literal zero-size dimension: "copy" would change it
        # dynamo writes allowzero=1; without any 0 in the shape it means the same as allowzero=0
        node.attributes.pop("allowzero")
    target = target.copy()
    target[0] = 0
    name = f"{shape.name}/batch_copied"
    new_shape = ir.Value(name=name, const_value=ir.tensor(target.astype(np.int64), name=name))
    graph.register_initializer(new_shape)
    node.replace_input_with(1, new_shape)
    return True


def batch_is_free(proto: onnx.ModelProto, batch: int) -> bool:
    """True when ``proto`` (batch declared ``N``) gives on ``2*batch`` samples what it gives per ``batch``."""
    import onnxruntime as ort

    from impq_onnx.runtime import inference_session

    x_info = next(i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer})
    dims = [d.dim_value if d.HasField("dim_value") else _PROBE_SIZE for d in x_info.type.tensor_type.shape.dim][1:]
    x = np.random.default_rng(0).standard_normal((2 * batch, *dims)).astype(np.float32)
    try:
        session = inference_session(proto.SerializeToString(), threads=1)
        name = session.get_inputs()[0].name
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a refusal means "not free", not an error to print
        whole = session.run(None, {name: x}, quiet)[0]
        parts = np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in (0, batch)])
    except Exception as exc:  # onnxruntime raises its own types; any failure means "not free"
        logger.debug("batch %d is not free: %s", batch, str(exc).splitlines()[0] if str(exc) else exc)
        return False
    return whole.shape == parts.shape and bool(np.allclose(whole, parts, rtol=1e-4, atol=1e-5))


def restore_declared_batch(proto: onnx.ModelProto, batch: int | None) -> onnx.ModelProto:
    """``proto`` (modified in place and returned) with the input's and outputs' batch ``N`` set back to ``batch``."""
    if batch is None:
        return proto
    initializers = {t.name for t in proto.graph.initializer}
    values = [i for i in proto.graph.input if i.name not in initializers] + list(proto.graph.output)
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if len(dims) and dims[0].dim_param == BATCH_SYMBOL:
            dims[0].Clear()
            dims[0].dim_value = batch
    return proto
