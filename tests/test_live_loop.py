"""The live loop end to end: sources, detector, the bundled emotion graph, recording,
snapshots, signals and the `camface live` command. Short synthetic clips; no camera."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from realtime_helpers import (BLOCK_TF, FakeCamera, FakeWindow, count_frames, frame_times, photo_folder,
                              sigint_as_from_a_terminal, write_clip)

from camface.api import face_detector
from camface.cli import main as camface_main
from camface.errors import OutputError, SourceError, UsageError
from camface.models import DETECTORS, EMOTION_ONNX
from camface.realtime.loop import LiveConfig, LiveLoop, Terminated, detect_workers_for, finish_progress
from camface.realtime.sample import SampleSource
from camface.realtime.smooth import iou
from camface.realtime.sources import ImageFolderSource, LiveSource, VideoFileSource, make_source

pytestmark = pytest.mark.skipif(not EMOTION_ONNX.is_file(), reason="bundled emotion graph not exported yet")
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def sample_frames():
    """Frames 0, 40, ..., 280 of the 300-frame sample clip, and the clip itself."""
    clip = SampleSource()
    return clip, {i: clip.frame(i) for i in range(0, 300, 40)}


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory, sample_frames):
    """A 12-frame mp4 of sample frames (faces moving between frames)."""
    clip, _ = sample_frames
    folder = tmp_path_factory.mktemp("clip")
    return write_clip(folder / "faces.mp4", [clip.frame(i) for i in range(100, 220, 10)])


# ------------------------------------------------------------------------------ detector, sample

def test_detector_finds_the_sample_faces(sample_frames):
    from camface.realtime.detect import FaceDetector

    clip, frames = sample_frames
    found = total = 0
    with FaceDetector(DETECTORS["full"]) as detector:
        for index, frame in frames.items():
            faces = detector.detect(frame)
            truth = clip.face_boxes(index)
            total += len(truth)
            found += sum(any(iou(t, f.box) > 0.4 for f in faces) for t in truth)
            for f in faces:
                x, y, w, h = f.box
                assert x >= 0 and y >= 0 and x + w <= 640 and y + h <= 480 and 0 < f.score <= 1
        assert detector.detect(np.zeros((48, 64, 3), np.uint8)) == ()
    assert total >= 14 and found >= 0.9 * total
    counts = [len(clip.face_boxes(i)) for i in range(300)]
    assert max(counts) >= 3 and min(counts) == 1  # faces enter and leave


def test_detector_astronaut_and_faces_cut_by_the_border(astronaut_bgr):
    from camface.realtime.detect import FaceDetector

    with FaceDetector(DETECTORS["short"]) as detector:
        (face,) = detector.detect(astronaut_bgr)
        assert iou(face.box, (177, 82, 95, 95)) > 0.8 and face.score > 0.8
        cut = np.ascontiguousarray(astronaut_bgr[100:, 210:])  # face cut at the top-left corner
        for f in detector.detect(cut):
            x, y, w, h = f.box
            assert x >= 0 and y >= 0 and x + w <= cut.shape[1] and y + h <= cut.shape[0]
    with pytest.raises(UsageError, match="outside its `with` block"):
        detector.detect(astronaut_bgr)


def test_mediapipe_import_does_not_import_tensorflow():
    code = ("import sys, time; t = time.perf_counter();"
            "from camface.realtime.detect import import_mediapipe_vision; import_mediapipe_vision();"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported';"
            "import importlib.util; assert importlib.util.find_spec('tensorflow') is not None;"
            "print(round(time.perf_counter() - t, 2))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------ the loop

def _run(config: LiveConfig, source=None) -> LiveLoop:
    loop = LiveLoop(config, source=source)
    loop.run()
    return loop


def test_recording_holds_every_processed_frame_and_snapshots(tmp_path, face_clip):
    out = tmp_path / "out.mp4"
    loop = _run(LiveConfig(source=str(face_clip), record=out, detector="full", snapshot_every=5,
                           snapshot_dir=tmp_path / "snaps", cam_boxes=True, bars=True, smooth=0.5))
    s = loop.summary
    assert s.frames == 12 and s.stopped_by == "end of input"
    # a file: --detect-every auto (key frames 0, 4, 8) in one detector thread; this clip's faces jump
    # (every 10th sample frame), so every carried box moves past carry.MAX_MOVE: detected again
    assert s.detectors == 1 and s.detect_every == 4 and s.detections == 12
    assert detect_workers_for(0) == min(2, len(os.sched_getaffinity(0)))  # with --detect-every 1
    assert s.recordings == ((str(out), 12),) and count_frames(out) == 12
    assert s.faces_per_frame >= 2 and s.snapshots == 3
    assert {"decode", "detect", "crop", "classify", "render", "encode"} <= set(s.stages)
    assert all(st.median_ms > 0 for st in s.stages.values())
    assert s.line().startswith("Speed: ") and "recorded 12 frames" in s.line()
    snap = tmp_path / "snaps" / "frame_000005"
    meta = json.loads((snap / "snapshot.json").read_text())
    assert meta["frame_index"] == 5 and meta["source"] == str(face_clip) and len(meta["faces"]) >= 2
    assert {f["predicted_label"] for f in meta["faces"]} == {"happy"}
    crop = cv2.imread(str(snap / meta["faces"][0]["crop"]), cv2.IMREAD_UNCHANGED)
    assert crop.shape == (64, 64)  # exactly the graph's input: 64x64 gray


def test_cpu_marks_time_the_steady_state_of_a_run():
    """LiveLoop's `cpu_marks` give the process CPU per frame between two frames of the run
    (what `camface bench` reports): within what the process spent in all, and more than the
    graph alone needs; None when the run stops before the last mark."""
    from camface.realtime.bench.rows import MARK_TAIL, cpu_marks
    from camface.realtime.loop import QUEUE_SIZE

    config = LiveConfig(source="sample", max_frames=60, detect_every=1)
    start = time.process_time()
    summary = LiveLoop(config, source=make_source("sample", sample_frames=60), cpu_marks=(10, 44)).run()
    total_ms = 1000 * (time.process_time() - start)
    assert summary.frames == 60
    assert 0.1 < summary.cpu_ms_per_frame * 34 < total_ms  # the 34 frames between the marks, start-up excluded
    short = LiveLoop(config.replace(max_frames=20), source=make_source("sample", sample_frames=60),
                     cpu_marks=(10, 44)).run()
    assert short.frames == 20 and short.cpu_ms_per_frame is None
    assert LiveLoop(config).run().cpu_ms_per_frame is None  # no marks asked for
    with pytest.raises(ValueError, match="cpu_marks must be 0 < first < last"):
        LiveLoop(config, cpu_marks=(5, 5))
    assert cpu_marks(300) == (30, 300 - MARK_TAIL) and cpu_marks(30) is None
    assert cpu_marks(300, detectors=8) == (30, 300 - 3 * QUEUE_SIZE - 8)  # more read ahead: an earlier mark


def test_max_faces_drops_the_smallest(tmp_path, sample_frames):
    _, frames = sample_frames
    frame = frames[160]  # three faces
    folder = tmp_path / "one"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), frame)
    loop = _run(LiveConfig(source=str(folder), max_faces=1))
    assert loop.summary.frames == 1 and loop.summary.faces == 1 and loop.summary.dropped == 2


def test_a_crowd_keeps_the_largest_faces_and_says_how_many_were_dropped(tmp_path, astronaut_bgr):
    """40 faces in one frame (a 5 x 8 grid, one tile of them larger): --max-faces 8 classifies the
    8 largest, the summary counts the rest, and the HUD says so on the recorded frame."""
    from camface.realtime.render import HudAnnotator
    from camface.realtime.results import FrameResult

    face = astronaut_bgr[40:240, 130:330]
    frame = np.tile(cv2.resize(face, (120, 120), interpolation=cv2.INTER_AREA), (5, 8, 1))
    frame[0:240, 0:240] = cv2.resize(face, (240, 240), interpolation=cv2.INTER_AREA)  # 4 tiles -> 1 big face
    folder = tmp_path / "crowd"
    folder.mkdir()
    cv2.imwrite(str(folder / "crowd.png"), frame)
    out = tmp_path / "crowd.mp4"
    loop = _run(LiveConfig(source=str(folder), max_faces=8, record=out))
    s = loop.summary
    assert s.frames == 1 and s.faces == 8 and s.dropped >= 1
    assert count_frames(out) == 1
    found = s.faces + s.dropped
    with face_detector(LiveConfig()) as detector:
        faces = detector.detect(frame)
    assert len(faces) == found and faces[0].box[2] > 1.5 * faces[-1].box[2]  # largest first
    hud = HudAnnotator().lines(FrameResult(index=0, faces=(), predictions=(), dropped=s.dropped,
                                           method="gradcam", explained_class=None, labels=("a",),
                                           fps=1.0, stage_ms={}, provider="CPUExecutionProvider"))
    assert f"{s.dropped} more face(s) not shown (--max-faces)" in hud


def test_the_hud_gives_the_detectors_mean_cost_when_boxes_are_carried(monkeypatch):
    """With --detect-every N > 1 the median detect time is a carried frame's: the HUD shows the
    mean, as the summary line does (3 carried frames of 0.3 ms, one detection of 3 ms)."""
    from camface.realtime import loop as loop_module
    from camface.realtime.summary import hud_stage_ms
    from camface.realtime.timing import StageTimer

    timer = StageTimer(("detect", "classify"))
    for _ in range(10):
        for seconds in (0.0003, 0.0003, 0.0003, 0.003):
            timer.add("detect", seconds)
            timer.add("classify", seconds)
    assert hud_stage_ms(timer, 4) == pytest.approx({"detect": 0.975, "classify": 0.3})
    assert hud_stage_ms(timer) == pytest.approx({"detect": 0.3, "classify": 0.3})

    asked = []
    monkeypatch.setattr(loop_module, "hud_stage_ms", lambda timer, every=1: asked.append(every) or {})
    summary = LiveLoop(LiveConfig(source="sample", max_frames=16)).run()
    assert summary.detect_every == 4 and asked == [4, 4]  # frames 0 and 15


def test_frames_of_every_kind(tmp_path, astronaut_bgr):
    """Gray, BGRA, 16-bit, all-black, 1x1 and odd-sized images in one folder."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    gray = cv2.cvtColor(astronaut_bgr, cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(folder / "01_gray.png"), gray)
    cv2.imwrite(str(folder / "02_bgra.png"), cv2.cvtColor(astronaut_bgr, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(folder / "03_16bit.png"), astronaut_bgr.astype(np.uint16) * 257)
    cv2.imwrite(str(folder / "04_black.png"), np.zeros((100, 120, 3), np.uint8))
    cv2.imwrite(str(folder / "05_tiny.png"), np.zeros((1, 1, 3), np.uint8))
    cv2.imwrite(str(folder / "06_odd.png"), astronaut_bgr[:333, :251])
    (folder / "07_broken.png").write_bytes(b"not a png")
    out = tmp_path / "mixed.mp4"
    loop = _run(LiveConfig(source=str(folder), record=out, detector="short"))
    assert loop.summary.frames == 6 and count_frames(out) == 6
    assert loop.summary.faces >= 4  # the astronaut in each of the four photos


def test_a_1x1_image_first_in_a_folder_does_not_shrink_the_recording(tmp_path, astronaut_bgr, caplog):
    """A 1x1 image first in a folder made the recording 2x2, the photos after it squeezed into
    that. The photos set its size; the 1x1 image is a frame of it, and a warning says why."""
    folder = photo_folder(tmp_path / "photos", np.full((1, 1, 3), 255, np.uint8), astronaut_bgr)
    out = tmp_path / "photos.mp4"
    with caplog.at_level(logging.WARNING):
        loop = _run(LiveConfig(source=str(folder), record=out, detector="short"))
    assert loop.summary.frames == 3 and count_frames(out) == 3
    capture = cv2.VideoCapture(str(out))
    assert capture.read()[1].shape == astronaut_bgr.shape
    capture.release()
    assert f"{out}: a first frame of 1x1 cannot show a face" in caplog.text


def test_fails_before_processing_when_output_is_unwritable(tmp_path, face_clip):
    with pytest.raises(OutputError, match="folder .*nowhere does not exist"):
        _run(LiveConfig(source=str(face_clip), record=tmp_path / "nowhere" / "x.mp4"))
    existing = tmp_path / "x.mp4"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        _run(LiveConfig(source=str(face_clip), record=existing))
    assert existing.read_bytes() == b"keep me"
    _run(LiveConfig(source=str(face_clip), record=existing, overwrite=True, max_frames=3))
    assert count_frames(existing) == 3


def test_camera_that_disappears_finalises_the_recording(tmp_path):
    out = tmp_path / "cam.mp4"
    source = LiveSource(0, timeout_s=1.0, opener=lambda target, timeout: FakeCamera(good=60))
    loop = LiveLoop(LiveConfig(record=out, detector="short"), source=source)
    with pytest.raises(SourceError, match="camera 0 stopped delivering frames"):
        loop.run()
    assert 0 < loop.summary.frames <= 60
    assert count_frames(out) == loop.summary.frames
    # measured, not the 30 fps default for a camera that reports 0 (which the old 20 < fps
    # bound let pass); about 200 on an idle machine, less on a loaded one (longer sleeps), so
    # no lower bound but the 2 s measuring window's; at most 10 frames over 9 gaps of >= 5 ms
    from camface.realtime.sources import DEFAULT_FPS

    assert source.info.fps != DEFAULT_FPS and 1.0 <= source.info.fps <= 10 / (9 * 0.005), source.info.fps
    assert loop.summary.detectors == 1  # a camera: one detector, the shortest latency


class _Clock:
    """time.monotonic's stand-in: each call is `step` seconds after the one before."""

    def __init__(self, step: float):
        self.step, self.now = step, 1000.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_camera_recording_lasts_as_long_as_the_camera_ran(tmp_path):
    """The loop keeps up with a camera by skipping frames; each recorded frame lasts until
    the next one came, not 1 / fps (the camera's ~200 fps here, while the clock says a frame
    came every 0.1 s), so the recording plays at the speed it was filmed."""
    out = tmp_path / "cam.mp4"
    source = LiveSource(0, timeout_s=1.0, opener=lambda target, timeout: FakeCamera())
    loop = LiveLoop(LiveConfig(record=out, detector="short", max_frames=8), source=source, clock=_Clock(0.1))
    loop.run()
    times = frame_times(out)
    assert len(times) == loop.summary.frames == 8
    period = 1 / source.info.fps  # the slot the times are rounded to
    assert np.diff(times) == pytest.approx([0.1] * 7, abs=period)
    assert source.info.fps > 1 / 0.1 * 2  # else the test could not tell the two apart


class _FakeSource:
    """A source's context-manager side: `info` named `name`, 30 fps, `live` or a file."""

    def __init__(self, name: str, live: bool):
        from camface.realtime.sources import SourceInfo

        self.info = SourceInfo(name, 30.0, None, live=live)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class _CameraWithClock(_FakeSource):
    """A live source whose i-th frame is taken at 0.1 * i s on `clock` (its `now`, which the
    source sets as it hands the frame over; calling the clock does not move it)."""

    def __init__(self, frames: list[np.ndarray]):
        super().__init__("fake camera", live=True)
        self.frames, self.now = frames, 1000.0

    def __iter__(self):
        for i, frame in enumerate(self.frames):
            self.now = 1000.0 + 0.1 * i
            yield frame.copy()

    def clock(self) -> float:
        return self.now


def test_a_camera_frame_is_timed_when_it_was_read_not_when_it_was_shown(tmp_path, sample_frames):
    """The reader runs frames ahead of the main thread (detection and the CAM graph sit between
    them, and their cost varies by frame): a frame stamped when shown would take the time of a
    frame read later, and the recording's timing would jitter by the queue's depth."""
    clip, _ = sample_frames
    camera = _CameraWithClock([clip.frame(i) for i in range(12)])
    out = tmp_path / "cam.mp4"
    loop = LiveLoop(LiveConfig(record=out, detector="short"), source=camera, clock=camera.clock)
    loop.run()
    assert loop.summary.frames == 12
    assert frame_times(out) == pytest.approx([0.1 * i for i in range(12)], abs=1e-3)


def test_a_file_recording_keeps_one_frame_period_per_frame(tmp_path, face_clip):
    out = tmp_path / "file.mp4"
    loop = LiveLoop(LiveConfig(source=str(face_clip), record=out, max_frames=6), clock=_Clock(0.5))
    loop.run()
    with VideoFileSource(face_clip) as clip:
        fps = clip.info.fps
    assert frame_times(out) == pytest.approx([i / fps for i in range(6)], abs=1e-3)


def test_live_source_keeps_only_the_newest_frame():
    camera = FakeCamera(good=1000)
    with LiveSource(0, opener=lambda target, timeout: camera) as source:
        frames = iter(source)
        first = int(next(frames)[0, 0, 0])  # the camera's read number (mod 255)
        deadline = time.monotonic() + 30
        while camera.reads < first + 5 and time.monotonic() < deadline:  # by count, not by time
            time.sleep(0.005)
        assert camera.reads >= first + 5, "the camera was not read on"
        second = int(next(frames)[0, 0, 0])
    assert second - first >= 3  # frames that arrived meanwhile were skipped, not queued


def test_truncated_video_stops_at_the_last_good_frame(tmp_path, sample_frames, caplog):
    clip, _ = sample_frames
    avi = tmp_path / "full.avi"  # AVI/MJPG decodes up to the cut; its index is optional
    writer = cv2.VideoWriter(str(avi), cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
    for i in range(100, 220, 10):
        writer.write(clip.frame(i))
    writer.release()
    data = avi.read_bytes()
    truncated = tmp_path / "cut.avi"
    truncated.write_bytes(data[: int(len(data) * 0.6)])
    out = tmp_path / "cut_out.mp4"
    loop = _run(LiveConfig(source=str(truncated), record=out, detector="short"))
    assert 3 <= loop.summary.frames < 12 and count_frames(out) == loop.summary.frames
    assert f"read {loop.summary.frames} of 12 frames (file truncated or damaged)" in caplog.text


def test_truncated_mp4_without_its_index_is_a_clear_error(tmp_path, face_clip, monkeypatch):
    """Said before the CAM graph loads, naming --source (it was said once the model had loaded,
    as a bare 'cannot open video file')."""
    import camface.api

    def no_model(*args, **kwargs):
        pytest.fail("the model was loaded before the source was checked")

    monkeypatch.setattr(camface.api, "load", no_model)
    data = face_clip.read_bytes()  # OpenCV writes the mp4 index (moov) last: cut it off
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="^--source: cannot open video file .*cut.mp4"):
        _run(LiveConfig(source=str(truncated), record=tmp_path / "never.mp4"))
    assert not (tmp_path / "never.mp4").exists()


@pytest.mark.parametrize("spec, message", [
    ("missing.mp4", "source not found: missing.mp4"),
    ("empty_dir", "no images .* in folder .*empty_dir"),
    ("text.mp4", "cannot open video file .*text.mp4"),
    ("7", "camera 7 could not be opened"),
    ("", "--source is empty"),
])
def test_bad_sources_name_the_thing(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "text.mp4").write_text("hello")
    with pytest.raises(SourceError, match=message):
        with make_source(spec) as source:
            list(source)


def test_stream_that_does_not_answer_times_out():
    start = time.perf_counter()
    with pytest.raises(SourceError, match="stream rtsp://127.0.0.1:9/none could not be opened"):
        with LiveSource("rtsp://127.0.0.1:9/none", timeout_s=2.0):
            pass
    assert time.perf_counter() - start < 10


def test_file_and_folder_sources_yield_every_frame(tmp_path, face_clip):
    with VideoFileSource(face_clip) as video:
        assert video.info.frames == 12 and video.info.fps == pytest.approx(30)
        assert sum(1 for _ in video) == 12
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"img{10 - i}.jpg"), np.full((20, 30), i * 50, np.uint8))
    with ImageFolderSource(tmp_path) as folder:
        values = [int(f[0, 0, 0]) for f in folder]
    assert len(values) == 3 and values == sorted(values, reverse=True)  # img8, img9, img10


