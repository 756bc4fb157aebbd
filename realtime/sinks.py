"""Recording annotated frames to an mp4 file.

By default recordings are H.264 in a fragmented MP4 (see `camface.realtime.fmp4`): every web
browser plays them, and a recorder killed hard leaves a playable file that lacks at most its
last second. Where PyAV is missing or has no H.264 encoder, `auto` falls back to OpenCV's
MPEG-4 Part 2 (`mp4v`) in a plain MP4, with one log line saying so: browsers do not play
that, and a hard kill leaves it unplayable.

`check_record_file` runs before any frame is processed, so a recording that cannot be written
fails at once; `VideoSink` is a context manager whose exit (normal end, error, Ctrl-C,
SIGTERM) always finalises the file.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import stat
from pathlib import Path

import cv2
import numpy as np

from camface.errors import OutputError
from camface.native import opencv_path
from camface.outputs import (beside, check_output_file, keep_unplaced, kept_by_a_stopped_copy, left_by_dead,
                             place_over)

log = logging.getLogger(__name__)

from camface.realtime.config import CODECS  # noqa: E402,F401 (the --codec choices live with the options)

# mp4v repeats a frame to fill the time until the next one, for at most this long: a camera
# that stalls for minutes would otherwise have the writer encode thousands of copies (H.264
# stores the time instead and keeps any gap).
MAX_HOLD_S = 5.0
# H.264 times a camera's frames to the millisecond (MP4 keeps any time base), not to its stated
# frame period: frames that come faster than a stream says (an MJPEG stream reports 25 fps
# whatever it sends) would otherwise each take a period, and the recording would play slow.
CLOCK_HZ = 1000
# The largest frame each encoder opens at: (pixels a side, pixels in all). MPEG-4 Part 2 stops
# below 8192 a side; libx264 at 16384 a side, and short of 16384 x 16384 in all (16384 x 16000
# opens, 16384 x 16368 not). A recording's first frame beyond them is scaled down to fit.
LARGEST = {"mp4v": (8190, 8190 * 8190), "h264": (16384, 16384 * 16000)}
# A frame smaller than this a side shows no face (BlazeFace's finest anchor cells are 8 px of its
# 128 px input): first in a folder of photos, a 1x1 image made the recording 2x2, every photo
# after it squeezed into that. Such first frames are held until a larger one sets the size (they
# are then scaled into it), at most MAX_HELD of them (a source of small frames only is recorded
# at its own size).
MIN_SIDE = 8
MAX_HELD = 300


def check_record_file(path: str | Path, overwrite: bool = False) -> Path:
    """`check_output_file`'s checks for a recording, and an OutputError naming `path` when it
    is a named pipe (FIFO), a socket or a block device: opening a pipe that no program reads
    waited for good (the run hung until SIGKILL), and an MP4 is finished by reading it back.
    A character device (/dev/null, /dev/full) is written as it is."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:  # nothing there (or a dangling link): check_output_file says what it must
        mode = 0
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a block device" if stat.S_ISBLK(mode) else None)
    if kind is not None:
        raise OutputError(f"cannot record to {path}: it is {kind}, not a file; give an .mp4 file to write")
    return check_output_file(path, overwrite)


