"""Make the logits the model's only output.

Search, fine-tuning and sensitivity all work on logits. Exports often end in Softmax or
LogSoftmax, behind or before no-op tails (Identity; a Reshape/Squeeze/Flatten that drops the
``1x1`` of a convolutional classifier), or carry extra outputs (features, auxiliary heads); this
pass keeps one output, the tensor feeding the trailing Softmax/LogSoftmax when there is one
(:func:`logits_behind`), and drops the nodes that no longer feed it. Dropped outputs lose their
declared shapes: a second output declared with a fixed batch must not fix the logits' batch.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

__all__ = ["StripClassifierHeadPass", "HEAD_OPS", "TAIL_OPS", "head_of", "logits_behind", "value_named"]

HEAD_OPS = ("Softmax", "LogSoftmax")
# Ops that may sit between the logits and a Softmax/LogSoftmax (or after it) without changing values.
TAIL_OPS = ("Identity", "Reshape", "Squeeze", "Flatten")


def _default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def head_of(value: ir.Value) -> ir.Node | None:
    """The trailing Softmax/LogSoftmax behind ``value`` (through no-op tails), if any."""
    return logits_behind(value)[1]


def _behind_identities(value: ir.Value) -> ir.Value:
    while (node := value.producer()) is not None and _default_domain(node) and node.op_type == "Identity":
        value = node.inputs[0]
    return value


def logits_behind(value: ir.Value) -> tuple[ir.Value, ir.Node | None]:
    """``(logits, head)`` for the output ``value``: through Identity nodes always; through a
    Softmax/LogSoftmax (the head) and the Reshape/Squeeze/Flatten after it only when there is one,
    since without a head those shape ops are what make the logits 2-D. Logits left 4-D
    (``[N, C, 1, 1]``) are flattened by the canonical form."""
    current = value
    while (node := current.producer()) is not None and _default_domain(node) and node.inputs:
        if node.op_type in HEAD_OPS:
            return _behind_identities(node.inputs[0]), node
        if node.op_type not in TAIL_OPS:
            break
        current = node.inputs[0]
    return _behind_identities(value), None


class StripClassifierHeadPass(ir.passes.InPlacePass):
    """Keep the logits behind ``output`` (see :func:`logits_behind`) as the only graph output."""

    def __init__(self, output: str):
        super().__init__()
        self.output = output

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        logits, _ = logits_behind(value_named(graph, self.output))
        if len(graph.outputs) == 1 and graph.outputs[0] is logits:
            return ir.passes.PassResult(model, False)
        dropped = [v for v in graph.outputs if v is not logits]
        graph.outputs.clear()
        graph.outputs.append(logits)
        for value in dropped:
            value.shape = None
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
