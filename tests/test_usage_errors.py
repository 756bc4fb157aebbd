"""A bad option value raises one UsageError, wherever it is checked, and camface/cli.py turns it
into the one error line `camface: error: ...` with exit code 2."""

import pytest

from camface.cli import main as camface_main
from camface.errors import CamfaceError, UsageError
from camface.realtime.config import LiveConfig


@pytest.mark.parametrize("argv, message", [
    (["live", "--source", "sample", "--no-show", "--alpha", "2"], r"--alpha must be in [0, 1], got 2.0"),
    (["live", "--source", "sample", "--show"], "--show needs a display"),
    (["serve", "--smooth", "1"], "--smooth must be in [0, 1), got 1.0"),
    (["serve", "--port", "70000"], "--port must be in 0..65535, got 70000"),
    (["serve", "--max-clients", "0"], "--max-clients must be >= 1, got 0"),
    (["batch", "in.mp4", "-o", "out", "--graph-actors", "0"], "--graph-actors must be >= 1, got 0"),
    (["batch", "in.mp4", "-o", "out", "--smooth", "0.5", "--segment-frames", "10"],
     "--segment-frames cannot be used with --smooth"),
    (["evaluate", "--steps", "1"], "--steps must be at least 2, got 1"),
    (["evaluate", "--margin", "-1"], "--margin must be in [0, 2], got -1.0"),
    (["live", "--margin", "inf"], "--margin must be in [0, 2], got inf"),
    (["live", "--record", "out.avi"], "--record out.avi: recordings are MP4 files; give a name ending in .mp4"),
    (["bench", "--frames", "1"], "--frames must be at least 2"),
    (["train", "data", "-o", "out", "--min-confidence", "2"], "--min-confidence must be in [0, 1], got 2.0"),
])
def test_bad_values_are_one_error_line_and_exit_2(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert camface_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"camface: error: {err[0][len('camface: error: '):]}"] and message in err[0], err


def test_a_config_built_in_code_raises_the_same_error():
    with pytest.raises(UsageError, match=r"--max-faces must be 1..32 \(the graph.s batch range\), got 0") as caught:
        LiveConfig(max_faces=0)
    assert isinstance(caught.value, CamfaceError) and isinstance(caught.value, ValueError)
