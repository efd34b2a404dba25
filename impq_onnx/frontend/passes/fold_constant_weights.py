"""Fold shape-only ops applied to initializers into initializers.

Some exporters reach a layer's weight through a node instead of storing it in the layer's shape:
CNTK stores the FC weight flat and ``Reshape``s it, others ``Transpose`` a MatMul weight, ``Cast`` a
float16 copy, or pass it through ``Identity``. Weight analysis needs the weight as an initializer of
the layer, so every such node whose inputs are all constants becomes the initializer it computes
(named as its output). Only value-preserving ops are folded; ``Constant`` nodes are lifted to
initializers before this pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

__all__ = ["FoldConstantWeightsPass", "FOLDABLE_OPS"]

logger = logging.getLogger(__name__)


def _int_list(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


def _attr(node: ir.Node, name: str, default):  # type: ignore[no-untyped-def]
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _reshape(node: ir.Node, data: np.ndarray) -> np.ndarray | None:
    shape = _int_list(node.inputs[1] if len(node.inputs) > 1 else None)
    if shape is None:
        return None
    if not _attr(node, "allowzero", 0):
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return data.reshape(shape)


def _transpose(node: ir.Node, data: np.ndarray) -> np.ndarray:
    perm = _attr(node, "perm", None)
    return np.transpose(data, None if perm is None else list(perm))


def _cast(node: ir.Node, data: np.ndarray) -> np.ndarray:
    return data.astype(ir.DataType(int(_attr(node, "to", 1))).numpy())


def _axes(node: ir.Node) -> list[int] | None:
    axes = _int_list(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    attribute = _attr(node, "axes", None)
    return axes if axes is not None else (list(attribute) if attribute is not None else None)


def _squeeze(node: ir.Node, data: np.ndarray) -> np.ndarray:
    axes = _axes(node)
    return np.squeeze(data) if axes is None else np.squeeze(data, axis=tuple(axes))


def _unsqueeze(node: ir.Node, data: np.ndarray) -> np.ndarray | None:
    axes = _axes(node)
    if axes is None:
        return None
    rank = data.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        data = np.expand_dims(data, axis)
    return data


def _flatten(node: ir.Node, data: np.ndarray) -> np.ndarray:
    axis = int(_attr(node, "axis", 1)) % (data.ndim or 1)
    return data.reshape(int(np.prod(data.shape[:axis])), -1)


FOLDABLE_OPS: dict[str, Callable[[ir.Node, np.ndarray], np.ndarray | None]] = {
    "Identity": lambda node, data: data,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Cast": _cast,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Flatten": _flatten,
}


def _constant(value: ir.Value | None, graph: ir.Graph) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


class FoldConstantWeightsPass(ir.passes.InPlacePass):
    """Replace every :data:`FOLDABLE_OPS` node whose inputs are all constants by an initializer."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded: list[str] = []
        for node in list(graph):
            fold = FOLDABLE_OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if fold is None or len(node.outputs) != 1 or not node.inputs:
                continue
            if not all(_constant(v, graph) for v in node.inputs if v is not None):
                continue
            result = fold(node, node.inputs[0].const_value.numpy())  # type: ignore[union-attr]
            if result is None:
                continue
            output = node.outputs[0]
            name = output.name
            value = ir.Value(name=None, const_value=ir.tensor(np.ascontiguousarray(result)))
            output.replace_all_uses_with(value, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            value.name = name
            value.const_value.name = name  # type: ignore[union-attr]
            graph.register_initializer(value)
            folded.append(node.name or name or node.op_type)
        if folded:
            logger.info("folded %d constant weight paths into initializers: %s", len(folded), ", ".join(folded))
        return ir.passes.PassResult(model, bool(folded))
