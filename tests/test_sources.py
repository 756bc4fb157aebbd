"""Frame sources opened as users give them: stream URLs, camera indices, folders, video files.

No camera and no network: cameras and streams are fakes passed as `opener`, files are written
to tmp_path."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from realtime_helpers import FakeCamera

from camface.errors import SourceError, UsageError
from camface.realtime.live_source import LiveSource
from camface.realtime.sources import redact


class Refuses(FakeCamera):
    def isOpened(self):
        return False


class Counting(FakeCamera):
    """Frame k carries k in its first pixel (blue + 256 x green), however many are read."""

    def read(self):
        ok, frame = super().read()
        if ok:
            frame[0, 0, :2] = self.reads % 256, self.reads // 256
        return ok, frame


def number(frame) -> int:
    return int(frame[0, 0, 0]) + 256 * int(frame[0, 0, 1])


@pytest.mark.parametrize("text, expected", [
    ("rtsp://admin:s3cret@10.0.0.2:554/stream1", "rtsp://***@10.0.0.2:554/stream1"),
    ("http://user@cam.local/video.mjpg", "http://***@cam.local/video.mjpg"),
    ("rtsp://admin:p@ss@cam/x", "rtsp://***@cam/x"),  # an "@" in the password: hidden whole
    ("rtsp://cam/x?at=me@home", "rtsp://cam/x?at=me@home"),  # an "@" after the host is no password
    ("rtsp://cam:554/x", "rtsp://cam:554/x"),
    ("/videos/me@home.mp4", "/videos/me@home.mp4"),
    ("0", "0"),
    ("stream rtsp://a:b@h/x failed; retry rtsp://c:d@h/y", "stream rtsp://***@h/x failed; retry rtsp://***@h/y"),
    # a space in the password: FFmpeg's authority ends at "/", "?" or "#" only, so it logs in with it
    ("rtsp://admin:two words@cam/x", "rtsp://***@cam/x"),
    ("stream rtsp://admin:two words@cam failed", "stream rtsp://***@cam failed"),
])
def test_redact_hides_the_credentials_of_urls_only(text, expected):
    assert redact(text) == expected


def test_a_stream_url_never_shows_its_password(caplog):
    """Errors, log lines and SourceInfo.name (summaries, snapshot metadata) printed the URL as
    given, user name and password included."""
    url = "rtsp://admin:s3cret@127.0.0.1:9/live"
    with pytest.raises(SourceError, match=r"stream rtsp://\*\*\*@127\.0\.0\.1:9/live could not be opened") as error:
        with LiveSource(url, timeout_s=0.5, opener=lambda target, timeout: Refuses()):
            pass
    assert "s3cret" not in str(error.value)

    opened = []

    def opener(target, timeout):
        assert target == url  # the capture itself gets the credentials
        opened.append(Refuses() if opened else FakeCamera(good=3))  # 3 frames, then gone
        return opened[-1]

    with caplog.at_level(logging.DEBUG), pytest.raises(SourceError) as error:
        with LiveSource(url, timeout_s=0.5, reconnects=1, backoff_s=0.01, opener=opener) as source:
            assert source.info.name == "rtsp://***@127.0.0.1:9/live"
            assert "s3cret" not in source._thread.name
            for _ in source:
                pass
    assert len(opened) == 2 and "1 reconnection attempts" in str(error.value)
    assert "admin" not in str(error.value) and "s3cret" not in str(error.value)
    assert "reconnecting" in caplog.text and "s3cret" not in caplog.text


def test_a_live_source_opens_again_and_never_repeats_a_frame():
    """Entering the same LiveSource a second time (a source object given to `process_video`
    twice) gave one stale frame and stopped: its reader's stop flag stayed set. Iterating it
    twice in one `with` gave the last frame of the first iteration again."""
    cameras = []

    def opener(target, timeout):
        cameras.append(Counting())
        return cameras[-1]

    source = LiveSource(0, timeout_s=0.5, opener=opener)
    for _ in range(2):
        with source:
            first = [number(frame) for _, frame in zip(range(4), source)]
            second = [number(frame) for _, frame in zip(range(4), source)]
        assert len(first) == len(second) == 4
        assert first == sorted(set(first)) and second == sorted(set(second)) and second[0] > first[-1]
        assert not source._thread.is_alive() and cameras[-1].released
    assert len(cameras) == 2


@pytest.mark.parametrize("spec, message", [
    ("-1", r"camera index -1 is negative: camera indices are 0, 1, \.\.\."),
    ("\u00b2", r"source not found: \u00b2 \(expected a camera index"),  # '²'.isdigit(); int('²') raised ValueError
    ("\u0663", r"source not found: \u0663 \(expected a camera index"),  # Arabic-Indic 3 opened camera 3
    ("2147483648", r"camera index 2147483648 is too large: camera indices are 0, 1, \.\.\."),  # cv2.error
    ("99999999999999999999", r"camera index 99999999999999999999 is too large"),
])
def test_make_source_names_what_is_wrong_with_a_camera_index(spec, message):
    from camface.realtime.sources import make_source

    with pytest.raises(SourceError, match=message):
        make_source(spec)


@pytest.mark.parametrize("spec, message", [
    ("/dev/null", r"source /dev/null is neither a video file nor a folder of images \(a device or a pipe\); "
                  r"a camera is given by its index"),
    ("/dev/video7", r"source /dev/video7 is neither a video file nor a folder of images \(a device or a pipe\); "
                    r"this camera is --source 7"),
])
def test_make_source_says_a_device_exists_but_is_no_file(spec, message, monkeypatch):
    """A path that exists but is neither a file nor a folder (/dev/video0, which OpenCV's own
    examples open) was 'source not found'."""
    from camface.realtime.sources import make_source

    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: str(self) == "/dev/video7" or real_exists(self))
    with pytest.raises(SourceError, match=message):
        make_source(spec)


def test_make_source_prefers_an_existing_file_named_like_a_negative_index(tmp_path, monkeypatch):
    from camface.realtime.sources import VideoFileSource, make_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "-1").write_bytes(b"x")
    assert isinstance(make_source("-1"), VideoFileSource)


def test_an_image_folder_plays_in_natural_order_whatever_the_listing(tmp_path, monkeypatch):
    """Names equal but for case or leading zeros compared equal and kept the order of
    Path.iterdir, which the file system decides: two runs over copies of a folder could
    differ. Ties now go by the name itself."""
    import cv2
    import numpy as np

    from camface.realtime.sources import ImageFolderSource

    names = ["frame10.png", "frame2.png", "frame1.png", "a.png", "A.png", "01.png", "1.png", "frame\u00b2.png"]
    for value, name in enumerate(names):
        cv2.imwrite(str(tmp_path / name), np.full((4, 4, 3), value, np.uint8))
    listed = sorted(tmp_path.iterdir())
    orders = []
    for listing in (listed, listed[::-1]):
        monkeypatch.setattr(type(tmp_path), "iterdir", lambda self, listing=listing: iter(listing))
        with ImageFolderSource(tmp_path) as source:
            orders.append([names[int(frame[0, 0, 0])] for frame in source])
    assert orders[0] == orders[1] == ["01.png", "1.png", "A.png", "a.png", "frame1.png", "frame2.png",
                                      "frame10.png", "frame\u00b2.png"]


@pytest.mark.parametrize("start, stop, frames", [(0, 0, 0), (3, 3, 0), (0, 4, 4), (7, 10, 3), (8, 50, 2), (12, 20, 0)])
def test_a_video_range_reads_its_frames_and_no_truncation(tmp_path, caplog, start, stop, frames):
    """An empty range from frame 0 (stop=0) said the file was truncated ("read 0 of 10
    frames"): `self.stop or expected` took stop=0 for no stop."""
    import cv2
    import numpy as np

    from camface.realtime.sources import VideoFileSource

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (32, 24))
    for index in range(10):
        writer.write(np.full((24, 32, 3), index * 20, np.uint8))
    writer.release()
    with caplog.at_level(logging.WARNING), VideoFileSource(path, start, stop) as source:
        read = [round(int(frame[0, 0, 0]) / 20) for frame in source]
    assert read == list(range(start, start + frames))
    assert not source.truncated and "ended early" not in caplog.text


