"""Recordings: H.264 in fragmented MP4 (PyAV) with an mp4v fallback; what survives a hard kill;
reading files cut short; browser playback. Small synthetic clips (160x120) in tmp_path."""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from realtime_helpers import count_frames, frame_times, write_clip

from camface.errors import OutputError, SourceError
from camface.models import EMOTION_ONNX
from camface.realtime import fmp4, sinks
from camface.realtime.sample import SampleSource
from camface.realtime.sinks import CODECS, VideoSink, encoder_for
from camface.realtime.sources import VideoFileSource

FPS = 30.0
SIZE = (160, 120)
LOSSY = 6.0  # mean absolute difference (grey levels) a decoded frame may have from its original
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def clip_frames():
    """90 frames (3 s at 30 fps) of the sample clip at 160x120, uint8 BGR; faces move."""
    sample = SampleSource(frames=90, size=SIZE)
    return [sample.frame(i) for i in range(90)]


@pytest.fixture
def fresh_probe():
    """Forget which encoder was found (and that the fallback was announced), before and after."""
    fmp4.h264_encoder.cache_clear()
    sinks._say_fallback.cache_clear()
    yield
    fmp4.h264_encoder.cache_clear()
    sinks._say_fallback.cache_clear()


def record(path: Path, frames, codec: str = "auto") -> VideoSink:
    with VideoSink(path, FPS, codec=codec) as sink:
        for frame in frames:
            sink.write(frame)
    return sink


def decode(path: Path) -> list[np.ndarray]:
    with VideoFileSource(path) as source:
        return list(source)


def boxes(data: bytes) -> list[tuple[int, int, bytes]]:
    """Top-level MP4 boxes: (offset, size, type)."""
    out, position = [], 0
    while position + 8 <= len(data):
        size, kind = int.from_bytes(data[position:position + 4], "big"), data[position + 4:position + 8]
        out.append((position, size, kind))
        position += size
    return out


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ------------------------------------------------------------------------------ recording

@pytest.mark.parametrize("codec, encoder, fourcc", [("auto", "libx264", "h264"), ("h264", "libx264", "h264"),
                                                    ("mp4v", "mp4v", "FMP4")])
def test_a_recording_of_n_frames_decodes_to_n_frames_with_their_content(tmp_path, clip_frames, codec,
                                                                         encoder, fourcc):
    if encoder == "libx264" and fmp4.h264_encoder()[0] == "h264_nvenc":
        encoder = "h264_nvenc"
    path = tmp_path / f"{codec}.mp4"
    sink = record(path, clip_frames, codec)
    assert sink.encoder == encoder and sink.frames_written == 90
    capture = cv2.VideoCapture(str(path))
    code = int(capture.get(cv2.CAP_PROP_FOURCC))
    assert code.to_bytes(4, "little").decode() == fourcc
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(FPS)
    capture.release()
    decoded = decode(path)
    assert len(decoded) == 90
    for index in (0, 1, 45, 89):
        assert mad(decoded[index], clip_frames[index]) < LOSSY, index
        # the comparison can fail: frames 20 apart differ by 17-38 grey levels
        assert mad(decoded[index], clip_frames[(index + 20) % 90]) > 2 * LOSSY, index


def test_h264_recordings_are_fragmented_with_a_keyframe_every_second(tmp_path, clip_frames):
    path = tmp_path / "fragments.mp4"
    record(path, clip_frames, "h264")
    kinds = [kind for _, _, kind in boxes(path.read_bytes())]
    assert kinds[:2] == [b"ftyp", b"moov"]
    import av

    with av.open(str(path)) as container:
        keyframes = [i for i, packet in enumerate(p for p in container.demux(video=0) if p.size)
                     if packet.is_keyframe]
    assert keyframes[:3] == [0, 30, 60]  # one per second of video; x264 may add scene cuts
    assert kinds.count(b"moof") == len(keyframes) == kinds.count(b"mdat")


def test_a_camera_recording_has_a_keyframe_every_second_of_its_time(tmp_path, clip_frames):
    """A loop that records 5 of a 30 fps camera's frames a second: a keyframe (and a fragment)
    every second of the frames' times, not every 30 frames (6 s, lost whole on a hard kill)."""
    path = tmp_path / "slow.mp4"
    with VideoSink(path, 30.0, codec="h264") as sink:
        for k, frame in enumerate(clip_frames[:40]):
            sink.write(frame, at=100.0 + 0.2 * k)
    import av

    with av.open(str(path)) as container:
        keys = [float(p.pts * p.time_base) for p in container.demux(video=0) if p.size and p.is_keyframe]
    assert keys[:8] == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], abs=1e-3)
    kinds = [kind for _, _, kind in boxes(path.read_bytes())]
    assert kinds.count(b"moof") == len(keys)


@pytest.mark.parametrize("codec", ["h264", "mp4v"])
@pytest.mark.parametrize("fps", [29.97, 192.103, 7.5])  # a measured camera rate is rarely round
def test_the_file_keeps_the_frame_rate(tmp_path, clip_frames, codec, fps):
    path = tmp_path / "rate.mp4"
    with VideoSink(path, fps, codec=codec) as sink:
        for frame in clip_frames[:20]:
            sink.write(frame)
    capture = cv2.VideoCapture(str(path))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(fps, rel=1e-3)
    capture.release()
    assert count_frames(path) == 20


TAKEN = (0.0, 0.1, 0.2, 0.5, 0.534)  # a camera's frames, with gaps where the loop skipped frames


@pytest.mark.parametrize("codec", ["h264", "mp4v"])
def test_a_camera_recording_plays_at_the_speed_it_was_filmed(tmp_path, clip_frames, codec):
    """Frames written with the time they were taken last until the next one: H.264 stores
    the times, mp4v repeats the frame before (at 30 fps, 0.1 s is 3 frame periods)."""
    path = tmp_path / "camera.mp4"
    shots = [clip_frames[i] for i in (0, 20, 40, 60, 80)]
    with VideoSink(path, FPS, codec=codec) as sink:
        for frame, at in zip(shots, TAKEN):
            sink.write(frame, at=100.0 + at)  # any clock: times count from the first frame
    decoded = decode(path)
    if codec == "h264":
        assert frame_times(path) == pytest.approx([0.0, 0.1, 0.2, 0.5, 16 / 30], abs=1e-3)
        assert sink.frames_written == len(decoded) == 5
        shown = decoded
    else:  # slots 0, 3, 6, 15, 16: each frame repeated until the next
        assert sink.frames_written == len(decoded) == 17
        assert capture_fps(path) == pytest.approx(FPS)
        shown = [decoded[i] for i in (0, 3, 6, 15, 16)]
        for held, shot in ((1, 0), (2, 0), (5, 1), (14, 2)):
            assert mad(decoded[held], shots[shot]) < LOSSY, held
    for k, got in enumerate(shown):  # each shown frame is its shot, and no other (shots differ by 11-38)
        differences = [mad(got, shot) for shot in shots]
        assert differences[k] < LOSSY and sorted(differences)[1] > differences[k] + LOSSY, (k, differences)


