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
    (["live", "--record", "out.mp4", "--snapshot-dir", "./out.mp4", "--snapshot-every", "1"],
     "--record out.mp4 and --snapshot-dir out.mp4 name the same path; give each its own"),
    (["live", "--record", "out.avi"], "--record out.avi: recordings are MP4 files; give a name ending in .mp4"),
    (["bench", "--frames", "1"], "--frames must be at least 2"),
    # "--repeats must be >= 1 and --batches within 1..32", "--frames and --every must be >= 1": which one?
    (["bench", "--compare-heads", "--batches", "1", "100"], "--batches must be 1..32 (the graph's batch range), "
                                                           "got [1, 100]"),
    (["bench", "--compare-heads", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["evaluate", "--frames", "0"], "--frames must be >= 1, got 0"),
    (["evaluate", "--every", "-2"], "--every must be >= 1, got -2"),
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


@pytest.mark.parametrize("argv, message", [
    (["live", "--source", "nope.mp4", "--no-show"], "source not found: nope.mp4"),
    (["live", "--source", "empty", "--no-show"], "in folder empty"),
    (["live", "--source", "notes", "--no-show"], "in folder notes"),
    (["live", "--source", "sample", "--no-show", "--snapshot-every", "1", "--snapshot-dir", "a_file"],
     "cannot write snapshots to a_file: it is a file"),
    (["live", "--source", "0", "--loop", "--no-show"],
     "--loop plays files, folders and the sample again; --source 0 is a camera (leave out --loop)"),
    (["live", "--source", "sample", "--no-show", "--record", "out.xyz"],
     "--record out.xyz: recordings are MP4 files; give a name ending in .mp4"),
    (["live", "--source", "sample", "--no-show", "--record", "out"],
     "--record out: recordings are MP4 files; give a name ending in .mp4"),
    (["live", "--source", "sample", "--no-show", "--record", "nowhere/out.mp4"],
     "cannot write nowhere/out.mp4: folder nowhere does not exist"),
    (["batch", "in.mp4", "-o", "a_file"], "cannot write to output folder a_file: it is a file"),
    (["train", "data", "-o", "out", "--weights", "empty"], "--weights empty: a folder, not a weights file (use "
                                                           "imagenet, none or a path"),  # "no such file"
    (["train", "data", "-o", "a_file"], "cannot write to OUT_DIR a_file: it is a file; give a folder"),  # "File exists"
    (["evaluate", "--source", "nope.mp4", "--sanity"], "--source: source not found: nope.mp4"),
    (["evaluate", "--source", "empty"], "--source: no images (.bmp"),
    # a file that is not a video: said once it was read, after the model (export: after the build)
    (["evaluate", "--source", "a_file"], "--source: cannot open video file a_file: not a video OpenCV can decode"),
    (["export", "m.keras", "-o", "g.onnx", "--int8", "--calibration", "a_file"],
     "--calibration: cannot open video file a_file: not a video"),
    (["bench", "--compare-int8", "--calibration", "a_file"], "--calibration: cannot open video file a_file"),
    # live said it after its model had loaded, bench without the flag
    (["live", "--source", "a_file", "--no-show"], "--source: cannot open video file a_file: not a video OpenCV "
                                                  "can decode"),
    (["bench", "--source", "a_file"], "--source: cannot open video file a_file: not a video OpenCV can decode"),
    # a camera as calibration: 'camera 0 could not be opened' after the build (export) or the model (bench)
    (["export", "m.keras", "-o", "g.onnx", "--calibration", "0"], "--calibration: 0 is a camera index; calibration "
                                                                 "needs a video file or a folder of images"),
    (["bench", "--compare-int8", "--calibration", "1"], "--calibration: 1 is a camera index; calibration needs"),
    # a stream URL as calibration: taken for a live source, opened (or refused) only after the build
    (["export", "m.keras", "-o", "g.onnx", "--calibration", "rtsp://admin:pw@cam/stream"],
     "--calibration: rtsp://***@cam/stream is a stream URL; calibration needs a video file or a folder of images "
     "(or 'sample', the bundled clip), not a stream"),
    (["export", "m.keras", "-o", "g.onnx", "--int8", "--no-rank", "--calibration", "udp://0.0.0.0:5000"],
     "--calibration: udp://0.0.0.0:5000 is a stream URL; calibration needs a video file"),
    (["bench", "--compare-int8", "--calibration", "rtmp://example.com/live/clip"],
     "--calibration: rtmp://example.com/live/clip is a stream URL; calibration needs a video file"),
    # blank: '--source: --source is empty' (live, evaluate), '--calibration: --source is empty' (export)
    (["live", "--source", " ", "--no-show"], "error: --source is empty (expected a camera index, a video file,"),
    (["evaluate", "--source", " "], "error: --source is empty (expected a camera index"),
    (["export", "m.keras", "-o", "g.onnx", "--calibration", " "], "error: --calibration is empty (expected a video "
                                                                  "file, a folder of images or 'sample')"),
    (["evaluate", "--methods", "gradcam,nosuch"], "unknown method nosuch; choose from all, gradcam,"),
    (["evaluate", "--sanity", "--keras", "nope.keras"], "--keras: model file not found: nope.keras"),
    (["evaluate", "--sanity", "--keras", "empty"], "--keras: empty is a folder, not a model file"),  # "not found"
    (["bench", "--baseline", "keras", "--keras-model", "nope.keras"], "--keras-model: model file not found: nope.keras"),
    (["bench", "--compare-int8", "--calibration", "nope"], "--calibration: source not found: nope"),
    # what --source takes was offered ('expected a camera index, ...', 'camera indices are 0, 1, ...')
    (["export", "m.keras", "-o", "g.onnx", "--calibration", "nope"], "--calibration: source not found: nope (expected "
                                                                    "a video file, a folder of images or 'sample')"),
    (["bench", "--compare-int8", "--calibration", "-1"], "--calibration: source not found: -1 (expected a video file,"),
    (["export", "m.keras", "-o", "g.onnx", "--calibration", "/dev/null"],
     "--calibration: source /dev/null is neither a video file nor a folder of images (a device or a pipe; expected a "
     "video file, a folder of images or 'sample')"),
    (["bench", "--backbone", "resnet50", "--backbone-size", "16"],
     "--backbone-size must be at least 32 (the Keras backbones' smallest input), got 16"),
    (["compare", "nope.png", "a_file", "--model", "m.onnx", "--preset", "arcface"], "cannot read the photo nope.png"),
    (["compare", "a_file", "a_file", "--model", "m.onnx", "--preset", "arcface"], "cannot read the photo a_file"),
    (["compare", "empty", "a_file", "--model", "m.onnx", "--preset", "arcface"],
     "cannot read the photo empty: it is a folder; give an image file"),  # "no such file"
    (["train", "data", "-o", "out", "--learning-rate", "0"], "--learning-rate must be a finite number > 0, got 0.0"),
    (["train", "data", "-o", "out", "--fine-tune-learning-rate", "nan"],
     "--fine-tune-learning-rate must be a finite number > 0, got nan"),
    # an unset shell variable listened on every interface
    (["serve", "--host", ""], "--host is empty; give an address: 127.0.0.1 (this machine only, the default) or "
                              "0.0.0.0 (every interface)"),
    (["train", "data", "-o", "out", "--seed", "-1"], "--seed must be 0..4294967295, got -1"),
    # OpenCV's out-of-memory traceback as the first photo was cropped
    (["train", "data", "-o", "out", "--input-size", "100000"], "--input-size must be 32..1024 (the backbones need "
                                                               "32+; they were trained at 224), got 100000"),
    (["train", "data", "-o", "out", "--input-size", "16"], "--input-size must be 32..1024"),
    (["train", "data", "-o", "out", "--seed", str(2 ** 32)], "--seed must be 0..4294967295, got 4294967296"),
    (["live", "--graph-threads", "5000000000"], "--graph-threads must be 0 (all cores) .. 1024, got 5000000000"),
    (["evaluate", "--graph-threads", "1025"], "--graph-threads must be 0 (all cores) .. 1024, got 1025"),
    (["serve", "--graph-threads", str(2 ** 64)], "--graph-threads must be 0 (all cores) .. 1024"),
    (["bench", "--compare-int8", "--int8-threads", "1", "5000000000"], "--int8-threads must be 1..1024, got [1, "),
    (["export", "m.keras", "-o", "g.onnx", "--rank-seconds", "nan"], "--rank-seconds must be >= 0 (0 = no limit), got nan"),
    (["enroll", "people", "--model", "m.onnx", "-o", "g.onnx", "--preset", "arcface", "--rank-seconds", "nan"],
     "--rank-seconds must be >= 0 (0 = no limit), got nan"),
])
def test_bad_values_are_refused_before_any_model_loads(argv, message, capsys, monkeypatch, tmp_path):
    """Values each command checked only after its model had loaded (TensorFlow's with --sanity
    or a Keras embedder), after bench's live rows had run, or never (a learning rate of 0 trained
    for every epoch; a negative backbone size was Keras' traceback): refused now before any model
    loads, in one error line. `camface live` on a folder without images, and `--loop` with a
    camera, said so only after loading its models. A --graph-threads (or --int8-threads) past
    2**31 - 1 was ONNX Runtime's TypeError traceback as the graph loaded, and a training --seed
    of 2**32 or more Keras' ValueError traceback once every photo was cropped. `serve --host ""`
    listened on every interface. `batch -o A_FILE` said so after its model had loaded."""
    import camface.api
    import camface.export.gallery
    import camface.realtime.bench.rows

    def no_model(*args, **kwargs):
        pytest.fail("a model was loaded (or a row run) before the options were checked")

    for owner, name in ((camface.api, "load"), (camface.export.gallery, "load"),
                        (camface.realtime.bench.rows, "run_live")):
        monkeypatch.setattr(owner, name, no_model)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a photo")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()  # a folder with a file, but no image
    (tmp_path / "notes" / "read-me.txt").write_text("not an image")
    assert camface_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("camface: error: ") and message in err[0], err


EMPTY = "the value is empty; give a path to write"


@pytest.mark.parametrize("argv, said", [
    (["live", "--record", ""], f"--record: {EMPTY}"),
    (["live", "--snapshot-dir", ""], f"--snapshot-dir: {EMPTY}"),
    (["serve", "--record-dir", ""], f"--record-dir: {EMPTY}"),
    (["batch", "in.mp4", "-o", ""], f"-o/--out: {EMPTY}"),
    (["batch", "in.mp4", "--out="], f"-o/--out: {EMPTY}"),
    (["evaluate", "--json", ""], f"--json: {EMPTY}"),
    (["evaluate", "--plot", ""], f"--plot: {EMPTY}"),
    (["bench", "--json", ""], f"--json: {EMPTY}"),
    (["bench", "--work-dir", ""], f"--work-dir: {EMPTY}"),
    (["export", "m.keras", "-o", ""], f"-o/--output: {EMPTY}"),
    (["enroll", "people", "--model", "m.onnx", "-o", ""], f"-o/--output: {EMPTY}"),
    (["compare", "a.png", "b.png", "--model", "m.onnx", "-o", ""], f"-o/--output: {EMPTY}"),
    (["guided", "snapshots", "-o", ""], f"-o/--output: {EMPTY}"),
    (["train", "data", "-o", ""], f"-o/--out-dir: {EMPTY}"),
    # a file named as a folder: Path() dropped the separator and wrote out.mp4
    (["live", "--record", "out.mp4/"], "--record: 'out.mp4/' ends with '/', a folder; give a file"),
    (["evaluate", "--json", "out.json/"], "--json: 'out.json/' ends with '/', a folder; give a file"),
    (["evaluate", "--plot", "curves.png/"], "--plot: 'curves.png/' ends with '/', a folder; give a file"),
    (["bench", "--json", "rows.json/"], "--json: 'rows.json/' ends with '/', a folder; give a file"),
    (["export", "m.keras", "-o", "cam.onnx/"], "-o/--output: 'cam.onnx/' ends with '/', a folder; give a file"),
    (["enroll", "people", "--model", "m.onnx", "-o", "g.onnx/"],
     "-o/--output: 'g.onnx/' ends with '/', a folder; give a file"),
    (["compare", "a.png", "b.png", "--model", "m.onnx", "-o", "why.png/"],
     "-o/--output: 'why.png/' ends with '/', a folder; give a file"),
])
def test_an_empty_output_path_or_a_file_named_as_a_folder_is_a_usage_error(argv, said, capsys, monkeypatch,
                                                                             tmp_path):
    """`--record ""` (a shell variable left unset) became Path("") = ".": "--record .: ..." named a
    path never given, and a folder output (`batch -o ""`, `--snapshot-dir ""`, `serve --record-dir
    ""`, `train -o ""`) was the working folder, written into; `--record out.mp4/` recorded to
    out.mp4. argparse refuses both, naming the option, with its usage and exit 2, before anything
    runs."""
    import camface.api

    monkeypatch.setattr(camface.api, "load", lambda *a, **k: pytest.fail("the command ran"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        camface_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"error: argument {said}" in err
    assert list(tmp_path.iterdir()) == []  # nothing written in the working folder


def test_a_recording_named_as_a_folder_in_code_is_refused():
    with pytest.raises(UsageError, match="^--record out.mp4/: recordings are MP4 files"):
        LiveConfig(record="out.mp4/")


@pytest.mark.parametrize("field, message", [("record", "--record is empty; give a file name ending in .mp4"),
                                            ("snapshot_dir", "--snapshot-dir is empty; give a folder")])
def test_an_empty_output_path_in_code_names_the_option(field, message):
    """camface.load(record="") said "--record : recordings are MP4 files"; snapshots went to "."."""
    with pytest.raises(UsageError, match=f"^{message}$"):
        LiveConfig(**{field: ""})


@pytest.mark.parametrize("argv, option", [
    (["live", "--model", ""], "--model"),
    (["info", ""], "MODEL.onnx"),
    (["export", "", "-o", "g.onnx"], "MODEL"),
    (["export", "m.keras", "-o", "g.onnx", "--labels", ""], "--labels"),
    (["export", "m.keras", "-o", "g.onnx", "--calibration", ""], "--calibration"),
    (["compare", "a.png", "b.png", "--model", ""], "--model"),  # a TypeError traceback
    (["compare", "", "b.png", "--model", "m.onnx"], "PHOTO"),
    (["enroll", "people", "--embedding-from", "", "-o", "g.onnx"], "--embedding-from"),  # a TypeError traceback
    (["enroll", "", "--model", "m.onnx", "-o", "g.onnx"], "PEOPLE_DIR"),
    (["guided", ""], "INPUT"),
    (["guided", "snapshots", "--model", ""], "--model"),
    (["evaluate", ""], "SNAPSHOT_DIR"),
    (["evaluate", "--source", ""], "--source"),  # scored the bundled clip
    (["evaluate", "--sanity", "--keras", ""], "--keras"),
    (["bench", "--baseline", "keras", "--keras-model", ""], "--keras-model"),
    (["bench", "--compare-int8", "--calibration", ""], "--calibration"),
    (["batch", "", "-o", "out"], "INPUT"),  # explained every video of the working folder
    (["serve", "--ssl-certfile", "", "--ssl-keyfile", "k.pem"], "--ssl-certfile"),
    (["train", "", "-o", "out"], "DATA_DIR"),
    (["train", "data", "-o", "out", "--weights", ""], "--weights"),
])
def test_an_empty_input_path_is_a_usage_error_naming_the_option(argv, option, capsys, monkeypatch, tmp_path):
    """An input given as "" (a shell variable left unset) was Path("") = ".": "'.' is a folder, not a
    CAM graph", "--keras: model file not found: .", a TypeError traceback in `compare` and `enroll`
    (an empty --model read as no model), the bundled clip scored by `evaluate --source ""`, and
    every video of the working folder explained by `batch ""`. argparse refuses it, naming the
    option, with exit 2, before anything runs."""
    import camface.api

    monkeypatch.setattr(camface.api, "load", lambda *a, **k: pytest.fail("the command ran"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        camface_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"error: argument {option}: the value is empty; give a path to read" in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_empty_model_in_code_names_it():
    """camface.load("") said "'.' is a folder, not a CAM graph"."""
    import camface

    with pytest.raises(UsageError, match=r"^model is empty; give the path of a CAM graph \(.onnx\), or None for the "
                                         r"bundled one$"):
        camface.load("")
    with pytest.raises(UsageError, match=r"^--model is empty; give a CAM graph \(.onnx\), or leave it out"):
        LiveConfig(model="")


def test_opencv_and_ffmpeg_say_nothing_beside_the_error_line(tmp_path):
    """A damaged clip printed FFmpeg's "[mov,mp4,...] moov atom not found" above the error line
    of `camface evaluate` (and a camera that did not open a dozen OpenCV WARN and ERROR lines):
    only `live`, `bench` and `batch` silenced them. A subprocess: FFmpeg reads its log level once
    per process, and OpenCV writes to the file descriptor."""
    import os
    import subprocess
    import sys

    (tmp_path / "junk.mp4").write_bytes(b"not a video\n" * 100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    done = subprocess.run([sys.executable, "-m", "camface", "evaluate", "--source", "junk.mp4"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["camface: error: --source: cannot open video file junk.mp4: not a "
                                                "video OpenCV can decode"], done.stderr
