"""The package's dependency rules, read from its imports (ast): no cycles, and nothing below train/
imports train/. `docs/design.md` ("Map") says which folder owns what."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fsdp_qlora"
# Leaves: import nothing of the package, and anything may import them (error types, layout facts,
# fault injection for tests, the torch-free model table the config's alias defaults come from).
LEAVES = {"fsdp_qlora.errors", "fsdp_qlora.layout", "fsdp_qlora.faults", "fsdp_qlora.model.registry"}
# Layers, lowest first: a module may import its own layer, the leaves and the layers before it.
LAYERS = ["config", "data", "model", "peft", "distributed", "checkpoint", "metrics", "train", "cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """fsdp_qlora modules `path` imports, wherever in the file (function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("fsdp_qlora")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {dep for dep in imports_of(path) if dep in modules and dep != name} for name, path in modules.items()}


def layer_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "root"


def test_leaves_import_nothing_of_the_package():
    edges = graph()
    assert {leaf: edges[leaf] for leaf in LEAVES if edges[leaf]} == {}


def test_no_import_cycles():
    edges = graph()
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for dep in sorted(edges[node]):
            visit(dep)
        stack.pop()

    for node in sorted(edges):
        visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_dependencies_point_down():
    wrong = []
    for module, deps in graph().items():
        layer = layer_of(module)
        if layer not in LAYERS or module in LEAVES:
            continue
        allowed = set(LAYERS[:LAYERS.index(layer) + 1])
        wrong += [f"{module} imports {dep}" for dep in deps
                  if dep not in LEAVES and layer_of(dep) in LAYERS and layer_of(dep) not in allowed]
    assert not wrong, "imports against the layering " + " < ".join(LAYERS) + ": " + "; ".join(sorted(wrong))
