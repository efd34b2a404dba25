"""Turn a float16 model into a float32 one, so every later stage sees one precision.

Simulation and fine-tuning need float32 shadow weights; keeping a float16 model's dtypes would
make every later pass handle both. Casts *to* float16 become casts to float32, float16 constants
and initializers are widened, and float16 value types become float32 (graph inputs and outputs
included: the canonical model takes and returns float32).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

__all__ = ["Float16ToFloat32Pass"]

logger = logging.getLogger(__name__)

_F16 = ir.DataType.FLOAT16
_F32 = ir.DataType.FLOAT


def _widen(tensor: ir.TensorProtocol) -> ir.Tensor:
    return ir.tensor(tensor.numpy().astype(np.float32), name=tensor.name)


class Float16ToFloat32Pass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        graph = model.graph
        for value in graph.initializers.values():
            if value.const_value is not None and value.const_value.dtype == _F16:
                value.const_value = _widen(value.const_value)
                modified = True
        values = list(graph.inputs) + list(graph.outputs)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            values.extend(node.outputs)
            modified |= self._fix_attributes(node)
        values.extend(graph.initializers.values())
        for value in values:
            if value.type is not None and value.dtype == _F16:
                value.dtype = _F32
                modified = True
        if modified:
            logger.debug("widened float16 tensors of %s to float32", graph.name)
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _fix_attributes(node: ir.Node) -> bool:
        modified = False
        for name, attr in list(node.attributes.items()):
            if node.op_type in ("Cast", "CastLike", "EyeLike", "RandomNormal", "RandomUniform",
                                "RandomNormalLike", "RandomUniformLike") and name in ("to", "dtype"):
                if attr.value == _F16:
                    node.attributes[name] = ir.AttrInt64(name, int(_F32))
                    modified = True
            elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype == _F16:
                node.attributes[name] = ir.AttrTensor(name, _widen(attr.value))
                modified = True
        return modified
