"""Make the logits the model's only output.

Search, fine-tuning and sensitivity all work on logits. Exports often end in Softmax or
LogSoftmax, or carry extra outputs (features, auxiliary heads); this pass keeps one output,
the tensor feeding a trailing Softmax/LogSoftmax when there is one, and drops the nodes that no
longer feed it.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

__all__ = ["StripClassifierHeadPass", "HEAD_OPS", "head_of", "value_named"]

HEAD_OPS = ("Softmax", "LogSoftmax")


def head_of(value: ir.Value) -> ir.Node | None:
    """The trailing Softmax/LogSoftmax node that produces ``value``, if any."""
    node = value.producer()
    return node if node is not None and node.op_type in HEAD_OPS and node.domain in ("", "ai.onnx") else None


class StripClassifierHeadPass(ir.passes.InPlacePass):
    """Keep ``output`` (or the input of the Softmax/LogSoftmax producing it) as the only graph output."""

    def __init__(self, output: str):
        super().__init__()
        self.output = output

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        value = value_named(graph, self.output)
        head = head_of(value)
        logits = head.inputs[0] if head is not None else value
        if len(graph.outputs) == 1 and graph.outputs[0] is logits:
            return ir.passes.PassResult(model, False)
        graph.outputs.clear()
        graph.outputs.append(logits)
        RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, True)


def value_named(graph: ir.Graph, name: str) -> ir.Value:
    """The graph output or node output called ``name`` (KeyError if there is none)."""
    for value in graph.outputs:
        if value.name == name:
            return value
    for node in graph:
        for value in node.outputs:
            if value.name == name:
                return value
    raise KeyError(name)
