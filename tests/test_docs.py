"""The README's Python section runs as written; the example notebook runs, shows its results,
and is kept in git without outputs."""

import argparse
import ast
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from realtime_helpers import write_clip

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "explain_a_photo.ipynb"


def readme_python() -> str:
    section = REPO.joinpath("README.md").read_text().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_python_section_runs_as_written(tmp_path, monkeypatch, astronaut_bgr):
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
    two = np.hstack([astronaut_bgr, cv2.resize(hopper, (427, 512), interpolation=cv2.INTER_AREA)])
    cv2.imwrite(str(tmp_path / "two_faces.jpg"), two)
    write_clip(tmp_path / "talk.mp4", [two] * 3)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_python(), "README.md (Python)", "exec"), namespace)
    annotated = cv2.imread(str(tmp_path / "annotated.png"))
    assert annotated.shape == two.shape and (annotated != two).any()
    assert len(namespace["maps"]) == 2 and namespace["maps"][0].method == "gradcam"
    assert len(namespace["record"]["faces"]) == 2 and namespace["record"]["index"] == 2


def test_example_notebook_is_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_example_notebook_runs_and_shows_its_results():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = {i: cell.outputs for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
    shown = [output.get("data", {}) for cell_outputs in outputs.values() for output in cell_outputs]
    bars = [data["text/html"] for data in shown if "text/html" in data]
    assert len(bars) == 1 and "heatmap hirescam" in bars[0] and "happy</span>" in bars[0]
    assert sum("image/png" in data for data in shown) == 1
    assert "'predicted_label': 'happy'" in str(shown)
    faces_per_frame = ast.literal_eval(shown[-1]["text/plain"])  # the sample clip, frame by frame
    assert len(faces_per_frame) == 10 and min(faces_per_frame) >= 1


def test_readme_speed_line_has_the_form_a_default_headless_run_prints(tmp_path, capsys):
    """The live section's example end-of-run line is what `camface live` prints with its
    defaults (the sample, --detect-every auto, recording), numbers and path aside."""
    from camface.cli import main

    example = re.search(r"`(Speed: [^`]*)`", REPO.joinpath("README.md").read_text()).group(1)
    head, path = example.rsplit(" ", 1)  # the recording's name ends the line
    pattern = re.sub(r"\d+(?:\\\.\d+)?", lambda _: r"\d+(?:\.\d+)?", re.escape(head))
    pattern += r" \S*" + re.escape(path)
    assert main(["live", "--source", "sample", "--no-show", "--max-frames", "24",
                 "--record", str(tmp_path / "out.mp4")]) == 0
    line = next(text for text in capsys.readouterr().err.splitlines() if text.startswith("Speed: "))
    assert re.fullmatch(pattern, line), (example, line)


def test_help_texts_name_only_flags_their_command_has():
    """A flag named in a subcommand's --help is one of its own, or quoted with backticks as
    another command's (`camface live --detector`): shared help texts (realtime/config.py FLAGS)
    must not send `serve` or `batch` users to a flag only `live` has."""
    from camface.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"live", "serve", "batch", "bench", "evaluate"} <= set(commands)
    foreign = []
    for name, command in commands.items():
        own = {flag for action in command._actions for flag in action.option_strings}
        for text in [action.help or "" for action in command._actions] + [command.description or "",
                                                                          command.epilog or ""]:
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", re.sub(r"`[^`]*`", "", text)):
                if flag not in own:
                    foreign.append(f"camface {name}: {flag} in {text!r}")
    assert not foreign, foreign


def test_readme_ranking_table_is_the_bundled_graphs_ranking():
    """The "Heatmap methods" table of the bundled graph's ranking shows what `camface info`
    prints from the graph: its order, and each score at the table's precision (a re-export
    that moves them must update the README)."""
    import onnx

    from camface.graph_spec import GraphInfo
    from camface.models import EMOTION_ONNX

    model = onnx.load(str(EMOTION_ONNX), load_external_data=False)
    ranking = GraphInfo.from_metadata({p.key: p.value for p in model.metadata_props}).ranking
    section = REPO.joinpath("README.md").read_text().split("\n## Heatmap methods\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+|-) \| `(\w+)`[^|]* \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", section, re.M)
    assert [name for rank, name, *_ in rows if rank != "-"] == ranking["ranking"]
    assert [name for rank, name, *_ in rows if rank == "-"] == ["random"]
    keys = ("deletion_auc", "insertion_auc", "average_drop_pct")
    wrong = [(name, key, shown, ranking["scores"][name][key])
             for _, name, *figures in rows for key, shown, step in zip(keys, figures, (1e-3, 1e-3, 0.1))
             if abs(float(shown) - ranking["scores"][name][key]) > 0.5 * step + 1e-4]  # printed rounded
    assert not wrong, wrong


FLAG = r"(?<![\w-])--[a-z][a-z0-9-]*"
NOT_CAMFACE_FLAGS = {"--head", "--working-dir",  # `ray start --head`, `ray job submit --working-dir`
                     "--use-file-for-fake-video-capture"}  # Chromium's fake camera


def _commands() -> dict[str, dict[str, argparse.Action]]:
    """camface subcommand -> {flag: its argparse action}."""
    from camface.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {name: {flag: action for action in command._actions for flag in action.option_strings}
            for name, command in commands.items()}


def _readme_sections() -> list[tuple[str, str]]:
    """(heading, text) of each `##` / `###` section of the README."""
    parts = re.split(r"\n(?=#{2,3} )", REPO.joinpath("README.md").read_text())
    return [(part.split("\n", 1)[0], part) for part in parts[1:]]


