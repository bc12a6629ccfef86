"""The package's shape: no module is part of an import cycle (every import counts, lazy ones too, as
../shared/tools/import_cycles.py counts them), and the execution layer's assemblers are peers that touch no other
module's underscore names."""
import ast
import pathlib

import pytest

import streamconv

PACKAGE = pathlib.Path(streamconv.__file__).parent
EXECUTION = sorted((PACKAGE / "execution").glob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, known) -> set:
    """Modules of the package that `path` imports anywhere in its body (as tools/import_cycles.py counts them)."""
    name = _module_name(path)
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = ".".join(base[:len(base) - node.level + 1] + [node.module] if node.module else
                           base[:len(base) - node.level + 1]) if node.level else node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts and ".".join(parts) not in (name, "streamconv"):
                out.add(".".join(parts))
    return out


def _reaches(graph, start, goal) -> bool:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def _graph():
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return paths, {name: _imports(path, paths) for name, path in paths.items()}


def _cycles(graph) -> list:
    """Strongly connected components of more than one module (Tarjan), each sorted: the import cycles."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    """A cycle is a concept with two homes (docs/architecture.md): give it one home in a lower module instead of
    importing inside a function to dodge the cycle, which this test counts the same."""
    paths, graph = _graph()
    assert len(paths) > 50 and sum(map(len, graph.values())) > 200     # the graph was really read
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    """The zero above means something: a lazy import like the ones that used to tie fastpaths to staging is one."""
    _, graph = _graph()
    graph["streamconv.fs.fastpaths"] = graph["streamconv.fs.fastpaths"] | {"streamconv.output.staging"}
    # (one component: staging reaches fastpaths directly and through durable and ledger)
    assert [c for c in _cycles(graph) if {"streamconv.fs.fastpaths", "streamconv.output.staging"} <= set(c)]


@pytest.mark.parametrize("subpackage", ["execution", "planning.trainers"])
def test_no_import_cycle_through(subpackage):
    paths, graph = _graph()
    mine = [n for n in paths if n.startswith(f"streamconv.{subpackage}")]
    assert mine
    assert [n for n in mine if _reaches(graph, n, n)] == []


@pytest.mark.parametrize("path", EXECUTION, ids=lambda p: p.name)
def test_no_module_reaches_into_another_ones_private_names(path):
    """`ex._scratch` from gather.py was how the assemblers used the executor; a Workspace has public verbs."""
    tree = ast.parse(path.read_text())
    reached = [f"line {node.lineno}: .{node.attr}" for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
               and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]
    imported = [f"line {node.lineno}: {a.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for a in node.names if a.name.startswith("_")]
    assert reached + imported == []


# The layers, lowest first (docs/architecture.md). A module's layer is its folder; top-level modules are ground
# except the entry points.
LAYERS = ("ground", "fs", "source", "planning", "output", "execution", "hf", "verification", "runs", "entry")
GROUND = ("errors", "model", "dtypes", "sizes", "failpoints", "safetensors_format")


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "entry"
    if parts[1] in LAYERS:
        return parts[1]
    return "ground" if parts[1] in GROUND else "entry"


def test_every_module_has_a_layer_and_imports_point_down():
    paths, graph = _graph()
    folders = {n.split(".")[1] for n in paths if n.count(".") >= 2}
    assert folders <= set(LAYERS), f"a folder that is no layer: {sorted(folders - set(LAYERS))}"
    upward = sorted((m, t) for m, targets in graph.items() for t in targets
                    if LAYERS.index(layer_of(t)) > LAYERS.index(layer_of(m)))
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    _, graph = _graph()
    assert LAYERS.index(layer_of("streamconv.output.staging")) > LAYERS.index(layer_of("streamconv.source.io"))
    assert "streamconv.source.io" in graph and layer_of("streamconv.api") == "entry"


def test_start_up_imports_no_openssl():
    """`hashlib` maps OpenSSL (3.6 MiB of RSS), more than the predicted peak's slack: the modules a conversion
    imports at start-up import it only where it is used (planning/names, hf/meta_probe's cache)."""
    import subprocess
    import sys
    code = "import sys, streamconv.commands; print(sorted(m for m in ('hashlib', '_hashlib') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