def test_a_stream_faster_than_its_stated_rate_records_its_own_times(tmp_path, clip_frames):
    """An MJPEG stream says 25 fps whatever it sends: frames 20 ms apart keep their times in
    H.264 (timed to the millisecond), not 40 ms each (which played the recording at half speed)."""
    path = tmp_path / "fast.mp4"
    with VideoSink(path, 25.0, codec="h264") as sink:
        for k, frame in enumerate(clip_frames[:10]):
            sink.write(frame, at=0.02 * k)
    assert frame_times(path) == pytest.approx([0.02 * k for k in range(10)], abs=1e-3)


def test_mp4v_of_a_stream_faster_than_its_stated_rate_keeps_its_speed(tmp_path, clip_frames):
    """mp4v holds one frame per period: frames 20 ms apart at a stated 25 fps took 40 ms each
    (0.8 s of video for 0.4 s filmed, later frames ever later); one per period is kept."""
    path = tmp_path / "fast.mp4"
    with VideoSink(path, 25.0, codec="mp4v") as sink:
        for k, frame in enumerate(clip_frames[:20]):
            sink.write(frame, at=0.02 * k)
    # times 0 .. 0.38 s: periods 0 .. 9 or 10 (where 9.5 rounds), one frame each
    assert 10 <= sink.frames_written == count_frames(path) <= 11


def test_mp4v_holds_a_frame_for_at_most_max_hold_s(tmp_path, clip_frames, monkeypatch):
    monkeypatch.setattr(sinks, "MAX_HOLD_S", 0.2)  # 6 frame periods at 30 fps
    path = tmp_path / "stall.mp4"
    with VideoSink(path, FPS, codec="mp4v") as sink:
        for frame, at in zip(clip_frames[:3], (0.0, 60.0, 60.1)):  # a minute's stall, then 3 periods
            sink.write(frame, at=at)
    assert sink.frames_written == count_frames(path) == 1 + 6 + 1 + 2 + 1


def test_frames_without_a_time_keep_one_period_each(tmp_path, clip_frames):
    path = tmp_path / "file.mp4"
    record(path, clip_frames[:5], "h264")
    assert frame_times(path) == pytest.approx([i / FPS for i in range(5)], abs=1e-3)


def capture_fps(path: Path) -> float:
    capture = cv2.VideoCapture(str(path))
    try:
        return capture.get(cv2.CAP_PROP_FPS)
    finally:
        capture.release()


class _DiskOf:
    """open() whose files fail with ENOSPC once `limit` bytes in all were written (a disk
    that fills up); `written` counts the bytes that went through. short: the write that
    fills the disk writes what fits and says so, as a real disk's does (FFmpeg takes the
    short count without a word); the next one fails."""

    def __init__(self, limit: float, short: bool = False):
        self.limit, self.written, self.short = limit, 0, short

    def __call__(self, path, mode="r", buffering=-1):
        disk = self

        class File(io.FileIO):
            def write(self, data):
                room = int(disk.limit - disk.written) if disk.short else 0
                if disk.written + len(data) > disk.limit and room <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                data = bytes(data)[:max(room, 0)] if disk.written + len(data) > disk.limit else data
                disk.written += len(data)
                return super().write(data)

        return File(path, mode)


def test_a_full_disk_is_an_error_naming_the_file_and_what_was_written_stays(tmp_path, clip_frames, monkeypatch):
    """A disk that fills while frames are written, or while the last fragment is (at close):
    OutputError naming the file, never silence; the fragments before stay playable."""
    if encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here")
    counting = _DiskOf(float("inf"))
    monkeypatch.setattr(fmp4, "open", counting, raising=False)
    with VideoSink(tmp_path / "whole.mp4", FPS) as sink:
        for frame in clip_frames[:75]:
            sink.write(frame)
        before_close = counting.written
    assert count_frames(tmp_path / "whole.mp4") == 75 and sink.frames_kept == 75

    monkeypatch.setattr(fmp4, "open", _DiskOf(before_close + 16), raising=False)  # full at close
    sink = VideoSink(tmp_path / "close.mp4", FPS)
    for frame in clip_frames[:75]:
        sink.write(frame)
    with pytest.raises(OutputError, match=f"cannot finish {re.escape(str(tmp_path / 'close.mp4'))}: "
                                          "No space left on device"):
        sink.close()
    assert count_frames(tmp_path / "close.mp4") == 60  # two whole fragments of 30 frames
    assert sink.frames_written == 75 and sink.frames_kept == 60  # what the summary line says

    monkeypatch.setattr(fmp4, "open", _DiskOf(before_close / 2), raising=False)  # full while writing
    sink = VideoSink(tmp_path / "write.mp4", FPS)
    with pytest.raises(OutputError, match=f"cannot write {re.escape(str(tmp_path / 'write.mp4'))}: "
                                          "No space left on device"):
        for frame in clip_frames[:75]:
            sink.write(frame)
    assert 0 < sink.frames_written < 75
    try:
        sink.close()  # the disk is still full: it may say so again
    except OutputError as exc:
        assert "write.mp4" in str(exc)
    assert count_frames(tmp_path / "write.mp4") == 30 and sink.frames_kept == 30


@pytest.mark.parametrize("disk, frames, fails, reason", [
    (_DiskOf(28 + 100), 1, "write", "its first frame could not be written"),  # after the ftyp box, in the header
    (_DiskOf(40, short=True), 1, "finish", "1 encoded, none written whole"),  # header cut, at close
    (_DiskOf(2000), 35, "write", "30 encoded, none written whole"),  # the header, no fragment
], ids=["first-frame", "header-cut", "no-fragment"])
def test_a_recording_that_holds_no_frame_is_removed_and_said_so(tmp_path, clip_frames, monkeypatch, caplog, disk,
                                                                 frames, fails, reason):
    """A disk that fills before the first frame reached the file left a stub: the encoder's
    header (or part of it), which no player opens and looked like a recording. It is removed,
    with a warning saying so; the write's or the close's error still names the file."""
    if encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here")
    monkeypatch.setattr(fmp4, "open", disk, raising=False)
    path = tmp_path / "stub.mp4"
    sink = VideoSink(path, FPS)
    with caplog.at_level(logging.WARNING), pytest.raises(OutputError, match=f"cannot {fails} {re.escape(str(path))}: "
                                                                            "No space left on device"):
        with sink:
            for frame in clip_frames[:frames]:
                sink.write(frame)
    assert 0 < disk.written and not path.exists() and sink.frames_kept == 0
    assert f"camface: removed {path}: it holds no frame ({reason}), so it would not play" in caplog.text


