"""The base install's promise: the live loop, `bench`, `info` and the Python API run without any
optional extra (no TensorFlow, torch, Ray, Starlette...), and every command that needs an extra
says in one line which one to install instead of a ModuleNotFoundError traceback. Also: every
third-party module the package imports is declared in pyproject.toml, as a base dependency or
in the extra camface/extras.py names for it."""

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import cv2
import numpy as np
import pytest

from camface.cli import SUBCOMMANDS
from camface.extras import COMMAND_NEEDS, EXTRA_OF_MODULE

sys.path.insert(0, str(Path(__file__).parent))
from realtime_helpers import write_clip  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EMOTION_KERAS = ROOT / "models" / "emotion" / "emotion_mini_xception_fer2013.hdf5"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
# distribution name where it is not the module's
DISTRIBUTION = {"cv2": "opencv-contrib-python", "PIL": "pillow", "onnxconverter_common": "onnxconverter-common",
                "onnx_ir": "onnx-ir"}

# `python -c BLOCK_EXTRAS ARGS...` runs `camface ARGS...` (or, with `--api` first, camface.load() on
# the sample) with every module of an optional extra unimportable, as on a base install (or those
# that $BLOCKED lists, comma-separated), and exits 3 if any of them got imported anyway.
BLOCK_EXTRAS = f"""
import os, sys
BLOCKED = os.environ.get('BLOCKED', {",".join(sorted(EXTRA_OF_MODULE))!r}).split(',')
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f'No module named {{name!r}} (blocked in this test)', name=name)
sys.meta_path.insert(0, Block())
if sys.argv[1:2] == ['--api']:
    import camface
    from camface.realtime.sample import SampleSource
    with camface.load() as cam:
        result = cam.explain(SampleSource().frame(0))
    assert result.faces, result
    code = 0
else:
    from camface.cli import main
    code = main(sys.argv[1:])
leaked = sorted({{m.split('.')[0] for m in sys.modules}} & set(BLOCKED))
if leaked:
    print('imported anyway:', leaked, file=sys.stderr)
    sys.exit(3)
sys.exit(code)
"""


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def _base_install(argv: list[str], cwd: Path, blocked: tuple[str, ...] = (), timeout: float = 300
                  ) -> subprocess.CompletedProcess:
    env = {**ENV, "BLOCKED": ",".join(blocked)} if blocked else ENV
    return subprocess.run([sys.executable, "-c", BLOCK_EXTRAS, *argv], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)


def test_each_modules_extra_installs_it():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module, extra in EXTRA_OF_MODULE.items():
        assert extra in extras, f"{module}: no extra {extra!r} in pyproject.toml"
        assert DISTRIBUTION.get(module, module).lower() in _requirement_names(extras[extra]), (module, extra)


def test_every_imported_module_is_declared():
    """Every third-party module imported anywhere in the installed package (at the top or inside a
    function) is a base dependency, or a module of the extra that camface/extras.py names."""
    folders = [folder for folder in PYPROJECT["tool"]["setuptools"]["package-dir"].values()]
    base = _requirement_names(PYPROJECT["project"]["dependencies"])
    undeclared = {}
    for folder in folders:
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("camface", "__future__"):
                        continue
                    if DISTRIBUTION.get(top, top).lower() not in base and top not in EXTRA_OF_MODULE:
                        undeclared.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not undeclared, undeclared


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, astronaut_bgr):
    """A clip, a photo, and a folder of photos of two people (three each)."""
    root = tmp_path_factory.mktemp("inputs")
    frames = [np.roll(astronaut_bgr, 4 * i, axis=1) for i in range(6)]
    write_clip(root / "clip.mp4", frames)
    cv2.imwrite(str(root / "astronaut.png"), astronaut_bgr)
    for person, image in (("ann", astronaut_bgr), ("bea", np.ascontiguousarray(astronaut_bgr[:, ::-1]))):
        (root / "people" / person).mkdir(parents=True)
        for i, scale in enumerate((0.8, 0.9, 1.0)):
            cv2.imwrite(str(root / "people" / person / f"{i}.jpg"), cv2.resize(image, None, fx=scale, fy=scale))
    (root / "model.pt2").write_bytes(b"not really a program")
    return root


