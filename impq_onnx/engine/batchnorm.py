"""Re-estimating batch-norm running statistics from data.

After the weights change other than by training steps (weight averaging, quantization), a
BatchNormalization's running mean and variance no longer describe its input. ``recompute_batchnorm``
sets them to what the data says, as torch's ``torch.optim.swa_utils.update_bn`` does: every batch-norm
runs in training mode (normalising by its batch's statistics, so each layer sees its inputs as in
training), and its running mean and variance become the average over the batches, weighted by batch
size, of the batch mean and variance (onnxruntime's training-mode statistics, the ones training uses).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from impq_onnx.errors import DataError
from impq_onnx.runtime import inference_session
from impq_onnx.quant.simulate import as_proto
from impq_onnx.engine.batchnorm_graph import batchnorm_to_training
from impq_onnx.engine.batches import split

__all__ = ["batchnorm_statistics", "recompute_batchnorm"]


def recompute_batchnorm(model, batches: Iterable, *, threads: int | None = None,
                        max_batches: int | None = None) -> onnx.ModelProto:
    """A copy of ``model`` (float; CanonicalModel or ModelProto) whose batch-norm running statistics
    are re-estimated on ``batches`` (``x`` or ``(x, y)`` numpy batches; labels are ignored), at most
    ``max_batches`` of them. A model without batch-norm comes back unchanged."""
    result = as_proto(model)
    averaged = batchnorm_statistics(result, batches, threads=threads, max_batches=max_batches)
    for i, t in enumerate(result.graph.initializer):
        if t.name in averaged:
            result.graph.initializer[i].CopyFrom(numpy_helper.from_array(averaged[t.name], t.name))
    return result


def batchnorm_statistics(model, batches: Iterable, *, threads: int | None = None,
                         max_batches: int | None = None) -> dict[str, np.ndarray]:
    """The batch-norm running means and variances :func:`recompute_batchnorm` writes, by initializer name
    (a simulated model's too: its names are the float model's); empty for a model without batch-norm."""
    probe = as_proto(model)
    running = batchnorm_to_training(probe, momentum=0.0)  # momentum 0: the "running" output is the batch's
    if not running:
        return {}
    dims = {t.name: list(t.dims) for t in probe.graph.initializer}
    del probe.graph.output[:]
    probe.graph.output.extend(
        helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, dims[stat]) for n, stat in running.items()
    )
    session = inference_session(probe.SerializeToString(), threads=threads)
    input_name = session.get_inputs()[0].name
    names = list(running)
    totals = {n: np.zeros(dims[running[n]], np.float64) for n in names}
    seen = 0
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        x, _ = split(batch)
        values = session.run(names, {input_name: x})
        for n, v in zip(names, values):
            totals[n] += len(x) * np.asarray(v, np.float64)
        seen += len(x)
    if not seen:
        raise DataError("recompute_batchnorm got no batches; pass at least one batch of images")
    return {running[n]: (totals[n] / seen).astype(np.float32) for n in names}
