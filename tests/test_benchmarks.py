"""The scripts in benchmarks/ still fit the product: every name they import from camface (or from
the helpers next to them in benchmarks/ and tests/) exists, including imports made inside
functions, and each script's `--help` runs. They are not run here (they time things); peer-only
imports (pytorch-grad-cam, timm, torchvision) are never resolved."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(REPO.joinpath("benchmarks").glob("*.py"))
LOCAL = {path.stem for path in SCRIPTS} | {path.stem for path in REPO.joinpath("tests").glob("*_helpers.py")}


def project_imports(script: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) for each `from camface... import name` or `from <local helper> import
    name` anywhere in the script."""
    found = []
    for node in ast.walk(ast.parse(script.read_text(), str(script))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "camface" or node.module in LOCAL:
                found += [(node.lineno, node.module, alias.name) for alias in node.names]
    return found


def test_benchmarks_found():
    assert len(SCRIPTS) >= 10 and any(project_imports(script) for script in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_benchmark_imports_resolve(script, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    missing = []
    for line, module_name, name in project_imports(script):
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ImportError:
                missing.append(f"{script.name}:{line}: {module_name} has no {name}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_benchmark_help_runs(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")