def test_a_video_file_that_cannot_be_read_is_a_source_error_naming_it(tmp_path, monkeypatch):
    """A video file without read permission: OpenCV does not open it, and the look for a cut
    MP4's readable part raised PermissionError out of the source (a traceback from
    `camface live --source`, not one error line)."""
    import builtins

    from camface.realtime import fmp4
    from camface.realtime.sources import VideoFileSource

    path = tmp_path / "private.mp4"
    path.write_bytes(b"\0\0\0\x18ftypisom" + b"\0" * 64)  # what FFmpeg will not open, as an unreadable file

    def refused(file, *args, **kwargs):  # root reads any file: as chmod 000 does for a user
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(fmp4, "open", refused, raising=False)
    with pytest.raises(SourceError, match=f"cannot open video file {path}: Permission denied"):
        with VideoFileSource(path):
            pass


@pytest.fixture
def served(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (python's http.server on a thread): its URL."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_video_file_behind_a_url_plays_every_frame_once(tmp_path, served, caplog):
    """http://host/clip.mp4 was read as a live stream: decoded as fast as FFmpeg could on the
    reader thread (the loop saw its first and last frames), its end taken for a stall, and
    each "reconnection" played it again: it never ended."""
    import time

    import cv2
    import numpy as np

    from camface.realtime.pace import LoopingSource
    from camface.realtime.sources import make_source

    writer = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25, (32, 24))
    for index in range(12):
        writer.write(np.full((24, 32, 3), index * 20, np.uint8))
    writer.release()
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING), make_source(f"{served}/clip.avi") as source:
        assert (source.info.live, source.info.frames, source.info.fps) == (False, 12, 25.0)
        frames = []
        for frame in source:
            frames.append(round(int(frame[0, 0, 0]) / 20))
            time.sleep(0.01)  # a loop slower than decoding still gets every frame
    assert frames == list(range(12))
    assert time.perf_counter() - started < 10 and "reconnecting" not in caplog.text and "ended early" not in caplog.text
    looped = LoopingSource(make_source(f"{served}/clip.avi"))  # --loop: a file, so allowed
    with looped:
        assert len([frame for _, frame in zip(range(20), looped)]) == 20 and looped.passes == 1


def test_a_video_file_behind_a_url_that_breaks_off_ends_with_a_warning(caplog):
    frames = []

    class RemoteClip(FakeCamera):
        def get(self, prop):
            import cv2

            return {cv2.CAP_PROP_FRAME_COUNT: 50.0, cv2.CAP_PROP_FPS: 0.0}.get(prop, 0.0)

    with caplog.at_level(logging.WARNING), \
            LiveSource("https://u:pw@host/clip.mp4", opener=lambda target, timeout: RemoteClip(good=20)) as source:
        frames = list(source)
    assert len(frames) == 20 and source.info.fps == 30.0 and not source.info.live
    assert "stream https://***@host/clip.mp4 ended early: read 20 of 50 frames" in caplog.text


def test_a_live_source_entered_twice_says_so_and_keeps_one_reader():
    """Entering an open LiveSource again (`with source:` around `process_video(source)`) started
    a second reader thread on a second capture and left the first running after exit."""
    cameras = []

    def opener(target, timeout):
        cameras.append(FakeCamera())
        return cameras[-1]

    source = LiveSource(0, timeout_s=0.5, opener=opener)
    with source:
        with pytest.raises(SourceError, match="camera 0 is already open: enter a source once"):
            source.__enter__()
        assert len(next(iter(source))) == 48
    assert len(cameras) == 1 and cameras[0].released and not source._thread.is_alive()


def test_a_video_file_behind_a_url_entered_twice_says_so_and_opens_it_once():
    """A URL to a video file has no reader thread: entered again while open it opened a second
    capture over the first, which nothing released. A failed entry leaves it enterable."""
    captures = []

    class RemoteClip(FakeCamera):
        def get(self, prop):
            import cv2

            return {cv2.CAP_PROP_FRAME_COUNT: 5.0, cv2.CAP_PROP_FPS: 25.0}.get(prop, 0.0)

    def opener(target, timeout):
        captures.append(RemoteClip(good=5 if captures else 0))  # the first delivers no frame
        return captures[-1]

    source = LiveSource("https://host/clip.mp4", timeout_s=0.5, opener=opener)
    with pytest.raises(SourceError, match="opened but delivered no frame"):
        source.__enter__()
    with source:
        assert not source.info.live
        with pytest.raises(SourceError, match="stream https://host/clip.mp4 is already open"):
            source.__enter__()
        assert len(list(source)) == 5
    assert len(captures) == 2 and all(capture.released for capture in captures)
    with source:  # closed: enters again
        assert len(list(source)) == 5

    class Raises(RemoteClip):
        def read(self):
            raise KeyboardInterrupt  # Ctrl-C during the first read

    captures.clear()
    source = LiveSource("https://host/clip.mp4", timeout_s=0.5,
                        opener=lambda target, timeout: captures.append(Raises()) or captures[-1])
    with pytest.raises(KeyboardInterrupt):
        source.__enter__()
    assert captures[0].released and source._capture is None


