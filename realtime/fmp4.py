"""H.264 in fragmented MP4, written through PyAV (FFmpeg), and the one fact readers need
about a fragmented file cut short.

A plain MP4 keeps its index (`moov`) at the end, so a writer killed hard leaves nothing
playable. A fragmented MP4 starts with an empty `moov` and then appends self-contained
fragments (`moof` index + `mdat` samples), here one per keyframe, a keyframe every
`KEYFRAME_S` seconds: a SIGKILL, power loss or out-of-memory kill loses at most the fragment
being filled. `flush_packets` hands each finished fragment to the operating system at once
(without it FFmpeg's 32 KiB write buffer would hold the first fragments back).
`default_base_moof` is what browsers' Media Source Extensions expect of fragments.

OpenCV converts each BGR frame to YUV 4:2:0 (BT.601, limited range: what swscale would do, in
a third of the time, 0.4 vs 1.2-1.6 ms at 640x480) and PyAV encodes and muxes it; both release
the GIL meanwhile, so the writer thread does not hold up the live loop's other threads.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import stat
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from camface.errors import OutputError
from camface.native import native_stderr_captured
from camface.outputs import beside, keep_unplaced, kept_by_a_stopped_copy, place_over

log = logging.getLogger(__name__)

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
KEYFRAME_S = 1.0  # seconds between keyframes, so between fragments
# libx264's fastest preset: the only one as cheap as OpenCV's mp4v writer (CPU per frame at
# 640x480: 2.5 ms vs 2.4 ms; superfast 3.9, veryfast 5.0; at 1280x720 5.7 vs 7.4 ms), at about
# mp4v's bit rate (benchmarks/encode_cost.py; figures in benchmarks/RESULTS.md).
X264_PRESET = "ultrafast"
# Per-encoder options. x264's zerolatency tune: no B-frames, no look-ahead, so every frame
# leaves the encoder (and reaches a fragment) as soon as it is encoded. One x264 thread: the
# same CPU time as x264's own slice threads, but on a busy machine the writer no longer waits
# for several threads to be scheduled (`camface bench --record`: encode 2.5 vs 3.9 ms a frame).
ENCODER_OPTIONS = {
    "libx264": {"preset": X264_PRESET, "tune": "zerolatency", "threads": "1"},
    # forced-idr: a frame `H264Writer.write` makes a keyframe (pict_type I) is an IDR frame, which
    # starts a fragment (NVENC's default makes it an intra frame that is not one; x264's is one)
    "h264_nvenc": {"preset": "p3", "tune": "ll", "zerolatency": "1", "forced-idr": "1"},
}


@functools.cache
def h264_encoder() -> tuple[str | None, str]:
    """The H.264 encoder recordings use and why: ("h264_nvenc", "") when an NVIDIA encoder
    opens, else ("libx264", ""), else (None, the reason: PyAV missing or without H.264)."""
    try:
        import av
    except ImportError as exc:
        return None, f"PyAV is not installed ({exc})"
    for name in ("h264_nvenc", "libx264"):
        if _opens(av, name):
            return name, ""
    return None, f"PyAV {av.__version__} has no usable H.264 encoder (libx264, h264_nvenc)"


def _opens(av, name: str) -> bool:
    """True when encoder `name` exists and opens with the options recordings use (NVENC needs
    a GPU, a driver and an encoder unit: the wheel has it everywhere, most machines, and
    data-centre GPUs without NVENC such as the H100, cannot open it)."""
    try:
        context = av.CodecContext.create(name, "w")
        context.width, context.height, context.pix_fmt = 256, 256, "yuv420p"
        context.time_base = Fraction(1, 30)
        context.options = ENCODER_OPTIONS.get(name, {})
        context.open()  # freed with the object
        return True
    except (av.FFmpegError, ValueError, NotImplementedError):  # unknown codec, cannot open
        return False


class UnplacedError(OutputError):
    """The new recording could not take the earlier file's place (`H264Writer._place`): it is
    kept beside it (`unplaced`, named in the message). Raised by a `write`, the frame it was
    given is in that file all the same (encoded before the placement was tried): it counts."""


class H264Writer:
    """Writes uint8 BGR [height, width, 3] frames of exactly `size` (width, height; even
    numbers) at `fps` as H.264 (yuv420p, BT.601 limited range) in a fragmented MP4.

    `options` add to or replace the encoder's ENCODER_OPTIONS (benchmarks try other presets).
    `clock_hz`: frames are timed in 1 / clock_hz s (`write`'s tick) instead of in frame periods,
    for a camera's frames, which come when they come (a stream's stated rate may be wrong); a
    keyframe (so a fragment) then starts every KEYFRAME_S of that time, not every fps frames
    (a loop recording 5 of a 30 fps camera's frames a second made one every 6 s).
    """

    def __init__(self, path: Path, fps: float, size: tuple[int, int], encoder: str,
                 options: dict[str, str] | None = None, clock_hz: int | None = None):
        import av

        self.path, self.encoder = path, encoder
        # A file already there (--overwrite; through a link, the file it points to) is written
        # beside it and put in its place once the new one holds a whole frame (`_place`: renamed,
        # or copied into its inode): a run whose frames never reached the disk leaves the
        # earlier recording as it was.
        self.final = Path(os.path.realpath(path))  # the file `path` names (through a link), as it opened
        self._staged = beside(self.final) if self.final.is_file() else None
        self.kept_earlier = False  # closed with no whole frame: the earlier file was kept
        self.unplaced: Path | None = None  # the staged file, when it could not be put in place (`_place`)
        self._written = self._staged or Path(path)  # the file the frames go to
        # Through a Python file, unbuffered: FFmpeg's own file protocol loses the error of the
        # last writes (a full disk while the last fragment is written: PyAV's close() returns,
        # the fragment is cut), while a Python file's write raises and PyAV passes it on. Opened
        # without truncating it: a device (/dev/full) is written as it is; a file this made is
        # removed when the encoder does not open.
        self._made = not os.path.lexists(self._written)
        self._container = None
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0)
        try:
            try:
                fd = os.open(self._written, flags, 0o666)
            except PermissionError:
                if self._staged is None:
                    raise
                # the earlier file's folder takes no new file (a link into a folder not ours, the
                # file in it writable): written over in place, as before, the earlier one not kept
                log.debug("%s: no file can be made beside %s; it is written over in place", path, self.final)
                self._staged, self._written, self._made = None, Path(path), False
                fd = os.open(self._written, flags, 0o666)
            self._file = open(fd, "wb", buffering=0)
        except OSError as exc:
            raise OutputError(f"cannot open {path} for writing: {exc.strerror or exc}") from exc
        if self._staged is not None:  # the earlier file's mode (a private 0600 recording stays private)
            with contextlib.suppress(OSError, NotImplementedError):  # (no fchmod: Windows)
                os.chmod(self._file.fileno(), stat.S_IMODE(self.final.stat().st_mode))
        try:
            context = self._set_up(av, fps, size, encoder, options, clock_hz)
        except (av.FFmpegError, OSError, ValueError, TypeError, NotImplementedError) as exc:  # an unknown encoder
            self._abandon()
            raise OutputError(f"cannot open {path} for writing: {exc}") from exc
        # x264 writes why it refuses an option (a preset, a tune) straight to fd 2, beside the
        # one-line error: it is put in that error instead (PyAV's logging never sees it)
        with native_stderr_captured("x264 [") as said:  # (not another thread's line meanwhile)
            try:
                context.open()  # now rather than on the first frame, so a refusal is clear
                refused = None
            except av.FFmpegError as exc:  # e.g. NVENC below its smallest frame size
                refused = exc
        said = [re.sub(r"^x264 \[\w+\]: ", "", line) for line in said]
        if refused is not None:
            self._abandon()
            why = "; ".join([*said, str(refused)])
            raise OutputError(f"{encoder} cannot encode {size[0]}x{size[1]} video for {path}: {why}") from refused
        for line in said:
            log.info("%s: %s", encoder, line)
        if stat.S_ISREG(os.fstat(self._file.fileno()).st_mode):  # (not a device: /dev/full)
            self._file.truncate(0)  # nothing is written before the first frame
        self._av, self._pts = av, 0
        self._failed = False  # a write or the close failed: the file may end inside a frame
        self._key_every = round(clock_hz * KEYFRAME_S) if clock_hz else None  # ticks between keyframes
        self._key_at: int | None = None  # the last keyframe's tick

    def _set_up(self, av, fps: float, size: tuple[int, int], encoder: str, options: dict[str, str] | None,
                clock_hz: int | None):
        """The container and its stream, the encoder's context (not opened) returned."""
        from av.video.reformatter import ColorPrimaries, ColorRange, ColorTrc

        self._container = av.open(self._file, "w", format="mp4", options={"movflags": MOVFLAGS, "flush_packets": "1"})
        rate = Fraction(fps).limit_denominator(1001)
        self._stream = self._container.add_stream(encoder, rate=rate)
        context = self._stream.codec_context
        context.width, context.height = size
        context.pix_fmt = "yuv420p"
        context.gop_size = max(1, round(fps * KEYFRAME_S))
        if clock_hz:
            context.time_base = Fraction(1, clock_hz)
            # keyframes by time (`write`); the encoder's own count of frames would space them by
            # how many frames came, however long that took
            context.gop_size = 1 << 30
        # frames are converted with BT.601 coefficients: say so, so players convert back alike
        context.colorspace = 6  # AVCOL_SPC_SMPTE170M (BT.601)
        context.color_primaries, context.color_trc = ColorPrimaries.SMPTE170M, ColorTrc.SMPTE170M
        context.color_range = ColorRange.MPEG  # limited range, 16-235
        context.options = {**ENCODER_OPTIONS.get(encoder, {}), **(options or {})}
        return context

    def _abandon(self) -> None:
        """The encoder did not open: close what was opened (nothing was written: the container
        writes its header with the first frame) and remove the file if this made it."""
        try:
            if self._container is not None:
                self._container.close()
        except Exception:  # the error that stopped the opening says why
            pass
        finally:
            self._file.close()
            if self._made:
                with contextlib.suppress(OSError):  # (the same error: never in place of it)
                    self._written.unlink(missing_ok=True)

    def write(self, frame: np.ndarray, tick: int | None = None) -> None:
        """Encode one frame; OutputError (naming the file) when it cannot be written, e.g. a
        full disk: the fragments written before it stay playable.

        tick: the frame's time from the first frame in the time base (1 / clock_hz, else one
        frame period): the frame before lasts until then. None (and any tick not after the last
        frame's): the next tick."""
        i420 = cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420)  # [height * 3 / 2, width]: Y, U, V planes
        video_frame = self._av.VideoFrame.from_ndarray(i420, format="yuv420p")
        video_frame.pts = self._pts if tick is None else max(self._pts, tick)
        self._pts = video_frame.pts + 1
        if self._key_every is not None and (self._key_at is None
                                            or video_frame.pts - self._key_at >= self._key_every):
            from av.video.frame import PictureType

            video_frame.pict_type = PictureType.I  # the encoder makes it a keyframe (an IDR frame)
            self._key_at = video_frame.pts
        try:
            packets = self._stream.encode(video_frame)
            self._container.mux(packets)
        except OSError as exc:  # PyAV's errors are OSErrors too
            self._failed = True
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        # a keyframe after the first starts a fragment: the one before it is on disk now
        if self._staged is not None and self._pts > 1 and any(packet.is_keyframe for packet in packets) \
                and whole_frames(self._staged) > 0:
            self._place()

    def _place(self) -> None:
        """Put the file written beside the earlier one (it holds a whole frame) in its place
        (`place_over`): renamed over it, or, where that would change which file the name is
        (other hard links, another owner or group, a sticky folder), copied into the earlier
        file's inode, the writer then going on there: its descriptor is made the earlier file's
        (dup2) at the same offset (PyAV's own position stays right: the bytes before it are the
        same). OutputError naming the path when neither can be done: the new recording is then
        left beside it (`keep_unplaced`, named in the error), which takes the rest of it, and
        the earlier file holds its earlier bytes (or, a copy cut short, part of the new ones). A
        kill during the copy leaves the new recording's first fragment beside it, named
        .NAME.PID-XXXXXX.unplaced.mp4 (which nothing removes), and the earlier file cut."""
        staged = self._staged
        live = not self._file.closed
        self._staged = None  # placed once, or never: a failure leaves the recording where it is
        try:
            target = place_over(staged, self.final, self._file.fileno() if live else None, self._moved)
            if target is not None:
                try:
                    if live:
                        os.lseek(target, os.lseek(self._file.fileno(), 0, os.SEEK_CUR), os.SEEK_SET)
                        os.dup2(target, self._file.fileno(), inheritable=False)
                finally:
                    os.close(target)
                with contextlib.suppress(OSError):  # placed: one left is removed by the next recording
                    staged.unlink()
        except OSError as exc:
            self._failed = True
            self._written = self.unplaced = keep_unplaced(staged, self.final)
            raise UnplacedError(f"cannot write {self.path}: {exc.strerror or exc}; the new recording is kept "
                                f"as {self.unplaced}") from exc
        except BaseException:  # Ctrl-C in the copy (a writer in the main thread): where it left them
            self._failed = True
            self.unplaced = kept_by_a_stopped_copy(self.path, self._written, staged) or self.unplaced
            raise
        self._written = self.final

    def _moved(self, path: Path) -> None:
        """`place_over` renamed the new recording's file to `path` (see `written`)."""
        self._written = path

    @property
    def written(self) -> Path:
        """The file the frames go to now: the path's, or the one beside it until the new
        recording takes the earlier one's place, or the one it was kept in (`unplaced`)."""
        return self._written

    def close(self) -> None:
        """Drain the encoder and finish the last fragment (the file stays playable even if
        this never runs); OutputError when that cannot be written. After a write that failed
        (a full disk) the file is cut at its last whole frame (`trim_to_whole_frames`)."""
        try:
            try:
                self._container.mux(self._stream.encode(None))
            finally:
                self._container.close()
        except OSError as exc:
            self._failed = True
            raise OutputError(f"cannot finish {self.path}: {exc.strerror or exc}") from exc
        finally:
            self._file.close()
            if self._failed:
                trim_to_whole_frames(self._written)
            if self._staged is not None:  # no fragment was on disk before the close
                self._place_or_drop()

    def _place_or_drop(self) -> None:
        """At close: the file written beside the earlier one replaces it when it holds a whole
        frame; else it is removed and the earlier file kept (`kept_earlier`)."""
        if whole_frames(self._staged) > 0:
            self._place()
            return
        self.kept_earlier = True
        with contextlib.suppress(OSError):
            self._staged.unlink(missing_ok=True)


