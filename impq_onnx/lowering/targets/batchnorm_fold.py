"""Graph edits shared by the targets that fold batch-norm into the layer before it (``ort``, ``packed-folded``):
which ``Conv -> BatchNormalization`` pairs can be folded, and the splice once the factors are in the Conv.
The factors themselves: :func:`impq_onnx.lowering.targets.ort_reference.fold_factors`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from impq_onnx.frontend.ops.base import const_array

__all__ = ["foldable_batchnorms", "drop_folded_batchnorm"]


def foldable_batchnorms(graph: ir.Graph) -> Iterator[tuple[ir.Node, ir.Node, list[np.ndarray]]]:
    """``(conv, batch-norm, [gamma, beta, mean, var])`` of every ``Conv -> BatchNormalization`` whose parameters
    are constant and whose Conv output nothing else reads (listed before any is folded)."""
    for bn in [n for n in graph if n.op_type == "BatchNormalization"]:
        x = bn.inputs[0]
        conv = x.producer() if x is not None else None
        params = [const_array(v) for v in bn.inputs[1:5]]
        if (x is None or conv is None or conv.op_type != "Conv" or len(bn.outputs) != 1
                or any(p is None for p in params) or len(x.uses()) != 1 or x.is_graph_output()):
            continue
        yield conv, bn, [p for p in params if p is not None]


def drop_folded_batchnorm(graph: ir.Graph, conv: ir.Node, bn: ir.Node, bias: ir.Value | None,
                          new_bias: ir.Value) -> None:
    """After a batch-norm's factors went into ``conv``'s weights or scales: ``new_bias`` becomes the Conv's
    bias, the Conv's output takes the batch-norm's place (and name), and the batch-norm and the constants
    nothing reads any more leave the graph."""
    if bias is None:
        conv.resize_inputs(3)
    conv.replace_input_with(2, new_bias)
    out, result = bn.outputs[0], conv.outputs[0]
    out_name = out.name
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    removed = [v for v in bn.inputs[1:5] if v is not None] + ([bias] if bias is not None else [])
    graph.remove(bn, safe=True)
    result.name = out_name
    for value in removed:
        if value.name is not None and value.name in graph.initializers and not value.uses():
            graph.initializers.pop(value.name)