def _recorded_bars(monkeypatch):
    """tqdm.tqdm replaced by a subclass that appends (n, total) to the returned list as it closes."""
    import tqdm

    bars = []

    class Recorded(tqdm.tqdm):
        def close(self):
            bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    return bars, Recorded


def test_the_progress_bar_finishes_when_a_folder_holds_an_unreadable_file(tmp_path, monkeypatch):
    """An image folder announces its files, unreadable ones included (skipped with a warning):
    the bar ended at 2/3. At the end of input it is made full (2/2); stopped early (quit,
    Ctrl-C, a failure), it keeps the announced total and says how far the run got."""
    bars, Recorded = _recorded_bars(monkeypatch)
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), SampleSource().frame(150 + i))
    (tmp_path / "2.png").write_bytes(b"not a png")
    loop = _run(LiveConfig(source=str(tmp_path), method="none", progress=True))
    assert loop.summary.frames == 2 and bars[0] == (2, 2)  # (tqdm closes again when collected)
    bars.clear()
    with open(os.devnull, "w") as devnull:
        stopped = Recorded(total=9, file=devnull)
        stopped.update(4)
        finish_progress(stopped, ended=False)
    assert bars[0] == (4, 9)


@pytest.mark.parametrize("looped", [True, False])
def test_the_progress_bar_of_an_endless_source_counts_to_max_frames(face_clip, sample_frames, monkeypatch, looped):
    """--loop over a 12-frame clip, or a camera, with --max-frames: the run stops at that many
    frames, and the bar counts to them (it had no total)."""
    bars, _ = _recorded_bars(monkeypatch)
    clip, _ = sample_frames
    source = None if looped else _CameraWithClock([clip.frame(i) for i in range(20)])
    config = LiveConfig(source=str(face_clip) if looped else None, loop=looped, max_frames=15, method="none",
                        progress=True, detector="short")
    loop = _run(config, source=source)
    assert loop.summary.frames == 15 and bars[0] == (15, 15)