def _command_lines(text: str) -> list[str]:
    """The `camface CMD ...` commands a README text shows: its code blocks' lines (less their
    `#` comments) and its inline code spans, each cut where another command starts."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    lines = [line.split(" #")[0] for block in blocks for line in block.splitlines()] + spans
    return [command for line in lines for command in re.findall(r"camface (\w+.*?)(?=camface |$)", line, re.S)]


def test_readme_commands_use_only_their_commands_flags():
    """Every `camface CMD --flag ...` the README shows (code blocks, inline code) names flags that
    CMD's --help lists, and every other flag it names is one of some camface command (users copy
    them: a renamed or removed flag must take the README with it)."""
    commands = _commands()
    text = REPO.joinpath("README.md").read_text()
    wrong = []
    for line in _command_lines(text):
        name = line.split()[0]
        if name in commands:
            wrong += [f"camface {name} has no {flag}: {line.strip()!r}" for flag in re.findall(FLAG, line)
                      if flag not in commands[name]]
    every = set().union(*commands.values())
    wrong += [f"no camface command has {flag}" for flag in sorted(set(re.findall(FLAG, text)) - every - NOT_CAMFACE_FLAGS)]
    assert not wrong, wrong


def test_readme_defaults_are_the_commands_defaults():
    """A default the README states beside a flag (`--max-clients` (4), `--idle-timeout` (60 s),
    `--pace auto`, the default) is that flag's argparse default in the command(s) its section is
    about (the heading's `camface CMD`), or, in a section about no command, in one that has it."""
    commands = _commands()
    stated = r"`(--[a-z0-9-]+)(?: ([\w.]+))?`(?: \((\d+(?:\.\d+)?)(?: s)?\)|,? \(?the default)"
    wrong, seen = [], 0
    for heading, text in _readme_sections():
        about = [name for name in re.findall(r"`camface (\w+)`", heading) if name in commands] or list(commands)
        for flag, value, number in re.findall(stated, text):
            given = number or value
            defaults = [commands[name][flag].default for name in about if flag in commands[name]]
            seen += 1
            if not defaults or not any(str(d) == given or (number and d == float(number)) for d in defaults):
                wrong.append(f"{heading}: {flag} default {given!r}, argparse says {defaults}")
            elif about != list(commands) and any(str(d) != given and not (number and d == float(number))
                                                 for d in defaults):
                wrong.append(f"{heading}: {flag} default {given!r} in one command, argparse says {defaults}")
    assert seen >= 7 and not wrong, (seen, wrong)


def test_readme_gradient_free_growth_is_the_bundled_graphs():
    """"Heatmap methods" says how much Ablation-CAM's and Score-CAM's clones add to the bundled
    graph (`grew by A kB of nodes and B kB of constants (X -> Y MB)`): the graph less the nodes
    only those two outputs need, against the file (a re-export that changes them must update it)."""
    import onnx
    from onnx.utils import Extractor

    from camface.models import EMOTION_ONNX

    section = REPO.joinpath("README.md").read_text().split("\n## Heatmap methods\n", 1)[1].split("\n## ", 1)[0]
    nodes_kb, constants_kb, before_mb, after_mb = map(float, re.search(
        r"grew by (\d+) kB of nodes and (\d+) kB of constants \(([\d.]+) -> ([\d.]+) MB\)", section).groups())
    model = onnx.load(str(EMOTION_ONNX))
    kept = [o.name for o in model.graph.output if o.name not in ("ablationcam", "scorecam")]
    without = Extractor(model).extract_model([i.name for i in model.graph.input], kept)

    def parts(m: onnx.ModelProto) -> tuple[int, int, int]:
        return (m.ByteSize(), sum(n.ByteSize() for n in m.graph.node),
                sum(t.ByteSize() for t in m.graph.initializer))

    (size, nodes, constants), (size0, nodes0, constants0) = parts(model), parts(without)
    assert size == EMOTION_ONNX.stat().st_size
    shown = (before_mb, after_mb, nodes_kb, constants_kb)
    measured = (round(size0 / 1e6, 3), round(size / 1e6, 3), round((nodes - nodes0) / 1e3),
                round((constants - constants0) / 1e3))
    assert shown == measured, (shown, measured)