def test_files_and_the_sample_iterated_twice_give_the_same_frames_twice(tmp_path):
    """A second iteration of an open video file gave no frame (its capture stood at the end),
    and the sample's drew its frames instead of decoding them (other pixels); a folder's
    already started again."""
    import cv2
    import numpy as np

    from camface.realtime.sample import SampleSource
    from camface.realtime.sources import VideoFileSource

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (32, 24))
    for index in range(8):
        writer.write(np.full((24, 32, 3), index * 20, np.uint8))
    writer.release()
    for source in (VideoFileSource(path), VideoFileSource(path, 2, 6), SampleSource(frames=6, size=(64, 48))):
        with source:
            first = list(source)
            partial = next(iter(source))
            second = list(source)
        assert len(first) == len(second) > 0
        assert all(np.array_equal(a, b) for a, b in zip(first, second))
        assert np.array_equal(partial, first[0])


def test_process_video_says_what_is_wrong_with_a_source_when_the_docstring_says(tmp_path):
    """process_video's docstring said a missing file failed at the first frame: it fails at
    once (make_source checks the path); a file that will not open fails at the first frame."""
    import camface

    (tmp_path / "text.mp4").write_text("not a video\n")
    with camface.load(device="cpu") as api:
        with pytest.raises(SourceError, match="source not found: .*missing.mp4"):
            api.process_video(tmp_path / "missing.mp4")
        with pytest.raises(SourceError, match="camera index -1 is negative"):
            api.process_video(-1)
        frames = api.process_video(tmp_path / "text.mp4")  # nothing opened yet
        with pytest.raises(SourceError, match="cannot open video file .*text.mp4: not a video"):
            next(frames)


@pytest.mark.parametrize("index", [0, 3, np.int64(0), np.int32(3), np.uint8(3), np.int64(-1)])
def test_process_video_takes_any_integer_as_a_camera_index(index, monkeypatch):
    """np.int64(0) was refused ("source must be ..."), while the API's other integers (a class
    index, max_frames) take numpy's: any integer but a bool is a camera index."""
    import camface
    from camface.realtime import sources

    asked, make_source = [], sources.make_source

    def recording(spec, *args, **kwargs):
        asked.append(spec)
        return make_source(spec, *args, **kwargs)

    monkeypatch.setattr(sources, "make_source", recording)
    with camface.load(device="cpu") as api:
        if index < 0:
            with pytest.raises(SourceError, match="camera index -1 is negative"):
                api.process_video(index)
        else:
            api.process_video(index).close()  # nothing opened: the camera opens at the first frame
        for bad in (True, np.True_):
            with pytest.raises(UsageError, match="source must be a video file, a folder of images"):
                api.process_video(bad)
    assert asked == [str(int(index))]


def _live_webm(path, intervals_ms):
    """A WebM as a browser's MediaRecorder writes it: frames at irregular millisecond times and
    no frame duration in its header (the muxer's DefaultDuration renamed to an unknown element,
    which readers skip): FFmpeg reports its time base, 1000, as its frame rate."""
    import fractions

    import av
    import numpy as np

    with av.open(str(path), "w", format="webm", options={"live": "1"}) as out:
        stream = out.add_stream("libvpx", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        pts = 0
        for index, interval in enumerate(intervals_ms):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), index * 4, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, fractions.Fraction(1, 1000)
            pts += interval
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    data = path.read_bytes()
    assert data.count(b"\x23\xe3\x83") == 1
    path.write_bytes(data.replace(b"\x23\xe3\x83", b"\x23\xe3\x84"))


def test_a_file_that_reports_its_time_base_as_frame_rate_plays_at_its_timestamps(tmp_path, caplog):
    """A live-written WebM reports 1000 fps: it was taken as its frame rate (a recording of a
    2 s clip lasted 0.06 s, a window played it 33 times too fast). Its timestamps say ~30."""
    import cv2

    from camface.realtime.sources import VideoFileSource

    path = tmp_path / "browser.webm"
    import random

    pick = random.Random(0)  # irregular, as a browser's: FFmpeg finds no frame rate in them
    intervals = [pick.choice([28, 31, 33, 34, 36, 40]) for _ in range(60)]
    _live_webm(path, intervals)
    assert cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FPS) == 1000  # what the container says
    with caplog.at_level(logging.INFO), VideoFileSource(path) as source:
        frames = list(source)
    first_31 = sum(intervals[:30])
    assert source.info.fps == pytest.approx(30 * 1000 / first_31, rel=1e-6)  # 30 intervals of the first 31 frames
    assert len(frames) == 60 and round(int(frames[0][0, 0, 0]) / 4) == 0  # from the first frame, none lost
    assert f"reports 1000.0 fps; its timestamps say {source.info.fps:.3g}" in caplog.text
    assert 28 < source.info.fps < 32
    with VideoFileSource(path, 10, 14) as source:  # a range of it: seeking in a file without index
        assert [round(int(frame[0, 0, 0]) / 4) for frame in source] == [10, 11, 12, 13]


def test_a_stream_that_reports_its_time_base_is_measured():
    """A stream saying 1000 fps (RTMP/FLV, a live WebM) was believed: its frame rate is measured
    from the frames' arrival, as for a camera that says 0."""

    class Says1000(FakeCamera):
        def get(self, prop):
            import cv2

            return 1000.0 if prop == cv2.CAP_PROP_FPS else -1.0

    with LiveSource("rtmp://host/live", timeout_s=1.0, opener=lambda target, timeout: Says1000()) as source:
        assert 20 < source.info.fps < 400  # FakeCamera: one frame per >= 5 ms


def test_closing_a_stream_whose_reader_is_stuck_leaves_the_capture_to_it(caplog):
    """__exit__ released the capture while the reader thread was still inside it (a read or a
    reconnection stuck in the backend past the join's time-out), and a reconnection finished
    after that opened a capture nobody released. The thread now releases what it holds."""
    import threading

    gate = threading.Event()
    opened = []

    class Stuck(FakeCamera):
        def get(self, prop):
            import cv2

            return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0  # no fps to measure while stuck

        def read(self):
            if self.reads >= 1:  # the reader thread's first read (__enter__ made the one before)
                gate.wait(10)  # stuck in the backend until the test lets it go
            return super().read()

        def release(self):
            assert threading.current_thread() is not threading.main_thread() or gate.is_set()
            super().release()

    def opener(target, timeout):
        opened.append(Stuck())
        return opened[-1]

    source = LiveSource("rtsp://host/live", timeout_s=0.2, reconnects=0, opener=opener)
    with caplog.at_level(logging.WARNING):
        with source:
            next(iter(source))
    assert "its reader did not stop within 1.2 s; it closes the stream when it returns" in caplog.text
    assert not opened[0].released  # not under the stuck thread
    gate.set()
    source._thread.join(5)
    assert not source._thread.is_alive() and opened[0].released and source._capture is None