# ------------------------------------------------------------------------------ the command

def test_cli_smoke_file_folder_and_bad_camera(tmp_path, face_clip, capsys):
    out = tmp_path / "cli.mp4"
    assert camface_main(["live", "--source", str(face_clip), "--no-show", "--record", str(out),
                         "--method", "gradcampp", "--detector", "short", "--max-frames", "4"]) == 0
    assert count_frames(out) == 4
    assert "Speed: " in capsys.readouterr().err
    folder = tmp_path / "imgs"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), SampleSource().frame(150))
    assert camface_main(["live", "--source", str(folder), "--no-show", "--method", "none", "--top3"]) == 0
    assert camface_main(["live", "--source", "9", "--no-show"]) == 2
    assert "camface: error: camera 9 could not be opened" in capsys.readouterr().err
    assert camface_main(["live", "--source", "sample", "--no-show", "--record", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    size = out.stat().st_size  # recording over the video being read would wipe it
    assert camface_main(["live", "--source", str(out), "--no-show", "--record", str(out), "--overwrite"]) == 2
    assert f"--record {out} is an input" in capsys.readouterr().err and out.stat().st_size == size
    assert camface_main(["live", "--source", "sample", "--no-show", "--alpha", "2"]) == 2


@pytest.mark.parametrize("record, code", [(False, 0), (True, 2)])
def test_codec_h264_without_an_encoder_fails_only_a_run_that_records(tmp_path, monkeypatch, capsys, record, code):
    """--codec h264 where no H.264 encoder opens: a headless run without --record never uses
    the codec and runs; with --record it is refused, naming the codec, before any frame."""
    from camface.realtime import fmp4

    monkeypatch.setattr(fmp4, "h264_encoder", lambda: (None, "no H.264 encoder in this test"))
    monkeypatch.chdir(tmp_path)
    argv = ["live", "--source", "sample", "--no-show", "--codec", "h264", "--max-frames", "2", "--method", "none"]
    assert camface_main([*argv, *(["--record", "out.mp4"] if record else [])]) == code
    err = capsys.readouterr().err
    if record:
        assert "camface: error: cannot record H.264: no H.264 encoder in this test" in err
        assert not (tmp_path / "out.mp4").exists()
    else:
        assert "Speed: " in err and "error" not in err


def test_sample_runs_with_tensorflow_blocked(tmp_path):
    out = tmp_path / "sample.mp4"
    run = subprocess.run([sys.executable, "-c", BLOCK_TF, "live", "--source", "sample", "--no-show",
                          "--record", str(out), "--max-frames", "20", "--snapshot-every", "10",
                          "--snapshot-dir", str(tmp_path / "snaps")],
                         capture_output=True, text=True, env=ENV, timeout=180, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "recorded 20 frames" in run.stderr and count_frames(out) == 20
    assert len(list((tmp_path / "snaps").iterdir())) == 2


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_clip_leaves_a_playable_recording(tmp_path, sig, code):
    out = tmp_path / "sig.mp4"
    # --loop: the sample never ends, so the signal always lands mid-run (its 300 frames alone
    # could all be done, at 76 fps, before a loaded machine's poll saw 20 kB and signalled)
    process = subprocess.Popen([sys.executable, "-m", "camface", "live", "--source", "sample", "--loop",
                                "--no-show", "--record", str(out)],
                               stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path,
                               preexec_fn=sigint_as_from_a_terminal)
    try:
        deadline = time.time() + 120
        while not (out.exists() and out.stat().st_size > 20_000) and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # never left running (it loops) whatever failed above
            process.kill()
            process.communicate()
    assert process.returncode == code, err
    recorded = int(err.split("recorded ")[1].split(" frames")[0])
    assert recorded > 0 and count_frames(out) == recorded


def test_a_recording_that_fills_the_disk_keeps_its_frames_playable(tmp_path):
    """A real write error, not a patched one: the file size limit (RLIMIT_FSIZE, as a full disk
    to the writer: EFBIG instead of ENOSPC) stops the recording mid-fragment. The run ends with
    an error naming the path, the file holds every frame the summary says it recorded, whole
    (PyAV decodes them all), and nothing is left beside it."""
    import resource

    from camface.realtime.sinks import encoder_for

    if encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here (mp4v writes its index last: a full disk loses it)")
    out = tmp_path / "full.mp4"

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # (Python ignores SIGXFSZ)

    run = subprocess.run([sys.executable, "-m", "camface", "live", "--source", "sample", "--no-show", "--record",
                          str(out), "--max-frames", "300"], capture_output=True, text=True, env=ENV, timeout=180,
                         cwd=tmp_path, preexec_fn=small_disk)
    assert run.returncode == 2, run.stderr
    assert f"camface: error: cannot write {out}: File too large" in run.stderr.splitlines()
    recorded = int(run.stderr.split("recorded ")[1].split(f" frames to {out}")[0])
    assert 0 < recorded < 300 and count_frames(out) == recorded == len(frame_times(out))
    assert [p.name for p in tmp_path.iterdir()] == ["full.mp4"]


STUCK_WRITER = """
import sys, threading
from camface.realtime import fmp4
real, written = fmp4.H264Writer.write, []
def write(self, frame, tick=None):
    written.append(1)
    if len(written) == 70:  # a file system that hangs: the write never returns
        print("stuck", file=sys.stderr, flush=True)
        threading.Event().wait()
    return real(self, frame, tick)
fmp4.H264Writer.write = write
from camface.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _ctrl_c_until_a_stuck_run_ends(script: str, record: list[str], folder: Path) -> tuple[int, str]:
    """Run `camface live` on the looping sample through `script` (STUCK_WRITER: its writer
    blocks and it says "stuck"), then press Ctrl-C every 0.2 s until it ends (at most 60 s, then
    killed): (its exit code, its stderr)."""
    process = subprocess.Popen([sys.executable, "-c", script, "live", "--source", "sample", "--loop", "--no-show",
                                *record, "--method", "none"], stderr=subprocess.PIPE, text=True, env=ENV,
                               cwd=folder, preexec_fn=sigint_as_from_a_terminal)
    try:
        said = []
        while not said or said[-1] not in ("stuck\n", ""):  # (camface's own lines come first)
            said.append(process.stderr.readline())
        assert said[-1] == "stuck\n", "".join(said)
        deadline = time.time() + 60
        while process.poll() is None and time.time() < deadline:
            process.send_signal(signal.SIGINT)
            time.sleep(0.2)
        if process.poll() is None:  # (the stuck run never ends: read what it said after the kill)
            process.kill()
        err = process.communicate()[1]
        return process.returncode, err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_ctrl_c_pressed_again_ends_a_run_whose_writer_is_stuck(tmp_path):
    """A writer stuck on its file: signals are held while the recording is finished, so Ctrl-C
    did nothing and only SIGKILL ended the run. Pressed again (the first is deferred while a
    frame is handed over, the next stops the loop, three more while it finishes), the run ends
    with 130, says why, and the fragments on disk play."""
    out = tmp_path / "stuck.mp4"
    code, err = _ctrl_c_until_a_stuck_run_ends(STUCK_WRITER, ["--record", str(out)], tmp_path)
    assert code == 130, err
    assert (f"camface: stopped without finishing: the writer of recordings and snapshots did not return; {out} "
            "holds what reached the disk (3 signals while it finished)") in err
    assert 30 <= count_frames(out) < 70


def test_a_stuck_recording_over_an_earlier_one_names_the_file_its_frames_are_in(tmp_path):
    """A recording over an earlier file (--overwrite) is written beside it until its first
    fragment is on disk: a writer stuck before then, ended by Ctrl-C, was said to have left
    what reached the disk in the path, which holds the earlier recording; the frames are in the
    file beside it, which the next recording to the path removes. The line names that file."""
    out = tmp_path / "stuck.mp4"
    out.write_bytes(b"the earlier recording")
    code, err = _ctrl_c_until_a_stuck_run_ends(STUCK_WRITER.replace("== 70", "== 10"),
                                               ["--record", str(out), "--overwrite"], tmp_path)
    assert code == 130, err
    staged = next(tmp_path.glob(".stuck.mp4.*.partial.mp4"))
    assert (f"what reached the disk is in {staged}, not in {out}: move it away before recording to {out} "
            "again (3 signals while it finished)") in err
    assert out.read_bytes() == b"the earlier recording"


def test_a_recording_closed_by_the_writer_as_the_run_ends_is_finished(tmp_path, face_clip, monkeypatch):
    """The run's end read `recorder.sink` twice (is one there? its path) while the writer thread
    may close it in between (key r, a failed recording: `sink` set to None): AttributeError
    there skipped the stop, the writer's join and the recording's close, and lost the summary.
    Read once: here the second read is made to see the writer's None."""
    from camface.realtime import loop as loop_module

    class Racing(loop_module.Recorder):
        reads = 0

        @property
        def sink(self):
            if threading.current_thread() is threading.main_thread():
                Racing.reads += 1
                if Racing.reads > 1:  # (as if the writer thread closed it just after the first read)
                    return None
            return self.__dict__.get("_sink")

        @sink.setter
        def sink(self, value):
            self.__dict__["_sink"] = value

    monkeypatch.setattr(loop_module, "Recorder", Racing)
    out = tmp_path / "out.mp4"
    loop = _run(LiveConfig(source=str(face_clip), record=out, detector="full"))
    assert Racing.reads >= 1 and loop.summary.recordings == ((str(out), 12),) and count_frames(out) == 12


@pytest.mark.parametrize("first, second, signal_error", [(signal.SIGINT, signal.SIGINT, KeyboardInterrupt),
                                                         (signal.SIGTERM, signal.SIGINT, Terminated),
                                                         (signal.SIGINT, signal.SIGTERM, KeyboardInterrupt)])
def test_a_second_signal_right_after_the_first_is_held_while_the_run_finishes(tmp_path, face_clip, monkeypatch,
                                                                             first, second, signal_error):
    """A second Ctrl-C (or SIGTERM) handled after the first had stopped the loop, before the
    finishing block had put its holding handler in place (here: as it reads the recorder's sink,
    its first step), raised in the middle of the finishing: the writer was not joined, the
    recording not finished, no summary. It is held: the run finishes, the first signal's
    exception ends it, and the recording holds every frame counted."""
    from camface.realtime import loop as loop_module
    from camface.realtime.threads import sigterm_raises

    stopped = []

    class SecondSignalAsTheRunFinishes(loop_module.Recorder):
        @property
        def sink(self):
            if stopped and threading.current_thread() is threading.main_thread():
                stopped.clear()  # (once)
                signal.raise_signal(second)
            return self.__dict__.get("_sink")

        @sink.setter
        def sink(self, value):
            self.__dict__["_sink"] = value

    class FirstSignalOnFrame3(FakeWindow):
        def show(self, frame):
            if len(self.shown) == 2:
                stopped.append(True)
                signal.raise_signal(first)
            return super().show(frame)

    monkeypatch.setattr(loop_module, "Recorder", SecondSignalAsTheRunFinishes)
    out = tmp_path / "out.mp4"
    loop = LiveLoop(LiveConfig(source=str(face_clip), record=out, show=True, method="none"),
                    window=FirstSignalOnFrame3(""))
    with sigterm_raises(), pytest.raises(signal_error):  # (SIGTERM's handler outside the loop, as the CLI's)
        loop.run()
    assert not stopped  # (the second signal was sent)
    assert loop.summary is not None and loop.summary.frames == 2
    assert loop.summary.stopped_by == ("interrupted" if first == signal.SIGINT else "terminated")
    assert loop.summary.recordings == ((str(out), 2),) and count_frames(out) == 2


@pytest.mark.parametrize("when", ["waiting for room", "on the put's return"])
@pytest.mark.parametrize("sig, signal_error", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_signal_as_a_frame_is_handed_to_the_writer_leaves_it_counted_and_recorded(tmp_path, face_clip, monkeypatch,
                                                                                   when, sig, signal_error):
    """A signal that came while the main thread waited for room in the writer's full queue left
    the frame counted but not recorded (its put cut short); one handled when the put returned
    (SIGTERM taken by another thread meanwhile) left it recorded but not counted ('1148 frames
    ...; recorded 1149 frames', one run in two on the sample). The signal takes effect once the
    frame is both: the summary counts every frame the file holds."""
    from camface.realtime import loop as loop_module
    from camface.realtime.recorder import Output

    real_put = loop_module.put

    def put_with_a_signal(q, item, stop):
        third = isinstance(item, Output) and item.explained is not None and item.explained.result.index == 2
        if third and when == "waiting for room":
            signal.raise_signal(sig)
        done = real_put(q, item, stop)
        if third and when == "on the put's return":
            signal.raise_signal(sig)
        return done

    monkeypatch.setattr(loop_module, "put", put_with_a_signal)
    out = tmp_path / "signal.mp4"
    loop = LiveLoop(LiveConfig(source=str(face_clip), record=out, method="none"))
    with pytest.raises(signal_error):
        loop.run()
    assert loop.summary.recordings == ((str(out), 3),) and count_frames(out) == 3
    assert loop.summary.frames == 3 and "; 3 frames, " in loop.summary.line()
    assert loop.summary.stopped_by == ("interrupted" if sig == signal.SIGINT else "terminated")


@pytest.mark.parametrize("signal_error", [KeyboardInterrupt, Terminated])
def test_a_recording_error_at_a_signal_is_said_with_the_signal(tmp_path, face_clip, monkeypatch, caplog, signal_error):
    """Ctrl-C (or SIGTERM) on frame 3, and the disk full when the recording's last fragment is
    written: the signal still ends the run (its exit code), and the recording's error is said
    too, naming the file; it was lost behind the signal."""
    import errno

    from camface.realtime import fmp4

    real_close = fmp4.H264Writer.close

    def full_disk_close(self):
        real_close(self)
        raise OSError(errno.ENOSPC, "No space left on device")

    class SignalOnFrame3(FakeWindow):
        def show(self, frame):
            if len(self.shown) == 2:
                raise signal_error()
            return super().show(frame)

    monkeypatch.setattr(fmp4.H264Writer, "close", full_disk_close)
    out = tmp_path / "full.mp4"
    loop = LiveLoop(LiveConfig(source=str(face_clip), record=out, codec="h264", show=True, method="none",
                               snapshot_dir=tmp_path / "snaps"), window=SignalOnFrame3(""))
    with caplog.at_level("ERROR", logger="camface.realtime.loop"), pytest.raises(signal_error):
        loop.run()
    assert loop.summary.stopped_by in ("interrupted", "terminated") and loop.summary.frames == 2
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert said == [f"camface: error: recording {out} failed: [Errno {errno.ENOSPC}] No space left on device"]


def test_window_keys_drive_the_loop(tmp_path, face_clip):
    """m: method; 3: explain class 3 ('happy'); a: predicted; s: snapshot of the frame shown;
    r: stop, then start recording (a second file); h: HUD off; q: quit."""
    out = tmp_path / "win.mp4"
    window = FakeWindow("m3s.r.rhq")
    loop = LiveLoop(LiveConfig(source=str(face_clip), record=out, show=True, detector="short", method="gradcam",
                               snapshot_dir=tmp_path / "snaps"), window=window)
    summary = loop.run()
    assert summary.frames == 9 and summary.stopped_by == "quit"
    # frames 0-3 recorded; r on frame 4 stops recording, r on frame 6 starts a second file (6-8)
    second = tmp_path / "win-2.mp4"
    assert summary.recordings == ((str(out), 4), (str(second), 3))
    assert count_frames(out) == 4 and count_frames(second) == 3
    (snap,) = (tmp_path / "snaps").iterdir()
    meta = json.loads((snap / "snapshot.json").read_text())
    assert meta["frame_index"] == 2 and meta["method"] == "gradcampp"
    assert all(f["explained"] == 3 for f in meta["faces"])
    assert not (window.shown[8][:40, :200] == window.shown[7][:40, :200]).all()  # HUD gone


@pytest.mark.parametrize("fault", ["folder not writable", "encoder refuses the file"])
def test_key_r_that_cannot_start_a_recording_warns_and_the_run_goes_on(tmp_path, monkeypatch, caplog, face_clip,
                                                                         fault):
    """r on frame 2 where the recording cannot start (its folder, here the working folder, not
    writable; or the encoder refusing the file at its first frame) ended the run with exit 2.
    The recording does not start, a warning names the path and the reason (the log, and the
    frames shown after it), and the run goes on: r on frame 5, the fault gone, records 5-9."""
    from camface.realtime.sinks import VideoSink
    from camface.realtime.text import TextPainter

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)  # key r records to a timestamped name in the working folder
    faults = [1]
    if fault == "folder not writable":
        reason, real_access = "permission denied", os.access

        def access(path, mode, *args, **kwargs):  # root writes anywhere: as chmod 500 does for a user
            if mode == os.W_OK and faults and Path(path).resolve() == here.resolve():
                faults.pop()
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    else:
        reason, real_open = "the encoder refused it", VideoSink._open

        def refusing_open(self, frame, *args):
            if faults:
                faults.pop()
                raise OutputError(f"cannot open {self.path} for writing: the encoder refused it")
            return real_open(self, frame, *args)

        monkeypatch.setattr(VideoSink, "_open", refusing_open)
    drawn: list[str] = []
    real_put = TextPainter.put
    monkeypatch.setattr(TextPainter, "put", lambda self, frame, text, *a, **k: (drawn.append(text),
                                                                             real_put(self, frame, text, *a, **k))[1])
    window = FakeWindow("..r..r...q")
    loop = LiveLoop(LiveConfig(source=str(face_clip), show=True, detector="short", method="none",
                               snapshot_dir=tmp_path / "snaps"), window=window)
    with caplog.at_level("WARNING", logger="camface.realtime.recorder"):
        summary = loop.run()
    assert summary.stopped_by == "quit" and summary.frames == 10 and not faults
    said = [r.getMessage() for r in caplog.records if "recording not started" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("camface: recording not started: cannot ") and reason in said[0]
    assert re.search(r"cannot (write|open) camface-\d{8}-\d{6}(-\d+)?\.mp4", said[0])  # the path
    assert said[0].removeprefix("camface: ") in drawn  # on the frames shown after it
    ((recorded, count),) = summary.recordings
    assert count == 5 and count_frames(Path(recorded)) == 5
    assert sorted(p.name for p in here.iterdir()) == [Path(recorded).name]


def test_key_rs_recording_that_fills_the_disk_stops_and_the_run_goes_on(tmp_path, monkeypatch, caplog, face_clip):
    """A recording key r started fails at its fourth frame (the disk full): it ended the run
    (exit 2). The recording is stopped and finalised with its three frames (playable), a
    warning names the file and the reason (the log, and the frames shown after it), and the run
    goes on: r again, the disk freed, records a second file. (The --record file's own failure
    still ends the run: test_a_recording_error_at_a_signal_is_said_with_the_signal.)"""
    import errno

    from camface.realtime.sinks import VideoSink
    from camface.realtime.text import TextPainter

    monkeypatch.chdir(tmp_path)  # key r records to a timestamped name in the working folder
    real_write, writes = VideoSink.write, []

    def filling_write(self, frame, *args, **kwargs):
        writes.append(self.path)
        if len(writes) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, frame, *args, **kwargs)

    monkeypatch.setattr(VideoSink, "write", filling_write)
    drawn: list[str] = []
    real_put = TextPainter.put
    monkeypatch.setattr(TextPainter, "put", lambda self, frame, text, *a, **k: (drawn.append(text),
                                                                             real_put(self, frame, text, *a, **k))[1])
    loop = LiveLoop(LiveConfig(source=str(face_clip), show=True, detector="short", method="none",
                               snapshot_dir=tmp_path / "snaps"), window=FakeWindow("..r....r..q"))
    with caplog.at_level("WARNING", logger="camface.realtime.recorder"):
        summary = loop.run()
    assert summary.stopped_by == "quit" and summary.frames == 11
    said = [r.getMessage() for r in caplog.records if "recording stopped" in r.getMessage()]
    assert len(said) == 1 and "No space left on device" in said[0] and "(3 frames kept)" in said[0]
    assert said[0].removeprefix("camface: ") in drawn
    (first, kept), (second, count) = summary.recordings
    assert first in said[0] and kept == 3 and count_frames(Path(first)) == 3
    assert second != first and count > 0 and count_frames(Path(second)) == count


class _KeyWhileHeld:
    """A window whose user presses a key while the n-th frame shown is held on screen (the
    viewer polls it while it waits for the next frame's time, or at the end of the input):
    keys: {n: key}, n counting the frames shown from 0."""

    def __init__(self, keys: dict[int, str]):
        self.keys, self.closed = keys, False
        self.shown: list[np.ndarray] = []
        self._polled = True

    def show(self, frame):
        if not self.shown or frame is not self.shown[-1]:
            self.shown.append(frame)
            self._polled = False
            return -1
        key = None if self._polled else self.keys.get(len(self.shown) - 1)
        self._polled = True
        return ord(key) if key else -1


def test_key_s_saves_the_image_on_screen(tmp_path, monkeypatch, sample_frames):
    """A folder's images are each held on screen (--image-seconds): s pressed meanwhile saves
    that image, the last one's included (once saved two images later, the last one's lost)."""
    from camface.realtime import pace

    clock = [0.0]  # the pacer's time, moved on only by its sleeps: the holds are polled alike everywhere
    real = pace.Pacer
    monkeypatch.setattr(pace, "Pacer", lambda period: real(period, lambda: clock[0],
                                                            lambda s: clock.__setitem__(0, clock[0] + s)))
    _, frames = sample_frames
    images = tmp_path / "images"
    images.mkdir()
    for n, index in enumerate((0, 120, 240)):
        cv2.imwrite(str(images / f"img{n}.png"), frames[index])
    window = _KeyWhileHeld({0: "s", 2: "s"})
    summary = LiveLoop(LiveConfig(source=str(images), show=True, pace="source", image_seconds=1.0,
                                  snapshot_dir=tmp_path / "snaps"), window=window).run()
    assert summary.frames == 3 and summary.snapshots == 2 and len(window.shown) == 3
    saved = sorted(p.name for p in (tmp_path / "snaps").iterdir())
    assert saved == ["frame_000000", "frame_000002"]
    for name, n in zip(saved, (0, 2)):
        image = cv2.imread(str(tmp_path / "snaps" / name / "frame.png"))
        assert np.array_equal(image, cv2.imread(str(images / f"img{n}.png")))
        meta = json.loads((tmp_path / "snaps" / name / "snapshot.json").read_text())
        assert meta["frame_index"] == n


def test_8k_frame_with_faces_over_the_edges():
    from camface.realtime.crop import crop_faces
    from camface.realtime.detect import FaceDetector
    from camface.realtime.render import Renderer
    from camface.realtime.results import Face, FrameResult, Prediction

    frame = np.zeros((4320, 7680, 3), np.uint8)
    with FaceDetector(DETECTORS["full"]) as detector:
        assert detector.detect(frame) == ()  # all black
    faces = (Face((7600, 4200, 80, 120), 0.9), Face((0, 0, 50, 50), 0.8))
    crops, faces = crop_faces(frame, faces, 0.2, (64, 64), "GRAY")
    assert crops.shape == (2, 64, 64, 1) and faces[0].crop_box[0] + faces[0].crop_box[2] > 7680
    predictions = tuple(Prediction(np.full(7, 1 / 7, np.float32), np.eye(4, dtype=np.float32), 0, 0, "gradcam")
                        for _ in faces)
    Renderer(cam_boxes=True, bars=True).annotate(frame, FrameResult(0, faces, predictions, labels=tuple("abcdefg")))
    assert frame[4200:, 7600:].any() and frame[:50, :50].any()


def test_stalled_stream_reconnects_a_bounded_number_of_times(caplog):
    opened = []

    def opener(target, timeout):
        opened.append(target)
        return FakeCamera(good=30 if len(opened) == 1 else 0)  # reconnections open but stay silent

    source = LiveSource("rtsp://camera.local/live", timeout_s=1.0, reconnects=2, opener=opener, backoff_s=0.01)
    received = 0
    with pytest.raises(SourceError, match=r"stream rtsp://camera.local/live stopped delivering frames after "
                                          r"\d+ frames and 2 reconnection attempts"):
        with source:
            for _ in source:
                received += 1
    assert len(opened) == 3 and received > 0
    assert "reconnecting in 0.0 s (attempt 2 of 2)" in caplog.text



def test_a_reconnected_stream_is_a_cut_for_the_carried_boxes():
    """A stream that stalls and is reconnected goes on seconds later: the loop's reader marks
    its first frame after the reconnection as a cut (LiveSource.passes), so the BoxCarrier
    detects it instead of carrying the boxes from before the stall onto it."""
    import queue
    import threading

    class Camera(FakeCamera):  # frames of `value`; stalls once `until()`
        def __init__(self, value, until=lambda: False):
            super().__init__()
            self.value, self.until = value, until

        def read(self):
            ok, frame = super().read()
            ok = ok and not self.until()
            return ok, np.full_like(frame, self.value) if ok else None

    # the first connection stalls once the loop's reader has taken 3 of its frames (not after 12
    # reads, which a loaded machine could let pass, reconnected, before the reader's first)
    out: queue.Queue = queue.Queue()
    opened = []

    def opener(target, timeout):
        opened.append(target)
        return Camera(1, until=lambda: out.qsize() >= 3) if len(opened) == 1 else Camera(100)

    source = LiveSource("rtsp://camera.local/live", timeout_s=1.0, reconnects=2, opener=opener, backoff_s=0.01)
    with source:
        LiveLoop(LiveConfig(max_frames=25))._read(source, out, threading.Event(), 1, threading.Semaphore(100))
    items = [item for item in out.queue if isinstance(item, tuple)]  # (index, frame, cut), then END
    assert len(items) == 25 and len(opened) == 2 and source.passes == 1
    after = [int(frame[0, 0, 0]) >= 100 for _, frame, _ in items]
    first = after.index(True)
    assert 3 <= first and all(after[first:])
    assert [cut for _, _, cut in items] == [index == first for index in range(25)]


def test_a_reconnected_stream_is_smoothed_afresh(sample_frames, monkeypatch):
    """Smoothing carried the averages and tracks from before a stream's reconnection into the
    frames after it (detection started over there, smoothing did not): the first frame after a
    reconnection is now its own, and its faces are new tracks."""
    from camface.realtime import render

    _, frames = sample_frames
    before = frames[120]
    after = np.ascontiguousarray(before // 2 + 60)  # the same faces, paler

    class Camera(FakeCamera):
        def __init__(self, frame, until=lambda: False):
            super().__init__()
            self.frame, self.until = frame, until

        def read(self):
            ok, _ = super().read()
            ok = ok and not self.until()
            return ok, self.frame.copy() if ok else None  # the loop draws on the frames it gets

    # The first connection stalls once the loop has drawn 3 of its frames, not after 12 reads:
    # read at ~200 fps from the moment the source is entered, those 12 were gone (reconnected)
    # before a loaded machine had opened the detectors and started the loop's reader, so the
    # loop's first frame was already after the cut (no cut at index > 0: StopIteration).
    seen = []
    opened = []

    def opener(target, timeout):
        opened.append(target)
        return Camera(before, until=lambda: len(seen) >= 3) if len(opened) == 1 else Camera(after)

    real_annotate = render.Renderer.annotate

    def spy_annotate(self, frame, result, *args):
        seen.append(result)
        return real_annotate(self, frame, result, *args)

    monkeypatch.setattr(render.Renderer, "annotate", spy_annotate)
    source = LiveSource("rtsp://camera.local/live", timeout_s=1.0, reconnects=2, opener=opener, backoff_s=0.01)
    _run(LiveConfig(smooth=0.6, max_frames=24, pace="none"), source=source)
    assert len(opened) == 2 and source.passes == 1 and len(seen) == 24
    cut = next(i for i, result in enumerate(seen) if result.index > 0 and
               {f.track_id for f in result.faces}.isdisjoint({f.track_id for f in seen[i - 1].faces}))
    # frames 0-2 are the first connection's; only the loop's frames in flight (its slots: 2 x
    # QUEUE_SIZE + one per detector thread) and the newest frame read follow them before the cut
    assert 3 <= cut <= len(seen) - 3 and len(seen[cut].faces) >= 2
    for result in seen[cut + 1:]:  # the same frame after the cut: the average is that frame's own
        assert [f.track_id for f in result.faces] == [f.track_id for f in seen[cut].faces]
        for got, first in zip(result.predictions, seen[cut].predictions):
            np.testing.assert_allclose(got.probs, first.probs, atol=1e-5)
    # the frames before had other probabilities, so an average carried across would show
    assert max(np.abs(a.probs - b.probs).max() for a, b in zip(seen[0].predictions, seen[cut].predictions)) > 1e-3


def test_a_stream_whose_reads_hang_says_how_long_it_waited():
    """A read that does not return (a stalled network stream): the iteration ends after the
    time it allows for the reconnections too, and the message says that time, not timeout_s."""
    import threading

    class Hangs(FakeCamera):
        def __init__(self):
            super().__init__()
            self.gone = threading.Event()

        def read(self):
            if self.reads:  # the first frame comes, then nothing
                self.gone.wait(5)
                return False, None
            return super().read()

        def release(self):
            self.gone.set()

    source = LiveSource("rtsp://camera.local/live", timeout_s=0.1, reconnects=2, opener=lambda t, s: Hangs())
    with pytest.raises(SourceError, match=r"stream rtsp://camera.local/live delivered no frame for 0.5 s"):
        with source:
            for _ in source:
                pass


def test_emotion_graph_explains_the_class_asked_for(astronaut_bgr):
    from camface.realtime.crop import crop_faces
    from camface.realtime.graph import CamGraph
    from camface.realtime.results import Face

    graph = CamGraph(EMOTION_ONNX, "cpu")
    crops, _ = crop_faces(astronaut_bgr, (Face((177, 82, 95, 95), 0.9),) * 2, 0.1,
                          graph.info.input_size, graph.info.color_order)
    probs, heat = graph.run(crops, np.array([-1, 0]), "gradcam")
    assert graph.info.labels[int(probs[0].argmax())] == "happy" and probs[0].max() > 0.9
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-6)  # same crop, same probabilities
    assert not np.allclose(heat[0], heat[1])  # 'happy' and 'angry' are explained differently


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "2"], "--alpha must be in [0, 1]"),
    (["--smooth", "1"], "--smooth must be in [0, 1)"),
    (["--graph-threads", "-1"], "--graph-threads must be 0 (all cores) .. 1024, got -1"),
    (["--colormap", "rainbowish"], "--colormap 'rainbowish' unknown"),
    (["--max-faces", "0"], "--max-faces must be 1..32"),
    (["--max-frames", "0"], "--max-frames must be >= 1"),
    (["--detect-workers", "9"], "--detect-workers must be 0 (auto) .. 8"),
])
def test_bad_live_flags_name_the_flag(flags, message, capsys):
    assert camface_main(["live", "--source", "sample", "--no-show", *flags]) == 2
    assert message in capsys.readouterr().err


