"""Give every unnamed node a readable, stable name.

Weight groups, plans and reports are keyed by node names, so every node needs one that a user
can recognise: ``<OpType>_<position>`` (``Conv_0``, ``Gemm_17``), the convention old exporters use.
Duplicate names are left to ``NameFixPass``.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["NameNodesPass"]


class NameNodesPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        taken = {node.name for node in model.graph if node.name}
        modified = False
        for position, node in enumerate(model.graph):
            if node.name:
                continue
            name = f"{node.op_type}_{position}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            modified = True
        return ir.passes.PassResult(model, modified)