def test_each_drawing_of_the_sample_clip_writes_a_file_of_its_own(tmp_path, monkeypatch):
    """The cached clip was drawn to `{stem}.{pid}.partial.mp4`: two threads of one process (two
    `camface.load(...).process_video("sample")` at once) wrote the same file. Each drawing now
    has a hidden name of its own, renamed over the clip when whole, nothing left beside it."""
    import tempfile

    from camface.realtime import sample

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    opened = []
    real = sample.VideoSink

    def recording(path, *args, **kwargs):
        opened.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sample, "VideoSink", recording)
    clips = []
    for _ in range(2):
        clip = sample.SampleSource(frames=3, size=(64, 48)).cached_clip()
        clips.append(clip.read_bytes())
        clip.unlink()  # drawn again by the next call
    assert len(set(opened)) == 2 and all(p.parent == tmp_path and p.name.startswith(".") for p in opened)
    assert clips[0] and clips[0] == clips[1] and list(tmp_path.iterdir()) == []


# Run in a child: without camface's bytes path, OpenCV 5.1 crashed the process (SIGSEGV) on a
# name that is not valid UTF-8, which would take the whole test session with it.
NOT_UTF8 = """
import os, sys, tempfile
from pathlib import Path

import numpy as np

from camface.realtime.sample import SampleSource
from camface.realtime.sinks import VideoSink
from camface.realtime.snapshot import SnapshotWriter, read_crop
from camface.realtime.sources import ImageFolderSource, VideoFileSource

folder = Path(sys.argv[1])
name = os.fsdecode(b"caf\\xe9")  # Latin-1 bytes: Python holds them as a surrogate
frame = np.zeros((48, 64, 3), np.uint8)
frame[8:40, 16:48] = (30, 120, 240)
SnapshotWriter._write_image(folder / f"{name}.png", frame)
with ImageFolderSource(folder) as images:
    pictures = list(images)
assert len(pictures) == 1 and np.array_equal(pictures[0], frame)
assert np.array_equal(read_crop(folder / f"{name}.png", "BGR"), frame)
with VideoSink(folder / f"{name}.mp4", 30, codec="mp4v") as sink:
    for _ in range(5):
        sink.write(frame)
with VideoFileSource(folder / f"{name}.mp4") as clip:
    print(len(list(clip)), sink.frames_kept)
tempfile.tempdir = str(folder / name)  # the sample's clip is cached in the temporary folder
os.mkdir(tempfile.tempdir)
with SampleSource(frames=4, size=(64, 48)) as sample:
    print(len(list(sample)), len(os.listdir(tempfile.tempdir)))
"""