def test_graph_threads_zero_uses_every_core(face_clip):
    loop = _run(LiveConfig(source=str(face_clip), graph_threads=0, max_frames=2))
    assert loop.summary.frames == 2 and loop.summary.faces >= 2


# ------------------------------------------------------------------------------ parallel detectors

def test_detect_workers_auto_is_one_per_core_at_most_two():
    assert [detect_workers_for(0, cpus=c) for c in (1, 2, 16)] == [1, 2, 2]
    assert detect_workers_for(0, graph_threads=0, cpus=16) == 1  # the graph takes every core
    assert detect_workers_for(0, live=True, cpus=16) == 1  # a camera: latency first
    assert detect_workers_for(3, cpus=1) == 3
    with pytest.raises(ValueError, match="--detect-workers must be 0"):
        LiveConfig(detect_workers=-1)


def test_parallel_detectors_keep_every_frame_in_order(tmp_path, face_clip, monkeypatch):
    """Three detectors, the first one slowed down so that results really arrive out of order:
    every later stage still sees frames 0..11 in order, each with the faces of its own frame."""
    import threading

    from camface.realtime import render

    cap = cv2.VideoCapture(str(face_clip))
    frames = [cap.read()[1] for _ in range(12)]
    cap.release()
    detector_class = type(face_detector(LiveConfig()))  # the one the loop opens
    with face_detector(LiveConfig()) as single:
        expected = [tuple(f.box for f in single.detect(frame)) for frame in frames]
    assert len(set(expected)) > 6  # the faces move: a frame mix-up would show
    index_of = {frame.tobytes(): i for i, frame in enumerate(frames)}

    instances: dict[int, int] = {}
    finished, workers = [], set()  # frames in the order detection finished; detecting threads
    real_detect = detector_class.detect
    later, held = threading.Condition(), []

    def uneven_detect(self, frame):
        n = instances.setdefault(id(self), len(instances))
        faces = real_detect(self, frame)
        if frame.tobytes() in index_of:  # not a detector's warm-up frame
            mine = index_of[frame.tobytes()]
            with later:
                if n == 0 and not held and mine < len(frames) - 1:
                    # the first detector holds its first frame until another has finished a
                    # later one: out of order by construction (a fixed sleep was not, on a loaded
                    # machine, where the others' detection can take longer than the sleep)
                    held.append(later.wait_for(lambda: any(i > mine for i in finished), timeout=30))
                finished.append(mine)
                workers.add(threading.current_thread().name)
                later.notify_all()
        return faces

    seen = []
    real_annotate = render.Renderer.annotate

    def spy_annotate(self, frame, result, *args):
        seen.append((result.index, tuple(f.box for f in result.faces)))
        return real_annotate(self, frame, result)

    monkeypatch.setattr(detector_class, "detect", uneven_detect)
    monkeypatch.setattr(render.Renderer, "annotate", spy_annotate)
    out = tmp_path / "out.mp4"
    loop = _run(LiveConfig(source=str(face_clip), record=out, detect_workers=3))
    assert len(workers) >= 2 and sorted(finished) == list(range(12))
    assert held == [True] and finished != list(range(12))  # detection really finished out of order
    assert [i for i, _ in seen] == list(range(12))
    assert [boxes for _, boxes in seen] == expected
    assert loop.summary.frames == 12 and count_frames(out) == 12
    assert " ms detect (3 detectors side by side), " in loop.summary.line()


