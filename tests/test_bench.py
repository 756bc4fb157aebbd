"""`camface bench`: the report's fields and their consistency, the Keras baseline, the
forward-only graph, and clear errors. A 6-frame clip with a known number of faces; speed
itself is never asserted (it is measured in benchmarks/)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # eager conv gradients segfault in oneDNN here
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from realtime_helpers import BLOCK_TF, graph_log_of, write_clip  # noqa: E402

from camface.cli import main as camface_main  # noqa: E402
from camface.models import EMOTION_KERAS, EMOTION_ONNX  # noqa: E402

pytestmark = pytest.mark.skipif(not EMOTION_ONNX.is_file(), reason="bundled emotion graph not exported yet")

STAGES = ("decode", "detect", "crop", "classify", "render", "encode")
FACES = (1, 1, 0, 1, 0, 1)  # faces in each frame of the clip


@pytest.fixture(scope="module")
def faces_clip(tmp_path_factory, astronaut_bgr):
    """6 frames of 640x480: the astronaut (one face, about 75 px) where FACES says 1, plain grey
    where it says 0. The full-range detector finds exactly those faces."""
    face = np.full((480, 640, 3), 128, np.uint8)
    face[48:432, 128:512] = cv2.resize(astronaut_bgr, (384, 384), interpolation=cv2.INTER_AREA)
    blank = np.full((480, 640, 3), 128, np.uint8)
    folder = tmp_path_factory.mktemp("bench")
    return write_clip(folder / "faces.mp4", [face if n else blank for n in FACES])


def check_row(row: dict, frames: int, faces: int, stages=STAGES, detectors: int = 1) -> None:
    assert row["frames"] == frames and row["faces"] == faces
    assert row["faces_per_frame"] == pytest.approx(faces / frames)
    assert row["fps"] > 0
    assert row["ms_per_frame"] == pytest.approx(1000.0 / row["fps"])
    assert row["span_s"] == pytest.approx((frames - 1) / row["fps"])  # N completions, N-1 intervals
    assert 0 < row["span_s"] <= row["wall_s"]
    assert row["peak_rss_mb"] > 50
    assert row["cpu_ms_per_frame"] is None or row["cpu_ms_per_frame"] > 0
    assert set(row["stages"]) == set(stages)
    for name, stage in row["stages"].items():
        assert stage["count"] == frames, name
        assert 0 < stage["median_ms"] <= stage["p95_ms"], name
        assert stage["mean_ms"] > 0, name
    # Each stage runs on one thread (detection on `detectors` threads), so its total time
    # cannot exceed the run's wall time (times that many threads): catches unit mix-ups.
    for name, stage in row["stages"].items():
        allowed = detectors if name == "detect" else 1
        assert stage["mean_ms"] * stage["count"] <= 1000 * allowed * row["wall_s"] * 1.01, name


def test_bench_writes_every_field(tmp_path, faces_clip, capsys):
    out = tmp_path / "bench.json"
    assert camface_main(["bench", "--source", str(faces_clip), "--frames", "6", "--warmup", "2",
                         "--record", "--compare-heads", "--batches", "1", "3", "--repeats", "3",
                         "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    table = capsys.readouterr().out
    for text in ("classify+explain", "end to end (fps)", "faces per frame", "camface live",
                 "the in-graph gradient and its heatmaps add", "gradient methods, all", "forward only", "eigencam",
                 "scorecam"):
        assert text in table

    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and 1 <= machine["usable_cores"] <= machine["cores"]
    assert isinstance(machine["gpus"], list) and machine["onnxruntime"]
    settings = report["settings"]
    assert settings["source_size"] == "640x480" and settings["frames"] == 6 and settings["record"]
    assert settings["provider"] == "CPUExecutionProvider" and settings["target_layer"]
    assert 1 <= settings["detect_workers"] <= 2
    assert report["date"] and report["speedup"] is None
    from camface.graph_spec import auto_method
    from camface.realtime.graph import CamGraph

    assert settings["method"] == auto_method(CamGraph(EMOTION_ONNX, "cpu").info)[0]  # --method auto, resolved

    # the default --detect-every auto (4 for a file) and, on the same frames, every frame
    live, every_frame = report["runs"]
    assert live["name"] == "camface live" and live["provider"] == "CPUExecutionProvider"
    assert settings["detect_every"] == 4 and settings["detect_workers"] == 1
    # faces here pop in and out from frame to frame: carried boxes see frames 0 (key) and 1
    # (carried); the faces of frames 3 and 5 appear after key frame 0 and 4 and are not boxed
    check_row(live, frames=6, faces=2, detectors=1)
    assert every_frame["name"] == "live, every frame"
    check_row(every_frame, frames=6, faces=sum(FACES), detectors=2)
    carried = report["detect_every"]
    assert carried["every"] == 4 and carried["cpu_ms_per_frame"] == live["cpu_ms_per_frame"]
    if live["cpu_ms_per_frame"] and every_frame["cpu_ms_per_frame"]:  # None: not separable from start-up
        assert carried["cpu_ratio"] == pytest.approx(every_frame["cpu_ms_per_frame"] / live["cpu_ms_per_frame"])
    else:
        assert carried["cpu_ratio"] is None
    assert carried["fps_ratio"] == pytest.approx(live["fps"] / every_frame["fps"])
    assert "detector full (onnx) on every 4th frame" in table

    heads = report["heads"]
    assert set(heads["batches"]) == {"1", "3"}
    for batch in heads["batches"].values():
        full, forward = batch["with_gradients"], batch["forward_only"]
        assert 0 < full["median_ms"] <= full["p95_ms"] and 0 < forward["median_ms"] <= forward["p95_ms"]
        assert batch["overhead_pct"] == pytest.approx(100 * (full["median_ms"] / forward["median_ms"] - 1))
        # one pruned graph per heatmap of the graph, each with its cost per crop over forward only
        from camface.realtime.graph import CamGraph

        assert tuple(batch["methods"]) == CamGraph(EMOTION_ONNX, "cpu").info.heatmaps
        size = next(b for b, v in heads["batches"].items() if v is batch)
        for cell in batch["methods"].values():
            assert 0 < cell["median_ms"] <= cell["p95_ms"]
            assert cell["ms_per_crop"] == pytest.approx(cell["median_ms"] / int(size))
            assert cell["overhead_pct"] == pytest.approx(100 * (cell["median_ms"] / forward["median_ms"] - 1))


def test_keras_baseline_runs_on_the_same_frames(tmp_path, faces_clip, capsys):
    out = tmp_path / "baseline.json"
    assert camface_main(["bench", "--source", str(faces_clip), "--frames", "4", "--warmup", "1",
                         "--baseline", "keras", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "speedup over the Keras baseline" in capsys.readouterr().out
    rows = {row["name"]: row for row in report["runs"]}
    assert list(rows) == ["camface live", "live, every frame", "ONNX, one thread", "Keras GradientTape"]
    no_encode = tuple(s for s in STAGES if s != "encode")
    for row in rows.values():
        every_frame = row["name"] == "live, every frame" or report["settings"]["detect_every"] == 1
        check_row(row, frames=4, faces=sum(FACES[:4]) if every_frame else 2, stages=no_encode,
                  detectors=2 if row["name"] == "live, every frame" else 1)
    assert rows["Keras GradientTape"]["provider"] == "TensorFlow eager"
    for row in (rows["ONNX, one thread"], rows["Keras GradientTape"]):
        # One thread: the span between first and last completion holds the stages of frames
        # 1..N-1 run one after another (medians: frame 0, the slowest, would lift a mean past
        # them), plus whatever waits a loaded machine puts between them (so the bounds only
        # catch a unit error, not the machine's load).
        per_frame = sum(s["median_ms"] for s in row["stages"].values()) / 1000
        # a one-thread pass always measures its process CPU (check_row also lets a live row's
        # be None: its marks need >= 20 frames, its fallback a warm-up run cheaper than it)
        assert row["cpu_ms_per_frame"] > 0
        assert 0.5 <= row["span_s"] / ((row["frames"] - 1) * per_frame) <= 20.0
    speedup = report["speedup"]
    keras, live, same = rows["Keras GradientTape"], rows["camface live"], rows["ONNX, one thread"]
    assert speedup["end_to_end"] == pytest.approx(live["fps"] / keras["fps"])
    assert speedup["same_loop"] == pytest.approx(same["fps"] / keras["fps"])
    assert speedup["classify"] == pytest.approx(keras["stages"]["classify"]["mean_ms"]
                                                / live["stages"]["classify"]["mean_ms"])


def test_keras_baseline_refuses_a_tensorflow_loaded_with_onednn_on(tmp_path, faces_clip):
    """TensorFlow imported before TF_ENABLE_ONEDNN_OPTS=0 was set (by a module of the same
    process) keeps oneDNN on, and the baseline's eager convolution gradients killed the process
    (a segfault in Conv2DBackpropFilter) after the live rows had run. Now a one-line error,
    before any row."""
    out = tmp_path / "baseline.json"
    script = ("import os, sys\n"
              "import tensorflow\n"
              "from tensorflow.python.util import _pywrap_util_port\n"
              "os.environ['TF_ENABLE_ONEDNN_OPTS'] = '0'  # too late: TensorFlow has read it\n"
              "if not _pywrap_util_port.IsMklEnabled():\n"
              "    sys.exit(99)\n"
              "from camface.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = {name: value for name, value in os.environ.items() if name != "TF_ENABLE_ONEDNN_OPTS"}
    run = subprocess.run([sys.executable, "-c", script, "bench", "--source", str(faces_clip), "--frames", "2",
                          "--baseline", "keras", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if run.returncode == 99:
        pytest.skip("this TensorFlow loads with oneDNN off")
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == (
        "camface: error: the Keras baseline cannot run in this process: TensorFlow was loaded with oneDNN on "
        "(TF_ENABLE_ONEDNN_OPTS was not 0 when it was imported), and eager convolution gradients crash in oneDNN; "
        "set TF_ENABLE_ONEDNN_OPTS=0 before TensorFlow is imported (in the environment, or before `import "
        "tensorflow`), or run `camface bench` in a process of its own; on a CPU where oneDNN's gradients work, "
        "CAMFACE_ALLOW_ONEDNN=1 allows it")
    assert not out.exists() and "Speed" not in run.stdout  # refused before any row


ONEDNN_PROBE = """
import os, sys
if sys.argv[1] == 'loaded':  # TensorFlow imported first, with its default (oneDNN on for x86 Linux)
    import tensorflow