# Boxes an MP4 holds at its top level (ISO/IEC 14496-12, and QuickTime's `wide`)
TOP_LEVEL = frozenset({b"ftyp", b"styp", b"moov", b"moof", b"mdat", b"mfra", b"free", b"skip", b"wide", b"sidx",
                       b"ssix", b"prft", b"emsg", b"meta", b"uuid", b"pdin", b"udta", b"meco"})


def complete_length(path: Path) -> int | None:
    """For an ISO base media file (MP4) that ends inside a top-level box, the byte length of
    its complete boxes; None when the file is whole or not an MP4. Bytes after the last box
    that do not start a top-level box (TOP_LEVEL: a phone's or tool's trailer, padding) are
    no cut: all of the file's frames read, and it was called truncated or damaged.

    FFmpeg reads every fragment index (`moof`) when it opens a fragmented MP4 and refuses the
    file if the last one is cut; a reader can open the complete prefix instead."""
    size = path.stat().st_size
    position = 0
    with open(path, "rb") as file:
        while position + 8 <= size:
            file.seek(position)
            header = file.read(16)
            length, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if position == 0 and kind != b"ftyp":
                return None
            if length == 1 and len(header) == 16:  # 64-bit size follows the type
                length = int.from_bytes(header[8:16], "big")
            elif length == 0:  # the box runs to the end of the file
                return None
            if position > 0 and kind not in TOP_LEVEL:  # not a box: data after the file's boxes
                return None
            if length < 8 or position + length > size:
                break
            position += length
    return position if 0 < position < size else None