@pytest.mark.parametrize("argv, extra", [
    (["export", str(EMOTION_KERAS), "-o", "{tmp}/out.onnx"], "keras"),
    (["export", "{in}/model.pt2", "-o", "{tmp}/out.onnx"], "torch"),
    (["guided", "{in}/astronaut.png"], "keras"),
    (["train", "{in}/people", "-o", "{tmp}/trained"], "keras"),
    (["enroll", "{in}/people", "--embedding-from", str(EMOTION_KERAS), "--preset", "emotion",
      "-o", "{tmp}/gallery.onnx"], "keras"),
    (["compare", "{in}/people/ann/0.jpg", "{in}/people/bea/0.jpg", "--embedding-from", str(EMOTION_KERAS),
      "--preset", "emotion"], "keras"),
    (["evaluate", "--sanity", "--keras", str(EMOTION_KERAS), "--frames", "20"], "keras"),
    (["batch", "{in}/clip.mp4", "-o", "{tmp}/batch"], "batch"),
    (["serve", "--port", "0"], "serve"),
], ids=lambda value: value if isinstance(value, str) else "-".join(value[:2]).replace("/", "_")[:40])
def test_a_command_without_its_extra_names_the_extra(argv, extra, inputs, tmp_path):
    argv = [a.replace("{in}", str(inputs)).replace("{tmp}", str(tmp_path)) for a in argv]
    run = _base_install(argv, tmp_path)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("camface: error:")]
    assert len(errors) == 1 and f"pip install 'camface[{extra}]'" in errors[0], run.stderr
    if argv[0] in COMMAND_NEEDS:  # refused before any work: no output folder half made
        assert errors == run.stderr.splitlines() and list(tmp_path.iterdir()) == [], run.stderr


