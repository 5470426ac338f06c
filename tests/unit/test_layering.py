"""One-way layering (operator -> llm2llm <- jobs), checked by import-linter, plus what it cannot see."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_import_contracts_are_kept():
    exe = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(exe)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


def test_operator_never_imports_ray_train():
    # import-linter cannot forbid a subpackage of an external package; walk the operator's imports.
    offenders = []
    for path in (REPO / "operator" / "llm2llm_operator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names if n == "ray.train" or n.startswith("ray.train.")]
    assert offenders == []


def test_the_operator_process_loads_no_data_libraries():
    # Its memory is a bar (< 250 MB with 200 runs, docs/reliability.md section 4): pyarrow and numpy alone were
    # ~45 MiB of it, and the operator reads JSON markers, never a table. Checked in a fresh interpreter.
    code = ("import sys, llm2llm_operator.__main__; "
            "print(','.join(m for m in ('pyarrow', 'numpy', 'pandas', 'ray', 'torch', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""