@pytest.mark.parametrize("disk, frames, said", [
    (_DiskOf(28 + 100), 1, "recording not started: cannot write {path}: No space left on device; the file was "
                           "removed: it holds no frame (its first frame could not be written), so it would not play"),
    (_DiskOf(2000), 35, "recording stopped: cannot write {path}: No space left on device (0 frames kept); the file "
                        "was removed: it holds no frame (30 encoded, none written whole), so it would not play"),
], ids=["first-frame", "no-fragment"])
def test_key_r_leaves_no_stub_and_says_so_in_one_line(tmp_path, clip_frames, monkeypatch, caplog, disk, frames, said):
    """Key r's recording whose first frame failed after its header was written: only an empty
    file was removed; the stub stayed beside the next ones. Its removal and the recording's
    failure were two warnings: they are one line, on screen (`notices`) and in the log."""
    if encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here")
    from camface.realtime.recorder import Output, Recorder
    from camface.realtime.timing import StageTimer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fmp4, "open", disk, raising=False)
    recorder = Recorder(None, FPS, False, None, StageTimer())
    path = recorder._next_path()  # camface-DATE-TIME.mp4: the name key r records to
    recorder._next_path = lambda: path  # (the same, should the second change meanwhile)
    with caplog.at_level(logging.WARNING):
        for index, frame in enumerate(clip_frames[:frames]):
            recorder.handle(Output(frame, explained=None, toggle=index == 0))  # (used for snapshots only)
    assert recorder.sink is None and recorder.recordings == [] and list(tmp_path.iterdir()) == []
    notice = recorder.notices.get_nowait()
    assert notice == said.format(path=path) and recorder.notices.empty()
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == \
        [f"camface: {notice}"]


@pytest.mark.parametrize("share", [0.45, 0.5, 0.55, 0.8])
def test_a_disk_that_fills_inside_a_frame_leaves_a_file_that_decodes_to_its_end(tmp_path, clip_frames, monkeypatch,
                                                                                  share):
    """A real disk writes the part of a fragment that fits: the file ended inside a frame, which
    FFmpeg handed to the decoder and PyAV's decode raised on after the whole frames. The file
    is cut at its last whole frame: every frame it holds decodes, without an error."""
    import av

    if encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here")
    counting = _DiskOf(float("inf"))
    monkeypatch.setattr(fmp4, "open", counting, raising=False)
    record(tmp_path / "whole.mp4", clip_frames[:75])
    monkeypatch.setattr(fmp4, "open", _DiskOf(counting.written * share, short=True), raising=False)
    path = tmp_path / "full.mp4"
    sink = VideoSink(path, FPS)
    with pytest.raises(OutputError, match="No space left on device"):
        with sink:
            for frame in clip_frames[:75]:
                sink.write(frame)
    with av.open(str(path)) as container:
        decoded = sum(1 for _ in container.decode(video=0))  # raised on a cut frame
    assert 30 <= decoded == sink.frames_kept == fmp4.whole_frames(path) < 75
    assert count_frames(path) == decoded


