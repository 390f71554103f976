"""The benchmark scripts import each other by name (bench/ is their sys.path[0]); a name moved from one to another
broke `bench/scale.py` at its first line unnoticed, since no test runs the benches. Judged from the sources: every
name a bench script imports from a sibling script is defined at that sibling's top level."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


SCRIPTS = {path.stem: ast.parse(path.read_text(), filename=str(path)) for path in sorted(BENCH.glob("*.py"))}


def sibling_imports(tree: ast.Module) -> list[tuple[str, str]]:
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in SCRIPTS
            for alias in node.names]


def test_the_benches_import_each_other():
    assert sum(len(sibling_imports(tree)) for tree in SCRIPTS.values()) > 5  # the judge has something to judge


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_name_a_bench_imports_from_a_sibling_exists(script):
    missing = [f"{module}.{name}" for module, name in sibling_imports(SCRIPTS[script])
               if name not in top_level_names(SCRIPTS[module])]
    assert not missing, f"bench/{script}.py imports names its siblings do not define: {missing}"
