"""The public API type-checks with mypy, and its types reach a user's code.

The repository's folders install as camface.* subpackages (pyproject's package-dir), which mypy
cannot follow through the editable install: the test lays them out as installed, with links.
"""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
PUBLIC = ["camface/__init__.py", "camface/api.py", "camface/errors.py", "camface/realtime/results.py"]


def installed_layout(root: Path) -> Path:
    """root/camface with camface/'s files and the subpackage folders linked in; returns root."""
    package = root / "camface"
    package.mkdir()
    for path in (REPO / "camface").iterdir():
        if path.name != "__pycache__":
            (package / path.name).symlink_to(path)
    dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in dirs.items():
        if name.count(".") == 1:  # camface.realtime -> realtime/ (nested ones come with it)
            (package / name.split(".")[1]).symlink_to(REPO / folder)
    return root


def mypy(root: Path, *files: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                           "--cache-dir", str(root / ".mypy_cache"), *files],
                          cwd=root, env={"MYPYPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return installed_layout(tmp_path_factory.mktemp("typed"))


def test_public_api_type_checks(layout):
    done = mypy(layout, *PUBLIC)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues found in 4 source files" in done.stdout


def test_a_misuse_of_the_api_is_a_type_error(layout):
    (layout / "usage.py").write_text(
        "import numpy as np\n"
        "import camface\n"
        "with camface.load(method='hirescam') as cam:\n"
        "    result = cam.explain(np.zeros((8, 8, 3), np.uint8))\n"
        "    ok: dict = result.to_dict()\n"
        "    wrong: int = result\n")
    done = mypy(layout, *PUBLIC, "usage.py")
    assert done.returncode == 1
    assert 'usage.py:6: error: Incompatible types in assignment (expression has type "FrameResult"' in done.stdout
    assert "usage.py:5" not in done.stdout


def test_the_readme_example_type_checks(layout):
    """The README's Python example is what users copy: mypy accepts it as written (OpenCV's
    stubs type `cv2.imread` as returning None too)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("\n## Python\n"):]
    start = section.index("```python\n") + len("```python\n")
    example = section[start:section.index("\n```", start)]
    assert "camface.load(" in example and "cam.explain(frame)" in example
    (layout / "readme_example.py").write_text(example + "\n")
    done = mypy(layout, *PUBLIC, "readme_example.py")
    assert done.returncode == 0, done.stdout + done.stderr


def test_class_indices_type_check_as_the_api_takes_them(layout):
    """What explain and explain_crops accept at run time (tests/test_api.py), mypy accepts:
    a list of class indices, one per crop, as well as numpy integers and arrays."""
    (layout / "classes.py").write_text(
        "import numpy as np\n"
        "import camface\n"
        "with camface.load() as cam:\n"
        "    crops = np.zeros((2, 64, 64, 1), np.uint8)\n"
        "    best = cam.explain_crops(crops)[0].probs.argmax()\n"
        "    cam.explain(np.zeros((8, 8, 3), np.uint8), explained_class=np.int64(2))\n"
        "    cam.explain_crops(crops, class_index=[2, 5])\n"
        "    cam.explain_crops(crops, class_index=np.array([2, 5]))\n"
        "    cam.explain_crops(crops, class_index=np.int64(best))\n"
        "    cam.explain_crops(crops, class_index='2')\n")
    done = mypy(layout, *PUBLIC, "classes.py")
    assert done.returncode == 1
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith("classes.py:10: error: Argument \"class_index\""), done.stdout


def test_py_typed_ships_with_the_package():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in config["package-data"]["camface"]
    assert (REPO / "camface" / "py.typed").is_file()