from camface.export import keras_baseline
keras_baseline.prepare_environment()
print(os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset'))
tf = keras_baseline._import_tensorflow()  # refuses (CamfaceError) when oneDNN is on and not allowed
from tensorflow.python.util import _pywrap_util_port
print('on' if _pywrap_util_port.IsMklEnabled() else 'off')
"""


@pytest.mark.parametrize("tensorflow, allow", [("loaded", "1"), ("loaded", "0"), ("not loaded", "1"),
                                                ("not loaded", None)])
def test_camface_allow_onednn_leaves_onednn_on_and_unrefused(tensorflow, allow):
    """The Keras baseline refused a TensorFlow loaded with oneDNN on, with no way round it on a
    CPU where oneDNN's convolution gradients work. CAMFACE_ALLOW_ONEDNN=1 is that way: oneDNN is
    left on (TF_ENABLE_ONEDNN_OPTS not set) and not refused; 0 or unset, as before. (No gradient
    is run: they crash in oneDNN on this project's CPU.)"""
    env = {name: value for name, value in os.environ.items()
           if name not in ("TF_ENABLE_ONEDNN_OPTS", "CAMFACE_ALLOW_ONEDNN")}
    if allow is not None:
        env["CAMFACE_ALLOW_ONEDNN"] = allow
    run = subprocess.run([sys.executable, "-c", ONEDNN_PROBE, tensorflow], capture_output=True, text=True,
                         timeout=300, env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = run.stdout.split()
    if tensorflow == "loaded" and allow != "1":
        assert run.returncode == 1 and "CamfaceError: the Keras baseline cannot run in this process" in run.stderr \
            and "CAMFACE_ALLOW_ONEDNN=1 allows it" in run.stderr, run.stderr[-2000:]
        return
    assert run.returncode == 0, run.stderr[-2000:]
    # what camface set before the import: nothing where oneDNN is allowed or TensorFlow had loaded
    assert lines[0] == ("unset" if allow == "1" or tensorflow == "loaded" else "0"), lines
    assert lines[1] == ("on" if allow == "1" else "off"), lines


@pytest.mark.parametrize("value", ["true", "yes", "2"])
def test_camface_allow_onednn_other_than_0_or_1_is_refused(capsys, monkeypatch, faces_clip, value):
    """A "true" read as no would have refused (or, unset, run oneDNN off) with the user thinking
    it was set."""
    monkeypatch.setenv("CAMFACE_ALLOW_ONEDNN", value)
    code = camface_main(["bench", "--source", str(faces_clip), "--frames", "2", "--baseline", "keras"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"camface: error: CAMFACE_ALLOW_ONEDNN must be 0 or 1, got {value!r}"], err


def test_keras_baseline_computes_the_graphs_gradcam(astronaut_bgr):
    """The baseline explains the same thing as the graph: same probabilities, same Grad-CAM
    (arXiv:1610.02391 eq. 1-2) at the graph's target layer, for the predicted and a chosen class."""
    from camface.export.keras_baseline import KerasGradCam
    from camface.realtime.crop import crop_faces
    from camface.realtime.graph import CamGraph
    from camface.methods import normalize as normalize_heatmap
    from camface.realtime.results import Face

    graph = CamGraph(EMOTION_ONNX, "cpu")
    info = graph.info
    faces = (Face(box=(177, 82, 95, 95), score=1.0), Face(box=(150, 60, 150, 150), score=1.0))
    crops, _ = crop_faces(astronaut_bgr, faces, 0.1, info.input_size, info.color_order)
    classes = np.array([-1, 0], np.int64)
    keras = KerasGradCam(EMOTION_KERAS, info.target_layer, info.normalization["scale"],
                         info.normalization["offset"])
    probs, heatmaps = keras.explain(crops, classes)
    want_probs, want_heatmaps = graph.run(crops, classes, "gradcam")
    assert probs.argmax(1)[0] == info.labels.index("happy")
    np.testing.assert_allclose(probs, want_probs, atol=1e-4)
    assert heatmaps.shape == want_heatmaps.shape == (2, *info.feature_size)
    for got, want in zip(heatmaps, want_heatmaps):
        np.testing.assert_allclose(normalize_heatmap(got, "gradcam"), normalize_heatmap(want, "gradcam"),
                                   atol=1e-3)


def test_forward_only_graph_keeps_the_forward_outputs():
    import onnx
    import onnxruntime as ort

    from camface.realtime.bench.heads import forward_only

    full_bytes = EMOTION_ONNX.read_bytes()
    pruned_bytes = forward_only(full_bytes)
    full, pruned = onnx.load_from_string(full_bytes), onnx.load_from_string(pruned_bytes)
    assert [o.name for o in pruned.graph.output] == ["probs", "activations"]
    assert len(pruned.graph.node) < len(full.graph.node)
    assert {p.key: p.value for p in pruned.metadata_props} == {p.key: p.value for p in full.metadata_props}
    crops = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 1), dtype=np.uint8)
    feed = {"image": crops, "class_index": np.full(3, -1, np.int64)}
    sessions = [ort.InferenceSession(b, providers=["CPUExecutionProvider"]) for b in (full_bytes, pruned_bytes)]
    want = sessions[0].run(["probs", "activations"], feed)
    got = sessions[1].run(["probs", "activations"], {i.name: feed[i.name] for i in sessions[1].get_inputs()})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, message", [
    # said before any model loads, naming the flag as evaluate and live do
    (lambda tmp: str(tmp / "missing.mp4"), "--source: source not found: .*missing.mp4"),
    (lambda tmp: (tmp / "junk.mp4").write_bytes(b"not a video") and str(tmp / "junk.mp4"),
     "--source: cannot open video file .*junk.mp4"),
    (lambda tmp: "9", "camera 9 could not be opened"),
])
def test_source_that_does_not_open_is_a_clear_error(tmp_path, capsys, make, message):
    import re

    assert camface_main(["bench", "--source", make(tmp_path), "--frames", "3"]) == 2
    err = capsys.readouterr().err
    assert re.search(f"camface: error: {message}", err), err


