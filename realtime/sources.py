"""Frame sources: a camera index, a video file, a folder of images, a stream URL, or `sample`.

Every source is a context manager; entering it opens the device or file (raising
`SourceError` naming the index / path / URL when it cannot), iterating it yields frames as
contiguous uint8 BGR arrays [H, W, 3], and leaving it releases everything.

Files and folders yield every frame, in order. Live sources (cameras, streams) are read on
their own thread and the loop always gets the newest frame, so a slow loop drops frames
instead of lagging behind (as Ultralytics' `LoadStreams` does).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from camface.errors import SourceError
from camface.native import opencv_path

log = logging.getLogger(__name__)

# read by OpenCV's imread (which turns photos upright by their EXIF orientation; FFmpeg would not):
# the one list of image suffixes (--source, image folders, enroll's and train's photos)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp"})
DEFAULT_FPS = 30.0  # for files that report no frame rate
MAX_BAD_RUN = 25  # frames in a row that do not decode, read past in a file that announces more


def cut_short(path: str | Path) -> str | None:
    """Why the JPEG at `path` looks cut short, or None (other formats, unreadable files: None).

    cv2.imread decodes a JPEG that ends early without an error, the missing rows grey (libjpeg
    prints "Premature end of JPEG file" without a name), so readers warn by name. A whole JPEG
    has its end marker (FF D9) after its last scan (FF DA): inside a scan's entropy-coded data
    an FF byte is followed by 00 or a restart marker, never by D9 or DA."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return None
    if data[:3] == b"\xff\xd8\xff" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        return "a JPEG cut short (no end marker after its last scan): its lower part decodes grey"
    return None