def test_files_whose_names_are_not_utf8_are_read_and_written(tmp_path):
    """A photo, recording or snapshot named in Latin-1 (an old archive, a camera card), or the
    sample's clip in such a temporary folder, crashed the process in OpenCV; they are read and
    written as any other."""
    import subprocess
    import sys

    try:
        (tmp_path / "probe").mkdir()
        open(tmp_path / "probe" / os.fsdecode(b"\xe9"), "wb").close()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes only UTF-8 names")
    folder = tmp_path / "photos"
    folder.mkdir()
    done = subprocess.run([sys.executable, "-c", NOT_UTF8, str(folder)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["5", "5", "4", "1"]


@pytest.fixture(scope="module")
def mjpeg_with_a_bad_frame(tmp_path_factory):
    """(an MJPEG AVI of 60 frames whose frame 30 does not decode, the same file whole)."""
    import cv2

    from camface.realtime.sample import SampleSource

    folder = tmp_path_factory.mktemp("mjpeg")
    sample = SampleSource(frames=60, size=(160, 120))
    whole = folder / "whole.avi"
    writer = cv2.VideoWriter(str(whole), cv2.VideoWriter_fourcc(*"MJPG"), 30, (160, 120))
    for index in range(60):
        writer.write(sample.frame(index))
    writer.release()
    data = bytearray(whole.read_bytes())
    starts = [at for at in range(len(data) - 2) if data[at:at + 3] == b"\xff\xd8\xff"]
    assert len(starts) == 60
    for at in range(starts[30] + 20, starts[30] + 400):  # its tables: it does not decode at all
        data[at] ^= 0xFF
    damaged = folder / "damaged.avi"
    damaged.write_bytes(bytes(data))
    return damaged, whole


@pytest.mark.parametrize("start, stop, bad", [(0, None, 1), (25, 35, 1), (30, 40, 1), (0, 31, 1), (0, 30, 0),
                                              (31, 60, 0)])
def test_a_frame_that_does_not_decode_is_read_past(mjpeg_with_a_bad_frame, caplog, start, stop, bad):
    """A damaged JPEG in the middle of an MJPEG AVI stopped the file there ("ended early"): its
    29 good frames after it were lost. It is given as the frame after it, with a warning naming
    it, and every frame keeps its number (batch's segments stitch by them)."""
    from camface.realtime.sources import VideoFileSource

    damaged, whole = mjpeg_with_a_bad_frame
    with VideoFileSource(whole, start, stop) as source:
        expected = list(source)
    with caplog.at_level(logging.WARNING), VideoFileSource(damaged, start, stop) as source:
        frames = list(source)
    assert len(frames) == len(expected) == (stop or 60) - start and source.bad_frames == bad
    assert not source.truncated and "ended early" not in caplog.text
    for number, (frame, good) in enumerate(zip(frames, expected), start):
        if number == 30 and bad:
            assert "damaged.avi: frame 30 does not decode; the frame after it is shown in its place" in caplog.text
            good = expected[number - start + 1] if number + 1 < (stop or 60) else frame  # (the range's last)
        assert np.array_equal(frame, good), number


def test_a_video_file_behind_a_url_reads_past_a_frame_that_does_not_decode(mjpeg_with_a_bad_frame, tmp_path,
                                                                            served, caplog):
    """The damaged MJPEG AVI served over HTTP stopped at its frame 30 ("ended early: read 30 of
    60 frames"), where the same file read locally goes on: it goes on alike now."""
    import shutil

    from camface.realtime.sources import VideoFileSource, make_source

    damaged, _ = mjpeg_with_a_bad_frame
    with VideoFileSource(damaged) as source:
        local = list(source)
    shutil.copy(damaged, tmp_path / "damaged.avi")
    with caplog.at_level(logging.WARNING), make_source(f"{served}/damaged.avi") as source:
        frames = list(source)
    assert (source.info.live, source.info.frames, source.bad_frames) == (False, 60, 1)
    assert len(frames) == len(local) == 60 and all(np.array_equal(a, b) for a, b in zip(frames, local))
    assert f"stream {served}/damaged.avi: frame 30 does not decode; the frame after it is shown" in caplog.text
    assert "ended early" not in caplog.text


@pytest.fixture(scope="module")
def mkv_with_a_bad_frame(tmp_path_factory):
    """(a Matroska written live, no frame count, of 60 MJPEG frames whose frame 30 does not
    decode; the same file whole)."""
    import fractions

    import av
    import cv2

    from camface.realtime.sample import SampleSource

    folder = tmp_path_factory.mktemp("mkv")
    sample = SampleSource(frames=60, size=(160, 120))
    jpegs = [bytearray(cv2.imencode(".jpg", sample.frame(index))[1].tobytes()) for index in range(60)]
    whole = [bytes(jpeg) for jpeg in jpegs]
    for at in range(20, 400):  # its tables: it does not decode at all
        jpegs[30][at] ^= 0xFF
    for name, frames in (("whole.mkv", whole), ("damaged.mkv", [bytes(jpeg) for jpeg in jpegs])):
        with av.open(str(folder / name), "w", format="matroska", container_options={"live": "1"}) as out:
            stream = out.add_stream("mjpeg", rate=30)
            stream.width, stream.height, stream.pix_fmt = 160, 120, "yuvj420p"
            for index, jpeg in enumerate(frames):
                packet = av.Packet(jpeg)
                packet.stream, packet.pts, packet.dts = stream, index, index
                packet.time_base = fractions.Fraction(1, 30)
                out.mux(packet)
    return folder / "damaged.mkv", folder / "whole.mkv"


@pytest.mark.parametrize("where", ["file", "url"])
def test_a_frame_that_does_not_decode_is_read_past_in_a_file_without_a_frame_count(mkv_with_a_bad_frame, tmp_path,
                                                                                   served, caplog, where):
    """A file that announces no frame count (a Matroska written live; behind a URL, any file its
    server gives a length for: an MPEG-TS that cannot seek) stopped at a frame that does not
    decode, its 29 good frames after it lost, without a word. It is read past as in a file with
    a count."""
    import shutil

    from camface.realtime.sources import VideoFileSource, make_source

    damaged, whole = mkv_with_a_bad_frame
    with VideoFileSource(whole) as source:
        expected = list(source)
    assert source.info.frames is None and len(expected) == 60
    shutil.copy(damaged, tmp_path / "damaged.mkv")
    spec = f"{served}/damaged.mkv" if where == "url" else str(tmp_path / "damaged.mkv")
    with caplog.at_level(logging.WARNING), make_source(spec) as source:
        frames = list(source)
    assert (source.info.live, source.info.frames, source.bad_frames) == (False, None, 1)
    assert len(frames) == 60 and "ended early" not in caplog.text
    assert "damaged.mkv: frame 30 does not decode; the frame after it is shown in its place" in caplog.text
    for number, (frame, good) in enumerate(zip(frames, expected)):
        assert np.array_equal(frame, expected[31] if number == 30 else good), number


@pytest.fixture(scope="module")
def ts_server(tmp_path_factory):
    """An MPEG-TS of 40 frames (64x48, 25 fps) served on 127.0.0.1 as
    /<how>/clip.ts, how: "ranges" (Content-Length and Range requests, as nginx), "length"
    (Content-Length, no Range: python's http.server), "live" (no length: sent until the
    connection closes, as a live stream is), "playlist" (a length, as an HLS playlist);
    /auth/... wants Basic authentication as u:p. Yields (the server's URL, the Authorization
    headers it got, the folder of clip.ts)."""
    import base64
    import functools
    import http.server
    import re
    import threading

    import av

    folder = tmp_path_factory.mktemp("ts")
    with av.open(str(folder / "clip.ts"), "w", format="mpegts") as container:
        stream = container.add_stream("mpeg2video", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(40):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), index * 5, np.uint8),
                                                                  format="bgr24")))
        container.mux(stream.encode(None))
    data = (folder / "clip.ts").read_bytes()
    asked = []

    class Server(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.answer(head=True)

        def do_GET(self):
            self.answer(head=False)

        def answer(self, head: bool):
            how = self.path.split("/")[1]
            if how == "auth":
                asked.append(self.headers.get("Authorization"))
                if self.headers.get("Authorization") != "Basic " + base64.b64encode(b"u:p").decode():
                    self.send_error(401)
                    return
                how = self.path.split("/")[2]
            wanted = re.fullmatch(r"bytes=([0-9]+)-([0-9]*)", self.headers.get("Range", "")) if how == "ranges" else None
            start, end = (int(wanted[1]), int(wanted[2] or len(data) - 1)) if wanted else (0, len(data) - 1)
            self.send_response(206 if wanted else 200)
            self.send_header("Content-Type", "application/vnd.apple.mpegurl" if how == "playlist" else "video/mp2t")
            if how == "ranges":
                self.send_header("Accept-Ranges", "bytes")
            if wanted:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            if how != "live":
                self.send_header("Content-Length", str(end - start + 1))
            else:
                self.close_connection = True
            self.end_headers()
            if not head:
                self.wfile.write(data[start:end + 1])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Server))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked, folder
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize("how, live, frames", [("ranges", False, 40), ("length", False, None), ("live", True, None)])
def test_a_ts_behind_a_url_is_a_file_when_its_server_says_its_length(ts_server, how, live, frames):
    """An MPEG-TS behind a server that cannot seek has no frame count in FFmpeg: it was read as a
    live stream (on a thread, newest frame only, not paced as a file, its end a stall). The
    server's Content-Length says it is a file; a .ts sent with no length is a live stream."""
    from camface.realtime.sources import make_source

    from camface.realtime.sources import VideoFileSource

    url, _, folder = ts_server
    with VideoFileSource(folder / "clip.ts") as clip:
        local = list(clip)
    source = make_source(f"{url}/{how}/clip.ts")
    source.reconnects = 0
    with source:
        assert (source.info.live, source.info.frames, source.info.fps) == (live, frames, 25.0)
        if not live:
            frames_read = list(source)
    if not live:  # every frame, in order: as the file read locally
        assert len(frames_read) == len(local) == 40
        assert all(np.array_equal(a, b) for a, b in zip(frames_read, local))


