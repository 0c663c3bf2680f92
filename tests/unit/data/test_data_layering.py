"""The data modules import each other one way only, at module level (no cycle hidden in a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import lmlab.data

DATA = Path(lmlab.data.__file__).parent


def _lmlab_imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmlab"):
            found.append((node.lineno, node.module or ""))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("lmlab")]
    return found


def test_no_function_level_imports_of_lmlab_in_data():
    inside = []
    for path in sorted(DATA.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [(path.name, line, module) for line, module in _lmlab_imports(node)]
    assert inside == []


def test_mixture_and_cache_never_import_pipeline():
    for name in ("mixture.py", "cache.py"):
        modules = {module for _, module in _lmlab_imports(ast.parse((DATA / name).read_text()))}
        assert "lmlab.data.pipeline" not in modules, name
    cache_imports = {module for _, module in _lmlab_imports(ast.parse((DATA / "cache.py").read_text()))}
    assert "lmlab.data.mixture" not in cache_imports
