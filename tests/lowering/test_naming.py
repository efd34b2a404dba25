"""Every name the lowering invents is spelled in impq_onnx/lowering/naming.py and nowhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import impq_onnx.lowering
from impq_onnx.lowering import naming

LOWERING = Path(impq_onnx.lowering.__file__).parent


def _spellings() -> set[str]:
    """The fixed parts of every name naming.py builds (``"_quantized"``, ``"/weight_dq"``, ...)."""
    names = [*naming.weight_names("W").values(), *naming.weight_nodes("L").values(),
             *naming.activation_names("T").values(), *naming.activation_nodes("T").values(),
             *naming.bias_names("B", "O", "L").values(), naming.bits_vector("T"), naming.bitwidth("T"),
             naming.quant_node("T"), *naming.layer_input("T").values(), naming.expansion_prefix("N", "std"),
             naming.expansion_prefix("N", "encoding"), *naming.unpacked_names("W").values()]
    return {name[1:] for name in names}


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """The parts of f-strings, and whole string constants that are not identifiers (``read_lowered``)."""
    tree = ast.parse(path.read_text())
    parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and (id(node) in parts or not node.value.isidentifier()) and "\n" not in node.value]


def test_spellings_cover_every_invented_name():
    assert {"_quantized", "/weight_dq", "/quantize", "/clip", "_layer_input", "_bitwidth", "/weight_quant",
            "_impq_bits", "_channels", "/encoding", "/std"} <= _spellings()


def test_no_module_but_naming_spells_an_invented_name():
    spellings = _spellings()
    found = [f"{path.relative_to(LOWERING)}:{line}: {text!r}"
             for path in sorted(LOWERING.rglob("*.py")) if path.name != "naming.py"
             for line, text in _code_strings(path) if any(text.startswith(s) or text.endswith(s) for s in spellings)]
    assert found == []
