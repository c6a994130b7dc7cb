"""The package's shape: its import graph has no cycle, and each layer imports only the layers below it
(docs/ARCHITECTURE.md draws them). Every import counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import mixdiff_cli

PACKAGE = Path(mixdiff_cli.__file__).parent

# lowest first; a module may import its own layer and the layers before it
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("catalog",),
    ("models",),
    ("routing",),
    ("experts",),
    ("sampling",),
    ("training",),
    ("evaluation",),
    ("demo", "testing"),
    ("cli", "__main__"),
]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the mixdiff modules it imports (anywhere in the file, TYPE_CHECKING included)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in modules:  # `from pkg import module` or a name in pkg
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("mixdiff_cli"):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the package root (version only)
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS and docs/ARCHITECTURE.md")


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "mixdiff_cli"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "core" / "b.py").write_text("from mixdiff_cli.core import a\n")
    graph = import_graph(pkg)
    assert graph["mixdiff_cli.core.a"] == {"mixdiff_cli.core.b"}
    assert find_cycle(graph) == ["mixdiff_cli.core.a", "mixdiff_cli.core.b", "mixdiff_cli.core.a"]


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_layers_import_only_downwards():
    bad = [
        f"{a} (layer {LAYERS[layer_of(a)][0]}) imports {b} (layer {LAYERS[layer_of(b)][0]})"
        for a, targets in import_graph().items() for b in targets if layer_of(b) > layer_of(a)
    ]
    assert not bad, "\n".join(bad)


def test_core_imports_nothing_else_of_mixdiff():
    graph = import_graph()
    for module, targets in graph.items():
        if layer_of(module) == 0:
            assert all(layer_of(t) <= 0 for t in targets), (module, targets)


MAX_PARAMETERS = 12  # a function that needs more takes a value (e.g. GenerationOptions) instead


def test_no_library_function_takes_more_than_a_dozen_parameters():
    heavy = []
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue  # commands declare one parameter per option
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                if len(names) > MAX_PARAMETERS:
                    heavy.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} takes {len(names)}")
    assert not heavy, "\n".join(heavy)
