"""Counting helpers shared by the architecture tests, as fixtures."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import shape_inference


def _macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of Conv and Gemm for one image, from shape-inferred output shapes."""
    inferred = shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else 1 for d in v.type.tensor_type.shape.dim]
        for v in list(inferred.graph.value_info) + list(inferred.graph.output)
    }
    inits = {t.name: t for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            # Each output element reads one weight row: (C_in/group)*kh*kw for Conv, K for Gemm.
            total += int(np.prod(shapes[node.output[0]])) * int(np.prod(inits[node.input[1]].dims[1:]))
    return total


def _trainable_params(model: onnx.ModelProto) -> int:
    """What PyTorch's ``parameters()`` counts: everything but batch-norm running statistics."""
    return sum(
        int(np.prod(t.dims))
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and not t.name.endswith(("running_mean", "running_var"))
    )


@pytest.fixture
def count_macs():
    return _macs


@pytest.fixture
def count_trainable_params():
    return _trainable_params
