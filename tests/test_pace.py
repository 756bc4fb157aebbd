"""Playing files at their own speed in a window, looping, and pausing (camface.realtime.pace).
Wall-time bounds here are generous behaviour checks (paced vs not), never benchmarks."""

from __future__ import annotations

import numpy as np
import pytest
from realtime_helpers import FakeCamera, FakeWindow, count_frames, write_clip

from camface.errors import SourceError
from camface.realtime.loop import LiveConfig, LiveLoop
from camface.realtime.pace import LoopingSource, Pacer, pace_period
from camface.realtime.sources import LiveSource, SourceInfo, VideoFileSource
from camface.realtime.controls import Controls, apply_key

FILE = SourceInfo("clip.mp4", 30.0, 60, live=False)
FOLDER = SourceInfo("photos", 30.0, 4, live=False, still=True)
CAMERA = SourceInfo("0", 30.0, None, live=True)


@pytest.mark.parametrize("pace, info, shown, expected", [
    ("auto", FILE, True, 1 / 30),   # a window shows a file: its own rate
    ("auto", FILE, False, None),    # headless: as fast as possible
    ("source", FILE, False, 1 / 30),
    ("none", FILE, True, None),
    ("auto", FOLDER, True, 2.5),    # images held --image-seconds
    ("auto", CAMERA, True, None),   # cameras and streams are never held back
    ("source", CAMERA, True, None),
])
def test_pace_period(pace, info, shown, expected):
    assert pace_period(pace, info, shown, image_seconds=2.5) == expected


class FakeClock:
    def __init__(self):
        self.now, self.slept = 0.0, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_pacer_keeps_a_schedule_and_absorbs_processing_time():
    clock = FakeClock()
    pacer = Pacer(0.1, clock=clock, sleep=clock.sleep)
    pacer.wait()  # frame 0 at once
    clock.now += 0.03  # processing frame 1 took 30 ms: waits the other 70
    pacer.wait()
    clock.now += 0.12  # frame 2 took longer than a period: 20 ms late, shown at once
    pacer.wait()
    pacer.wait()  # frame 3 back on the schedule (0.3), not 0.25 + 0.1
    assert clock.slept == [0.07, 0.08]
    clock.now += 5.0  # far behind (a stall): the schedule re-bases instead of playing fast
    pacer.wait()
    pacer.wait()
    assert clock.slept[-1] == pytest.approx(0.1)
    pacer.hold(1.0)  # paused for a second: the next frame is due a second later
    pacer.wait()
    assert clock.slept[-1] == pytest.approx(1.1)
    with pytest.raises(ValueError, match="period must be > 0"):
        Pacer(0)


@pytest.fixture(scope="module")
def clip60(tmp_path_factory, astronaut_bgr):
    """60 frames of 320x240 at 30 fps, each with a frame number drawn in a corner."""
    import cv2

    base = np.full((240, 320, 3), 90, np.uint8)
    base[20:220, 60:260] = cv2.resize(astronaut_bgr, (200, 200))
    frames = []
    for i in range(60):
        frame = base.copy()
        frame[:, :8] = 4 * i  # a stripe whose brightness encodes the frame number
        frames.append(frame)
    return write_clip(tmp_path_factory.mktemp("pace") / "clip60.mp4", frames, fps=30.0)


@pytest.fixture
def virtual_pacers(monkeypatch):
    """Every Pacer the loop makes runs on virtual time (a FakeClock that only its sleeps move),
    so a test checks the schedule it keeps exactly, not the wall time of a loaded machine."""
    from camface.realtime import pace

    made = []

    class VirtualPacer(pace.Pacer):
        def __init__(self, period):
            self.clock, self.waits = FakeClock(), 0
            super().__init__(period, clock=self.clock, sleep=self.clock.sleep)
            made.append(self)

        def wait(self, *args, **kwargs):
            self.waits += 1
            super().wait(*args, **kwargs)

    monkeypatch.setattr(pace, "Pacer", VirtualPacer)
    return made