class PrefixReader(io.BufferedIOBase):
    """The first `length` bytes of a file, as a binary stream that OpenCV's VideoCapture
    (OpenCV >= 4.10, FFmpeg backend) can read from."""

    def __init__(self, path: Path, length: int):
        self._file, self._length = open(path, "rb"), length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        left = max(0, self._length - self._file.tell())
        return self._file.read(left if size is None or size < 0 else min(size, left))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            return self._file.seek(self._length + offset)
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        super().close()


def whole_frames(path: Path) -> int:
    """Frames of a fragmented MP4 (as H264Writer writes it) whose bytes are all in the file:
    what a reader gets from one cut short (a full disk fails a fragment's write part-way; its
    index, written first, may be whole while its samples are not). 0 for a file that is not
    a fragmented MP4 or cannot be read.

    Each fragment's `moof` holds a `traf` per track whose `trun` lists its samples' sizes and
    where they start (from the `moof`'s first byte: `default_base_moof`, or `tfhd`'s base)."""
    return _whole(path)[0]


def trim_to_whole_frames(path: Path) -> int:
    """Cut a fragmented MP4 that ends inside a frame (a full disk stopped a fragment's write
    part-way) at the end of its last whole frame; returns the frames it holds (`whole_frames`).
    FFmpeg gave the cut frame to the decoder, which refused it: a reader that stops at the
    first decoding error (PyAV's `decode`) failed on a file whose frames before were all
    there. A file that is whole, holds no whole frame, or has a fragment whose sample sizes
    cannot be told (cut there, frames after it would be lost), is left as it is."""
    frames, end = _whole(path)
    try:
        if frames and 0 < end < path.stat().st_size:
            os.truncate(path, end)
    except OSError:  # gone, or not ours to change: readers still get its whole frames
        pass
    return frames