class _FailingClip(_FakeSource):
    """A file-like source (not live) that raises after `good` frames (None: never);
    `pulled` counts the frames taken from it."""

    def __init__(self, frames, good: int | None):
        super().__init__("failing-clip", live=False)
        self.frames, self.good = frames, good
        self.pulled = 0

    def __iter__(self):
        for i, frame in enumerate(self.frames):
            if i == self.good:
                raise SourceError("failing-clip: read error at frame 5")
            self.pulled += 1
            yield frame


def test_a_source_failure_with_two_detectors_keeps_every_frame_read(tmp_path, face_clip):
    cap = cv2.VideoCapture(str(face_clip))
    frames = [cap.read()[1] for _ in range(12)]
    cap.release()
    out = tmp_path / "out.mp4"
    loop = LiveLoop(LiveConfig(record=out, detect_workers=2), source=_FailingClip(frames, good=5))
    with pytest.raises(SourceError, match="read error at frame 5"):
        loop.run()
    assert loop.summary.frames == 5 and loop.summary.detectors == 2
    assert count_frames(out) == 5


def test_a_stalled_detector_holds_back_the_reader(face_clip, monkeypatch):
    """One detector stalls on its first frame while the other could run through the clip:
    the frames read but not yet taken by the main thread stay bounded."""
    from camface.realtime import render
    from camface.realtime.loop import QUEUE_SIZE

    cap = cv2.VideoCapture(str(face_clip))
    frames = [cap.read()[1] for _ in range(12)] * 5
    cap.release()
    clip = _FailingClip(frames, good=None)
    instances: dict[int, int] = {}
    ahead = []
    seen = []
    detector_class = type(face_detector(LiveConfig(detector="short")))  # the one the loop opens
    real_detect, real_annotate = detector_class.detect, render.Renderer.annotate

    def stalling_detect(self, frame):
        n = instances.setdefault(id(self), len(instances))
        if n == 0 and frame.shape == frames[0].shape and not ahead:  # its first frame of the clip
            time.sleep(1.5)  # long enough for the other detector to run through all 60 frames
            ahead.append(clip.pulled - len(seen))
        return real_detect(self, frame)

    def spy_annotate(self, frame, result, *args):
        seen.append(result.index)
        return real_annotate(self, frame, result)

    monkeypatch.setattr(detector_class, "detect", stalling_detect)
    monkeypatch.setattr(render.Renderer, "annotate", spy_annotate)
    loop = LiveLoop(LiveConfig(detect_workers=2, detector="short"), source=clip)
    loop.run()
    assert seen == list(range(60)) and clip.pulled == 60
    assert ahead and ahead[0] <= 2 * QUEUE_SIZE + 2


