"""Which optional extra (pyproject.toml's [project.optional-dependencies]) brings each module the
base install lacks. The live loop, `bench`, `info` and `evaluate` need only the base install;
the other commands import their extra's modules when they run, and camface/cli.py turns a
missing one into one line that names the extra to install. The commands that need an extra
whatever their arguments (COMMAND_NEEDS) are checked before they start, so that they do not fail
after minutes of work or leave a half-made output folder; export, enroll and compare need one
only for a Keras or PyTorch model, and find out when they load it.

tests/test_packaging.py checks this table against pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import sys

from camface.errors import CamfaceError


class ExtraMissingError(CamfaceError):
    """A command needs an optional extra that is not installed (the message names it)."""


# top-level module name -> extra that installs it
EXTRA_OF_MODULE: dict[str, str] = {
    "tensorflow": "keras",
    "keras": "keras",
    "tf2onnx": "keras",
    "onnxconverter_common": "keras",
    "h5py": "keras",
    "torch": "torch",
    "onnxscript": "torch",
    "onnx_ir": "torch",
    "ray": "batch",
    "pyarrow": "batch",
    "starlette": "serve",
    "uvicorn": "serve",
    "websockets": "serve",
}

# command -> the modules it imports whatever its arguments; each entry is a tuple of alternatives,
# any one of which will do (uvicorn serves WebSockets with either library)
COMMAND_NEEDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "train": (("tensorflow",), ("keras",), ("tf2onnx",)),
    "guided": (("tensorflow",), ("keras",)),
    "batch": (("ray",), ("pyarrow",)),
    "serve": (("starlette",), ("uvicorn",), ("websockets", "wsproto")),
}


def _installed(module: str) -> bool:
    """Whether `module` (a top-level name) can be imported, without importing it."""
    if sys.modules.get(module, False) is None:  # None in sys.modules: imports of it fail
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False  # a finder that refuses the name


def check_command(command: str) -> None:
    """Raise ExtraMissingError naming the extra to install when `command` needs modules that are
    not installed (COMMAND_NEEDS); return quietly otherwise, and for every other command."""
    for alternatives in COMMAND_NEEDS.get(command, ()):
        if not any(_installed(module) for module in alternatives):
            names = " (or ".join(alternatives) + ")" * (len(alternatives) - 1)
            raise ExtraMissingError(f"camface {command} needs {names}, which is not installed: "
                                    f"pip install 'camface[{EXTRA_OF_MODULE[alternatives[0]]}]'")


def install_hint(exc: ModuleNotFoundError) -> str | None:
    """`needs X, which is not installed: pip install 'camface[EXTRA]'` where the missing module is
    one an extra brings and is indeed absent; None for any other (a missing base dependency, or a
    module inside an installed package: a broken install or a bug, which must not be disguised)."""
    if not exc.name:
        return None
    top = exc.name.split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None or _installed(top):
        return None
    return f"needs {top}, which is not installed: pip install 'camface[{extra}]'"
