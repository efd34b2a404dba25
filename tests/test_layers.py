"""The package's import structure: no import cycles, and each stage imports only the stages before it.

Every module of ``impq_onnx`` is read with ``ast`` (imports inside functions included), so a cycle
hidden in a function body counts as one. Stages, in data-flow order (a module may import its own
stage and the stages before it)::

    base (errors, files, config, runtime, outputs, run_lock, option_checks, events, stop_signals) < architectures < frontend < quant < data < engine
        < sensitivity < search < lowering < report < compression and the package API < cli (and cli_progress, interrupts)

``architectures`` (reference models built as ONNX graphs) imports nothing of the package; it sits
before ``frontend`` because it is where models come from. ``data`` imports ``frontend`` (the model
whose input and classes it checks) and nothing after it.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import impq_onnx

PACKAGE = Path(impq_onnx.__file__).parent

STAGES: tuple[tuple[str, ...], ...] = (
    ("errors", "files", "config", "runtime", "outputs", "run_lock", "option_checks", "events", "stop_signals"),
    ("architectures",),
    ("frontend",),
    ("quant",),
    ("data",),
    ("engine",),
    ("sensitivity",),
    ("search",),
    ("lowering",),
    ("report",),
    ("compress_config", "compression", "api", ""),  # "": the package itself (impq_onnx/__init__.py, the public API)
    ("cli", "cli_options", "cli_progress", "__main__", "interrupts"),  # interrupts: the entry point, signal handlers before the heavy imports
)

@dataclasses.dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module of the package
    line: int
    type_only: bool  # inside ``if TYPE_CHECKING:``: never executed, so no part of a cycle


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The package module that ``name`` (a module, or a name inside one) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    type_only = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.append(Import(module, target, node.lineno, node.lineno in type_only))
    return found


def stage_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    return next(level for level, names in enumerate(STAGES) if top in names)


def package_edges() -> dict[str, list[str]]:
    """Module -> the package modules it imports when run (type-only imports left out)."""
    return {m: sorted({i.target for i in imports_of(m) if not i.type_only}) for m in MODULES}


def cycles(edges: dict[str, list[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for module in edges:
        if module not in index:
            visit(module)
    return found


def test_every_module_has_a_stage() -> None:
    unplaced = []
    for module in MODULES:
        try:
            stage_of(module)
        except StopIteration:
            unplaced.append(module)
    assert unplaced == [], "add these modules' top-level name to STAGES"


def test_no_import_cycles() -> None:
    assert [sorted(c) for c in cycles(package_edges())] == []


def test_each_stage_imports_only_earlier_stages() -> None:
    backwards = [f"{i.source} (line {i.line}) imports {i.target}"
                 for module in MODULES for i in imports_of(module)
                 if stage_of(i.target) > stage_of(i.source)]
    assert backwards == []


def test_the_walk_sees_imports_inside_functions_and_finds_cycles() -> None:
    cli = imports_of("impq_onnx.cli")
    functions = [n for n in ast.walk(ast.parse(MODULES["impq_onnx.cli"].read_text())) if isinstance(n, ast.FunctionDef)]
    inside = {i.target for i in cli if any(f.lineno < i.line <= (f.end_lineno or 0) for f in functions)}
    assert {"impq_onnx.compression", "impq_onnx.frontend.canonical"} <= inside
    found = cycles({"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["e"]})
    assert found == [frozenset({"a", "b", "c"})]