def test_a_detector_still_running_at_the_end_is_named_and_left_open(face_clip, monkeypatch, caplog, tmp_path):
    """A detection that does not return when the run stops (q on frame 0 while the detector
    is stuck in frame 1): the shutdown's wait for the thread ends, a warning names it, and its
    detector is not closed under it (it was, in silence)."""
    import threading

    from camface.realtime import loop as loop_module

    cap = cv2.VideoCapture(str(face_clip))
    frames = [cap.read()[1] for _ in range(4)]
    cap.release()
    detector_class = type(face_detector(LiveConfig()))  # the one the loop opens
    real_detect, real_close = detector_class.detect, detector_class.close
    stuck, release, closed = threading.Event(), threading.Event(), []

    def stuck_detect(self, frame):
        if frame.tobytes() == frames[1].tobytes():
            stuck.set()
            release.wait(timeout=60)
        return real_detect(self, frame)

    def spy_close(self):
        closed.append(threading.current_thread().name)
        real_close(self)

    class QuitWhenStuck(FakeWindow):
        def show(self, frame):
            assert stuck.wait(timeout=60)
            return super().show(frame)

    monkeypatch.setattr(detector_class, "detect", stuck_detect)
    monkeypatch.setattr(detector_class, "close", spy_close)
    monkeypatch.setattr(loop_module, "JOIN_TIMEOUT_S", 0.2)
    loop = LiveLoop(LiveConfig(show=True, detect_every=1, detect_workers=1, snapshot_dir=tmp_path / "snaps"),
                    source=_FailingClip(frames, good=None), window=QuitWhenStuck("q"))
    try:
        with caplog.at_level("WARNING", logger="camface.realtime.loop"):
            summary = loop.run()
        assert summary.stopped_by == "quit" and summary.frames == 1
        assert closed == []
        said = [r.getMessage() for r in caplog.records if "camface-detector-0" in r.getMessage()]
        assert said == ["camface: camface-detector-0 is still running 0.2 s after the stop (a detection that does "
                        "not return); its face detector is left open, and the thread ends when it returns"]
    finally:
        release.set()
        for thread in threading.enumerate():
            if thread.name.startswith("camface-detector-"):
                thread.join(timeout=30)