@pytest.mark.parametrize("path, whole", [
    ("/length/clip.ts", True), ("/ranges/clip.ts", True), ("/live/clip.ts", False),
    ("/playlist/clip.ts", False),  # an HLS playlist's length is not its video's
    ("/auth/length/clip.ts", False),  # no password: 401
])
def test_served_as_a_file_asks_the_server(ts_server, path, whole):
    from camface.realtime.live_source import served_as_a_file

    url, _, _ = ts_server
    assert served_as_a_file(url + path, 5.0) is whole


def test_served_as_a_file_logs_in_as_ffmpeg_does(ts_server):
    from camface.realtime.live_source import served_as_a_file

    url, asked, _ = ts_server
    asked.clear()
    assert served_as_a_file(url.replace("://", "://u:p@") + "/auth/length/clip.ts", 5.0)
    assert not served_as_a_file(url.replace("://", "://u:wrong@") + "/auth/length/clip.ts", 5.0)
    assert asked == ["Basic " + __import__("base64").b64encode(s).decode() for s in (b"u:p", b"u:wrong")]


class Uneven(FakeCamera):
    """Reads 2 to `last` give `odd` (ok=True) at once, the others good frames, 0.1 s apart
    after `last` (so the newest frame when the loop first asks is an odd one); 30 fps."""

    def __init__(self, odd, last: int):
        super().__init__()
        self.odd, self.last = odd, last

    def get(self, prop):
        return 30.0

    def read(self):
        if self.reads >= self.last:
            time.sleep(0.1)
        ok, frame = super().read()
        return (True, self.odd) if ok and 2 <= self.reads <= self.last else (ok, frame)


def test_a_camera_that_says_ok_with_an_empty_frame_goes_on():
    """A backend that answers ok with an empty frame: to_bgr8 raised a bare ValueError in the
    loop (a traceback, exit 1). It counts as a dropped frame; the camera is read on."""
    with LiveSource(0, opener=lambda target, timeout: Uneven(np.zeros((0,), np.uint8), 4)) as source:
        time.sleep(0.05)  # reads 2 to 4 are done
        frames = [frame for _, frame in zip(range(5), source)]
    assert all(frame.shape == (48, 64, 3) for frame in frames)


def test_a_camera_whose_frames_camface_cannot_use_is_a_source_error_naming_it():
    with LiveSource(0, opener=lambda target, timeout: Uneven(np.zeros((48, 64, 2), np.uint8), 10 ** 6)) as source:
        with pytest.raises(SourceError, match=r"camera 0 delivers frames camface cannot use "
                                              r"\(unsupported number of channels: 2\): uint8 \(48, 64, 2\)"):
            for _ in zip(range(50), source):
                pass


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (8-bit RGB) and whose data is a few bytes: OpenCV
    reads its header and refuses it, or starts decoding; it is never whole."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _jpeg_header(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) says width x height instead."""
    import struct

    import cv2

    data = bytearray(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("name, data, size, variable, limit", [
    ("big.png", _png_header(40000, 30000), "40000x30000 = 1200000000 pixels", "OPENCV_IO_MAX_IMAGE_PIXELS=1200000000",
     f"limit of {2 ** 30} pixels"),
    ("big.jpg", _jpeg_header(60000, 50000), "60000x50000 = 3000000000 pixels", "OPENCV_IO_MAX_IMAGE_PIXELS=3000000000",
     f"limit of {2 ** 30} pixels"),
    ("wide.png", _png_header(2 ** 20 + 2, 2), f"{2 ** 20 + 2}x2 = {2 ** 21 + 4} pixels",
     f"OPENCV_IO_MAX_IMAGE_WIDTH={2 ** 20 + 2}", f"limit of {2 ** 20} pixels in width"),
], ids=["png", "jpeg", "wide-png"])
def test_an_image_over_opencvs_pixel_limit_says_so_and_how_to_raise_it(tmp_path, caplog, monkeypatch, name, data,
                                                                         size, variable, limit):
    """An image larger than OpenCV decodes (2^30 pixels, 2^20 a side) was skipped from a folder
    as "not an image OpenCV can read" (OpenCV 4), or ended the run with cv2.error's traceback
    (OpenCV 5 raises): it is skipped saying its size, the limit and the environment variable
    that raises it; `camface guided`, `camface compare`, `camface train` (its log and report.md)
    and `camface enroll` say the same."""
    from camface.export.compare import read_photos
    from camface.guided.image import read_image
    from camface.guided.snapshot import EMOTION_PREPROCESSING
    from camface.realtime.sources import ImageFolderSource

    for variable_name in ("OPENCV_IO_MAX_IMAGE_PIXELS", "OPENCV_IO_MAX_IMAGE_WIDTH", "OPENCV_IO_MAX_IMAGE_HEIGHT"):
        monkeypatch.delenv(variable_name, raising=False)
    import cv2

    cv2.imwrite(str(tmp_path / "01.png"), np.full((6, 8, 3), 50, np.uint8))
    (tmp_path / f"02-{name}").write_bytes(data)
    cv2.imwrite(str(tmp_path / "03.png"), np.full((6, 8, 3), 90, np.uint8))
    with caplog.at_level(logging.WARNING, logger="camface.realtime.sources"), ImageFolderSource(tmp_path) as source:
        frames = list(source)
    assert [int(f[0, 0, 0]) for f in frames] == [50, 90]
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"skipping {tmp_path / f'02-{name}'}: {size}, over OpenCV's {limit}; ")
    assert f"set the environment variable {variable} (or more) before camface starts" in said
    reason = said.split(": ", 1)[1]
    with pytest.raises(SourceError) as guided:
        read_image(tmp_path / f"02-{name}", Path("unused.keras"), EMOTION_PREPROCESSING, (48, 48), ("a",))
    assert str(guided.value) == f"cannot read image {tmp_path / f'02-{name}'}: {reason}"
    with pytest.raises(SourceError) as compared:
        read_photos([tmp_path / "01.png", tmp_path / f"02-{name}"])
    assert str(compared.value) == f"cannot read the photo {tmp_path / f'02-{name}'}: {reason}"
    # `camface train` and `camface enroll` read their photos alike: they said "unreadable" only
    import shutil

    from camface.export.enroll import face_crops, scan_people
    from camface.models import dataset, report
    from camface.models.train import _log_counts

    people = tmp_path / "people"
    for folder, photos in {"a": ["01.png", f"02-{name}"], "b": ["03.png"]}.items():
        (people / folder).mkdir(parents=True)
        for photo in photos:
            shutil.copy(tmp_path / photo, people / folder / photo)
    big = people / "a" / f"02-{name}"
    classes = dataset.scan_classes(people)
    settings = dataset.CropSettings(size=8, detect=False, detector="", margin=0.0, min_confidence=0.0)
    photos = dataset.prepare_crops(people, classes, tmp_path / "crops", settings)
    assert [(p.source, p.why) for p in photos if p.status == dataset.UNREADABLE] == [(big, reason)]
    again = dataset.prepare_crops(people, classes, tmp_path / "crops", settings)  # tried again, not cached
    assert again == photos
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _log_counts(dataset.count_statuses(photos), {str(big): reason})
        face_crops(people, scan_people(people), (8, 8), "BGR", detect=False)
    assert [r.getMessage() for r in caplog.records] == [f"unreadable image skipped: {big}: {reason}",
                                                        f"skipping {big}: {reason}"]
    report.write_report(tmp_path / "report.md", command="camface train", labels=["a", "b"],
                        counts=dataset.count_statuses(photos), unreadable={str(big): reason}, split_sizes={},
                        stages=[], metrics=report.classification_metrics(np.array([0, 1]), np.array([0, 1]), ["a", "b"]),
                        settings={}, seconds=1.0)
    assert f"- `{big}`: {reason}\n" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("where, sent", [("elsewhere", None), ("here", "Basic dTpw")])  # base64 of u:p