def test_trimming_leaves_a_file_whose_sample_sizes_it_cannot_tell(tmp_path, clip_frames):
    """A fragment whose index gives no sample sizes: where its frames end is unknown, so a file
    cut inside it is not trimmed (at the last frame counted, the frames after it were lost)."""
    if encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here")
    data = bytearray(record(tmp_path / "whole.mp4", clip_frames[:75]).path.read_bytes())
    moofs = [m.start() - 4 for m in re.finditer(b"moof", data)]
    cut = bytes(data[:moofs[2] + (len(data) - moofs[2]) // 2])  # inside the last fragment's samples
    (tmp_path / "cut.mp4").write_bytes(cut)
    assert fmp4.trim_to_whole_frames(tmp_path / "cut.mp4") == fmp4.whole_frames(tmp_path / "cut.mp4") > 60
    assert (tmp_path / "cut.mp4").stat().st_size < len(cut)  # its sizes told: cut at its last whole frame
    trun = data.index(b"trun", moofs[1])  # the 2nd fragment's index
    data[trun + 6] &= ~0x02  # flags: sample sizes not present (nor in tfhd)
    tfhd = data.index(b"tfhd", moofs[1])
    data[tfhd + 7] &= ~0x10  # no default sample size
    (tmp_path / "unknown.mp4").write_bytes(bytes(data[:len(cut)]))
    assert fmp4.trim_to_whole_frames(tmp_path / "unknown.mp4") == fmp4.whole_frames(tmp_path / "unknown.mp4")
    assert (tmp_path / "unknown.mp4").stat().st_size == len(cut)  # left whole


class _LosesItsIndex:
    """What a full disk does to OpenCV's mp4v file: the index, written last, is lost (a
    cv2.VideoWriter whose file loses its second half at release)."""

    real = cv2.VideoWriter  # (taken before a test puts this class in its place)

    def __init__(self, path, *args):
        self.path, self.writer = path, self.real(path, *args)

    def __getattr__(self, name):
        return getattr(self.writer, name)

    def release(self):
        self.writer.release()
        os.truncate(self.path, os.path.getsize(self.path) // 2)


def test_mp4v_says_when_its_file_could_not_be_finished(tmp_path, clip_frames, monkeypatch):
    """OpenCV's writer reports no write error (a full disk leaves a file without its index, and
    silence): the file is read back at close instead."""
    assert count_frames(record(tmp_path / "fine.mp4", clip_frames[:10], "mp4v").path) == 10  # a whole file passes
    monkeypatch.setattr(sinks.cv2, "VideoWriter", _LosesItsIndex)
    sink = VideoSink(tmp_path / "cut.mp4", FPS, codec="mp4v")
    for frame in clip_frames[:10]:
        sink.write(frame)
    path = re.escape(str(tmp_path / "cut.mp4"))
    with pytest.raises(OutputError, match=f"cannot finish {path}: it holds 0 of the 10 frames written"):
        sink.close()
    assert sink.frames_written == 10 and sink.frames_kept == 0


def test_whole_frames_counts_the_samples_a_cut_fragment_still_holds(tmp_path, clip_frames):
    """A full disk can cut a fragment after its index (moof) was written: the frames whose
    bytes all made it are readable, the others not; whole_frames says how many."""
    if encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here")
    whole = record(tmp_path / "whole.mp4", clip_frames[:75]).path
    assert fmp4.whole_frames(whole) == 75
    data = whole.read_bytes()
    moofs = [m.start() - 4 for m in re.finditer(b"moof", data)]
    assert len(moofs) == 3  # fragments of 30, 30 and 15 frames
    for cut, kept in [(moofs[2], 60), (moofs[2] + 200, 60), (moofs[1] + (moofs[2] - moofs[1]) // 2, None)]:
        (tmp_path / "cut.mp4").write_bytes(data[:cut])
        found = fmp4.whole_frames(tmp_path / "cut.mp4")
        assert found == (kept if kept is not None else count_frames(tmp_path / "cut.mp4"))
        assert 30 < found <= 60
    (tmp_path / "text.mp4").write_bytes(b"not a video at all")
    assert fmp4.whole_frames(tmp_path / "text.mp4") == 0


def test_live_summary_counts_the_frames_the_file_holds_after_a_full_disk(tmp_path, monkeypatch, capsys):
    """The disk fills during a fragment: the encoder had taken more frames than reached the
    file. The summary line says how many the file holds, not how many were encoded."""
    if encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here")
    from camface.cli import main

    monkeypatch.setattr(fmp4, "open", _DiskOf(300_000), raising=False)
    out = tmp_path / "out.mp4"
    assert main(["live", "--source", "sample", "--no-show", "--max-frames", "90", "--record", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}: No space left on device" in err
    kept = count_frames(out)
    assert 0 < kept < 60 and f"recorded {kept} frames to {out}" in err


def _earlier_recording(tmp_path, clip_frames, given):
    """(the path given to --record, the file it writes, that file's bytes before the run)."""
    earlier = record(tmp_path / "earlier.mp4", clip_frames[:10]).path
    if given == "file":
        return earlier, earlier, earlier.read_bytes()
    link = tmp_path / "link.mp4"
    link.symlink_to(earlier)
    return link, earlier, earlier.read_bytes()


@pytest.mark.parametrize("given", ["file", "link"])
@pytest.mark.parametrize("disk", [lambda: _DiskOf(28 + 100), lambda: _DiskOf(40, short=True), lambda: _DiskOf(2000)],
                         ids=["first-frame", "header-cut", "no-fragment"])
def test_an_earlier_recording_is_kept_when_the_new_one_holds_no_frame(tmp_path, clip_frames, monkeypatch, given,
                                                                       disk):
    """--overwrite over an earlier recording (or a link to one), the disk full before a whole
    frame reached the file: the earlier file was emptied when the encoder opened, and then
    removed (a link: the link removed, the file it points to left holding the encoder's stub).
    The earlier file is kept as it was, the link too, and nothing is left beside them."""
    if encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here")
    path, earlier, before = _earlier_recording(tmp_path, clip_frames, given)
    kept = sorted(tmp_path.iterdir())
    monkeypatch.setattr(fmp4, "open", disk(), raising=False)
    sink = VideoSink(path, FPS, overwrite=True)
    with pytest.raises(OutputError, match=f"cannot (write|finish) {re.escape(str(path))}: No space left"):
        with sink:
            for frame in clip_frames[:35]:
                sink.write(frame)
    assert earlier.read_bytes() == before and path.resolve() == earlier
    assert sorted(tmp_path.iterdir()) == kept and sink.frames_kept == 0 and sink.kept_earlier


@pytest.mark.parametrize("given", ["file", "link"])
def test_an_earlier_recording_is_replaced_once_the_new_one_holds_a_whole_frame(tmp_path, clip_frames, given):
    """The new recording takes the earlier one's place as soon as its first fragment is on
    disk (so a hard kill after it leaves the new recording there, playable), through a link the
    file it points to; the link stays a link."""
    if encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here")
    path, earlier, before = _earlier_recording(tmp_path, clip_frames, given)
    with VideoSink(path, FPS, overwrite=True) as sink:
        for frame in clip_frames[:29]:
            sink.write(frame)
        assert earlier.read_bytes() == before  # no fragment on disk yet
        for frame in clip_frames[29:35]:
            sink.write(frame)
        assert count_frames(earlier) == 30  # the first fragment, in the earlier file's place
    assert count_frames(earlier) == 35 and path.resolve() == earlier and path.is_symlink() == (given == "link")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"earlier.mp4", path.name})


@pytest.mark.parametrize("given", ["file", "link"])
def test_mp4v_over_an_earlier_recording_replaces_it_at_close(tmp_path, clip_frames, given):
    """--codec mp4v --overwrite: OpenCV emptied the earlier file as it opened, so a run killed
    or failing before its close had lost it. It is written beside it and renamed over it at
    close (mp4v's index is written then); through a link, the file it points to."""
    path, earlier, before = _earlier_recording(tmp_path, clip_frames, given)
    with VideoSink(path, FPS, overwrite=True, codec="mp4v") as sink:
        for frame in clip_frames[:12]:
            sink.write(frame)
        assert earlier.read_bytes() == before
    assert count_frames(earlier) == 12 and sink.frames_kept == 12 and not sink.kept_earlier
    assert path.resolve() == earlier and path.is_symlink() == (given == "link")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"earlier.mp4", path.name})


@pytest.mark.parametrize("codec", ["auto", "mp4v"])
@pytest.mark.parametrize("given", ["file", "link"])
def test_an_earlier_recording_in_a_folder_taking_no_new_file_is_written_over_in_place(tmp_path, clip_frames,
                                                                                        monkeypatch, given, codec):
    """A link to a writable recording in a folder where no new file can be made (another user's,
    read-only to this one) was written over before; written beside it, the recording failed at
    its first frame ("cannot open ...: Permission denied"). It is written over in place, as
    before (the link stays a link)."""
    if codec == "auto" and encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here")
    path, earlier, _ = _earlier_recording(tmp_path, clip_frames, given)
    real_open = os.open

    def no_new_file_beside(name, flags, mode=0o777):
        if ".partial" in os.fspath(name):  # (root makes files in a read-only folder: refused here)
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(name))
        return real_open(name, flags, mode)

    real_writer = cv2.VideoWriter

    def writer_no_new_file_beside(name, *args):  # OpenCV opens its files itself (mp4v)
        return real_writer() if ".partial" in os.fspath(name) else real_writer(name, *args)  # (not opened)

    monkeypatch.setattr(fmp4.os, "open", no_new_file_beside)
    monkeypatch.setattr(sinks.cv2, "VideoWriter", writer_no_new_file_beside)
    with VideoSink(path, FPS, overwrite=True, codec=codec) as sink:
        for frame in clip_frames[:35]:
            sink.write(frame)
    monkeypatch.undo()
    assert count_frames(earlier) == 35 and sink.frames_kept == 35
    assert path.resolve() == earlier and path.is_symlink() == (given == "link")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"earlier.mp4", path.name})


