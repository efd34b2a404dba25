"""The layer-op registry: every quantizable layer kind, keyed by ONNX ``op_type``.

Each op is one module with a :class:`~impq_onnx.frontend.ops.base.LayerOp` subclass (which input is
the weight, the kernel axis, MACs, the per-sample gradient rule, ...) and one ``register`` line here.
Site analysis, simulation, the gradient graph, the sensitivity and lowering look ops up with
:func:`layer_op`; none of them tests a layer's ``op_type``.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from impq_onnx.frontend.ops.base import LayerGeometry, LayerOp, LayerShape, NormEmitter
from impq_onnx.frontend.ops.conv import ConvOp
from impq_onnx.frontend.ops.conv_transpose import ConvTransposeOp
from impq_onnx.frontend.ops.gemm import GemmOp
from impq_onnx.frontend.ops.matmul import MatMulOp

__all__ = ["LAYER_OPS", "register", "layer_op", "LayerOp", "LayerShape", "LayerGeometry", "NormEmitter"]

LAYER_OPS: dict[str, LayerOp] = {}


def register(op: LayerOp) -> LayerOp:
    """Make ``op`` the layer op of its ``op_type`` (default ONNX domain)."""
    LAYER_OPS[op.op_type] = op
    return op


register(ConvOp())
register(GemmOp())
register(MatMulOp())
register(ConvTransposeOp())


def layer_op(node: ir.Node | onnx.NodeProto | str) -> LayerOp | None:
    """The layer op of a node (default domain only) or of an ``op_type`` name; None for other ops."""
    if isinstance(node, str):
        return LAYER_OPS.get(node)
    if node.domain not in ("", "ai.onnx"):
        return None
    return LAYER_OPS.get(node.op_type)