# OpenCV refuses to decode an image larger than these (its imgcodecs' validateInputImageSize), read
# from the environment when OpenCV loads: (variable, default)
OPENCV_LIMITS = {"width": ("OPENCV_IO_MAX_IMAGE_WIDTH", 1 << 20), "height": ("OPENCV_IO_MAX_IMAGE_HEIGHT", 1 << 20),
                 "pixels": ("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30)}


def opencv_limit(which: str) -> int:
    """OpenCV's limit on an image's "width", "height" or "pixels", as its environment variable
    sets it (a number, or with a KB/MB suffix, as OpenCV parses it) or by default."""
    variable, default = OPENCV_LIMITS[which]
    value = os.environ.get(variable, "").strip()
    match = re.fullmatch(r"([0-9]+)\s*(kb|mb)?", value, re.IGNORECASE)
    if not match:
        return default
    return int(match[1]) * {None: 1, "kb": 1 << 10, "mb": 1 << 20}[match[2] and match[2].lower()]


def header_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) an image file's header states, read without decoding it (Pillow's
    format readers, short of `Image.open`'s own check on large images), or None when no reader
    takes the file."""
    from PIL import Image

    try:
        with open(path, "rb") as file:
            prefix = file.read(16)
            Image.init()
            for name in Image.ID:
                factory, accept = Image.OPEN[name]
                if accept is not None and not accept(prefix):
                    continue
                file.seek(0)
                try:
                    image = factory(file, str(path))
                except Exception:  # not this format, or a header cut short: try the next
                    continue
                return tuple(image.size)
    except Exception:  # an unreadable file, a Pillow without these internals: no size to give
        return None
    return None


def too_large_for_opencv(path: str | Path, refused: bool = False) -> str | None:
    """Why OpenCV refuses the image at `path` for its size (over OPENCV_LIMITS), naming its size
    and the environment variable that raises the limit; None when its header says it is within
    them or cannot be read. refused: OpenCV said so already (its error names the limit), so the
    reason is given without the size when the header cannot be read."""
    size = header_size(path)
    if size is None:
        return (f"larger than OpenCV reads (its limits: {opencv_limit('pixels')} pixels, {opencv_limit('width')} "
                "a side); raise them with the environment variables OPENCV_IO_MAX_IMAGE_PIXELS, "
                "OPENCV_IO_MAX_IMAGE_WIDTH and OPENCV_IO_MAX_IMAGE_HEIGHT before camface starts") if refused else None
    width, height = size
    for which, value in (("pixels", width * height), ("width", width), ("height", height)):
        if value > opencv_limit(which):
            memory = f" (decoding it takes {width * height * 3 / (1 << 30):.1f} GiB)" if which == "pixels" else ""
            return (f"{width}x{height} = {width * height} pixels, over OpenCV's limit of {opencv_limit(which)} "
                    f"{'pixels' if which == 'pixels' else 'pixels in ' + which}; to read it, set the environment "
                    f"variable {OPENCV_LIMITS[which][0]}={value} (or more) before camface starts{memory}")
    return None


def _gone(path: str | Path) -> str:
    """Why `path`, which does not exist, gave no image: a link to nothing says where it points
    (the file it named was deleted or moved, or the link was made wrong), else the file went."""
    if os.path.islink(path):
        return f"it is a link to {os.readlink(path)}, which does not exist"
    return "it is gone (deleted or moved since the folder was listed)"


def imread(path: str | Path, flags: int) -> tuple[np.ndarray | None, str | None]:
    """cv2.imread(path, flags), and why it gave no image: (image, None) or (None, why): the file
    is gone, permission denied, too large for OpenCV (`too_large_for_opencv`: OpenCV 5 raises
    cv2.error there, OpenCV 4 returns None), or not an image OpenCV can read."""
    # asked first: OpenCV writes its own warning line for a file it cannot open, before the one
    # error line (`camface compare`, `guided`) or the log line saying why a photo was skipped
    if not Path(path).exists():  # os.access says False for a file that is gone too
        return None, _gone(path)
    if not os.access(path, os.R_OK):
        return None, "permission denied"
    refused = False
    try:
        image = cv2.imread(opencv_path(path), flags)
    except cv2.error as exc:
        image, refused = None, "CV_IO_MAX_IMAGE_" in str(exc)
    if image is not None:
        return image, None
    if not Path(path).exists():  # os.access says False for a file that is gone too
        return None, _gone(path)
    if not os.access(path, os.R_OK):
        return None, "permission denied"
    return None, too_large_for_opencv(path, refused) or "not an image OpenCV can read"


@dataclass(frozen=True)
class SourceInfo:
    """What the loop and the recorder need to know about a source.

    name: what the user passed (camera index, path, URL or "sample").
    fps: frames per second of the source (measured for cameras that report none).
    frames: number of frames when known (files, folders, sample), else None.
    live: True for cameras and streams (frames may be dropped to stay current).
    still: True for folders of images (each a still picture: a window holds it --image-seconds).
    """

    name: str
    fps: float
    frames: int | None
    live: bool
    still: bool = False


class Source(Protocol):
    info: SourceInfo

    def __enter__(self) -> "Source": ...

    def __exit__(self, *exc) -> None: ...

    def __iter__(self) -> Iterator[np.ndarray]: ...


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """Any frame a source may deliver -> contiguous uint8 BGR [H, W, 3].

    Accepts gray [H, W] or [H, W, 1], BGR [H, W, 3], BGRA [H, W, 4]; uint8, uint16 (its top 8
    bits) or float in [0, 1]. Returns the input itself when it already is uint8 BGR contiguous.
    """
    if image is None or image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(f"not an image: {None if image is None else image.shape}")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype.kind == "f":
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported frame dtype {image.dtype}")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif channels == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif channels != 3:
        raise ValueError(f"unsupported number of channels: {channels}")
    return np.ascontiguousarray(image)


_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#\r\n]*)@")


def redact(text: str) -> str:
    """`text` fit to print: the user name and password of each URL in it replaced by "***"
    ("rtsp://admin:pw@cam/x" -> "rtsp://***@cam/x"); anything else unchanged.

    Every message, log line and SourceInfo.name that shows a stream URL goes through here:
    camera URLs carry their credentials, and logs, summaries and snapshot metadata get shared.
    The authority ends at the first "/", "?" or "#" (as FFmpeg splits it; a space does not end
    it); its last "@" ends the credentials, so a password holding an "@" or a space is hidden
    whole (in a message, words up to an "@" later on its line may be hidden with it)."""
    return _USERINFO.sub(r"\1***@", text)


MAX_FPS = 240.0  # above this a figure is a container's time base, not a frame rate: FFmpeg
# says 1000 for a WebM or MKV written live (a browser's MediaRecorder, OBS) or an FLV/RTMP stream


def _valid_fps(fps: float) -> bool:
    return fps is not None and math.isfinite(fps) and 0.5 <= fps <= MAX_FPS


# ---------------------------------------------------------------------------- files


def read_past_bad_frames(capture, left: int | None, deadline: float | None = None) -> tuple[int, np.ndarray | None]:
    """After a read of `capture` (a cv2.VideoCapture) that failed, with `left` frames announced
    after the failed one (None: the file announces no count, as a Matroska written live or an
    MPEG-TS behind a server that cannot seek): (frames that failed, the next good frame) when a
    good frame follows within MAX_BAD_RUN reads; (0, None) at the end of the announced frames, or
    past `deadline` (a time.perf_counter() time: a URL whose connection dropped waits out its read
    time-out on each read). A damaged frame in a file (a JPEG of an MJPEG AVI that does not
    decode) fails its read and the next read goes on after it, locally or behind a URL alike.
    Without a count the end is where MAX_BAD_RUN reads fail: reads at the end of a file fail at
    once (25 take under 10 ms, locally or over HTTP)."""
    import time

    for failed in range(1, MAX_BAD_RUN + 1):
        if (left is not None and left < failed) or (deadline is not None and time.perf_counter() > deadline):
            return 0, None
        try:
            ok, frame = capture.read()
        except cv2.error:  # a backend's read error (FFmpeg behind a URL): this frame failed too
            ok, frame = False, None
        if ok and frame is not None and frame.size:
            return failed, frame
    return 0, None


class VideoFileSource:
    """Every frame of a video file, in order; or frames start..stop-1 of it (`camface batch`'s
    segments: `start` is reached by seeking, checked, and by reading from the first frame when
    the seek lands elsewhere; a range past the file's end gives no frame and no error).

    A file that ends early (truncated, damaged; a recording whose writer was killed) stops at
    its last good frame with one warning; `truncated` then is True, `frames_read` says how
    far it got and `truncation` why. A fragmented MP4 cut inside a fragment's index, which FFmpeg refuses to open,
    is read up to its last complete fragment. A frame that does not decode with good frames
    after it (a damaged JPEG in an MJPEG AVI) is given as the frame after it, with a warning
    naming it, and reading goes on (it stopped there: the rest of the file was lost); the frames
    keep their numbers and times. `bad_frames` counts them.

    info.fps: the container's figure; when that is none or above MAX_FPS (a time base: 1000
    for a WebM written live), the mean rate of its first frames' timestamps, else DEFAULT_FPS.
    Each iteration starts at `start`.
    """

    def __init__(self, path: str | Path, start: int = 0, stop: int | None = None):
        if start < 0 or (stop is not None and stop < start):
            raise ValueError(f"bad frame range {start}..{stop} of {path}")
        self.path = Path(path)
        self.start, self.stop = start, stop
        self.frames_read = 0
        self.bad_frames = 0  # frames that did not decode, given as the frame after them
        self.truncated = False
        self.truncation: str | None = None  # why, when truncated
        self._capture = None
        self._prefix = None
        self._iterated = False

    def __enter__(self) -> "VideoFileSource":
        if not self.path.is_file():
            raise SourceError(f"video file not found: {self.path}")
        self.frames_read, self.truncated, self.truncation = 0, False, None  # per pass: --loop enters again
        self._iterated = False
        self._capture = capture = self._open()
        if not self.truncated and self.stop is None:  # FFmpeg opens some MP4s cut inside their last
            # index and says nothing (a range that stops earlier does not reach the cut)
            from camface.realtime.fmp4 import complete_length

            length = complete_length(self.path)
            if length is not None:
                self.truncated = True
                self.truncation = (f"it ends inside an MP4 box: only its first {length} of "
                                   f"{self.path.stat().st_size} bytes are whole")
        fps = capture.get(cv2.CAP_PROP_FPS)
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if not _valid_fps(fps):
            # recorded at 1000 fps, a 3 s clip lasted 0.1 s, and a window played it as fast
            measured = self._fps_from_timestamps()
            if measured is not None:
                log.info("%s reports %s fps; its timestamps say %.3g", self.path, fps, measured)
            else:
                log.warning("%s reports no frame rate (%s); assuming %g fps", self.path, fps, DEFAULT_FPS)
            fps = measured or DEFAULT_FPS
        self.info = SourceInfo(str(self.path), float(fps), count if count > 0 else None, live=False)
        if self.start:
            self._seek(self.start)
        return self

    def check(self) -> None:
        """SourceError now when the file does not open as a video (what entering it would raise
        first), without reading its frames or logging what entering says of them."""
        if not self.path.is_file():
            raise SourceError(f"video file not found: {self.path}")
        self._open().release()
        self._close_prefix()

    def _fps_from_timestamps(self, frames: int = 31) -> float | None:
        """The mean frame rate of the first `frames` frames from their timestamps (N frames:
        N-1 intervals), or None when they say nothing plausible. The file is then opened
        again (seeking back to 0 in a WebM written live, which has no index, reads nothing)."""
        stamps = []
        while len(stamps) < frames and self._capture.grab():
            stamps.append(self._capture.get(cv2.CAP_PROP_POS_MSEC))
        self._reopen()
        if len(stamps) < 2 or not stamps[-1] > stamps[0]:
            return None
        fps = (len(stamps) - 1) * 1000.0 / (stamps[-1] - stamps[0])
        return fps if 0.5 <= fps <= 1000 else None  # frames 1 ms apart: a high-speed camera's

    def _read_past_bad_frames(self) -> tuple[int, np.ndarray | None]:
        if not self.info.frames:  # none announced (a Matroska written live): read on while reads give frames
            return read_past_bad_frames(self._capture, None)
        return read_past_bad_frames(self._capture, self.info.frames - self.start - self.frames_read - 1)

    def _seek(self, start: int) -> None:
        """Put the capture before frame `start`. FFmpeg's seek goes to the keyframe before it
        and decodes forward (exact on the MP4s checked, B-frames included); when the position
        it reports is not `start`, read the frames before it instead."""
        if self._capture.set(cv2.CAP_PROP_POS_FRAMES, start) and \
                int(self._capture.get(cv2.CAP_PROP_POS_FRAMES)) == start:
            return
        log.debug("%s: seeking to frame %d missed; reading up to it", self.path, start)
        self._reopen()
        for _ in range(start):
            if not self._capture.grab():
                break

    def _reopen(self) -> None:
        """The capture opened again, before frame 0 (what is known of a truncation kept)."""
        truncated, truncation = self.truncated, self.truncation
        self.__exit__()
        self._capture = self._open()
        self.truncated, self.truncation = truncated, truncation

    def _open(self):
        capture = cv2.VideoCapture(opencv_path(self.path))
        if not capture.isOpened():
            capture.release()
            capture = self._open_complete_part()
        return capture

    def _open_complete_part(self):
        from camface.realtime.fmp4 import PrefixReader, complete_length

        try:
            length = complete_length(self.path)
        except OSError as exc:  # e.g. no read permission: why OpenCV did not open it either
            raise SourceError(f"cannot open video file {self.path}: {exc.strerror or exc}") from exc
        if length is not None:
            self._prefix = PrefixReader(self.path, length)
            try:
                capture = cv2.VideoCapture(self._prefix, cv2.CAP_FFMPEG, [])
            except (cv2.error, TypeError):  # an OpenCV that cannot read from a stream
                capture = None
            if capture is not None and capture.isOpened():
                self.truncated = True
                self.truncation = (f"it ends inside an MP4 box: only its first {length} of "
                                   f"{self.path.stat().st_size} bytes are readable")
                log.warning("%s is cut short (it ends inside an MP4 box); reading its first %d of %d bytes",
                            self.path, length, self.path.stat().st_size)
                return capture
            self._close_prefix()
        raise SourceError(f"cannot open video file {self.path}: not a video OpenCV can decode")

    def _close_prefix(self) -> None:
        if self._prefix is not None:
            self._prefix.close()
            self._prefix = None

    def __exit__(self, *exc) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        self._close_prefix()

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._iterated:  # a second iteration plays it again from `start`, as a folder's does
            self._seek(self.start)  # (it gave no frame: the capture stood at the end)
            self.frames_read = 0
        self._iterated = True
        wanted = None if self.stop is None else self.stop - self.start
        self.bad_frames = 0
        while wanted is None or self.frames_read < wanted:
            ok, frame = self._capture.read()
            if not ok or frame is None:
                bad, frame = self._read_past_bad_frames()
                if frame is None:
                    break
                if wanted is not None:  # the range may end among them (the good frame read past it)
                    bad = min(bad, wanted - self.frames_read)
                frame = to_bgr8(frame)
                for _ in range(bad):  # each in its place, so later frames keep their numbers
                    log.warning("%s: frame %d does not decode; the frame after it is shown in its place",
                                self.path, self.start + self.frames_read)
                    self.frames_read += 1
                    self.bad_frames += 1
                    yield frame.copy()  # a copy: the live loop draws on the frames it is given
                if wanted is not None and self.frames_read >= wanted:
                    break
            self.frames_read += 1
            yield to_bgr8(frame)
        if self.frames_read == 0 and self.start == 0 and wanted != 0:
            raise SourceError(f"no frame could be read from video file {self.path}")
        expected = self.info.frames
        if expected:
            expected = max(0, min(expected, expected if self.stop is None else self.stop) - self.start)
        if self.truncated or (expected and self.frames_read < expected):
            self.truncated = True
            if expected and self.frames_read < expected:  # the header's count says more than the boxes
                self.truncation = "fewer frames decode than its header announces"
            self.truncation = self.truncation or "fewer frames decode than its header announces"
            of = f" of {expected}" if expected and expected > self.frames_read else ""
            log.warning("%s ended early: read %d%s frames (file truncated or damaged)",
                        self.path, self.frames_read, of)


def _natural_key(path: Path) -> tuple:
    """frame2 before frame10; names equal but for case or leading zeros ("a.jpg", "A.jpg";
    "1.png", "01.png") then by the name itself, not by the folder listing's order (which
    differs between file systems and runs)."""
    parts = [int(part) if part.isascii() and part.isdigit() else part.lower()
             for part in re.split(r"([0-9]+)", path.name)]
    return parts, path.name


class ImageFolderSource:
    """The images of a folder (or one image file), in natural name order, at `fps`.

    Frames may differ in size; unreadable files are skipped with a warning.
    """

    def __init__(self, path: str | Path, fps: float = DEFAULT_FPS):
        self.path = Path(path)
        self.fps = fps
        self.files: list[Path] = []

    def __enter__(self) -> "ImageFolderSource":
        if self.path.is_dir():
            try:
                self.files = sorted((p for p in self.path.iterdir()
                                     if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=_natural_key)
            except OSError as exc:  # a folder the user may not list: a traceback, and exit 1
                raise SourceError(f"cannot list folder {self.path}: {exc.strerror or exc}") from exc
            if not self.files:
                raise SourceError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {self.path}")
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise SourceError(f"image folder not found: {self.path}")
        self.info = SourceInfo(str(self.path), self.fps, len(self.files), live=False, still=True)
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __iter__(self) -> Iterator[np.ndarray]:
        read = 0
        for path in self.files:
            # any depth and colour as stored (to_bgr8 converts), turned upright by its EXIF
            # orientation as viewers show it (IMREAD_UNCHANGED would ignore it: phone portraits
            # would lie on their side, their faces missed)
            image, why = imread(path, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
            if image is None:
                log.warning("skipping %s: %s", path, why)
                continue
            if (why := cut_short(path)) is not None:
                log.warning("%s: %s", path, why)
            try:
                frame = to_bgr8(image)
            except ValueError as exc:  # e.g. a signed 16-bit TIFF
                log.warning("skipping %s: %s", path, exc)
                continue
            read += 1
            yield frame
        if read == 0:
            raise SourceError(f"none of the {len(self.files)} image files in {self.path} could be read")


# ---------------------------------------------------------------------------- live
# Cameras and streams: camface.realtime.live_source (imported below, after what it uses).


# ---------------------------------------------------------------------------- choosing


def _camera_opens(index: int) -> bool:
    capture = cv2.VideoCapture(index)
    try:
        return capture.isOpened()
    finally:
        capture.release()


def __getattr__(name: str):
    """`LiveSource` lives in camface.realtime.live_source (which builds on this module)."""
    if name == "LiveSource":
        from camface.realtime.live_source import LiveSource

        return LiveSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MAX_CAMERA_INDEX = 2 ** 31 - 1  # OpenCV takes a C int
SOURCE_KINDS = "a camera index, a video file, a folder of images, a stream URL or 'sample'"  # what --source takes
FIXED_KINDS = "a video file, a folder of images or 'sample'"  # what needs the same frames each run takes


def is_camera_index(spec: str | None) -> bool:
    """True when the `--source` value `spec` names a camera by its index ("0", "1", ...)."""
    return isinstance(spec, str) and spec.isascii() and spec.isdigit()  # not "²" or "٣" (int("²") raises)


def is_stream_url(spec: str | None) -> bool:
    """True when the `--source` value `spec` is a stream URL (rtsp://, http(s)://, udp://, ...):
    any "scheme://" but file://, which `make_source` hands to OpenCV/FFmpeg as it is."""
    return isinstance(spec, str) and "://" in spec and not spec[:7].lower() == "file://"


def local_spec(spec: str, windows: bool = os.name == "nt") -> str:
    """`spec` with a file:// URL of this machine (file:///data/clip.mp4, file://localhost/...,
    file://127.0.0.1/..., file://[::1]/...; on Windows, `windows`, file:///C:/data/clip.mp4, and
    file://server/share/... a share's UNC path) as the path it names, so that it is read as that file or folder, not as a stream; any
    other value as it is (one naming no path, file:// or file://localhost, too: "" would be the
    current folder)."""
    if spec[:7].lower() != "file://":
        return spec
    from urllib.parse import urlsplit

    if windows:  # what urllib.request's is on Windows
        from nturl2path import url2pathname
    else:
        from urllib.request import url2pathname

    parts = urlsplit(spec)
    here = _this_machine(parts.netloc)
    # a loopback address before a path with no drive names a share of this machine, as pathlib
    # writes \\127.0.0.1\c$\clip.mp4: file://127.0.0.1/c%24/clip.mp4 (not \c$\clip.mp4)
    drive = len(parts.path) > 2 and parts.path[0] == "/" and parts.path[1].isalpha() and parts.path[2] in ":|"
    share = not here or (parts.netloc.lower() not in ("", "localhost") and not drive)
    if windows and share and "@" not in parts.netloc and parts.path:
        # a host's share (\\server\share\clip.mp4: Path.as_uri() writes file://server/share/...)
        return url2pathname(f"//{parts.netloc}{parts.path}")
    return url2pathname(parts.path) if here and parts.path else spec


def _this_machine(netloc: str) -> bool:
    """True when a file URL's host part `netloc` names this machine: none, localhost (host names
    are case-insensitive: LOCALHOST too) or a loopback address (127.0.0.1, [::1]); not one with a
    user name or a port, nor any other host."""
    import ipaddress

    host = netloc.lower()
    if host in ("", "localhost"):
        return True
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address is written in brackets
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name (or user@host, host:port): another machine's
        return False


def _sample(frames: int | None):
    """The sample clip, `frames` long (bench's --frames; None: its 300 frames)."""
    from camface.realtime.sample import MAX_FRAMES, SampleSource

    if frames is None:
        return SampleSource()
    if frames > MAX_FRAMES:
        raise SourceError(f"--frames {frames}: the sample clip is drawn ahead into a temporary file, at most "
                          f"{MAX_FRAMES} frames (20 minutes at 30 fps); time a longer run on a video file or camera")
    return SampleSource(frames=frames)


def make_source(spec: str | None, sample_frames: int | None = None, *, api: bool = False) -> Source:
    """The source for a `--source` value (not yet entered).

    spec: a camera index ("0"), a video file, a folder of images (or one image), a stream URL
    (rtsp://, http(s)://...), "sample", or None: camera 0 if it opens, else the sample clip
    (with one log line saying so). api: messages name the Python API's `source`, not the flag.
    """
    from camface.realtime.config import option
    from camface.realtime.live_source import LiveSource

    if spec is None:
        if _camera_opens(0):
            return LiveSource(0)
        log.info("camface: no camera 0 could be opened; playing the sample clip instead (%s)",
                 option("source", "sample", api=api))
        return _sample(sample_frames)
    if not spec.strip():  # Path("") is the current folder: an empty value is a mistake, not "."
        raise SourceError(f"{option('source', api=api)} is empty (expected a camera index, a video file, "
                          "a folder of images, a stream URL or 'sample')")
    if spec == "sample":
        return _sample(sample_frames)
    spec = local_spec(spec)
    if is_camera_index(spec) and int(spec) <= MAX_CAMERA_INDEX:
        return LiveSource(int(spec))
    if is_stream_url(spec):
        return LiveSource(spec)
    path = Path(spec)
    if path.is_dir() or (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
        return ImageFolderSource(path)
    if path.is_file():
        return VideoFileSource(path)
    if is_camera_index(spec):  # OpenCV raised a bare cv2.error on it (a traceback, exit 1)
        raise SourceError(f"camera index {spec} is too large: camera indices are 0, 1, ... (0 is the first camera)")
    if re.fullmatch(r"-[0-9]+", spec):  # OpenCV's -1 is "any camera": say which to give instead
        raise SourceError(f"camera index {spec} is negative: camera indices are 0, 1, ... "
                          "(0 is the first camera)")
    if path.exists():  # a device (/dev/video0) or a pipe: it was "not found"
        camera = re.fullmatch(r"/dev/video([0-9]+)", os.path.realpath(spec))
        hint = f"this camera is {option('source', int(camera.group(1)), api=api)}" if camera else "a camera is given by its index: 0, 1, ..."
        raise SourceError(f"source {spec} is neither a video file nor a folder of images (a device or a pipe); {hint}")
    from camface.outputs import shown

    raise SourceError(f"source not found: {shown(redact(spec))} (expected {SOURCE_KINDS})")  # file://user:pw@host/...


def _a_live_stream(url: str) -> bool:
    """Whether the http(s) `url` opens as a live stream, not as a video file behind it (whose
    server gives its length: the same frames on every run); raises SourceError when it does not
    open at all."""
    source = make_source(url)
    source.reconnects = 0
    with source:
        return source.info.live


def check_source(spec: str, flag: str, *, no_camera: str | None = None) -> Source:
    """The source for `spec` (not yet entered), or SourceError naming `flag` and `spec` now,
    before any model loads, when `spec` names no camera, stream, file or folder, a folder that
    holds no image, or a file that is not a video (cameras and streams are opened only when read:
    they are not tried here). no_camera: what needs the same frames on every run
    ("calibration": its crops set the ranking and int8 ranges a graph records), which then refuses
    a camera index and a stream URL too (each was opened, or failed to, only after the whole
    build; a live source gives other frames on every run): an http(s) URL is opened now to tell
    a live stream from a video file behind it, which is taken."""
    kinds = FIXED_KINDS if no_camera else SOURCE_KINDS
    if not spec.strip():  # make_source's words name --source: "--calibration: --source is empty"
        raise SourceError(f"{flag} is empty (expected {kinds})")
    from camface.outputs import shown

    try:
        if no_camera and is_camera_index(spec):
            raise SourceError(f"{spec} is a camera index; {no_camera} needs a video file or a folder of "
                              "images (or 'sample', the bundled clip), not a camera")
        if no_camera and is_stream_url(spec):  # was opened, or failed to, only after the whole build
            if not spec[:8].lower().startswith(("http://", "https://")) or _a_live_stream(spec):
                raise SourceError(f"{shown(redact(spec))} is a stream URL; {no_camera} needs a video file or a "
                                  "folder of images (or 'sample', the bundled clip), not a stream (a video file "
                                  "behind an http(s) URL is one when its server gives its length)")
        path = Path(local_spec(spec))
        if no_camera and spec != "sample" and not is_stream_url(spec) and not (path.is_file() or path.is_dir()):
            # make_source's words offer a camera ("expected a camera index, ...", "camera indices
            # are 0, 1, ...", "this camera is --source 0"): this flag takes none
            if path.exists():
                raise SourceError(f"source {spec} is neither a video file nor a folder of images (a device or a "
                                  f"pipe; expected {kinds})")
            raise SourceError(f"source not found: {shown(redact(spec))} (expected {kinds})")
        opened = make_source(spec)
        if isinstance(opened, ImageFolderSource):
            with opened:
                pass
        elif isinstance(opened, VideoFileSource):  # a .txt or a damaged clip failed only once it was read
            opened.check()
    except SourceError as exc:
        raise SourceError(f"{flag}: {exc}") from exc
    return opened
