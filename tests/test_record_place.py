"""A recording over an earlier one (--overwrite) takes its place without changing which file
the name is where a rename would: other hard links, the owner and group, a sticky folder
(`camface.outputs.place_over`). Tiny synthetic clips (64x48) in tmp_path, through the real
H.264 (PyAV) and mp4v (OpenCV) writers."""

from __future__ import annotations

import errno
import os
import re

import numpy as np
import pytest
from realtime_helpers import count_frames

from camface import outputs
from camface.errors import OutputError
from camface.outputs import left_beside
from camface.realtime.sinks import VideoSink, encoder_for

FPS = 30.0
NEW = 35  # frames of the new recording: a keyframe at 0 and 30, so its first fragment is placed mid-run
LOSSY = 8.0  # mean absolute difference (grey levels) a decoded frame may have from its original


def frames(count: int, offset: int) -> list[np.ndarray]:
    """`count` uint8 BGR [48, 64, 3] frames, frame i flat grey at `offset` + 4 i mod 200."""
    return [np.full((48, 64, 3), offset + (4 * i) % 200, np.uint8) for i in range(count)]


def record(path, count: int, offset: int, codec: str, overwrite: bool = False) -> VideoSink:
    with VideoSink(path, FPS, overwrite=overwrite, codec=codec) as sink:
        for frame in frames(count, offset):
            sink.write(frame)
    return sink


def decoded_greys(path) -> list[float]:
    """The mean grey level of each frame PyAV decodes from `path`, the file read whole (any
    decoding error fails the test)."""
    import av

    with av.open(str(path)) as container:
        return [float(frame.to_ndarray(format="gray").mean()) for frame in container.decode(video=0)]


def assert_new_recording(path, count: int = NEW) -> None:
    """`path` decodes whole (PyAV and OpenCV) to the first `count` frames of the new recording."""
    greys = decoded_greys(path)
    assert len(greys) == count == count_frames(path)
    want = [20 + (4 * i) % 200 for i in range(count)]  # (PyAV converts back to full-range grey)
    assert np.abs(np.array(greys) - want).max() < LOSSY


@pytest.fixture(params=["auto", "mp4v"])
def codec(request):
    if request.param == "auto" and encoder_for("auto") == "mp4v":
        pytest.skip("no H.264 encoder here")
    return request.param


@pytest.fixture
def earlier(tmp_path, codec):
    """An earlier recording of 10 frames (grey 200 + 4 i), 0640."""
    path = tmp_path / "earlier.mp4"
    record(path, 10, 200 - 36, codec)
    path.chmod(0o640)
    return path


def test_other_hard_links_to_an_earlier_recording_show_the_new_one(tmp_path, earlier, codec):
    """The new recording was renamed over the earlier one: its other hard links kept the earlier
    recording, the name another file. It is copied into the earlier file's inode: every link
    shows it, whole, and nothing is left beside it."""
    link = tmp_path / "link.mp4"
    os.link(earlier, link)
    inode = earlier.stat().st_ino
    sink = record(earlier, NEW, 20, codec, overwrite=True)
    assert sink.frames_kept == NEW and not sink.kept_earlier
    assert earlier.stat().st_ino == link.stat().st_ino == inode and earlier.stat().st_nlink == 2
    assert_new_recording(earlier)
    assert_new_recording(link)
    assert oct(earlier.stat().st_mode & 0o777) == oct(0o640)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.mp4", "link.mp4"]


def test_fragments_written_after_the_copy_land_in_the_earlier_file_whole(tmp_path, earlier, codec):
    """H.264 goes on through the earlier file's descriptor (dup2) after the copy: the fragments
    flushed mid-run after it (frames 30-59, 60-89) and at close follow the copied bytes, none
    lost or doubled (PyAV's own position and its buffer stay right). Decoded whole."""
    os.link(earlier, tmp_path / "link.mp4")
    record(earlier, 100, 20, codec, overwrite=True)
    assert_new_recording(tmp_path / "link.mp4", 100)