def test_served_as_a_file_sends_the_urls_password_to_its_own_server_only(where, sent):
    """The request for its length carried the URL's user name and password as Authorization through a
    redirect to any other server (urllib passes every header on). A redirect to another server
    (here: another port) gets none; one to the same server keeps them."""
    import http.server
    import threading

    from camface.realtime.live_source import served_as_a_file

    heard, servers = [], []

    class Server(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/clip.ts":
                target = servers[1] if where == "elsewhere" else servers[0]
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{target.server_address[1]}/moved.ts")
            else:
                heard.append(self.headers.get("Authorization"))
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                self.send_header("Content-Length", "1000")
            self.end_headers()

    threads = []
    for _ in range(2):
        servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server))
        threads.append(threading.Thread(target=servers[-1].serve_forever, daemon=True))
        threads[-1].start()
    try:
        assert served_as_a_file(f"http://u:p@127.0.0.1:{servers[0].server_address[1]}/clip.ts", 5.0)
    finally:
        for server, thread in zip(servers, threads):
            server.shutdown()
            server.server_close()
            thread.join()
    assert heard == [sent]


@pytest.mark.parametrize("path, whole", [("/live.m3u8", False), ("/live.M3U8?token=1", False), ("/live.mpd", False),
                                         ("/clip.ts", True)])
def test_a_playlist_sent_as_octet_stream_is_not_a_file(path, whole):
    """A live HLS or DASH playlist that a server (a bucket) sends as application/octet-stream, with
    the list's Content-Length, was taken as a file of known length: read in order with no
    reconnection, paced as a file. Its suffix says it is a playlist, whatever the type."""
    import http.server
    import threading

    from camface.realtime.live_source import served_as_a_file

    class Server(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", "321")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert served_as_a_file(f"http://127.0.0.1:{server.server_address[1]}{path}", 5.0) is whole
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("head", ["refused", "ignored"])
def test_a_ts_whose_server_does_not_answer_head_is_asked_its_length_by_get(head):
    """The length was asked with a HEAD, after FFmpeg had opened the URL and before its first
    frame was given: a server that ignores HEAD (answers only the GET FFmpeg sends) held the
    source for its whole time-out (5 s), then had a .ts of known length read as a live stream;
    one that refuses HEAD (405, a URL signed for GET) had it read as a stream. The headers of a
    GET say the same, from any server that answers FFmpeg."""
    import http.server
    import threading

    from camface.realtime.live_source import served_as_a_file

    release, asked = threading.Event(), []

    class Server(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            asked.append("HEAD")
            if head == "ignored":
                release.wait(30)  # never answers while the test runs
            self.send_error(405)

        def do_GET(self):
            asked.append("GET")
            self.send_response(200)
            self.send_header("Content-Type", "video/mp2t")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(bytes(1000))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert served_as_a_file(f"http://127.0.0.1:{server.server_address[1]}/clip.ts", 5.0)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join()
    assert asked == ["GET"]


def test_a_stream_url_waits_for_its_servers_length_far_less_than_its_time_out(monkeypatch):
    """A stream whose server took its time to answer the length request held the source for
    the whole open/read time-out (5 s) before its first frame was given; FFmpeg has just opened
    it, so its server's headers come within LENGTH_WAIT_S or it is read as a stream."""
    from camface.realtime import live_source

    asked = []
    monkeypatch.setattr(live_source, "served_as_a_file", lambda url, timeout_s: asked.append(timeout_s) or False)
    with LiveSource("http://127.0.0.1:9/live.ts", timeout_s=5.0, opener=lambda target, timeout: FakeCamera()) as source:
        assert source.info.live
    assert asked == [live_source.LENGTH_WAIT_S] and live_source.LENGTH_WAIT_S <= 1.0


@pytest.mark.parametrize("fault, why", [("gone", "it is gone (deleted or moved since the folder was listed)"),
                                        ("dangling link", "it is a link to nowhere.png, which does not exist"),
                                        ("unreadable", "permission denied")])
def test_an_image_that_cannot_be_opened_is_said_in_one_line(tmp_path, monkeypatch, capfd, fault, why):
    """`camface compare` / `guided` on a photo without read permission printed OpenCV's warning
    line ("[ WARN:0@0.07] global loadsave.cpp:279 findDecoder imread_(...): can't open/read
    file") before their own error line: the reason is now found before OpenCV is asked."""
    import cv2

    from camface.realtime import sources

    path = tmp_path / "photo.png"
    if fault == "dangling link":  # was called "gone (deleted or moved since the folder was listed)"
        path.symlink_to("nowhere.png")
    if fault == "unreadable":  # root reads anything: the check is faked, as chmod 000 does for a user
        cv2.imwrite(str(path), np.zeros((4, 4, 3), np.uint8))
        readable = os.access
        monkeypatch.setattr(sources.os, "access", lambda p, mode: readable(p, mode) and Path(p) != path)
        monkeypatch.setattr(sources.cv2, "imread", lambda *a: pytest.fail("OpenCV was asked"))
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_WARNING)  # OpenCV's default
    try:
        assert sources.imread(path, cv2.IMREAD_COLOR) == (None, why)
    finally:
        cv2.utils.logging.setLogLevel(level)
    assert capfd.readouterr().err == ""


def test_a_file_url_is_read_as_the_file_or_folder_it_names(tmp_path):
    """file:///... was taken for a stream URL: played through FFmpeg as a live source by
    --source, refused by --calibration as "a stream URL". It names a file or folder of this
    machine, read as the path itself (a folder of images, a video file), also where
    calibration refuses streams; a file URL of another host is no path here."""
    import cv2

    from camface.realtime.sources import ImageFolderSource, VideoFileSource, check_source, make_source

    folder = tmp_path / "my faces"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8, 3), np.uint8))
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (32, 32))
    for _ in range(3):
        writer.write(np.zeros((32, 32, 3), np.uint8))
    writer.release()
    for path, kind in ((folder, ImageFolderSource), (clip, VideoFileSource)):
        for url in (path.as_uri(), "file://localhost" + path.as_uri()[len("file://"):]):
            assert isinstance(make_source(url), kind), url
            assert isinstance(check_source(url, "--calibration", no_camera="calibration"), kind), url
    with pytest.raises(SourceError, match=r"^--calibration: source not found: file://elsewhere/clip\.mp4"):
        check_source("file://elsewhere/clip.mp4", "--calibration", no_camera="calibration")


