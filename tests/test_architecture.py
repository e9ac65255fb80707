"""The layering of docs/architecture.md, checked on the source: imports point one way, the cheap
modules stay cheap, and only the command line speaks in flags."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "monarchify"
MODULES = sorted(PACKAGE.rglob("*.py"))
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")

# Modules the command line imports to build its help: no torch, no transformers at import.
LIGHT = [
    "__init__.py", "errors.py", "config.py", "report.py", "samples.py", "tsv.py", "atomic.py",
    "distill_config.py", "heal_config.py", "hf/registration.py", "glue/options.py", "glue/tasks.py", "glue/compress.py",
    "lm/__init__.py", "lm/options.py",
    "plots.py",
]


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def under(module: str, *roots: str) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


@pytest.mark.parametrize("path", [p for p in MODULES if rel(p).startswith("monarch/")], ids=rel)
def test_the_monarch_math_imports_nothing_but_itself(path):
    ours = {m for m in imports(path) if under(m, "monarchify")}
    assert all(under(m, "monarchify.monarch", "monarchify.errors") for m in ours), ours
    assert not any(under(m, "transformers") for m in imports(path))


@pytest.mark.parametrize("path", [p for p in MODULES if rel(p).startswith("pipeline/")], ids=rel)
def test_the_pipeline_knows_nothing_of_transformers_or_front_ends(path):
    bad = {m for m in imports(path) if under(m, "transformers", "monarchify.hf", "monarchify.glue", "monarchify.cli")}
    assert not bad


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