def test_a_window_plays_a_file_at_its_own_speed_and_headless_does_not(tmp_path, clip60, virtual_pacers):
    shown = LiveLoop(LiveConfig(source=str(clip60), show=True, detector="short"), window=FakeWindow("")).run()
    headless = LiveLoop(LiveConfig(source=str(clip60), detector="short")).run()
    assert shown.frames == headless.frames == 60
    assert shown.pace_fps == 30.0 and headless.pace_fps == 0.0
    (pacer,) = virtual_pacers  # the headless run made none
    # a wait before each frame, and one holding the last frame its time (hold_last)
    assert pacer.period == pytest.approx(1 / 30) and pacer.waits == 61
    assert pacer.clock.now == pytest.approx(60 / 30)  # virtual time slept: 60 frames, each on screen 1/30 s
    assert "paced to the source's 30 fps" in shown.line() and "paced" not in headless.line()


def test_a_camera_is_never_held_back(tmp_path):
    source = LiveSource(0, timeout_s=1.0, opener=lambda target, timeout: FakeCamera(good=40))
    loop = LiveLoop(LiveConfig(show=True, pace="source", detector="short"), source=source,
                    window=FakeWindow(""))
    with pytest.raises(SourceError, match="stopped delivering frames"):
        loop.run()
    assert loop.summary.pace_fps == 0.0 and loop.summary.frames > 0


def test_loop_records_every_pass_in_order(tmp_path, clip60):
    import cv2

    out = tmp_path / "loop.mp4"
    summary = LiveLoop(LiveConfig(source=str(clip60), loop=True, max_frames=150, record=out, detector="short",
                                  method="none")).run()
    assert summary.frames == 150 and summary.recordings == ((str(out), 150),)
    assert count_frames(out) == 150
    capture = cv2.VideoCapture(str(out))
    stripes = []
    for _ in range(150):
        ok, frame = capture.read()
        stripes.append(float(frame[100:140, 1:6].mean()))
    capture.release()
    # frame k of the run is frame k % 60 of the clip: the stripe brightness wraps
    expected = [4 * (k % 60) for k in range(150)]
    assert np.abs(np.array(stripes) - expected).max() < 8


def test_a_looped_file_is_detected_afresh_where_it_starts_again(tmp_path, astronaut_bgr):
    """Boxes are carried between key frames only within a pass: the first frame of the next
    pass does not follow the last one, so it is detected, whatever N says. A still clip of 6
    frames looped to 12 with N = 4: detections on frames 0, 4, 6 (a new pass) and 8."""
    clip = write_clip(tmp_path / "still.mp4", [astronaut_bgr] * 6)
    summary = LiveLoop(LiveConfig(source=str(clip), loop=True, max_frames=12, detect_every=4,
                                  method="none")).run()
    assert summary.frames == 12 and summary.faces == 12 and summary.detections == 4


def test_loop_refuses_a_camera():
    source = LiveSource(0, timeout_s=1.0, opener=lambda target, timeout: FakeCamera(good=40))
    with pytest.raises(SourceError, match="--loop plays files, folders and the sample again; 0 is a camera"):
        with LoopingSource(source):
            pass


def test_looping_source_reenters_a_file(clip60):
    with LoopingSource(VideoFileSource(clip60)) as source:
        assert source.info.frames is None
        frames = [frame for _, frame in zip(range(130), source)]
    assert len(frames) == 130 and source.passes == 2
    np.testing.assert_array_equal(frames[0], frames[60])


def test_space_pauses_and_resumes():
    controls, command = apply_key(Controls("gradcam"), ord(" "), ("gradcam",), 7)
    assert controls == Controls("gradcam", paused=True) and command is None
    assert apply_key(controls, ord(" "), ("gradcam",), 7)[0].paused is False


