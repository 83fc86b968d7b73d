"""The package layout is the architecture: lower layers never import higher ones, and nothing imports in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "genadapter"
# What each layer may import from the package besides itself and the core (the top-level modules).
ALLOWED = {
    "core": set(),
    "eval": set(),
    "train": set(),
    "serve": set(),
    "cli": {"eval", "train", "serve"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "core"


def package_imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules of genadapter imported by `path` (relative imports resolved); with top_level_only, only the imports
    run when the module is imported (not those inside functions or TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [f"{target}.{alias.name}" for alias in node.names]
            found |= {
                name if (PACKAGE.parent / name.replace(".", "/")).with_suffix(".py").exists() else target
                for name in names
            }
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name == "genadapter" or name.startswith("genadapter.")}


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def violations(imports: dict[str, set[str]]) -> list[str]:
    """'A imports B' for every import of a higher or sibling layer, from {module: the package modules it imports}."""
    broken = []
    for module, targets in imports.items():
        own = layer(module)
        for target in targets:
            if target != "genadapter" and layer(target) not in {own, "core"} | ALLOWED[own]:
                broken.append(f"{module} imports {target}")
    return broken


def test_lower_layers_never_import_higher_ones():
    broken = violations({module: package_imports(path) for module, path in all_modules().items()})
    assert not broken, "layer rule broken:\n" + "\n".join(broken)


def test_the_layer_check_sees_a_violation():
    """The checker itself must be able to fail."""
    assert violations({"genadapter.eval.probe": {"genadapter.train.data"}}) == [
        "genadapter.eval.probe imports genadapter.train.data"
    ]
    assert violations({"genadapter.state": {"genadapter.serve.store"}})
    assert not violations({"genadapter.cli.train": {"genadapter.train.loop", "genadapter.adapter"}})


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, …, a], or None."""
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> list[str] | None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in trail:
                return [*trail[trail.index(nxt) :], nxt]
            if nxt not in done:
                cycle = visit(nxt, [*trail, nxt])
                if cycle:
                    return cycle
        done.add(node)
        return None

    for module in sorted(graph):
        cycle = None if module in done else visit(module, [module])
        if cycle:
            return cycle
    return None


def test_no_import_cycles_at_import_time():
    modules = all_modules()
    graph = {
        m: {t for t in package_imports(p, top_level_only=True) if t in modules and t != m} for m, p in modules.items()
    }
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail
