"""The layering of docs/architecture.md, checked on the source: imports point one way, the cheap
modules stay cheap, and only the command line speaks in flags."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "monarchify"
MODULES = sorted(PACKAGE.rglob("*.py"))
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")

# Modules the command line imports to build its help: no torch, no transformers at import.
LIGHT = [
    "__init__.py", "errors.py", "version.py", "config.py", "report.py", "samples.py", "tsv.py", "atomic.py",
    "distill_config.py", "heal_config.py", "hf/registration.py", "glue/options.py", "glue/tasks.py", "glue/compress.py",
    "lm/__init__.py", "lm/options.py",
    "plots.py", "manifest.py", "training.py",
]


LAYERS = (
    ("monarchify.errors", "monarchify.version", "monarchify.tsv", "monarchify.report", "monarchify.distributed"),
    ("monarchify.config", "monarchify.atomic", "monarchify.samples", "monarchify.distill_config",
     "monarchify.heal_config", "monarchify.model_inputs", "monarchify.plots", "monarchify.manifest",
     "monarchify.training"),
    ("monarchify.monarch",),
    ("monarchify.bench",),
    ("monarchify.pipeline",),
    ("monarchify.distill", "monarchify.heal", "monarchify.gradual"),
    ("monarchify.hf",),
    ("monarchify.glue",),
    ("monarchify.lm",),
    ("monarchify",),
    ("monarchify.cli",),
)
"""docs/architecture.md's layers, bottom first: a module imports only from its own layer and the
ones below (the root package, which registers the transformers plug-in, sits above ``hf/``)."""


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


OURS = {module_name(path): path for path in MODULES}


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (a function-level import
    is still a dependency: it only runs later). Relative imports are made absolute, and
    ``from package import name`` counts as importing ``package.name`` when that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    here = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in OURS else base)
    return found


@functools.cache
def graph() -> dict[str, set[str]]:
    """monarchify's modules, each with the modules of monarchify it imports."""
    return {name: {m for m in imports(path) if m in OURS and m != name} for name, path in OURS.items()}


def reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    """Every module loading ``start`` can load, ``start`` included."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges[name])
    return seen


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for other in sorted(edges[name]):
            if other not in index:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in stack:
                low[name] = min(low[name], index[other])
        if low[name] == index[name]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == name:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in sorted(edges):
        if name not in index:
            visit(name)
    return found


def layer(module: str) -> int:
    """The layer of ``module``: the most specific entry of :data:`LAYERS` it falls under."""
    matches = [(len(root), i) for i, roots in enumerate(LAYERS) for root in roots
               if under(module, root) and (root != "monarchify" or module == root)]
    return max(matches)[1] if matches else -1


def under(module: str, *roots: str) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


def external(modules: set[str]) -> set[str]:
    """What the given modules of monarchify import from outside it."""
    return {m for name in modules for m in imports(OURS[name]) if not under(m, "monarchify")}


def documented_layers() -> list[set[str]]:
    """The layers drawn in docs/architecture.md, bottom first, as module names."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    drawing = text.split("## What each module owns", 1)[1].split("```")[1]
    layers = []
    for line in drawing.strip().splitlines()[::-1]:
        names = re.split(r"\s{2,}", line.strip())[0].split(", ")
        layers.append({"monarchify" if name.startswith("__init__.py") else f"monarchify.{name.rstrip('/')}" for name in names})
    return layers


def test_the_documented_layers_are_the_checked_ones():
    assert documented_layers() == [set(roots) for roots in LAYERS]


def test_no_module_loads_itself_back():
    """An import cycle, even through an import inside a function, means two layers each need the
    other: the one that hid its import only works while the other is already loaded."""
    assert cycles(graph()) == []


def test_the_cycle_finder_sees_a_cycle_hidden_in_a_function():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(OURS))
def test_every_module_has_a_layer(name):
    assert layer(name) >= 0, f"{name} is in no layer of LAYERS (and of docs/architecture.md)"


@pytest.mark.parametrize("name", sorted(OURS))
def test_imports_only_go_down(name):
    """Top-level and function-level imports alike point to the module's own layer or below."""
    upward = {m for m in graph()[name] if layer(m) > layer(name)}
    assert not upward, f"{name} (layer {layer(name)}) imports {sorted(upward)} from above"


@pytest.mark.parametrize("path", [p for p in MODULES if rel(p).startswith("monarch/")], ids=rel)
def test_the_monarch_math_imports_nothing_but_itself(path):
    loads = reachable(module_name(path), graph())
    assert all(under(m, "monarchify.monarch", "monarchify.errors") for m in loads), loads
    assert not any(under(m, "transformers") for m in external(loads))


@pytest.mark.parametrize("path", [p for p in MODULES if rel(p).startswith("pipeline/")], ids=rel)
def test_the_pipeline_knows_nothing_of_transformers_or_front_ends(path):
    """Followed through every module it loads, at the top or inside a function."""
    loads = reachable(module_name(path), graph())
    assert not {m for m in loads if under(m, "monarchify.hf", "monarchify.glue", "monarchify.lm", "monarchify.cli")}
    assert not {m for m in external(loads) if under(m, "transformers")}


@pytest.mark.parametrize("path", [p for p in MODULES if not rel(p).startswith("cli/")], ids=rel)
def test_nothing_imports_the_command_line(path):
    assert not any(under(m, "monarchify.cli") for m in imports(path))


@pytest.mark.parametrize("name", LIGHT)
def test_light_modules_import_no_torch_or_transformers_at_load(name):
    heavy = {m for m in imports(PACKAGE / name, top_level_only=True) if under(m, "torch", "transformers", "datasets")}
    assert not heavy


def docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


COMMAND_ADVICE = {"STORED_METHOD"}
"""Module-level strings that are a shell command for someone outside monarchify's API (stock
transformers without monarchify, hf/plugin.py): a command needs its flags."""


def command_advice(tree: ast.AST) -> set[int]:
    return {
        id(node.value) for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        and any(isinstance(t, ast.Name) and t.id in COMMAND_ADVICE for t in node.targets)
    }


@pytest.mark.parametrize("path", [p for p in MODULES if not rel(p).startswith("cli/")], ids=rel)
def test_only_the_command_line_names_flags(path):
    """Library errors and saved reports speak of the recipe (field names), never of flags."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = docstrings(tree) | command_advice(tree)
    flags = [
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip and FLAG.search(node.value)
    ]
    assert not flags