class _PacedCamera(_CameraWithClock):
    """A live source that films a frame every `period` s of real time (time.monotonic)."""

    def __init__(self, frames: list[np.ndarray], period: float):
        super().__init__(frames)
        self.period, self.taken = period, []

    def __iter__(self):
        for i, frame in enumerate(self.frames):
            if i:
                time.sleep(self.period)
            self.taken.append(time.monotonic())
            yield frame.copy()


def test_a_camera_recording_leaves_a_pause_out_without_squeezing_the_frames_before_it(tmp_path, sample_frames):
    """Space pauses on frame 3 for about 0.5 s: the frames read before the pause keep their
    times (frame 3 a camera period after frame 2), the pause is left out of the recording's
    timeline (it lasts at most the time filmed less the pause), and no frame goes back in time.
    Stamped at read time minus the whole pause, frame 3 and those read ahead of it went back
    by the pause and were squeezed into 1 ms each."""
    clip, _ = sample_frames
    period = 0.04
    camera = _PacedCamera([clip.frame(i) for i in range(14)], period)
    window = FakeWindow("..." + " " + "." * 25 + " ")  # pause on frame 3, 25 polls of 20 ms, resume
    out = tmp_path / "cam.mp4"
    loop = LiveLoop(LiveConfig(record=out, detector="short", show=True), source=camera, window=window)
    loop.run()
    assert loop.summary.frames == 14 and loop.summary.paused_s >= 0.45
    times = frame_times(out)
    assert len(times) == 14 and all(b > a for a, b in zip(times, times[1:]))
    assert times[3] - times[2] >= 0.75 * period  # was 0.001: pushed back by the pause, then clamped
    # the pause left out; frames the reader read during it sit at its start
    filmed = camera.taken[-1] - camera.taken[0]
    assert times[-1] <= filmed - 0.9 * loop.summary.paused_s + 0.02