def test_a_lone_earlier_recording_is_still_renamed_over(tmp_path, earlier, codec):
    """One link, this user's: the atomic rename (a new inode), as before."""
    inode = earlier.stat().st_ino
    record(earlier, NEW, 20, codec, overwrite=True)
    assert earlier.stat().st_ino != inode
    assert_new_recording(earlier)
    assert oct(earlier.stat().st_mode & 0o777) == oct(0o640)
    assert [p.name for p in tmp_path.iterdir()] == ["earlier.mp4"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("may_chown", [True, False], ids=["root", "no-fchown"])
def test_an_earlier_recording_keeps_its_owner_and_group(tmp_path, earlier, codec, monkeypatch, may_chown):
    """Root recording over a user's file handed it to root (a setgid folder's group was lost
    too). Root gives the new file the earlier owner and group before the rename; where that is
    refused (any other user), it is copied into the earlier file's inode."""
    os.chown(earlier, 12345, 23456)
    inode = earlier.stat().st_ino
    if not may_chown:
        def refused(fd, uid, gid):
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(outputs.os, "fchown", refused)
    record(earlier, NEW, 20, codec, overwrite=True)
    monkeypatch.undo()
    after = earlier.stat()
    assert (after.st_uid, after.st_gid) == (12345, 23456) and oct(after.st_mode & 0o777) == oct(0o640)
    assert (after.st_ino == inode) == (not may_chown)
    assert_new_recording(earlier)
    assert [p.name for p in tmp_path.iterdir()] == ["earlier.mp4"]


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.EACCES])
def test_an_earlier_recording_that_cannot_be_renamed_over_is_copied_into(tmp_path, earlier, codec, monkeypatch,
                                                                         refusal):
    """In a sticky folder (/tmp) another user's file cannot be renamed over (EPERM): the run
    failed once its first fragment was on disk. The recording is copied into the earlier file's
    inode and goes on there, whole and playable, nothing left beside it."""
    inode = earlier.stat().st_ino

    def refused(src, dst, **kwargs):
        raise PermissionError(refusal, os.strerror(refusal), os.fspath(src), None, os.fspath(dst))

    monkeypatch.setattr(outputs.os, "replace", refused)
    sink = record(earlier, NEW, 20, codec, overwrite=True)
    monkeypatch.undo()
    assert sink.frames_kept == NEW and earlier.stat().st_ino == inode
    assert_new_recording(earlier)
    assert [p.name for p in tmp_path.iterdir()] == ["earlier.mp4"]


def test_a_copy_that_fails_keeps_the_new_recording_beside_it(tmp_path, earlier, codec, monkeypatch):
    """A copy into the earlier file that fails (a full disk) is one error naming the path and the
    file that holds the new recording, which is left beside it whole, under a name the next
    recording to the path does not remove (it removes the "partial" files of killed runs): H.264
    stops at the frame whose fragment was to be placed (the 31st), mp4v at its close."""
    os.link(earlier, tmp_path / "link.mp4")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.shutil, "copyfileobj", disk_full)
    sink = VideoSink(earlier, FPS, overwrite=True, codec=codec)
    with pytest.raises(OutputError, match=f"cannot write {re.escape(str(earlier))}: No space left on device; "
                                          "the new recording is kept as .*unplaced.mp4") as raised:
        with sink:
            for frame in frames(NEW, 20):
                sink.write(frame)
    monkeypatch.undo()
    kept = next(tmp_path.glob(".earlier.mp4.*.unplaced.mp4"))
    assert str(kept) in str(raised.value) and earlier.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["earlier.mp4", "link.mp4", kept.name])
    assert not left_beside(tmp_path)  # (what the next recording to it, or batch, removes)
    held = NEW if codec == "mp4v" else 31
    assert_new_recording(kept, held)
    # H.264: the 31st frame's write raised (its placement failed), and it is in the file all the
    # same: counted (it was not, and the run said one frame fewer than the file holds)
    assert sink.frames_written == sink.frames_kept == held


def test_a_run_whose_recording_could_not_be_placed_names_the_file_it_is_in(tmp_path, earlier, codec, monkeypatch):
    """The live run's error said the new recording was kept beside the path, and its summary
    then said "recorded N frames to" the path, which holds the earlier recording (or a copy cut
    short): the run's recordings name the file that holds the frames."""
    import queue

    from camface.realtime.recorder import Output, Recorder
    from camface.realtime.threads import END
    from camface.realtime.timing import StageTimer

    os.link(earlier, tmp_path / "link.mp4")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.shutil, "copyfileobj", disk_full)
    recorder = Recorder(earlier, FPS, True, None, StageTimer(), codec)
    inbox: queue.Queue = queue.Queue()
    for frame in frames(NEW, 20):
        inbox.put(Output(frame, None))
    inbox.put(END)
    recorder.run(inbox)
    monkeypatch.undo()
    kept = next(tmp_path.glob(".earlier.mp4.*.unplaced.mp4"))
    assert isinstance(recorder.error, OutputError) and str(kept) in str(recorder.error)
    assert [path for path, _ in recorder.recordings] == [str(kept)]
    assert recorder.recordings[0][1] == count_frames(kept) == len(decoded_greys(kept))  # (H.264: as above)