def test_serve_without_a_websocket_library_is_refused_before_it_listens(tmp_path):
    """uvicorn without websockets or wsproto serves the page but cannot upgrade its WebSocket (it
    logs a warning per request): the camera page would stay blank."""
    run = _base_install(["serve", "--port", "0"], tmp_path, blocked=("websockets", "wsproto"), timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == ["camface: error: camface serve needs websockets (or wsproto), which is not "
                                       "installed: pip install 'camface[serve]'"]


def test_command_needs_table_names_modules_of_extras():
    for command, needs in COMMAND_NEEDS.items():
        assert command in SUBCOMMANDS, command
        assert all(alternatives[0] in EXTRA_OF_MODULE for alternatives in needs), command


def test_a_missing_module_that_no_extra_brings_is_not_disguised(monkeypatch):
    """A missing base dependency (or a typo in an import) stays a traceback: the hint would lie."""
    from camface import cli

    def broken(args):
        import camface_no_such_module  # noqa: F401

    monkeypatch.setattr(cli, "_available", lambda: {"live": type("M", (), {
        "configure": staticmethod(lambda parser: None), "main": staticmethod(broken)})})
    with pytest.raises(ModuleNotFoundError, match="camface_no_such_module"):
        cli.main(["live"])


@pytest.mark.parametrize("argv", [
    ["live", "--source", "sample", "--no-show", "--max-frames", "8", "--record", "out.mp4",
     "--snapshot-every", "4", "--snapshot-dir", "snaps"],
    ["info", str(ROOT / "models" / "emotion" / "emotion.onnx")],
    ["evaluate", "--frames", "20", "--steps", "4"],
    ["bench", "--source", "sample", "--frames", "3", "--warmup", "0"],
    ["--api"],
], ids=lambda argv: argv[0])
def test_base_install_commands_run_without_any_extra(argv, tmp_path):
    run = _base_install(argv, tmp_path)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("target", ["demo", "bench"])
def test_make_demo_and_bench_install_the_base_only(target, tmp_path):
    """They run the live loop, which needs no extra: a first `make demo` must not download
    TensorFlow, torch and Ray (gigabytes). A dry run (`make -n`) into a venv that does not exist."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    dry = subprocess.run(["make", "-n", "-B", f"VENV={tmp_path / 'venv'}", target], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert dry.returncode == 0, dry.stderr
    installs = [line for line in dry.stdout.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs and all(line.rstrip().endswith("-e .") for line in installs), dry.stdout
    assert f"{tmp_path / 'venv'}/bin/camface {'live' if target == 'demo' else 'bench'} --source sample" in dry.stdout


def test_every_python_folder_is_a_listed_package():
    """A subpackage left out of [tool.setuptools] packages works from the source tree and is
    missing from the wheel."""
    setup = PYPROJECT["tool"]["setuptools"]
    listed = set(setup["packages"])
    missing = set()
    for package, folder in setup["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            name = ".".join([package, *init.parent.relative_to(ROOT / folder).parts])
            if name not in listed:
                missing.add(name)
    assert not missing, sorted(missing)


def test_every_tracked_data_file_is_package_data():
    """Files the code reads at run time (bundled models, the sample photo, serve's page) install
    from a wheel only where [tool.setuptools.package-data] names them."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    setup = PYPROJECT["tool"]["setuptools"]
    folders = {folder: package for package, folder in setup["package-dir"].items()}
    tracked = subprocess.run(["git", "ls-files", *folders], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.split()
    left_out = []
    for file in (Path(name) for name in tracked if not name.endswith(".py")):
        # the deepest listed package holding the file, and the file's path inside it
        for parent in file.parents:
            package = next((p for p in setup["packages"] if _folder_of(p, folders) == parent), None)
            if package is not None:
                inside = file.relative_to(parent)
                break
        else:
            left_out.append(str(file))
            continue
        if not any(inside.match(pattern) and len(inside.parts) == len(Path(pattern).parts)
                   for pattern in setup["package-data"].get(package, [])):
            left_out.append(str(file))
    assert not left_out, left_out


def _folder_of(package: str, folders: dict[str, str]) -> Path | None:
    """The source folder of a listed package: its own package-dir entry, else its parent's plus
    the last part of its name."""
    by_package = {p: f for f, p in folders.items()}
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        if ".".join(parts[:cut]) in by_package:
            return Path(by_package[".".join(parts[:cut])], *parts[cut:])
    return None


def test_info_without_a_path_describes_the_bundled_graph(capsys, tmp_path, monkeypatch):
    """`camface live` ends with "`camface info` shows the ranking": after a pip install there is no
    models/ folder to name, so `camface info` alone describes the graph live runs by default."""
    from camface.cli import main as camface_main

    monkeypatch.chdir(tmp_path)
    assert camface_main(["info", str(ROOT / "models" / "emotion" / "emotion.onnx")]) == 0
    named = capsys.readouterr().out
    assert camface_main(["info"]) == 0
    assert capsys.readouterr().out == named and "method ranking (--method auto shows" in named


def test_default_output_folders_are_git_ignored():
    """What `camface live`/`serve` write where they run when no folder is given (snapshots on a
    key press, serve's recordings) stays out of a commit made in the checkout, as `make demo`'s
    demo-out/ does."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    import argparse

    from camface.realtime.config import LiveConfig
    from camface.serve import cli as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.configure(parser)
    defaults = [LiveConfig().snapshot_dir, parser.get_default("record_dir"), Path("demo-out")]
    for folder in defaults:
        probe = str(folder / "x" / "frame.png")
        assert subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT).returncode == 0, f"{probe} is not ignored"


def test_make_test_installs_every_extra(tmp_path):
    """`make test` (and CI's .ci/run) runs the whole suite: its environment has every extra."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    dry = subprocess.run(["make", "-n", "-B", f"VENV={tmp_path / 'venv'}", "test"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert dry.returncode == 0, dry.stderr
    installed = [re.search(r"-e '\.\[([^\]]*)\]'", line) for line in dry.stdout.splitlines() if "pip install" in line]
    extras = {name for found in installed if found for name in found.group(1).split(",")}
    assert extras == set(PYPROJECT["project"]["optional-dependencies"]), dry.stdout


def test_the_declared_license_ships_with_its_text():
    """pyproject declares Apache-2.0: the license files it names exist, are that license's text,
    and a wheel or sdist carries them (license-files)."""
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"], "no license-files: a wheel would carry no license text"
    for name in project["license-files"]:
        text = (ROOT / name).read_text(encoding="utf-8")
        assert "Apache License" in text and "Version 2.0, January 2004" in text, name
        assert "END OF TERMS AND CONDITIONS" in text, f"{name} is not the whole license"