def test_a_caught_first_signal_stops_a_run_whose_source_stalls(tmp_path, face_clip, monkeypatch):
    """A first Ctrl-C caught by library code (a finaliser's KeyboardInterrupt is printed and
    dropped) was raised again at the next frame only: with the camera stalled after it, the main
    thread waited for that frame, and every later Ctrl-C was held (the run stopped, by the
    first), so the fourth ended the process unfinished. It is raised while the loop waits too."""
    from camface.realtime import loop as loop_module
    from camface.realtime.sources import make_source

    unblock = threading.Event()
    waits = []  # True: the stall ended by the stop
    real_in_order = loop_module.in_order

    def in_order(*args, **kwargs):  # the stalled source is let go once the main thread stops waiting
        try:
            yield from real_in_order(*args, **kwargs)
        finally:
            unblock.set()

    class StallsAfter3:
        def __init__(self):
            self.inner = make_source(str(face_clip))

        @property
        def info(self):
            return self.inner.info

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __iter__(self):
            for n, frame in enumerate(self.inner):
                if n == 3:  # (let go after 20 s without the stop: the caught signal is raised then)
                    waits.append(unblock.wait(timeout=20))
                yield frame

    class CaughtOnFrame3(FakeWindow):
        def show(self, frame):
            if len(self.shown) == 2:
                try:
                    signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    pass  # as a finaliser's
            return super().show(frame)

    monkeypatch.setattr(loop_module, "in_order", in_order)
    out = tmp_path / "out.mp4"
    loop = LiveLoop(LiveConfig(source=str(face_clip), record=out, show=True, method="none"),
                    window=CaughtOnFrame3(""), source=StallsAfter3())
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    assert waits == [True]  # stopped while it waited for the stalled frame
    assert loop.summary.stopped_by == "interrupted" and loop.summary.frames == 3
    assert loop.summary.recordings == ((str(out), 3),) and count_frames(out) == 3


THREADS_START_SIGNAL = """
import signal, sys, threading
from camface.realtime.loop import LiveConfig, LiveLoop, Terminated
from camface.realtime.sources import make_source
from camface.realtime.threads import sigterm_raises

real_start, started = threading.Thread.start, []

def start(thread):
    real_start(thread)
    started.append(thread)
    if thread.name == "camface-detector-0" and threading.current_thread() is threading.main_thread():
        signal.raise_signal(int(sys.argv[1]))

threading.Thread.start = start
loop = LiveLoop(LiveConfig(source="sample", method="none", max_frames=30), source=make_source("sample", sample_frames=30))
try:
    with sigterm_raises():
        loop.run()
except (KeyboardInterrupt, Terminated) as exc:
    print(type(exc).__name__)
threading.Thread.start = real_start
for thread in started:
    thread.join(timeout=10)
print(sorted(thread.name for thread in started if thread.is_alive()), loop.summary and loop.summary.stopped_by)
"""


@pytest.mark.parametrize("sig, said", [(signal.SIGINT, "KeyboardInterrupt\n[] interrupted"),
                                       (signal.SIGTERM, "Terminated\n[] terminated")])
def test_a_signal_as_the_threads_start_stops_them_and_ends_with_a_summary(sig, said):
    """A signal handled as the loop's threads started (before its handler was in place) escaped
    the run: stop never set, the reader and detector threads went on with the source and the
    detectors closed under them, which hung the process (a video file's capture released under
    its reader's read; the sample source too). It stops the run as any first signal does. (In a
    process of its own: the hang is no test's end.)"""
    run = subprocess.run([sys.executable, "-c", THREADS_START_SIGNAL, str(int(sig))], capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert (run.returncode, run.stdout.strip()) == (0, said), run.stderr


def test_a_recording_over_the_clip_given_as_a_file_url_is_refused(tmp_path, face_clip, capsys):
    """--source file:///x.mp4 reads x.mp4 (sources.local_spec), but the check that --record does
    not name the video being read looked at the URL as a path: --overwrite wiped the clip."""
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(face_clip.read_bytes())
    before = clip.read_bytes()
    assert camface_main(["live", "--source", clip.as_uri(), "--no-show", "--record", str(clip), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--record {clip} is an input" in err and "Traceback" not in err, err
    assert clip.read_bytes() == before