@pytest.mark.parametrize("host", ["LOCALHOST", "LocalHost", "127.0.0.1", "[::1]"])
def test_a_file_url_of_this_machine_by_any_name_is_read_as_its_path(host, tmp_path):
    """file://LOCALHOST/... (host names are case-insensitive), file://127.0.0.1/... and
    file://[::1]/... name this machine as file://localhost/... does: they were "not found"."""
    import cv2

    from camface.realtime.sources import ImageFolderSource, check_source, local_spec, make_source

    folder = tmp_path / "my faces"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8, 3), np.uint8))
    url = f"file://{host}" + folder.as_uri()[len("file://"):]
    assert local_spec(url) == str(folder)
    assert isinstance(make_source(url), ImageFolderSource)
    assert isinstance(check_source(url, "--calibration", no_camera="calibration"), ImageFolderSource)
    for other in (f"file://{host}:8080/x", f"file://me@{host}/x", "file://127.0.0.1.example/x", "file://10.0.0.1/x"):
        assert local_spec(other) == other, other  # a port, a user or another host: not this machine's path


def test_calibration_takes_a_video_file_behind_a_url_but_no_live_stream(ts_server, tmp_path):
    """Every URL was refused as --calibration, a video file behind an http(s) URL too, though
    its frames are the same on every run (read as a file: test above). The URL is opened to
    tell: a server that gives the length is a file, taken; one that sends until it closes is a
    live stream, refused; one that does not answer is named."""
    from camface.realtime.live_source import LiveSource
    from camface.realtime.sources import check_source

    url, _, _ = ts_server
    source = check_source(f"{url}/length/clip.ts", "--calibration", no_camera="calibration")
    assert isinstance(source, LiveSource) and source.target == f"{url}/length/clip.ts"
    with source:  # not entered by the check: it opens as the file it is
        assert not source.info.live and len(list(source)) == 40
    with pytest.raises(SourceError, match=rf"^--calibration: {url}/live/clip\.ts is a stream URL; calibration "
                                          r"needs a video file or a folder of images \(or 'sample'"):
        check_source(f"{url}/live/clip.ts", "--calibration", no_camera="calibration")
    with pytest.raises(SourceError, match=r"^--calibration: stream http://127\.0\.0\.1:9/clip\.ts could not be opened"):
        check_source("http://127.0.0.1:9/clip.ts", "--calibration", no_camera="calibration")  # nothing listens


@pytest.mark.parametrize("url", ["file://", "file://localhost", "FILE://"])
def test_a_file_url_naming_no_path_is_not_the_current_folder(url, tmp_path, monkeypatch):
    """local_spec gave "" for a file URL with no path, and Path("") is the current folder: it
    was read as a folder of images (the one camface ran in), where an empty --source is refused."""
    import cv2

    from camface.realtime.sources import check_source, make_source

    monkeypatch.chdir(tmp_path)
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))  # the folder would be read
    with pytest.raises(SourceError, match=rf"^source not found: {url}( |$)"):
        make_source(url)
    with pytest.raises(SourceError, match=rf"^--calibration: source not found: {url} "):
        check_source(url, "--calibration", no_camera="calibration")


@pytest.mark.parametrize("no_camera", [None, "calibration"])
def test_a_file_url_of_another_host_is_said_without_its_password(no_camera):
    """A file:// URL was a stream URL, said redacted; read as a path since, a file URL of another
    host (no path here) was said "not found" with its user name and password in the message."""
    from camface.realtime.sources import check_source, make_source

    url = "file://admin:s3cret@nas/clip.mp4"
    with pytest.raises(SourceError) as raised:
        make_source(url)
    assert str(raised.value).startswith("source not found: file://***@nas/clip.mp4 ")
    with pytest.raises(SourceError) as raised:
        check_source(url, "--calibration", no_camera=no_camera)
    assert str(raised.value).startswith("--calibration: source not found: file://***@nas/clip.mp4 ")
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize("url, path", [
    ("file:///C:/data/my%20faces", "C:\\data\\my faces"),
    ("file://localhost/C:/data/clip.mp4", "C:\\data\\clip.mp4"),
    ("file://LOCALHOST/C:/data/clip.mp4", "C:\\data\\clip.mp4"),
    ("file://127.0.0.1/C:/data/clip.mp4", "C:\\data\\clip.mp4"),
    ("file://server/share/clip.mp4", "\\\\server\\share\\clip.mp4"),  # Path(r"\\server\share\clip.mp4").as_uri()
    # a share of this machine by its loopback address: PureWindowsPath(r"\\127.0.0.1\c$\data\clip.mp4").as_uri()
    ("file://127.0.0.1/c%24/data/clip.mp4", "\\\\127.0.0.1\\c$\\data\\clip.mp4"),
    ("file://admin:pw@server/share/clip.mp4", "file://admin:pw@server/share/clip.mp4"),  # said redacted, not found
])
def test_a_file_url_on_windows_is_its_drive_or_share_path(url, path):
    """On Windows a file URL with a host names a share (pathlib writes \\\\server\\share\\x as
    file://server/share/x): it was left as the URL, "not found", where FFmpeg had read it."""
    from camface.realtime.sources import local_spec

    assert local_spec(url, windows=True) == path
    if url.startswith("file://server"):  # elsewhere a host's file is none of this machine's
        assert local_spec(url, windows=False) == url
