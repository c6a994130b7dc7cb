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
    ("families",),
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


MAX_PARAMETERS = 8  # a function that needs more takes a value (e.g. GenerationOptions) instead
MAX_FUNCTION_LINES = 60  # def line to last line, docstring included
MAX_MODULE_LINES = 500


def _library_functions(package: Path = PACKAGE):
    """(path, node) of every function outside cli/ (commands declare one parameter per option)."""
    for path in sorted(package.rglob("*.py")):
        if "cli" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
    return len(names) + (a.vararg is not None) + (a.kwarg is not None)


def test_no_library_function_takes_more_than_eight_parameters():
    heavy = [f"{p.relative_to(PACKAGE)}:{n.lineno} {n.name} takes {parameter_count(n)}"
             for p, n in _library_functions() if parameter_count(n) > MAX_PARAMETERS]
    assert not heavy, "\n".join(heavy)


def test_no_library_function_is_longer_than_sixty_lines():
    long = [f"{p.relative_to(PACKAGE)}:{n.lineno} {n.name} is {n.end_lineno - n.lineno + 1} lines"
            for p, n in _library_functions() if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


def test_no_library_module_is_longer_than_five_hundred_lines():
    big = [f"{p.relative_to(PACKAGE)} is {n} lines" for p in sorted(PACKAGE.rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not big, "\n".join(big)


def test_the_size_checks_find_a_planted_violation(tmp_path):
    pkg = tmp_path / "mixdiff_cli"
    (pkg / "core").mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (pkg / "core" / "big.py").write_text(f"def f(a, b, c, d, e, f, g, h, *rest):\n{body}\n")
    (pkg / "cli").mkdir()
    (pkg / "cli" / "cmd.py").write_text("def command(a, b, c, d, e, f, g, h, i, j):\n    pass\n")
    found = {(n.name, parameter_count(n), n.end_lineno - n.lineno + 1) for _, n in _library_functions(pkg)}
    assert found == {("f", 9, 62)}  # the cli/ command is not counted


# What only a model family may name: its classes, its components, its conditioning and config keys, its
# LoRA key prefixes. A string with whitespace is prose (help text, messages) and may name a family to
# users; comments are not code.
FAMILY_NAMES = frozenset({
    "UNet2DConditionModel", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "text_encoder_2", "tokenizer_2",
    "add_time_ids", "time_ids", "text_embeds", "pooled_prompt_embeds", "cross_attention_dim", "addition_embed_type",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim", "time_cond_proj_dim", "is_sdxl",
    "lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "model.diffusion_model.",
})
FAMILY_VALUES = frozenset({"sd", "sd1", "sd2", "sdxl"})  # a comparison with one of these is a family branch


def family_names_outside_families(package: Path = PACKAGE) -> list[str]:
    """`module:line name` for every family-specific name a module outside `families/` uses."""
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] == "families":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.alias):
                names = [node.name.rpartition(".")[2], node.asname or ""]
            elif isinstance(node, (ast.keyword, ast.arg)):
                names = [node.arg or ""]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and not any(c.isspace() for c in node.value):
                names = [node.value] + [n for n in FAMILY_NAMES if n.endswith(("_", ".")) and node.value.startswith(n)]
            elif isinstance(node, ast.Compare):
                names = [f"== {c.value!r}" for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in FAMILY_VALUES]
            found += [f"{rel.as_posix()}:{getattr(node, 'lineno', 0)} {n}" for n in names if n in FAMILY_NAMES or n.startswith("== ")]
    return found


def test_family_names_stay_inside_the_families():
    found = family_names_outside_families()
    assert not found, "\n".join(found)


PLANTED = '''def f(pipe, arch):
    """Help that names SDXL and its text_encoder_2 to users is prose."""
    if arch == "sdxl":
        return pipe.text_encoder_2
    return {"time_ids": 1}, "lora_unet_down_blocks"
'''


def test_the_family_check_finds_a_planted_violation(tmp_path):
    pkg = tmp_path / "mixdiff_cli"
    (pkg / "sampling").mkdir(parents=True)
    (pkg / "families").mkdir()
    (pkg / "families" / "sdxl.py").write_text("from diffusers import UNet2DConditionModel\nKEY = 'text_encoder_2'\n")
    (pkg / "sampling" / "engine.py").write_text(PLANTED)
    assert sorted(family_names_outside_families(pkg)) == [
        "sampling/engine.py:3 == 'sdxl'", "sampling/engine.py:4 text_encoder_2", "sampling/engine.py:5 lora_unet_",
        "sampling/engine.py:5 time_ids",
    ]