@pytest.mark.parametrize("given", ["file", "link"])
def test_mp4v_over_an_earlier_recording_keeps_it_when_the_new_one_holds_no_frame(tmp_path, clip_frames, monkeypatch,
                                                                                 given):
    """A full disk takes the new mp4v file's index (no frame readable): the earlier recording
    stays as it was, said in the error, and nothing is left beside it."""
    path, earlier, before = _earlier_recording(tmp_path, clip_frames, given)
    kept = sorted(tmp_path.iterdir())
    monkeypatch.setattr(sinks.cv2, "VideoWriter", _LosesItsIndex)
    sink = VideoSink(path, FPS, overwrite=True, codec="mp4v")
    for frame in clip_frames[:10]:
        sink.write(frame)
    with pytest.raises(OutputError, match=f"cannot finish {re.escape(str(path))}: the new recording holds 0 of "
                                          "the 10 frames written .*; the earlier file is kept"):
        sink.close()
    assert earlier.read_bytes() == before and path.resolve() == earlier
    assert sorted(tmp_path.iterdir()) == kept and sink.frames_kept == 0 and sink.kept_earlier


@pytest.mark.parametrize("stop", [cv2.error, KeyboardInterrupt], ids=["opencv-error", "ctrl-c"])
def test_mp4v_over_an_earlier_recording_that_fails_to_open_leaves_nothing_beside_it(tmp_path, clip_frames,
                                                                                   monkeypatch, stop):
    """OpenCV's VideoWriter raising (rather than returning a writer not opened), or Ctrl-C while
    it opens, left the empty file made beside the earlier recording. It is removed, the earlier
    recording kept as it was."""
    path, earlier, before = _earlier_recording(tmp_path, clip_frames, "file")
    kept = sorted(tmp_path.iterdir())

    def raises(*args):
        raise stop("the writer did not open")

    monkeypatch.setattr(sinks.cv2, "VideoWriter", raises)
    sink = VideoSink(path, FPS, overwrite=True, codec="mp4v")
    with pytest.raises(stop, match="the writer did not open"):
        sink.write(clip_frames[0])  # (opened with the first frame)
    assert sorted(tmp_path.iterdir()) == kept and earlier.read_bytes() == before