def test_a_copy_cut_short_by_a_kill_keeps_the_new_recording(tmp_path, earlier, codec, monkeypatch, caplog):
    """A copy into the earlier file cut short (Ctrl-C pressed three times while a long mp4v
    recording was copied at its close ends the process at once; here an interrupt half-way) left
    the new recording in its staged "partial" file, which the next recording to the path removes
    as left by a killed run, and the earlier file cut: both recordings lost. The staged file
    holds the name "unplaced" while it is copied, which nothing removes."""
    os.link(earlier, tmp_path / "link.mp4")
    copy = outputs.shutil.copyfileobj

    def killed_half_way(source, target, *args):
        target.write(source.read(100))
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs.shutil, "copyfileobj", killed_half_way)
    sink = VideoSink(earlier, FPS, overwrite=True, codec=codec)
    with caplog.at_level("WARNING"), pytest.raises(KeyboardInterrupt):
        with sink:
            for frame in frames(NEW, 20):
                sink.write(frame)
    monkeypatch.setattr(outputs.shutil, "copyfileobj", copy)
    assert not left_beside(tmp_path)  # (what the next recording to it, or batch, removes)
    kept = next(tmp_path.glob(".earlier.mp4.*.unplaced.mp4"))
    assert_new_recording(kept, NEW if codec == "mp4v" else 31)
    # a Ctrl-C in a main thread's copy (bench; live holds signals while its writer copies) says
    # where the new recording is, and the sink names that file; neither did
    assert sink.kept_in == kept
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"camface: {earlier}: stopped while the new recording was copied over the earlier file: the new recording "
        f"is kept as {kept}"]


def test_a_writer_stuck_in_the_copy_names_the_file_that_holds_the_new_recording(tmp_path, earlier, codec,
                                                                                monkeypatch):
    """The live run's forced exit (Ctrl-C three times, its writer stuck on a file system that
    hangs) names the file that holds what reached the disk: while the new recording was copied
    into the earlier file, that is the "unplaced" file it is copied from, which the line did not
    name (the "partial" name it had before the copy, gone, or the path, which holds a cut copy)."""
    from camface.realtime.loop import stuck_writer_line

    os.link(earlier, tmp_path / "link.mp4")
    copy, seen = outputs.shutil.copyfileobj, []
    sink = VideoSink(earlier, FPS, overwrite=True, codec=codec)

    def copy_seen_from_the_main_thread(source, target, *args):
        held = next(tmp_path.glob(".earlier.mp4.*.unplaced.mp4"))
        seen.append((held, sink.kept_in, stuck_writer_line(sink)))
        copy(source, target, *args)

    monkeypatch.setattr(outputs.shutil, "copyfileobj", copy_seen_from_the_main_thread)
    with sink:
        for frame in frames(NEW, 20):
            sink.write(frame)
    monkeypatch.undo()
    [(held, kept_in, line)] = seen
    assert kept_in == held
    assert line.endswith(f"what reached the disk is in {held}, not in {earlier}: move it away before recording to "
                         f"{earlier} again")
    assert sink.kept_in == earlier and sink.frames_kept == NEW
    assert_new_recording(earlier)


@pytest.mark.parametrize("over_earlier", [False, True])
def test_the_forced_exit_line_is_made_without_touching_the_disk(tmp_path, earlier, codec, monkeypatch, over_earlier):
    """The forced exit (Ctrl-C three times) is the way out of a writer stuck on a file system
    that hangs; its line resolved the recording's path (os.path.realpath: an lstat of each part),
    which waits on that file system too. It is told from memory: the path while the recording
    is in place, the file beside it before its first fragment is placed (H.264; mp4v until its
    close), the path's file once placed."""
    from camface.realtime.loop import stuck_writer_line

    path = earlier if over_earlier else tmp_path / "new.mp4"
    real, lines = os.path.realpath, []

    def hangs(*args, **kwargs):
        raise AssertionError("the file system was asked (it hangs)")

    with VideoSink(path, FPS, overwrite=True, codec=codec) as sink:
        for n, frame in enumerate(frames(NEW, 20)):
            sink.write(frame)
            if n in (5, NEW - 1):
                monkeypatch.setattr(os.path, "realpath", hangs)
                lines.append(stuck_writer_line(sink))
                monkeypatch.setattr(os.path, "realpath", real)
    said = "camface: stopped without finishing: the writer of recordings and snapshots did not return"
    if not over_earlier:
        assert lines == [f"{said}; {path} holds what reached the disk"] * 2
        return
    staged = re.escape(str(tmp_path)) + r"/\.earlier\.mp4\.\d+-\w+\.partial\.mp4"
    assert re.fullmatch(f"{re.escape(said)}; what reached the disk is in {staged}, not in {re.escape(str(path))}: "
                        f"move it away before recording to {re.escape(str(path))} again", lines[0])
    assert lines[1] == (lines[0] if codec == "mp4v" else f"{said}; {path} holds what reached the disk")