def _whole(path: Path) -> tuple[int, int]:
    """(whole_frames, the byte just after the last of them; 0 when none, -1 when a fragment's
    sample sizes could not be told)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            frames, position, end = 0, 0, 0
            while position + 8 <= size:
                file.seek(position)
                length, kind = _box_header(file.read(16))
                if length < 8:
                    break
                if kind == b"moof" and position + length <= size:
                    file.seek(position)
                    count, last = _whole_samples(file.read(length), position, size)
                    frames, end = frames + count, (-1 if min(end, last) < 0 else max(end, last))
                position += length
            return frames, end
    except OSError:
        return 0, 0


def _box_header(header: bytes) -> tuple[int, bytes]:
    """(length, type) of the box starting `header` (16 bytes or fewer); length 0 when it runs
    to the end of the file or cannot be told."""
    if len(header) < 8:
        return 0, b""
    length, kind = int.from_bytes(header[:4], "big"), header[4:8]
    if length == 1:
        length = int.from_bytes(header[8:16], "big") if len(header) == 16 else 0
    return length, kind


def _children(data: bytes, start: int, end: int):
    """(type, payload start, box end) of the boxes in data[start:end] (32-bit sizes: moof's)."""
    while start + 8 <= end:
        length = int.from_bytes(data[start:start + 4], "big")
        if length < 8 or start + length > end:
            return
        yield data[start + 4:start + 8], start + 8, start + length
        start += length


def _whole_samples(moof: bytes, at: int, size: int) -> tuple[int, int]:
    """(samples of the fragment whose index is `moof` (the whole box, at byte `at` of a file of
    `size` bytes) that end within the file, the byte just after the last of them; 0 when none,
    -1 when their sizes cannot be told)."""
    count, end = 0, 0
    for kind, start, end in _children(moof, 8, len(moof)):
        if kind != b"traf":
            continue
        base, default_size = at, None
        for child, payload, child_end in _children(moof, start, end):
            flags = int.from_bytes(moof[payload + 1:payload + 4], "big")
            if child == b"tfhd":
                field = payload + 8  # after version, flags and track_ID
                if flags & 0x1:  # base_data_offset
                    base = int.from_bytes(moof[field:field + 8], "big")
                    field += 8
                field += 4 * bool(flags & 0x2)  # sample_description_index
                field += 4 * bool(flags & 0x8)  # default_sample_duration
                if flags & 0x10:
                    default_size = int.from_bytes(moof[field:field + 4], "big")
            elif child == b"trun":
                samples = int.from_bytes(moof[payload + 4:payload + 8], "big")
                field = payload + 8
                offset = 0
                if flags & 0x1:  # data_offset (signed)
                    offset = int.from_bytes(moof[field:field + 4], "big", signed=True)
                    field += 4
                field += 4 * bool(flags & 0x4)  # first_sample_flags
                sized = bool(flags & 0x200)
                before_size = 4 * bool(flags & 0x100)
                entry = 4 * sum(bool(flags & bit) for bit in (0x100, 0x200, 0x400, 0x800))
                cursor = base + offset
                for n in range(samples):
                    if sized:
                        at_size = field + n * entry + before_size
                        sample = int.from_bytes(moof[at_size:at_size + 4], "big")
                    elif default_size is not None:
                        sample = default_size
                    else:
                        return count, -1  # sizes unknown: count no further, and say where nothing ends
                    cursor += sample
                    if cursor > size:
                        return count, end
                    count, end = count + 1, cursor
    return count, end