def encoder_for(codec: str = "auto") -> str:
    """The encoder a recording with `codec` (one of CODECS) uses: "h264_nvenc", "libx264" or
    "mp4v". Raises OutputError for `h264` when no H.264 encoder is available."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    if codec == "mp4v":
        return "mp4v"
    from camface.realtime.fmp4 import h264_encoder

    encoder, reason = h264_encoder()
    if encoder is not None:
        return encoder
    if codec == "h264":
        raise OutputError(f"cannot record H.264: {reason}; record with --codec mp4v (or auto) instead")
    _say_fallback(reason)
    return "mp4v"


@functools.cache
def _say_fallback(reason: str) -> None:
    """Once per process, however many recordings fall back."""
    log.warning("camface: %s; recording MPEG-4 Part 2 (mp4v) with OpenCV instead, which web "
                "browsers do not play and a hard kill leaves unplayable", reason)


class Mp4vWriter:
    """MPEG-4 Part 2 (`mp4v`, which every OpenCV build can encode) in a plain MP4.

    A file already there (--overwrite; through a link, the file it points to) is written beside
    it (`beside`) and put in its place at close (`_place_or_drop`) when the new one holds a frame
    (mp4v's index is written at close, so no frame is readable before): a run that wrote none (or
    lost its index to a full disk) keeps the earlier recording (`kept_earlier`); OpenCV emptied it
    on opening."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]):
        # MPEG-4 caps the time base denominator at 65535: a measured rate like 192.103 fps
        # must be rounded (to 1/100 fps, or to whole frames when that is still too fine).
        fps = round(fps, 2) if fps * 100 < 65535 else float(round(fps))
        self.final = Path(os.path.realpath(path))  # the file `path` names (through a link), as it opened
        self._staged = _made_beside(self.final, path) if self.final.is_file() else None
        self.kept_earlier = False  # closed with no frame readable: the earlier file was kept
        self.unplaced: Path | None = None  # the staged file, when it could not be put in place
        self._written = self._staged or Path(path)  # the file the frames go to
        try:
            self._writer = cv2.VideoWriter(opencv_path(self._written), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
            if not self._writer.isOpened():
                self._writer.release()
                raise OutputError(f"cannot open {path} for writing (mp4v codec unavailable?)")
        except BaseException:  # (an OpenCV error, Ctrl-C too): the empty file made beside, removed
            if self._staged is not None:
                with contextlib.suppress(OSError):  # (the error that stopped the opening says why)
                    self._staged.unlink(missing_ok=True)
            raise
        self._path, self._frames = path, 0

    def write(self, frame: np.ndarray) -> None:
        self._writer.write(frame)
        self._frames += 1

    @property
    def written(self) -> Path:
        """The file the frames go to now: the path's, or the one beside it until the new
        recording takes the earlier one's place, or the one it was kept in (`unplaced`)."""
        return self._written

    def _moved(self, path: Path) -> None:
        """`place_over` renamed the new recording's file to `path` (see `written`)."""
        self._written = path

    def close(self) -> None:
        """Finalise the file, then read its index back: OpenCV's writer reports no write
        error, so a full disk would otherwise leave an unplayable file (its index, written
        last, missing) and no word of it. OutputError when the file holds fewer frames."""
        self._writer.release()
        readable = mp4v_frames(self._written) if self._frames else 0
        if self._staged is not None:
            self._place_or_drop(readable)
        if readable < self._frames:
            what, kept = ("the new recording", "; the earlier file is kept") if self.kept_earlier else ("it", "")
            raise OutputError(f"cannot finish {self._path}: {what} holds {readable} of the {self._frames} frames "
                              f"written (is the disk full?){kept}")

    def _place_or_drop(self, readable: int) -> None:
        """The file written beside the earlier one takes its place when it holds a frame
        (`place_over`: renamed over it, or copied into its inode where a rename would change
        which file the name is: other hard links, another owner or group, a sticky folder); else
        it is removed and the earlier file kept (`kept_earlier`). OutputError naming the path
        when it cannot be placed: the new recording is left beside it (`keep_unplaced`), named
        in the error. A kill during the copy leaves it beside it, named
        .NAME.PID-XXXXXX.unplaced.mp4 (which nothing removes), and the earlier file cut."""
        staged, self._staged = self._staged, None
        if readable > 0:
            try:
                target = place_over(staged, self.final, moved=self._moved)
                if target is not None:
                    os.close(target)
                    with contextlib.suppress(OSError):  # placed: one left is removed by the next recording
                        staged.unlink()
            except OSError as exc:
                self._written = self.unplaced = keep_unplaced(staged, self.final)
                raise OutputError(f"cannot write {self._path}: {exc.strerror or exc}; the new recording is kept "
                                  f"as {self.unplaced}") from exc
            except BaseException:  # Ctrl-C in the copy (bench, the API: a close in the main thread)
                self.unplaced = kept_by_a_stopped_copy(self._path, self._written, staged) or self.unplaced
                raise
            self._written = self.final
            return
        self.kept_earlier = True
        with contextlib.suppress(OSError):
            staged.unlink(missing_ok=True)


def _made_beside(final: Path, path: Path) -> Path | None:
    """An empty file `beside` the earlier recording `final`, with its mode (a private 0600
    recording stays private once replaced), for the new one; None when its folder takes no new
    file (a link into a folder not ours, the file in it writable): written over in place then,
    as before, the earlier one not kept (as H264Writer does)."""
    staged = beside(final)
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except PermissionError:
        log.debug("%s: no file can be made beside %s; it is written over in place", path, final)
        return None
    except OSError as exc:
        raise OutputError(f"cannot open {path} for writing: {exc.strerror or exc}") from exc
    try:
        with contextlib.suppress(OSError, NotImplementedError):  # (no fchmod: Windows)
            os.chmod(fd, stat.S_IMODE(final.stat().st_mode))
    finally:
        os.close(fd)
    return staged


def remove_left_by_dead(path: Path) -> None:
    """Remove what recordings to `path` killed hard before they held a frame left: the file they
    wrote beside the earlier one (`left_by_dead`: of dead processes only). A live run has no
    `camface batch` start to clean them (batch removes every one in its folders)."""
    final = Path(os.path.realpath(path))
    if not final.is_file():  # such files are written only beside an existing recording
        return
    for left in left_by_dead(final):
        try:
            left.unlink()
        except OSError as exc:
            log.warning("camface: could not remove %s, which a killed recording of %s left: %s", left, path,
                        exc.strerror or exc)
            continue
        log.info("camface: removed %s, which a killed recording of %s left", left.name, path)


def mp4v_frames(path: Path) -> int:
    """Frames a plain MP4's index lists (0 when it has none: a file whose index was lost)."""
    capture = cv2.VideoCapture(opencv_path(path))
    try:
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    finally:
        capture.release()


def fit(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """A new uint8 BGR [height, width, 3] picture: `frame` scaled to fit inside it, its shape
    kept (stretched to another shape, faces came out squeezed), centred on black."""
    scale = min(width / frame.shape[1], height / frame.shape[0])
    inner_w = min(width, max(1, round(frame.shape[1] * scale)))
    inner_h = min(height, max(1, round(frame.shape[0] * scale)))
    picture = np.zeros((height, width, 3), np.uint8)
    left, top = (width - inner_w) // 2, (height - inner_h) // 2
    picture[top:top + inner_h, left:left + inner_w] = cv2.resize(
        frame, (inner_w, inner_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return picture


class VideoSink:
    """Writes uint8 BGR frames to an mp4 at `fps`, with `codec` (one of CODECS; `encoder` is
    what it resolved to).

    The writer opens on the first frame (of MIN_SIDE pixels a side or more: smaller ones before
    it are held, then scaled into it), at that frame's size rounded down to even numbers
    (4:2:0 video needs even sizes; odd frames lose their last row/column), or scaled down to
    what the encoder takes (LARGEST). Later frames of another size are scaled to fit it, their
    shape kept, black bars beside or above and below (`fit`: a folder's landscape photos after
    a portrait one). `frames_written` counts frames handed to the encoder; `frames_kept` those
    the file holds once closed (fewer after a write error: a full disk); `removed` why the file
    was removed at close (it held no frame), None when it was not. A recording over an existing
    file (overwrite; through a link, the file it points to) replaces it only once it holds a
    whole frame (H.264: its first fragment on disk; mp4v: at close; renamed over it, or copied
    into its inode: `place_over`): one that holds none keeps the earlier file (`kept_earlier`).
    """

    def __init__(self, path: str | Path, fps: float, overwrite: bool = False, codec: str = "auto"):
        self.path = check_record_file(path, overwrite)
        remove_left_by_dead(self.path)
        self.fps = fps
        self.encoder = encoder_for(codec)
        self.frames_written = 0
        self.removed: str | None = None
        self.kept_earlier = False  # closed with no frame over an earlier file, which was kept
        self._unplaced: Path | None = None  # the new recording's file, when it could not take the earlier one's place
        self._failed = False  # a write or the close raised: the file may hold fewer frames
        self._writer = None
        self._closing = None  # the writer while its close runs
        self._closed = False
        self._size: tuple[int, int] | None = None  # (width, height)
        self._resized = False  # a frame of another size was scaled (said once)
        self._first: tuple[int, int] | None = None  # the first frame's (height, width)
        self._start: float | None = None  # the first frame's `at`
        self._slot = -1  # mp4v: the last frame's period from the first
        self._last: np.ndarray | None = None  # mp4v: the last frame, repeated to fill a gap
        self._held: list[tuple[np.ndarray, float | None]] = []  # small first frames (MIN_SIDE), with their `at`

    def __enter__(self) -> "VideoSink":
        return self

    def _open(self, frame: np.ndarray, clock_hz: int | None = None) -> None:
        height, width = self._first = frame.shape[:2]
        side, pixels = LARGEST["mp4v" if self.encoder == "mp4v" else "h264"]
        scale = min(1.0, side / max(width, height), (pixels / (width * height)) ** 0.5)
        if scale < 1:  # a panorama first in a folder: the encoder refused it, and the run stopped
            width, height = max(2, int(width * scale)), max(2, int(height * scale))
            self._resized = True  # said here: every frame is scaled
            log.warning("camface: %s: frames of %dx%d are larger than %s encodes; recording at %dx%d",
                        self.path, frame.shape[1], frame.shape[0], self.encoder, width - width % 2,
                        height - height % 2)
        self._size = (max(2, width - width % 2), max(2, height - height % 2))
        if self.encoder == "mp4v":
            self._writer = Mp4vWriter(self.path, self.fps, self._size)
            return
        from camface.realtime.fmp4 import H264Writer

        try:
            self._writer = H264Writer(self.path, self.fps, self._size, self.encoder, clock_hz=clock_hz)
        except OutputError as exc:
            if self.encoder != "h264_nvenc":
                raise
            log.warning("camface: %s; recording with libx264 instead", exc)
            self.encoder = "libx264"
            self._writer = H264Writer(self.path, self.fps, self._size, self.encoder, clock_hz=clock_hz)

    def write(self, frame: np.ndarray, at: float | None = None) -> None:
        """Append one uint8 BGR [H, W, 3] frame.

        at: when the frame was taken, in seconds on any clock (a camera's frames: the loop
        keeps up with the camera by skipping frames, and a frame then lasts until the next one
        was taken, so the recording plays at the speed it was filmed). H.264 stores the time
        (variable frame rate); mp4v, which cannot, repeats the frame before, and leaves out a
        frame taken within the frame period of the one before. None: the frame lasts 1 / fps
        (files: every frame is kept)."""
        if self._closed:  # opening again would write over the finished recording
            raise OutputError(f"{self.path} is finished: a closed recording takes no more frames")
        if self._writer is None:
            if min(frame.shape[:2]) < MIN_SIDE and len(self._held) < MAX_HELD:
                if not self._held:
                    log.warning("camface: %s: a first frame of %dx%d cannot show a face; the recording takes its "
                                "size from the first frame of %d pixels a side or more", self.path, frame.shape[1],
                                frame.shape[0], MIN_SIDE)
                self._held.append((frame.copy(), at))
                return
            held, self._held = self._held, []
            self._open_with(frame, held[0][1] if held else at, held)
        self._put(frame, at)

    def _open_with(self, frame: np.ndarray, start: float | None, held: list) -> None:
        """Open the writer at `frame`'s size, its time starting at `start`, then write `held`
        ((frame, at) pairs: the small frames held before it)."""
        self._open(frame, None if start is None else CLOCK_HZ)
        self._start = start
        for small, small_at in held:
            self._put(small, small_at, said=True)

    def _put(self, frame: np.ndarray, at: float | None, said: bool = False) -> None:
        """Write `frame` at the recording's size (said: its scaling was said already)."""
        width, height = self._size
        if frame.shape[1] != width or frame.shape[0] != height:
            if frame.shape[1] in (width, width + 1) and frame.shape[0] in (height, height + 1):
                frame = frame[:height, :width]
            elif frame.shape[:2] == self._first:  # scaled down for the encoder (`_open`): no bars
                frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
            else:
                if not self._resized and not said:
                    self._resized = True
                    log.warning("camface: %s: frames of %dx%d are scaled to fit the recording's %dx%d (its first "
                                "frame's size)", self.path, frame.shape[1], frame.shape[0], width, height)
                frame = fit(frame, width, height)
        frame = np.ascontiguousarray(frame)
        elapsed = None if at is None or self._start is None else at - self._start
        try:
            if self.encoder == "mp4v":
                self._write_mp4v(frame, None if elapsed is None else round(elapsed * self.fps))
            else:
                self._writer.write(frame, None if elapsed is None else round(elapsed * CLOCK_HZ))
                self.frames_written += 1
        except BaseException as exc:
            self._failed = True
            if self.encoder != "mp4v":
                from camface.realtime.fmp4 import UnplacedError

                if isinstance(exc, UnplacedError):  # only the placement failed: the frame is in the
                    self.frames_written += 1  # file the recording is kept in, which the error names
            raise

    def _write_mp4v(self, frame: np.ndarray, slot: int | None) -> None:
        """mp4v holds one frame per period 1 / fps. slot: the frame's period from the first
        (None: the next one). The frame before is repeated until `slot` (at most MAX_HOLD_S); a
        frame in the period of the one before (a stream faster than its stated rate, the loop's
        jitter) is left out: written, it pushed every later frame a period late, and the
        recording played ever slower."""
        if slot is not None:
            if slot <= self._slot:
                return
            for _ in range(0 if self._last is None else min(slot - self._slot - 1, round(MAX_HOLD_S * self.fps))):
                self._writer.write(self._last)
                self._slot += 1
                self.frames_written += 1
        self._writer.write(frame)
        self._last = frame.copy() if slot is not None else None
        self._slot = self._slot + 1 if slot is None else slot
        self.frames_written += 1

    def close(self, say_removed: bool = True) -> None:
        """Finalise the file (idempotent). A file that holds no frame once closed (its first
        frame's write failed after the encoder had written the file's header, or no whole frame
        of H.264 reached a full disk) is removed, with a warning saying so (say_removed=False: the
        caller says it, with `removed`, in its own line): it would not play, and looked like a
        recording."""
        held, self._held = self._held, []
        self._closed = True
        try:
            if held and self._writer is None:  # no frame came of a size to show a face: recorded as they are
                self._open_with(held[0][0], held[0][1], held)
        finally:
            self._finish(say_removed)

    def _finish(self, say_removed: bool) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            self._closing = writer  # (`kept_in` while it closes: it may be placing the file, a copy)
            try:
                writer.close()
            except BaseException:
                self._failed = True
                raise
            finally:
                self.kept_earlier = getattr(writer, "kept_earlier", False)
                self._unplaced = getattr(writer, "unplaced", None)
                if self.kept_earlier:
                    log.warning("camface: %s keeps its earlier file: the recording holds no frame", self.path)
                elif self._unplaced is None:  # (else the error names the file the recording is in)
                    self._remove_if_empty(say_removed)
                self._closing = None
            log.debug("recording %s finalised (%s): %d frames", self.path, self.encoder, self.frames_written)

    def _remove_if_empty(self, say: bool) -> None:
        if self.encoder == "mp4v" and self.frames_written:  # its frames may be in the file without
            return  # their index (written last, lost to a full disk): a repair tool can get them back
        if self.frames_kept or not self.path.is_file():  # (not a device: /dev/full)
            return
        try:
            self.path.unlink()
        except OSError as exc:
            log.warning("camface: %s holds no frame (it would not play) and could not be removed: %s",
                        self.path, exc.strerror or exc)
            return
        why = ("its first frame could not be written" if not self.frames_written
               else f"{self.frames_written} encoded, none written whole")
        self.removed = f"it holds no frame ({why}), so it would not play"
        if say:
            log.warning("camface: removed %s: %s", self.path, self.removed)

    @property
    def frames_kept(self) -> int:
        """Frames the closed file holds: `frames_written`, or after a write error (the encoder
        had taken frames that never reached the disk) those a reader gets from the file."""
        if self.kept_earlier:
            return 0
        if not self._failed or not self.frames_written:
            return self.frames_written
        if self.encoder == "mp4v":
            return min(self.frames_written, mp4v_frames(self.kept_in))
        from camface.realtime.fmp4 import whole_frames

        return min(self.frames_written, whole_frames(self.kept_in))

    @property
    def kept_in(self) -> Path:
        """The file the recording's frames are in: `path`; while a recording over an earlier
        file is written beside it (until its first whole frame, mp4v: until its close), that
        file; where the new recording could not take the earlier file's place, the file beside
        it that the error named (`keep_unplaced`)."""
        writer = self._writer or self._closing
        return (writer.written if writer is not None else None) or self._unplaced or self.path

    @property
    def in_place(self) -> bool:
        """Whether `kept_in` is the path's own file (the recording placed, or never staged), told
        without touching the disk: a forced exit asks while a file system hangs (`stuck_writer_line`)."""
        writer = self._writer or self._closing
        if writer is not None:
            return writer.written in (self.path, writer.final)
        return self._unplaced is None

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except OutputError as error:
            if exc is None:
                raise
            log.warning("camface: %s", error)  # the error already on its way says more
