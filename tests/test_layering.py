"""Layering of the package: no import cycle between its modules (imports under
``if TYPE_CHECKING:`` count too), no import upward across the layers below, and no code that
edits sys.path or loads a tool by file path (tools are thin wrappers of opensora_duca.cli)."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "opensora_duca"



def _modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the package."""
    mods = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            mods[".".join(rel)] = os.path.join(folder, name)
    return mods


def _imported(name: str, path: str, mods: dict) -> set[str]:
    """Modules of the package that module ``name`` imports, at any level of its code."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = os.path.basename(path) == "__init__.py"
    out = set()

    def longest_known(dotted):
        parts = dotted.split(".")
        while parts and ".".join(parts) not in mods:
            parts.pop()
        return ".".join(parts) if parts else None

    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src
                       for a in node.names]
        for t in targets:
            t = longest_known(t) if t.split(".")[0] == PACKAGE else None
            if t is None or t == name:
                continue
            out.add(t)
            # importing a.b.c runs a/__init__ and a/b/__init__ first, unless this module is
            # one of them or inside them (then they are already being imported)
            parts = t.split(".")
            for k in range(2, len(parts)):
                parent = ".".join(parts[:k])
                if parent in mods and not (name + ".").startswith(parent + "."):
                    out.add(parent)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imported(name, path, mods) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]):
    """One cycle as a list of modules [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_resolves_relative_and_function_level_imports():
    g = import_graph()
    assert "opensora_duca.registry" in g["opensora_duca.pipeline"]  # from .registry import
    assert "opensora_duca.utils.dtype" in g["opensora_duca.models.text_encoders"]
    # function-level: ``from ..data.synthetic import normalize_caption`` inside a method
    assert "opensora_duca.data.synthetic" in g["opensora_duca.models.text_encoders"]
    # ``from .. import parallel as sp`` names a subpackage
    assert "opensora_duca.parallel" in g["opensora_duca.models.stdit3"]
    # importing a submodule of another package runs that package's __init__
    assert "opensora_duca.models" in g["opensora_duca.cache.layouts.stdit3"]
    # a package importing its own submodules is not a cycle
    assert "opensora_duca.cache" not in g["opensora_duca.cache.manager"]


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Layers, lowest first: a module may import its own layer and those below, never one above.
# Top-level parts of the package, then the parts of cache/ (the plugin's core).
LAYERS = [
    {"utils", "registry"},
    {"data", "parallel"},
    {"models"},
    {"cache", "schedulers"},
    {"pipeline", "pipeline_v2"},
    {"config_check", "opensora_plugin", "eval"},
    {"bench"},
    {"cli", "__main__", ""},
]
CACHE_LAYERS = [
    {"plan"},
    {"calibrate", "policies"},
    {"state", "selection", "flops", "context"},
    {"layouts"},
    {"adaptive", "runs", "stats"},
    {"runner"},
    {"manager"},
    {"wrapper", ""},
]


def _rank(layers, part):
    for i, names in enumerate(layers):
        if part in names:
            return i
    raise AssertionError(f"{part!r} is in no layer of tests/test_layering.py: add it")


def upward_imports(graph, layers=LAYERS, prefix=PACKAGE + "."):
    """(importer, imported) pairs where a module imports from a layer above its own."""
    def part(mod):
        rest = mod[len(prefix):] if mod.startswith(prefix) else ""
        return rest.split(".")[0]
    bad = []
    for a, targets in graph.items():
        if not (a + ".").startswith(prefix):
            continue
        for b in targets:
            if (b + ".").startswith(prefix) and _rank(layers, part(b)) > _rank(layers, part(a)):
                bad.append((a, b))
    return sorted(bad)


def test_upward_imports_are_found():
    g = {"opensora_duca.models.x": {"opensora_duca.cache.y"}, "opensora_duca.cache.y": set()}
    assert upward_imports(g) == [("opensora_duca.models.x", "opensora_duca.cache.y")]


def test_no_upward_import():
    g = import_graph()
    assert upward_imports(g) == []
    assert upward_imports(g, CACHE_LAYERS, PACKAGE + ".cache.") == []


def test_no_sys_path_edits_or_tools_loaded_by_path():
    patterns = ("sys.path.insert", "sys.path.append", "spec_from_file_location")
    found = set()
    for sub in (PACKAGE, "tools", "tests", "configs"):
        for folder, _, files in os.walk(os.path.join(ROOT, sub)):
            for name in files:
                path = os.path.join(folder, name)
                if not name.endswith(".py") or os.path.samefile(path, __file__):
                    continue
                text = open(path, encoding="utf-8").read()
                if any(p in text for p in patterns):
                    found.add(os.path.relpath(path, ROOT))
    assert found == set()
