"""Which optional extra (pyproject.toml's [project.optional-dependencies]) brings each module the
base install lacks. The live loop, `bench`, `info` and `evaluate` need only the base install;
the other commands import their extra's modules when they run, and camface/cli.py turns a
missing one into one line that names the extra to install.

tests/test_packaging.py checks this table against pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import sys

# top-level module name -> extra that installs it
EXTRA_OF_MODULE: dict[str, str] = {
    "tensorflow": "keras",
    "keras": "keras",
    "tf2onnx": "keras",
    "onnxconverter_common": "keras",
    "matplotlib": "keras",
    "torch": "torch",
    "onnxscript": "torch",
    "onnx_ir": "torch",
    "ray": "batch",
    "pyarrow": "batch",
    "starlette": "serve",
    "uvicorn": "serve",
    "websockets": "serve",
}


def install_hint(exc: ModuleNotFoundError) -> str | None:
    """`needs X, which is not installed: pip install 'camface[EXTRA]'` where the missing module is
    one an extra brings and is indeed absent; None for any other (a missing base dependency, or a
    module inside an installed package: a broken install or a bug, which must not be disguised)."""
    if not exc.name:
        return None
    top = exc.name.split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None or (top in sys.modules and sys.modules[top] is not None):
        return None
    try:
        if importlib.util.find_spec(top) is not None:
            return None
    except (ImportError, ValueError):
        pass  # a finder that refuses the name: not importable, so not installed as far as we can use it
    return f"needs {top}, which is not installed: pip install 'camface[{extra}]'"
