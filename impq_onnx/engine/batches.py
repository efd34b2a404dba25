"""The batches a fine-tune steps through (:func:`impq_onnx.engine.fine_tune`): an endless, prefetched stream of
epochs, each batch as contiguous float32 images and int64 labels, and a model's fixed batch size with the chunks a
batch is cut into for it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from impq_onnx.data.prefetch import Prefetch
from impq_onnx.errors import DataError


def epochs(batches) -> Iterator:
    """Cycle over ``batches`` (a factory, called once per epoch, or a re-iterable), prepared ahead in a
    prefetch thread (same batches, same order) while onnxruntime computes; the thread stops when this
    generator is closed (explicitly, or when fine_tune's frame lets it go)."""
    with Prefetch(cycle(batches)) as ahead:
        yield from ahead


def cycle(batches) -> Iterator:
    while True:
        produced = False
        for batch in (batches() if callable(batches) else batches):
            produced = True
            yield batch
        if not produced:
            raise DataError("the training data yielded no batches")


def split(batch):
    if isinstance(batch, (tuple, list)):
        x, y = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        x, y = batch, None
    return np.ascontiguousarray(x, np.float32), (None if y is None else np.ascontiguousarray(y, np.int64))


def fixed_batch(proto: onnx.ModelProto) -> int | None:
    """The batch a model whose graph bakes it in (the canonical form could not free it) must run at."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def fixed_chunks(count: int, fixed: int | None) -> list[slice]:
    """The whole batch, or its consecutive chunks of the model's fixed batch size (a short rest is dropped)."""
    if fixed is None or fixed == count:
        return [slice(0, count)]
    if count < fixed:
        raise DataError(f"the model's batch is fixed at {fixed}: fine-tune with a batch size of at least {fixed}")
    return [slice(start, start + fixed) for start in range(0, count - fixed + 1, fixed)]