def test_pause_holds_the_frame_and_the_recording(tmp_path, clip60):
    """Space on frame 2: the window keeps showing frame 2 (three more polls), space resumes;
    q on frame 5. Nothing is processed or recorded while paused."""
    out = tmp_path / "paused.mp4"
    window = FakeWindow(".. .. ..q")  # frames 0, 1, 2 (space: pause), polls ., ., space; frames 3, 4, 5 (q)
    loop = LiveLoop(LiveConfig(source=str(clip60), show=True, record=out, detector="short"), window=window)
    summary = loop.run()
    assert summary.stopped_by == "quit" and summary.paused_s > 0
    processed = summary.frames
    assert processed == 6 and len(window.shown) == processed + 3  # the paused frame was shown 3 more times
    np.testing.assert_array_equal(window.shown[2], window.shown[3])
    np.testing.assert_array_equal(window.shown[3], window.shown[5])
    assert count_frames(out) == processed


def test_a_folder_image_is_held_with_the_window_alive(tmp_path, astronaut_bgr, virtual_pacers):
    """Each image is held --image-seconds, the last one too, and the window keeps being
    drawn (keys read) while it is held."""
    import cv2

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"{i}.png"), astronaut_bgr)
    window = FakeWindow("")
    summary = LiveLoop(LiveConfig(source=str(folder), show=True, image_seconds=0.4, detector="short"),
                       window=window).run()
    (pacer,) = virtual_pacers
    assert summary.frames == 2 and pacer.period == 0.4
    assert pacer.clock.now == pytest.approx(0.8)  # virtual time slept: both images held 0.4 s
    # the two images, and the window polled every 50 ms through each 0.4 s hold (8 slices, 7
    # when float rounding leaves the last slice a sliver, slept without a poll)
    assert len(window.shown) >= 2 + 2 * 7
    assert "each image held 0.4 s" in summary.line()


def test_quit_while_a_folder_image_is_held(tmp_path, astronaut_bgr):
    import cv2

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), astronaut_bgr)
    summary = LiveLoop(LiveConfig(source=str(folder), show=True, image_seconds=30.0, detector="short"),
                       window=FakeWindow(".q")).run()  # q on the first poll of the first image's hold
    assert summary.stopped_by == "quit" and summary.wall_s < 10


def test_keys_pressed_while_paused_are_kept(tmp_path, clip60):
    """Space on frame 1; s and r while paused (then space): a snapshot of the paused frame, and
    the recording stops; q on frame 4."""
    out = tmp_path / "rec.mp4"
    window = FakeWindow(". sr ..q")
    summary = LiveLoop(LiveConfig(source=str(clip60), show=True, record=out, detector="short",
                                  snapshot_dir=tmp_path / "snaps"), window=window).run()
    assert summary.stopped_by == "quit" and summary.snapshots == 1
    assert summary.recordings == ((str(out), 1),)  # r on frame 1 (while paused) stops before it, as on any frame
    (snap,) = (tmp_path / "snaps").iterdir()
    assert snap.name == "frame_000001"


def test_space_while_an_image_is_held_pauses_on_that_image():
    """A folder's image waits seconds for the next one's time: space meanwhile pauses on the image
    on screen (once, the wait ran on and the next image came, then paused); the paused time
    moves the schedule on, and s while paused saves the image on screen."""
    from camface.realtime.viewer import SNAPSHOT_SHOWN, Viewer

    clock = FakeClock()
    first, second = np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8)
    calls: list[tuple[np.ndarray, str]] = []
    keys = iter(". ..s.. ")  # first shown; polls: space, then three more polls (s among them), space

    class Window:
        closed = False

        def show(self, frame):
            key = next(keys, ".")
            calls.append((frame, key))
            return -1 if key == "." else ord(key)

    viewer = Viewer(Window(), Pacer(1.0, clock=clock, sleep=clock.sleep), ("gradcam",), 7)
    controls, commands = viewer.show(first, Controls("gradcam"))
    assert commands == () and not controls.paused
    controls, commands = viewer.show(second, controls)
    assert not controls.paused and commands == (SNAPSHOT_SHOWN,) and viewer.paused_s > 0
    pressed = [n for n, (_, key) in enumerate(calls) if key == " "]
    assert pressed == [1, 7]
    assert all(frame is first for frame, _ in calls[:pressed[1] + 1])  # held while paused
    assert calls[-1][0] is second and clock.now >= 1.0
