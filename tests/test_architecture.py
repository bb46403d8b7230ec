"""The architecture contract: the import-linter contracts in pyproject.toml (layers, no cycles, the package
facade), and a ceiling on imports of glimpse modules inside functions."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

# Imports of glimpse modules inside functions, allowed in src/glimpse (only where they carry their weight:
# an optional dependency, a heavy module kept off a hot import path). Lower it as they go; raise it only for
# a reason like today's: the CLI loads the model code (torch) only once its arguments and the port have been
# checked, and `glimpse --help` stays fast. 86 at the start of the restructuring (2026-12-03).
MAX_IMPORTS_INSIDE_FUNCTIONS = 31  # +1: glimpse.scaleout.serve, loaded only to serve on Ray

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
CONTRACTS = [c["id"] for c in tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]]


@pytest.mark.parametrize("contract", CONTRACTS)
def test_import_contract_is_kept(contract: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
        + ["--no-cache", "--no-logo", "--contract", contract, str(PYPROJECT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def imports_inside_functions(package: Path) -> list[str]:
    """`path:line` of every import of a glimpse module (absolute or relative) in a function body."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        lines = set()
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                lines.update(node.lineno for node in ast.walk(func) if _imports_glimpse(node))
        found += [f"{path.relative_to(package.parent)}:{line}" for line in sorted(lines)]
    return found


def _imports_glimpse(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "glimpse"
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "glimpse" for alias in node.names)
    return False


def test_imports_inside_functions_stay_under_the_ceiling():
    found = imports_inside_functions(ROOT / "src" / "glimpse")
    assert len(found) <= MAX_IMPORTS_INSIDE_FUNCTIONS, (
        f"{len(found)} imports of glimpse modules inside functions (ceiling {MAX_IMPORTS_INSIDE_FUNCTIONS}):\n"
        + "\n".join(found)
    )


def test_the_counter_sees_function_level_imports_only(tmp_path: Path):
    (tmp_path / "glimpse").mkdir()
    (tmp_path / "glimpse" / "m.py").write_text(
        "from glimpse import config\n"
        "import torch\n"
        "def f():\n"
        "    from glimpse.engine import llm\n"
        "    import torch\n"
        "    class C:\n"
        "        def g(self):\n"
        "            from . import errors\n"
        "            import glimpse.kernels\n"
    )
    assert imports_inside_functions(tmp_path / "glimpse") == [
        "glimpse/m.py:4",
        "glimpse/m.py:8",
        "glimpse/m.py:9",
    ]
