"""Imports run one way: each package of ``specdec`` imports only packages of lower layers, and no module
imports itself back through others (function-level imports count: a late import is still a dependency).

A lower layer must make sense without the ones above it: the drafters without the decoding engine, the cache
format without the LightningModules. A violation names the importing module and what it imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).parents[1] / "src"

# lowest first; a package may import its own modules and those of any earlier layer
LAYERS = [
    {"<root>", "sampling", "kernels"},
    {"targets"},
    {"drafters", "losses", "metrics"},
    {"data"},
    {"decoding"},
    {"export"},
    {"lightning"},
    {"planning"},
    {"callbacks"},
    {"demo"},
    {"cli"},
]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def imports_of(path: Path, module: str) -> set[str]:
    """``specdec`` modules that ``path`` imports anywhere in its body (``from x import y`` counts x, and x.y
    when that is a module)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "specdec")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] == "specdec":
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in (SOURCE / "specdec").rglob("*.py")}
    return {
        module: {m for m in imports_of(path, module) if m in paths and m != module} for module, path in paths.items()
    }


def test_every_package_is_in_a_layer():
    packages = {package_of(module) for module in import_graph()}
    assert packages <= set(RANK), f"packages without a layer: {sorted(packages - set(RANK))}"


def test_packages_import_only_lower_layers():
    violations = []
    for module, imported in sorted(import_graph().items()):
        source = package_of(module)
        for target in sorted(imported):
            destination = package_of(target)
            if destination != source and RANK[destination] >= RANK[source]:
                violations.append(f"{module} imports {target} ({destination} is not below {source})")
    assert not violations, "\n".join(violations)


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ re-exports its modules; "module → its own package" is the normal way back up
    edges = {m: {t for t in targets if not m.startswith(f"{t}.")} for m, targets in graph.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(" → ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)