@pytest.mark.parametrize("argv, message", [
    (["--frames", "1"], "--frames must be at least 2"),
    (["--max-faces", "40"], "--max-faces must be 1..32"),
    (["--backbone", "resnet50", "--model", "x.onnx"], "exclude each other"),
    (["--json", "/nonexistent-folder/out.json"], "does not exist"),
    (["--model", "missing.onnx"], "CAM graph not found: missing.onnx"),
])
def test_bad_flags_are_clear_errors(faces_clip, capsys, argv, message):
    assert camface_main(["bench", "--source", str(faces_clip), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_sample_clip_longer_than_can_be_drawn_ahead_is_refused_before_drawing(tmp_path, capsys, monkeypatch):
    """--frames 10000000 on the sample drew a clip into the temporary folder for hours (about
    3.5 KB a frame) before anything ran."""
    from camface.realtime.sample import MAX_FRAMES

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    assert camface_main(["bench", "--source", "sample", "--frames", str(MAX_FRAMES + 1)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"camface: error: --frames {MAX_FRAMES + 1}: the sample clip is drawn ahead into a temporary file, at most "
        f"{MAX_FRAMES} frames (20 minutes at 30 fps); time a longer run on a video file or camera"]
    assert not list(tmp_path.glob("camface-sample-*"))


@pytest.mark.parametrize("work_dir, message", [
    ("a_file", "--work-dir a_file: it is a file; give a folder for the --backbone graphs"),
    ("a_file/graphs", "--work-dir a_file/graphs: cannot create the folder (Not a directory)"),
])
def test_a_work_dir_that_cannot_be_a_folder_is_one_error_line(faces_clip, capsys, tmp_path, monkeypatch, work_dir,
                                                              message):
    """A file as --work-dir was a FileExistsError traceback (exit 1) once the source had opened."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    assert camface_main(["bench", "--source", str(faces_clip), "--frames", "3", "--backbone", "mobilenetv2",
                         "--work-dir", work_dir]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"camface: error: {message}"]


@pytest.mark.parametrize("record, code", [(False, 0), (True, 2)])
def test_codec_h264_without_an_encoder_fails_only_a_bench_that_records(faces_clip, capsys, monkeypatch, record,
                                                                       code):
    """--codec h264 where no H.264 encoder opens: a bench without --record never encodes."""
    from camface.realtime import fmp4

    monkeypatch.setattr(fmp4, "h264_encoder", lambda: (None, "no H.264 encoder in this test"))
    argv = ["bench", "--source", str(faces_clip), "--frames", "2", "--warmup", "0", "--codec", "h264"]
    assert camface_main([*argv, *(["--record"] if record else [])]) == code
    captured = capsys.readouterr()
    if record:
        assert "camface: error: cannot record H.264: no H.264 encoder in this test" in captured.err
    else:
        assert "camface live" in captured.out and "error" not in captured.err


def test_bench_runs_without_tensorflow(tmp_path, faces_clip):
    run = subprocess.run([sys.executable, "-c", BLOCK_TF, "bench", "--source", str(faces_clip),
                          "--frames", "3", "--warmup", "0", "--json", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "b.json").read_text())["runs"][0]["faces"] == sum(FACES[:3])


def test_compare_int8_adds_a_live_row_and_the_precision_table(tmp_path, faces_clip, capsys):
    out = tmp_path / "bench.json"
    assert camface_main(["bench", "--source", str(faces_clip), "--frames", "3", "--warmup", "0",
                         "--compare-int8", "--batches", "1", "2", "--int8-threads", "1", "2", "--repeats", "2",
                         "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert "camface live int8" in table and "float32 vs int8" in table and "top-1 agreement" in table
    live, every_frame, live_int8 = report["runs"]
    assert live_int8["name"] == "camface live int8" and every_frame["name"] == "live, every frame"
    check_row(live_int8, frames=3, faces=sum(FACES[:3]), stages=STAGES[:-1],
              detectors=report["settings"]["detect_workers"])  # no --record: no encode stage
    int8 = report["int8"]
    assert int8["calibration"] == {"source": "sample", "crops": 192, "method": "minmax"} and int8["passed"]
    assert set(int8["threads"]) == {"1", "2"}
    for batches in int8["threads"].values():
        assert set(batches) == {"1", "2"}
        for b in batches.values():
            assert b["speedup"] == pytest.approx(b["fp32"]["median_ms"] / b["int8"]["median_ms"])
            forward = b["int8_forward_only"]["median_ms"]
            assert b["gradient_overhead_pct"] == pytest.approx(100 * (b["int8"]["median_ms"] / forward - 1))


def test_source_of_one_frame_is_a_clear_error(tmp_path, astronaut_bgr, capsys):
    """One image gives one frame completion, no interval: the bench printed fps 0.0 and inf ms
    per frame, and crashed formatting the speed-up with --baseline keras."""
    cv2.imwrite(str(tmp_path / "face.jpg"), astronaut_bgr)
    assert camface_main(["bench", "--source", str(tmp_path), "--frames", "5", "--warmup", "0",
                         "--baseline", "keras"]) == 2
    err = capsys.readouterr().err
    assert f"camface: error: {tmp_path} gave one frame; camface bench times at least 2" in err, err


@pytest.mark.parametrize("carried_ms, every_frame_ms, words", [
    (2.0, 6.0, "2.00 CPU ms per frame against 6.00 with detection on every frame, 3.00x less"),
    (10.0, 5.0, "10.00 CPU ms per frame against 5.00 with detection on every frame, 2.00x more"),
    (None, 5.0, "CPU time per frame not separable from start-up"),
])
def test_detect_every_line_says_less_or_more(carried_ms, every_frame_ms, words):
    """A run where carrying boxes cost more CPU per frame printed '0.50x less'."""
    from camface.realtime.bench.report import format_detect_every
    from camface.realtime.bench.rows import Row, compare_detect_every

    carried = compare_detect_every(4, Row("camface live", 10, 10, 20.0, 1.0, cpu_ms_per_frame=carried_ms),
                                   Row("live, every frame", 10, 10, 10.0, 1.0, cpu_ms_per_frame=every_frame_ms))
    line = format_detect_every(carried)
    assert line.startswith("detector on every 4th frame (boxes carried between): ")
    assert words in line and line.endswith("; 2.00x the fps (this run)")


@pytest.mark.parametrize("argv, said", [
    (["--calibration", "photos", "--int8-threads", "4"],
     ["--calibration is used only with --compare-int8; ignored",
      "--int8-threads is used only with --compare-int8; ignored"]),
    (["--keras-model", "m.keras", "--batches", "2", "--backbone-size", "96"],
     ["--keras-model is used only with --baseline keras; ignored",
      "--batches is used only with --compare-heads or --compare-int8; ignored",
      "--backbone-size is used only with --backbone; ignored"]),
    (["--calibration", "photos", "--compare-int8", "--repeats", "5", "--compare-heads"], []),
    (["--keras-model", "m.keras", "--baseline", "keras", "--backbone", "resnet50", "--backbone-size", "96"], []),
])
def test_flags_that_would_be_ignored_are_named(argv, said):
    """Flags accepted and then ignored in silence (a --calibration without --compare-int8)."""
    import argparse

    from camface.realtime.bench.config import configure, unused_flags

    parser = argparse.ArgumentParser()
    configure(parser)
    assert unused_flags(parser.parse_args(argv)) == said


def test_compare_int8_of_a_graph_that_is_not_float32_fails_before_any_row(tmp_path, faces_clip, capsys, monkeypatch):
    """An int8 (or fp16) --model with --compare-int8 failed only after the live rows had run."""
    import onnx

    from camface.realtime.bench import rows

    model = onnx.load(str(EMOTION_ONNX))
    for prop in model.metadata_props:
        if prop.key == "precision":
            prop.value = "int8"
    path = tmp_path / "emotion.int8.onnx"
    onnx.save(model, str(path))

    def no_row(*args, **kwargs):
        raise AssertionError("a live row ran")

    monkeypatch.setattr(rows, "run_live", no_row)
    assert camface_main(["bench", "--source", str(faces_clip), "--model", str(path), "--frames", "3",
                         "--compare-int8"]) == 2
    assert f"camface: error: --compare-int8 quantizes a float32 CAM graph; {path} is int8" in capsys.readouterr().err


def test_a_slow_graph_is_timed_by_one_run_and_said(monkeypatch):
    """--compare-heads on a big model: Score-CAM on ResNet-50 is ~100 s a crop on one thread, so
    50 repeats at batches 1 and 8 took half a day. A graph whose first run takes over SLOW_RUN_S
    is timed by one more run, at the first batch size only, and the table says so (a fake clock
    that the sessions advance: no timing here)."""
    import time
    from types import SimpleNamespace

    from camface.realtime.bench import heads
    from camface.realtime.bench.report import format_heads

    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    class Session:
        def __init__(self, seconds_per_crop):
            self.seconds, self.runs = seconds_per_crop, []

        def get_inputs(self):
            return [SimpleNamespace(name="image"), SimpleNamespace(name="class_index")]

        def run(self, outputs, feed):
            self.runs.append(len(feed["image"]))
            clock[0] += self.seconds * len(feed["image"])

    sessions = {"forward only": Session(0.01), "with gradients": Session(0.02), "scorecam": Session(5.0)}
    stats, slow = heads.time_sessions(sessions, np.zeros((8, 4, 4, 1), np.uint8), 1, 5, heads.SLOW_RUN_S)
    assert slow == {"scorecam": pytest.approx(5.0)}
    assert sessions["scorecam"].runs == [1, 1] and sessions["forward only"].runs == [1] * 6
    assert stats["scorecam"].count == 1 and stats["scorecam"].median_ms == pytest.approx(5000)
    assert stats["forward only"].count == 5
    _, none_slow = heads.time_sessions(sessions, np.zeros((8, 4, 4, 1), np.uint8), 8, 2)
    assert none_slow == {}  # without slow_s every session runs its repeats

    cell = {"median_ms": 10.0, "p95_ms": 11.0, "ms_per_crop": 10.0, "runs": 5, "overhead_pct": None}
    table = format_heads({
        "provider": "CPUExecutionProvider", "threads": 1, "repeats": 5,
        "slow": {"scorecam": {"batch": 1, "first_run_s": 5.0}},
        "batches": {"1": {"forward_only": cell, "with_gradients": {**cell, "overhead_pct": 100.0},
                          "overhead_pct": 100.0,
                          "methods": {"scorecam": {**cell, "ms_per_crop": 5000.0, "overhead_pct": 49900.0}}},
                    "8": {"forward_only": cell, "with_gradients": {**cell, "overhead_pct": 90.0},
                          "overhead_pct": 90.0, "methods": {"scorecam": None}}}})
    row = next(line for line in table if line.strip().startswith("scorecam"))
    assert "5000.000 (+49900.0%)*" in row and row.rstrip().endswith("-")
    assert any("* scorecam: one timed run at batch 1 (its first run took 5.0 s, over 1 s)" in line
               for line in table)


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("fails", [False, True])
def test_the_graph_log_shows_under_debug_only_and_is_left_as_it_was(debug, fails, faces_clip, caplog, monkeypatch):
    """bench set the graph's logger to WARNING for good: every later graph load in the process was
    silenced, --debug or not. Now as export does: hidden while the command runs, unless --debug,
    and the level restored after it, whether the rows ran or a row failed (--debug raises the
    error rather than printing it)."""
    import logging

    from camface.errors import SourceError
    from camface.realtime.bench import rows

    def broken_row(*args, **kwargs):
        raise SourceError("the clip broke")

    if fails:
        monkeypatch.setattr(rows, "run_live", broken_row)
    shown, after = graph_log_of(camface_main, caplog, ["bench", "--source", str(faces_clip), "--frames", "2",
                                                       "--warmup", "0", "--detect-every", "1"], debug,
                                pytest.raises(SourceError, match="the clip broke") if fails else None)
    assert (f"CAM graph {EMOTION_ONNX.name} on CPUExecutionProvider" in shown) == debug, shown
    assert after == logging.INFO


class _SavedModel:
    """Stands in for a built Keras model: `save` writes known bytes (no TensorFlow graph built)."""

    def save(self, path):
        with open(path, "wb") as file:
            file.write(b"new keras")


@pytest.mark.parametrize("fails", ["export", "onnx rename", None])
def test_backbone_cache_is_written_whole_or_not_at_all(tmp_path, monkeypatch, fails):
    """bench_graphs renamed the new .keras over the cached one before exporting the graph: a failed
    export (or a graph that could not be renamed into place) left a new Keras model beside an
    older graph. Both are now renamed together, or neither, and no temporary file is left."""
    import onnx
    from onnx import TensorProto, helper

    from camface.errors import ModelError, OutputError
    from camface.export import bench_graphs, exporter
    from camface.models import builders

    stem = "tiny_32_random_seed0"
    keras_path, onnx_path = tmp_path / f"{stem}.keras", tmp_path / f"{stem}.onnx"
    keras_path.write_bytes(b"old keras")
    if fails == "onnx rename":
        onnx_path.mkdir()
    else:  # a graph cached before a method was added: exported again
        old = helper.make_model(helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])], "old",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
        onnx.save(old, str(onnx_path))
    old_onnx = onnx_path.read_bytes() if onnx_path.is_file() else None
    asked = []

    def fake_export(model_path, output, options, source_name=None):
        asked.append((Path(model_path).read_bytes(), source_name))
        if fails == "export":
            raise ModelError(f"cannot convert {model_path}")
        Path(output).write_bytes(b"new onnx")

    monkeypatch.setitem(builders.BUILDERS, "tiny", lambda classes, input_size, weights: _SavedModel())
    monkeypatch.setitem(builders.PRESETS, "tiny", "none")
    monkeypatch.setattr(exporter, "export", fake_export)
    if fails is None:
        assert bench_graphs.backbone_graph("tiny", 32, tmp_path) == (onnx_path, keras_path)
        assert (keras_path.read_bytes(), onnx_path.read_bytes()) == (b"new keras", b"new onnx")
    else:
        error, named = (ModelError, keras_path) if fails == "export" else (OutputError, onnx_path)
        with pytest.raises(error, match=re.escape(str(named))) as raised:
            bench_graphs.backbone_graph("tiny", 32, tmp_path)
        assert ".partial" not in str(raised.value)
        assert keras_path.read_bytes() == b"old keras"
        assert (onnx_path.read_bytes() if onnx_path.is_file() else None) == old_onnx
    # the graph records the final Keras name (evaluate and guided look for it beside the graph)
    assert asked == [(b"new keras", keras_path.name)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([keras_path.name, onnx_path.name])


@pytest.mark.parametrize("input_flag", ["--source", "--model"])
def test_json_that_is_an_input_is_refused_before_the_run(tmp_path, faces_clip, capsys, monkeypatch, input_flag):
    """`--json` naming the clip (or the model) the bench reads ran every row, then wrote the
    report over that file: the clip was lost. Now refused before anything runs."""
    import shutil

    from camface.realtime.bench import cli as bench_cli

    def run(config):
        raise AssertionError("the bench ran")

    monkeypatch.setattr(bench_cli, "run", run)
    given = tmp_path / ("clip.mp4" if input_flag == "--source" else "graph.onnx")
    shutil.copy(faces_clip if input_flag == "--source" else EMOTION_ONNX, given)
    before = given.read_bytes()
    argv = ["--source", str(faces_clip), input_flag, str(given), "--json", str(given)]
    assert camface_main(["bench", *argv]) == 2
    assert f"--json {given} is an input" in capsys.readouterr().err
    assert given.read_bytes() == before


@pytest.mark.parametrize("bundled, flags", [("EMOTION_ONNX", []), ("EMOTION_KERAS", ["--baseline", "keras"])])
def test_json_over_the_bundled_model_it_reads_is_refused(tmp_path, faces_clip, capsys, monkeypatch, bundled, flags):
    """Without --model the bench reads the bundled graph (and for --baseline keras the bundled
    Keras model): `--json` naming it was checked against --model, None, and wrote over it."""
    import shutil

    import camface.models
    from camface.realtime.bench import cli as bench_cli

    def run(config):
        raise AssertionError("the bench ran")

    monkeypatch.setattr(bench_cli, "run", run)
    given = tmp_path / getattr(camface.models, bundled).name  # a copy stands for the bundled file
    shutil.copy(getattr(camface.models, bundled), given)
    monkeypatch.setattr(camface.models, bundled, given)
    before = given.read_bytes()
    assert camface_main(["bench", "--source", str(faces_clip), *flags, "--json", str(given)]) == 2
    assert f"--json {given} is an input" in capsys.readouterr().err
    assert given.read_bytes() == before


def test_json_is_written_whole_or_the_earlier_report_stays(tmp_path, monkeypatch, capsys):
    """The report was written in place: a full disk halfway left half a JSON file where the
    earlier report had been. Now it is written beside and renamed, and the error names it."""
    import errno
    from pathlib import Path

    from camface.realtime.bench import cli as bench_cli
    from camface.realtime.bench import report as bench_report

    out = tmp_path / "bench.json"
    out.write_text('{"earlier": true}\n')
    monkeypatch.setattr(bench_cli, "run", lambda config: ({"runs": [1, 2, 3]}, []))
    monkeypatch.setattr(bench_report, "format_report", lambda report, rows: "table")
    write_text = Path.write_text

    def disk_fills(path, text, *args, **kwargs):
        write_text(path, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_fills)
    assert camface_main(["bench", "--json", str(out)]) == 2
    assert f"cannot write {out}: No space left on device" in capsys.readouterr().err
    assert out.read_text() == '{"earlier": true}\n' and sorted(tmp_path.iterdir()) == [out]
    monkeypatch.setattr(Path, "write_text", write_text)
    assert camface_main(["bench", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == {"runs": [1, 2, 3]}


@pytest.mark.parametrize("method, expected", [(None, "gradcam"), ("gradcam", "gradcam"), ("hirescam", None)])
def test_keras_baseline_rows_all_explain_gradcam(faces_clip, capsys, monkeypatch, method, expected):
    """The live rows showed --method auto (the graph's top-ranked heatmap, not Grad-CAM on the
    bundled graph) while the Keras and one-thread rows computed Grad-CAM, so the speed-ups
    compared two different heatmaps. Now every row explains Grad-CAM, and another --method with
    --baseline keras is refused naming it."""
    from camface.realtime.bench import rows as bench_rows

    class Stop(Exception):
        pass

    seen = []

    def run_live(config, *args, **kwargs):
        seen.append(config.pipeline.method)
        raise Stop

    monkeypatch.setattr(bench_rows, "run_live", run_live)
    argv = ["bench", "--source", str(faces_clip), "--frames", "3", "--warmup", "0", "--baseline", "keras",
            *(["--method", method] if method else [])]
    if expected is None:
        assert camface_main(argv) == 2
        assert f"--baseline keras computes Grad-CAM, the Keras example's heatmap; --method {method}" \
            in capsys.readouterr().err
        assert seen == []
    else:
        with pytest.raises(Stop):
            camface_main(argv)
        assert seen == [expected]


@pytest.mark.parametrize("change, keras_file, message", [
    ({}, b"another checkpoint", "--keras-model {keras}: not the model {graph} was exported from "
                                "(emotion_mini_xception_fer2013.hdf5): sha256 "),
    ({"gallery": {"scale": 30.0}}, None, "--baseline keras: {graph} is a gallery graph"),
    ({"target_layer": "backbone/add_3"}, None, "the Keras baseline needs a flat target layer; 'backbone/add_3'"),
])
def test_keras_baseline_of_another_model_fails_before_any_row(tmp_path, faces_clip, capsys, monkeypatch, change,
                                                              keras_file, message):
    """--baseline keras with a Keras model that is not the graph's (another checkpoint, another input
    shape: a Keras ValueError traceback), a gallery graph or a nested target failed, or timed other
    maps, only after the live rows had run; each is refused now naming the file, before any row."""
    import dataclasses

    from camface.realtime.bench import rows
    from camface.realtime.graph import CamGraph

    info = dataclasses.replace(CamGraph(EMOTION_ONNX, "cpu").info, **change)
    keras = tmp_path / "other.keras"
    if keras_file is not None:
        keras.write_bytes(keras_file)
    else:
        keras = EMOTION_KERAS

    def no_row(*args, **kwargs):
        raise AssertionError("a live row ran")

    monkeypatch.setattr(rows, "run_live", no_row)
    if change:  # the graph's metadata as the table says (bench imports `load` when it runs)
        import camface.api

        loaded = camface.api.load

        def load(*args, **kwargs):
            pipeline = loaded(*args, **kwargs)
            pipeline.graph.info = info
            return pipeline

        monkeypatch.setattr(camface.api, "load", load)
    assert camface_main(["bench", "--source", str(faces_clip), "--frames", "3", "--baseline", "keras",
                         "--keras-model", str(keras)]) == 2
    err = capsys.readouterr().err
    assert f"camface: error: {message.format(keras=keras, graph=EMOTION_ONNX)}" in err, err
    assert "Traceback" not in err


def test_keras_baseline_refuses_a_model_of_other_crops(tmp_path):
    """KerasGradCam (the baseline row) failed with Keras's ValueError on the first face when the
    Keras model takes other inputs than the graph's crops; it is a ModelError naming both now."""
    import keras

    from camface.errors import ModelError
    from camface.export.keras_baseline import KerasGradCam

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="add_3")(inputs)
    outputs = keras.layers.Dense(7, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    path = tmp_path / "tiny.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ModelError, match=r"tiny.keras takes 32x32x3 inputs, the CAM graph 64x64x1 crops"):
        KerasGradCam(path, "add_3", [1 / 127.5], [-1.0], input_shape=(64, 64, 1), classes=7)
    with pytest.raises(ModelError, match=r"tiny.keras has 7 classes, the CAM graph 5"):
        KerasGradCam(path, "add_3", [1 / 127.5], [-1.0], input_shape=(32, 32, 3), classes=5)
    KerasGradCam(path, "add_3", [1 / 127.5], [-1.0], input_shape=(32, 32, 3), classes=7)  # its own shape: fine


def test_backbone_bench_runs_its_graph(tmp_path, faces_clip, capsys, monkeypatch):
    """`camface bench --backbone NAME` stopped after building its graph with "--model and --backbone
    exclude each other": the config load() returned names the graph it opened, and replacing the
    bench config with it ran the check again. The backbone's graph is faked as the bundled one."""
    from camface.export import bench_graphs
    from camface.models import EMOTION_KERAS, EMOTION_ONNX

    asked = []

    def fake_backbone_graph(builder, size, folder):
        asked.append((builder, size))
        return EMOTION_ONNX, EMOTION_KERAS

    monkeypatch.setattr(bench_graphs, "backbone_graph", fake_backbone_graph)
    out = tmp_path / "bench.json"
    assert camface_main(["bench", "--source", str(faces_clip), "--backbone", "mobilenetv2", "--backbone-size", "64",
                         "--frames", "3", "--warmup", "0", "--work-dir", str(tmp_path), "--json", str(out)]) == 0
    assert asked == [("mobilenetv2_gap", 64)]
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert (settings["backbone"], settings["model"], settings["frames"]) == ("mobilenetv2", str(EMOTION_ONNX), 3)
    assert report["runs"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_in_the_live_row_ends_bench_with_its_exit_code(faces_clip, capsys, monkeypatch, sig, code):
    """SIGTERM while bench's live row runs (the live loop's handler raises Terminated, as in
    `camface live`) ended `camface bench` with a Terminated traceback and exit code 1: only
    KeyboardInterrupt was taken. Both end it with the signal's code, and no traceback."""
    from camface.realtime import loop as loop_module

    real_put = loop_module.put
    sent = []

    def put_then_signal(q, item, stop):  # the frame handed to the writer, then the signal
        if not sent and threading.current_thread() is threading.main_thread():
            sent.append(sig)
            signal.raise_signal(sig)
        return real_put(q, item, stop)

    monkeypatch.setattr(loop_module, "put", put_then_signal)
    assert camface_main(["bench", "--source", str(faces_clip), "--frames", "4", "--warmup", "0"]) == code
    assert sent == [sig] and "Traceback" not in capsys.readouterr().err