@pytest.mark.parametrize("given", ["file", "link"])
def test_a_recording_removes_what_killed_recordings_of_its_path_left(tmp_path, clip_frames, given):
    """A recording killed hard before it held a frame leaves its file beside the earlier one
    (.NAME.PID-XXXXXX.partial.mp4); the next recording to that path removes it (through a link:
    beside the file it points to), not one of a live process or of another recording."""
    path, earlier, _ = _earlier_recording(tmp_path, clip_frames, given)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 60

    def left(final, pid):
        name = tmp_path / f".{final}.{pid}-a1b2c3.partial.mp4"
        name.write_bytes(b"\0\0\0\x18ftypisom")
        os.utime(name, (old, old))
        return name

    killed, live, other = left("earlier.mp4", dead.pid), left("earlier.mp4", os.getpid()), left("other.mp4", dead.pid)
    with VideoSink(path, FPS, overwrite=True, codec="mp4v") as sink:
        sink.write(clip_frames[0])
    assert not killed.exists() and live.exists() and other.exists() and count_frames(earlier) == 1


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("given", ["file", "link"])
@pytest.mark.parametrize("mode", [0o600, 0o664], ids=["0600", "0664"])
@pytest.mark.parametrize("codec", ["auto", "mp4v"])
def test_an_earlier_recording_replaced_keeps_its_mode(tmp_path, clip_frames, given, mode, codec):
    """The new recording, written beside the earlier one and renamed over it, took the mode of
    a new file (0644 under umask 022): a private 0600 recording became readable by everyone.
    It keeps the earlier file's mode, through a link too."""
    if codec == "auto" and encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here")
    path, earlier, _ = _earlier_recording(tmp_path, clip_frames, given)
    earlier.chmod(mode)
    umask = os.umask(0o022)
    try:
        record_over = VideoSink(path, FPS, overwrite=True, codec=codec)
        with record_over:
            for frame in clip_frames[:35]:
                record_over.write(frame)
    finally:
        os.umask(umask)
    assert count_frames(earlier) == 35 and stat.S_IMODE(earlier.stat().st_mode) == mode


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_live_on_a_full_disk_stops_with_one_error_line(tmp_path, capsys):
    from camface.cli import main

    full = tmp_path / "full.mp4"
    full.symlink_to("/dev/full")
    assert main(["live", "--source", "sample", "--no-show", "--max-frames", "10", "--record", str(full),
                 "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"camface: error: cannot write {full}: No space left on device" in err and "Traceback" not in err

def _refuse_the_container(monkeypatch):
    import av

    def refused(*args, **kwargs):
        raise av.FFmpegError(22, "Invalid argument")

    monkeypatch.setattr(av, "open", refused)


def _refuse_the_stream(monkeypatch):
    import av

    def refused(self, *args, **kwargs):
        raise ValueError("no encoder of that name")

    monkeypatch.setattr(av.container.OutputContainer, "add_stream", refused)


def _refuse_the_encoder(monkeypatch):
    for name in ("libx264", "h264_nvenc"):  # (NVENC, where it opens, gives way to libx264)
        monkeypatch.setitem(fmp4.ENCODER_OPTIONS, name, {"preset": "no-such-preset"})


@pytest.mark.parametrize("refuse, reason", [
    (_refuse_the_container, "cannot open {out} for writing: .*Invalid argument"),
    (_refuse_the_stream, "cannot open {out} for writing: no encoder of that name"),
    (_refuse_the_encoder, "libx264 cannot encode [0-9]+x[0-9]+ video for {out}: "),
], ids=["container", "stream", "encoder"])
@pytest.mark.parametrize("before", [None, b"an earlier recording"], ids=["new", "overwrite"])
def test_a_record_file_whose_encoder_does_not_open_is_one_error_and_no_file(tmp_path, capsys, monkeypatch, refuse,
                                                                            reason, before):
    """The encoder refusing the --record file left an empty file behind (the container's refusal),
    or a traceback (the stream's), and --overwrite's earlier file was emptied before the encoder
    opened. One error line names the file and why, exit 2; a file the run made is removed, an
    earlier one is kept as it was."""
    if encoder_for("auto") == "mp4v":  # (also finds the encoder before its options are spoilt)
        pytest.skip("no H.264 encoder here")
    from camface.cli import main

    out = tmp_path / "out.mp4"
    if before is not None:
        out.write_bytes(before)
    refuse(monkeypatch)
    argv = ["live", "--source", "sample", "--no-show", "--max-frames", "3", "--record", str(out)]
    assert main(argv + (["--overwrite"] if before is not None else [])) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("camface: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.fullmatch("camface: error: " + reason.format(out=re.escape(str(out))) + ".*", errors[0]), errors
    assert (out.read_bytes() if before is not None else out.exists()) == (before if before is not None else False)
    assert list(tmp_path.iterdir()) == ([out] if before is not None else [])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_a_record_path_that_is_a_named_pipe_is_refused_naming_it(tmp_path, overwrite):
    """--record at a named pipe waited for good (until SIGKILL) for a program to read it, or
    with no --overwrite was told to pass --overwrite, which then hung. It is refused before
    anything opens it, naming it and what it is."""
    pipe = tmp_path / "pipe.mp4"
    os.mkfifo(pipe)
    with pytest.raises(OutputError, match=f"cannot record to {re.escape(str(pipe))}: it is a named pipe"):
        VideoSink(pipe, FPS, overwrite=overwrite)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_live_record_to_a_named_pipe_is_one_error_before_any_work(tmp_path, capsys):
    from camface.cli import main

    pipe = tmp_path / "pipe.mp4"
    os.mkfifo(pipe)
    link = tmp_path / "link.mp4"
    link.symlink_to(pipe)
    for target in (pipe, link):
        assert main(["live", "--source", "sample", "--no-show", "--max-frames", "3", "--record", str(target)]) == 2
        err = capsys.readouterr().err
        assert f"camface: error: cannot record to {target}: it is a named pipe (FIFO), not a file" in err, err
        assert "Traceback" not in err


def test_x264s_own_refusal_is_in_the_one_error_line_not_beside_it(tmp_path, capfd, monkeypatch):
    """x264 prints why it refuses an option ("x264 [error]: invalid preset ...") straight to
    file descriptor 2, beside camface's one-line error, which said only "avcodec_open2 ...
    returned 22". The reason is in camface's line, and nothing else reaches stderr."""
    if encoder_for("auto") != "libx264":
        pytest.skip("libx264 is not the encoder here")
    from camface.cli import main

    out = tmp_path / "out.mp4"
    _refuse_the_encoder(monkeypatch)
    assert main(["live", "--source", "sample", "--no-show", "--max-frames", "3", "--record", str(out)]) == 2
    err = capfd.readouterr().err
    assert "x264 [" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("camface: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"camface: error: libx264 cannot encode 640x480 video for {out}: invalid preset 'no-such-preset'; "), err


@pytest.mark.parametrize("codec, error, message", [
    ("vp9", ValueError, "unknown codec 'vp9'; expected one of auto, h264, mp4v"),
    ("H264", ValueError, "unknown codec 'H264'"),
])
def test_unknown_codecs_are_refused(tmp_path, codec, error, message):
    with pytest.raises(error, match=message):
        VideoSink(tmp_path / "x.mp4", FPS, codec=codec)
    assert not (tmp_path / "x.mp4").exists()
    assert CODECS == ("auto", "h264", "mp4v")


@pytest.mark.parametrize("codec", ["auto", "mp4v"])
@pytest.mark.parametrize("small", [(1, 1), (3, 7), (7, 200)], ids=["1x1", "7x3", "200x7"])
def test_small_first_frames_do_not_set_the_recordings_size(tmp_path, clip_frames, caplog, codec, small):
    """A first frame that cannot show a face (a 1x1 image first in a folder) set the recording's
    size: 2x2, every photo after it squeezed into that. Small first frames are held, said once
    naming the recording, and the first larger frame sets the size; the held ones are scaled
    into it (their colour kept), in order."""
    if codec == "auto" and encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here")
    path = tmp_path / "out.mp4"
    colours = (60, 200)
    with caplog.at_level(logging.WARNING):
        record(path, [np.full((*small, 3), c, np.uint8) for c in colours] + clip_frames[:5], codec)
    decoded = decode(path)
    assert len(decoded) == 7 and all(frame.shape == (SIZE[1], SIZE[0], 3) for frame in decoded)
    for frame, colour in zip(decoded, colours):  # the middle of each held frame, scaled up
        middle = frame[SIZE[1] // 2 - 1:SIZE[1] // 2 + 1, SIZE[0] // 2 - 1:SIZE[0] // 2 + 1]
        assert abs(float(middle.mean()) - colour) < LOSSY, (colour, middle.mean())
    for frame, original in zip(decoded[2:], clip_frames):
        assert mad(frame, original) < LOSSY
    assert caplog.text.count(f"camface: {path}: a first frame of {small[1]}x{small[0]} cannot show a face") == 1
    assert "scaled to fit" not in caplog.text


def test_a_recording_of_small_frames_only_keeps_their_size(tmp_path, monkeypatch):
    """Small frames and nothing else (or more than MAX_HELD of them) are recorded as they are,
    at their size rounded down to even numbers, every frame kept."""
    monkeypatch.setattr(sinks, "MAX_HELD", 4)
    for frames, name in ((3, "few.mp4"), (9, "many.mp4")):
        path = tmp_path / name
        sink = record(path, [np.full((5, 7, 3), 20 * k, np.uint8) for k in range(frames)], "mp4v")
        decoded = decode(path)
        assert sink.frames_written == len(decoded) == frames and decoded[0].shape == (4, 6, 3)
        assert [round(float(frame.mean()) / 20) for frame in decoded] == list(range(frames))


# ------------------------------------------------------------------------------ choosing the encoder

@pytest.mark.parametrize("usable, encoder, reason", [
    ({"h264_nvenc", "libx264"}, "h264_nvenc", ""),
    ({"libx264"}, "libx264", ""),
    (set(), None, r"PyAV \S+ has no usable H.264 encoder \(libx264, h264_nvenc\)"),
])
def test_h264_encoder_prefers_nvenc_then_libx264(monkeypatch, fresh_probe, usable, encoder, reason):
    monkeypatch.setattr(fmp4, "_opens", lambda av, name: name in usable)
    found, why = fmp4.h264_encoder()
    assert found == encoder
    assert why == "" if not reason else re.fullmatch(reason, why)


def test_this_machine_has_an_h264_encoder(fresh_probe):
    import av

    encoder, reason = fmp4.h264_encoder()
    assert encoder in ("libx264", "h264_nvenc") and reason == ""
    assert fmp4._opens(av, "libx264") and not fmp4._opens(av, "no_such_encoder")


@pytest.mark.parametrize("break_pyav, reason", [
    ("missing", "PyAV is not installed"),
    ("no h264", "has no usable H.264 encoder"),
])
def test_without_h264_auto_records_mp4v_and_says_so_once(tmp_path, clip_frames, monkeypatch, caplog,
                                                         fresh_probe, break_pyav, reason):
    if break_pyav == "missing":
        monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    else:
        monkeypatch.setattr(fmp4, "_opens", lambda av, name: False)
    with caplog.at_level(logging.INFO, logger="camface"):
        first = record(tmp_path / "a.mp4", clip_frames[:10])
        second = record(tmp_path / "b.mp4", clip_frames[:10])  # key r: another take
    assert first.encoder == second.encoder == "mp4v"
    lines = [r.getMessage() for r in caplog.records if "mp4v" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0] and "browsers do not play" in lines[0]
    capture = cv2.VideoCapture(str(tmp_path / "b.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little") == b"FMP4"  # FFmpeg's mp4v
    capture.release()
    assert count_frames(tmp_path / "a.mp4") == 10
    with pytest.raises(OutputError, match=f"cannot record H.264: .*{reason}.*--codec mp4v"):
        VideoSink(tmp_path / "c.mp4", FPS, codec="h264")
    assert encoder_for("mp4v") == "mp4v"


def test_an_nvenc_that_refuses_the_recording_gives_way_to_libx264(tmp_path, clip_frames, monkeypatch, caplog):
    monkeypatch.setattr(fmp4, "h264_encoder", lambda: ("h264_nvenc", ""))
    monkeypatch.setitem(fmp4.ENCODER_OPTIONS, "h264_nvenc", {"preset": "no-such-preset"})  # refused everywhere
    with caplog.at_level(logging.WARNING, logger="camface"):
        sink = record(tmp_path / "nv.mp4", clip_frames[:10])
    assert sink.encoder == "libx264" and count_frames(sink.path) == 10
    assert "h264_nvenc cannot encode 160x120 video for" in caplog.text and "with libx264 instead" in caplog.text


# ------------------------------------------------------------------------------ files cut short

def _cut_at(data: bytes, where: str) -> int:
    """Byte offset of a cut of a 3-fragment recording: inside the 2nd fragment's samples,
    inside the 3rd fragment's index, between fragments 2 and 3."""
    moofs = [(offset, size) for offset, size, kind in boxes(data) if kind == b"moof"]
    mdats = [(offset, size) for offset, size, kind in boxes(data) if kind == b"mdat"]
    return {"mid-samples": mdats[1][0] + mdats[1][1] // 2,
            "mid-index": moofs[2][0] + moofs[2][1] // 2,
            "start of an index": moofs[2][0] + 8,
            "between fragments": moofs[2][0]}[where]


@pytest.mark.parametrize("where, at_least, at_most", [
    ("mid-samples", 30, 59),  # the 1st fragment, and the 2nd one's frames before the cut
    ("mid-index", 60, 60),  # FFmpeg refuses the cut index: the reader opens the two fragments before it
    ("start of an index", 60, 60),  # FFmpeg opens this one and says nothing: the reader still says it is cut
    ("between fragments", 60, 60),
])
def test_reader_stops_at_the_last_good_frame_of_a_cut_recording(tmp_path, clip_frames, caplog, where,
                                                                at_least, at_most):
    whole = tmp_path / "whole.mp4"
    record(whole, clip_frames, "h264")
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:_cut_at(data, where)])
    with caplog.at_level(logging.WARNING, logger="camface"):
        frames = decode(cut)
    assert at_least <= len(frames) <= at_most
    assert max(mad(frame, clip_frames[i]) for i, frame in enumerate(frames)) < LOSSY  # no broken frame
    if where != "between fragments":  # a cut between fragments looks like a whole, shorter file
        assert f"cut.mp4 ended early: read {len(frames)}" in caplog.text


def test_reader_gives_a_clear_error_when_no_fragment_survived(tmp_path, clip_frames):
    whole = tmp_path / "whole.mp4"
    record(whole, clip_frames, "h264")
    data = whole.read_bytes()
    first_moof = next(offset for offset, _, kind in boxes(data) if kind == b"moof")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:first_moof + 40])
    with pytest.raises(SourceError, match="no frame could be read from video file .*cut.mp4"):
        decode(cut)


def test_complete_length_of_whole_cut_and_foreign_files(tmp_path, clip_frames):
    whole = record(tmp_path / "whole.mp4", clip_frames[:40], "h264").path
    data = whole.read_bytes()
    assert fmp4.complete_length(whole) is None
    last = boxes(data)[-1]
    (tmp_path / "cut.mp4").write_bytes(data[:last[0] + 3])
    assert fmp4.complete_length(tmp_path / "cut.mp4") == last[0]
    (tmp_path / "text.mp4").write_text("not a video at all")
    assert fmp4.complete_length(tmp_path / "text.mp4") is None


@pytest.mark.parametrize("trailer", [b"SAMSUNG TRAILER " * 8, b"\xff" * 64, b"\x00\x00\x10\x00junkjunkjunk"])
def test_a_whole_file_with_bytes_after_its_boxes_is_not_called_cut(tmp_path, clip_frames, caplog, trailer):
    """Data after an MP4's last box (a phone's trailer, a tool's padding) read as a box cut
    short: every frame read, and the file was warned about as truncated or damaged (batch
    wrote that on its record)."""
    path = record(tmp_path / "trailed.mp4", clip_frames[:40], "h264").path
    path.write_bytes(path.read_bytes() + trailer)
    assert fmp4.complete_length(path) is None
    with caplog.at_level(logging.WARNING, logger="camface"), VideoFileSource(path) as source:
        assert len(list(source)) == 40
    assert not source.truncated and "ended early" not in caplog.text


# ------------------------------------------------------------------------------ a recorder killed hard

# `python -c COUNT_WRITES ARGS...` runs `camface ARGS...` and prints, on stdout, the number of
# frames the recording holds after each write (what was handed to the sink when it was killed).
COUNT_WRITES = """
import sys
from camface.realtime import sinks
write = sinks.VideoSink.write
def counted(self, frame, at=None):
    write(self, frame, at)
    print(self.frames_written, flush=True)
sinks.VideoSink.write = counted
from camface.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not EMOTION_ONNX.is_file(), reason="bundled emotion graph not exported yet")
def test_sigkill_leaves_every_frame_but_the_last_second_and_a_next_run_reads_it(tmp_path):
    sample = SampleSource(frames=1800, size=SIZE)
    clip = write_clip(tmp_path / "long.mp4", [sample.frame(i) for i in range(1800)])  # 60 s of video
    out = tmp_path / "killed.mp4"
    process = subprocess.Popen([sys.executable, "-c", COUNT_WRITES, "live", "--source", str(clip),
                                "--no-show", "--record", str(out), "--detector", "short"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    written: list[int] = []  # frames handed to the sink, after each write

    def follow():
        for line in process.stdout:
            if line.strip().isdigit():
                written.append(int(line))

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    deadline = time.perf_counter() + 120
    # kill when at least 200 frames were handed over (several fragments)
    while ((not written or written[-1] < 200)
           and time.perf_counter() < deadline and process.poll() is None):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    reader.join(timeout=30)
    stderr = process.stderr.read()
    assert process.returncode == -signal.SIGKILL, stderr
    handed = written[-1]  # the prints made before the kill are all in the pipe
    assert 200 <= handed < 1800, stderr
    kept = count_frames(out)
    # lost: at most the fragment being filled, 1 s of video (FPS frames), counted in frames, not
    # wall time: on a loaded machine the loop may run below FPS, and frames handed over even
    # seconds before the kill can still be in that fragment
    assert handed - FPS <= kept <= handed, (kept, handed)

    again = tmp_path / "again.mp4"
    run = subprocess.run([sys.executable, "-m", "camface", "live", "--source", str(out), "--no-show",
                          "--record", str(again), "--detector", "short"],
                         capture_output=True, text=True, env=ENV, timeout=180, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"; {kept} frames, " in run.stderr and f"recorded {kept} frames" in run.stderr
    assert count_frames(again) == kept


# ------------------------------------------------------------------------------ browser playback

CHROMIUM = Path("/usr/lib/chromium/chromium")


def _play(page, folder: Path, name: str) -> tuple[float, float]:
    """Load `name` in a <video>, play it; (duration, currentTime once past 1 s), seconds."""
    (folder / f"{name}.html").write_text(f'<video id="v" src="{name}" muted playsinline></video>')
    page.goto((folder / f"{name}.html").as_uri())
    page.wait_for_function("document.getElementById('v').readyState >= 1 || document.getElementById('v').error",
                           timeout=20_000)
    assert page.evaluate("document.getElementById('v').error") is None, f"Chromium refused {name}"
    duration = page.evaluate("document.getElementById('v').duration")
    page.evaluate("document.getElementById('v').play()")
    page.wait_for_function("document.getElementById('v').currentTime > 1.0", timeout=20_000)
    return duration, page.evaluate("document.getElementById('v').currentTime")


def test_chromium_plays_a_recording_and_one_cut_short(tmp_path, clip_frames):
    """Headless Chromium loads a recording in <video>, reports its duration and plays it; the
    same for a recording cut between fragments, as a hard kill leaves it."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    data = record(tmp_path / "clip.mp4", clip_frames * 2, "h264").path.read_bytes()  # 6 s
    third = [offset for offset, _, kind in boxes(data) if kind == b"moof"][2]
    (tmp_path / "cut.mp4").write_bytes(data[:third])  # fragments 1 and 2: 2 s
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto("about:blank")
            support = page.evaluate("""document.createElement('video').canPlayType('video/mp4; codecs="avc1.42E01E"')""")
            if not support:
                pytest.skip("this Chromium build has no H.264 decoder (canPlayType('video/mp4; "
                            "codecs=\"avc1.42E01E\"') is empty): proprietary codecs left out")
            duration, played = _play(page, tmp_path, "clip.mp4")
            assert duration == pytest.approx(180 / FPS, abs=0.1) and 1.0 < played <= duration
            duration, played = _play(page, tmp_path, "cut.mp4")
            assert duration == pytest.approx(60 / FPS, abs=0.1) and 1.0 < played <= duration
        finally:
            browser.close()


def test_codec_flag_reaches_the_recording(tmp_path):
    """`camface live --codec mp4v` records MPEG-4 Part 2; the default records H.264; a bad
    value is refused naming the flag."""
    import av

    from camface.cli import main
    from camface.realtime.config import LiveConfig

    for codec, stream_codec in (("mp4v", "mpeg4"), ("auto", "h264")):
        out = tmp_path / f"{codec}.mp4"
        assert main(["live", "--source", "sample", "--no-show", "--max-frames", "5", "--record", str(out),
                     "--codec", codec, "--method", "none"]) == 0
        with av.open(str(out)) as container:
            assert container.streams.video[0].codec_context.name == stream_codec
            assert sum(1 for _ in container.decode(video=0)) == 5
    with pytest.raises(ValueError, match="--codec must be one of auto, h264, mp4v"):
        LiveConfig(codec="webm")


@pytest.mark.parametrize("later, inner", [
    ((60, 120), (50, 0, 60, 120)),  # a portrait photo after a landscape one: bars left and right
    ((320, 60), (0, 45, 160, 30)),  # a panorama: bars above and below
    ((80, 60), (0, 0, 160, 120)),  # the same shape: the whole frame
])
def test_frames_of_another_shape_keep_it_in_the_recording(tmp_path, later, inner):
    """A folder's photos of another shape than the first were stretched to the recording's
    size (faces squeezed); they are scaled to fit, their shape kept, on black. (width, height)
    and (x, y, w, h) in pixels of the 160x120 recording."""
    path = tmp_path / "mixed.mp4"
    record(path, [np.full((120, 160, 3), 128, np.uint8), np.full((later[1], later[0], 3), 255, np.uint8)])
    picture = decode(path)[1].astype(float)
    x, y, w, h = inner
    inside = np.zeros(picture.shape[:2], bool)
    inside[y:y + h, x:x + w] = True
    near = cv2.dilate(inside.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0  # the codec blurs the edge
    far = cv2.erode(inside.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    assert picture[far].mean() > 245
    if (~near).any():
        assert picture[~near].mean() < 10


@pytest.mark.parametrize("codec, side", [("auto", 16384), ("mp4v", 8190)])
def test_a_first_frame_larger_than_the_encoder_takes_is_recorded_smaller(tmp_path, codec, side, caplog):
    """A panorama first in a folder (20000 pixels wide) stopped the run: libx264 refuses frames
    over 16384 pixels a side, MPEG-4 Part 2 over 8190 ("mp4v codec unavailable?"). The
    recording is scaled down to fit, its shape kept."""
    if codec == "auto" and encoder_for("auto") == "mp4v":
        side = 8190  # no H.264 here: auto is mp4v
    path = tmp_path / "panorama.mp4"
    panorama = np.zeros((40, 20000, 3), np.uint8)
    panorama[:, :10000] = 255  # its left half white
    with caplog.at_level(logging.WARNING):
        record(path, [panorama, panorama], codec)
    frames = decode(path)
    assert len(frames) == 2 and "larger than" in caplog.text
    height, width = frames[0].shape[:2]
    assert side - 2 <= width <= side and width % 2 == 0 and height == pytest.approx(40 * width / 20000, abs=2)
    columns = frames[1].mean(axis=(0, 2))
    assert columns[: width // 2 - 8].min() > 240 and columns[width // 2 + 8:].max() < 15


@pytest.mark.parametrize("codec", ["auto", "mp4v"])
def test_a_closed_recording_takes_no_more_frames(tmp_path, clip_frames, codec):
    """A frame written after close opened the file again and wrote over the finished recording
    (one frame where there were ten); it is an OutputError, and the file keeps its frames."""
    sink = record(tmp_path / "done.mp4", clip_frames[:10], codec)
    with pytest.raises(OutputError, match="done.mp4 is finished: a closed recording takes no more frames"):
        sink.write(clip_frames[10])
    sink.close()
    assert count_frames(tmp_path / "done.mp4") == 10 == sink.frames_kept
