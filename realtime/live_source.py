"""Live sources: a camera index or a stream URL, read on their own thread so the loop always
gets the newest frame (a slow loop drops frames instead of lagging behind, as Ultralytics'
`LoadStreams` does); streams reconnect with back-off a bounded number of times."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

import cv2
import numpy as np

from camface.errors import SourceError
from camface.realtime.sources import DEFAULT_FPS, SourceInfo, _valid_fps, read_past_bad_frames, redact, to_bgr8

log = logging.getLogger(__name__)



def _open_capture(target: int | str, timeout_s: float):
    """cv2.VideoCapture for a camera index or stream URL, with open/read time-outs for URLs."""
    if isinstance(target, int):
        return cv2.VideoCapture(target)
    ms = int(timeout_s * 1000)
    return cv2.VideoCapture(target, cv2.CAP_FFMPEG,
                            [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])


PLAYLISTS = ("mpegurl", "dash+xml", "multipart/")  # Content-Types of a length that is not the video's:
# an HLS or DASH playlist (a live one too), an MJPEG stream's parts
PLAYLIST_SUFFIXES = (".m3u8", ".m3u", ".mpd")  # the same by the URL's path: a server (a bucket) sending a
# playlist as application/octet-stream or text/plain


LENGTH_WAIT_S = 1.0  # the most a URL FFmpeg has just opened waits for its server's headers (a
# server that answered FFmpeg answers the same GET within a round trip or two; one that does not
# is read as a stream, as before)


def served_as_a_file(url: str, timeout_s: float) -> bool:
    """True when the http(s) `url` is a file of known length: its server answers a GET with a
    Content-Length, and not as a playlist (PLAYLISTS). A live stream sent over HTTP has no
    length (chunked, or until the connection closes). Only the status line and headers are read
    (the body is left unread, the connection closed): the request FFmpeg made, so a server that
    answers FFmpeg answers it (a HEAD waited out its whole time-out on a server that ignores
    HEAD, was refused by one signing URLs for GET only). False for other schemes, for a playlist
    by its suffix (PLAYLIST_SUFFIXES, whatever its Content-Type: a live one's length is the
    list's), and when the server cannot be asked (an error, a time-out, a certificate
    not verified: read as a stream then, as before). The URL's user name and password go as Basic authentication,
    as FFmpeg sends them."""
    import base64
    import urllib.parse
    import urllib.request

    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or parts.path.lower().endswith(PLAYLIST_SUFFIXES):
            return False
        headers = {}
        if parts.username is not None:
            user = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode("ascii")
            url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        request = urllib.request.Request(url, method="GET", headers=headers)
        with urllib.request.build_opener(_same_origin_auth()).open(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length", "")
            kind = response.headers.get("Content-Type", "").lower()
    except Exception as exc:  # URLError, HTTPError (a 401), a time-out, a malformed URL
        log.debug("%s: its server was not asked its length: %s", redact(url), redact(str(exc)))
        return False
    return length.strip().isdigit() and int(length) > 0 and not any(p in kind for p in PLAYLISTS)


def _origin(url: str) -> tuple[str, str | None, int | None]:
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())


def _same_origin_auth():
    import urllib.request

    class SameOriginAuth(urllib.request.HTTPRedirectHandler):
        """Follows a redirect without the URL's credentials when it leads to another server
        (urllib passes every header on, Authorization too: the password went to wherever the
        first server pointed)."""

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            if new is not None and _origin(newurl) != _origin(req.full_url):
                new.remove_header("Authorization")
            return new

    return SameOriginAuth


class LiveSource:
    """A camera index or a stream URL, read on a background thread; iteration yields the newest
    frame each time (never the same frame twice).

    fps: the device's own figure, or measured over the first frames when it reports 0/NaN.
    A camera that stops delivering frames, or a stream that stays silent after `reconnects`
    attempts with doubling back-off (backoff_s, 2 x backoff_s, ...), ends the iteration with a
    `SourceError` saying so.

    A URL to a video file (FFmpeg knows its frame count: http(s)://host/clip.mp4, an HLS
    recording; or its server gives its length, `served_as_a_file`: an MPEG-TS behind a server
    that cannot seek, whose frame count then is unknown) is read as a file is: every frame in
    order, no thread, no reconnection, a frame that does not decode read past (`bad_frames`);
    its `info` says live=False and the frame count (None when unknown). The suffix decides
    nothing: a .ts may be a file or a live stream.

    `passes`: how many times a stalled stream was reconnected and went on delivering; the first
    frame after a reconnection does not follow the one before it (a gap of seconds), so the live
    loop detects it afresh instead of carrying the boxes before the stall (as after a pass of
    `--loop`).

    Messages, log lines and `info.name` show a stream URL without its user name and password
    (`redact`). `opener(target, timeout_s)` returns a cv2.VideoCapture-like object (tests pass a fake).
    """

    def __init__(self, target: int | str, timeout_s: float = 5.0, reconnects: int = 3,
                 opener: Callable = _open_capture, backoff_s: float = 0.5):
        self.target = target
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.reconnects = reconnects if isinstance(target, str) else 0
        self._opener = opener
        self._capture = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._frame: np.ndarray | None = None
        self._seq = 0
        self._yielded = 0  # the _seq of the last frame iteration gave (a new iteration goes on from it)
        self._restart = 0  # the _seq of the first frame after the last reconnection (0: none)
        self.passes = 0
        self.bad_frames = 0  # a video file behind a URL: frames that did not decode (see _read_in_order)
        self._error: str | None = None
        self._stop = threading.Event()

    @property
    def _what(self) -> str:
        return f"camera {self.target}" if isinstance(self.target, int) else f"stream {redact(self.target)}"

    def _open(self):
        capture = self._opener(self.target, self.timeout_s)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"{self._what} could not be opened")
        return capture

    def __enter__(self) -> "LiveSource":
        # afresh each time: a source object used again (`process_video(source)` twice) ended
        # after one stale frame, its reader stopped by the first exit
        # entered twice, or its last exit timed out; a video file behind a URL has no reader
        # thread, only its open capture (entered twice, the first was never released)
        if (self._thread is not None and self._thread.is_alive()) or (self._thread is None and self._capture is not None):
            raise SourceError(f"{self._what} is already open: enter a source once (`with` it, or give it "
                              "to process_video, not both)")
        self._stop.clear()
        self._error, self._frame, self._seq, self._yielded, self._restart = None, None, 0, 0, 0
        self._capture = self._open()
        try:
            ok, frame = self._capture.read()
        except BaseException:  # a backend's error, Ctrl-C: `with` will not call __exit__
            self._release()
            raise
        if not ok or frame is None or not frame.size:
            self._release()
            raise SourceError(f"{self._what} opened but delivered no frame")
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        self._frame, self._seq = frame, 1
        self._thread = None
        count = self._capture.get(cv2.CAP_PROP_FRAME_COUNT) if isinstance(self.target, str) else 0
        known = count is not None and math.isfinite(count) and count > 0
        try:
            # FFmpeg knows no length of an MPEG-TS (.ts) behind a server that cannot seek
            # (no Range requests): the server's Content-Length says it is a file all the same
            whole = known or (isinstance(self.target, str) and served_as_a_file(self.target, min(self.timeout_s, LENGTH_WAIT_S)))
        except BaseException:  # Ctrl-C while asking: `with` will not call __exit__
            self._release()
            raise
        if whole:
            # a video file behind a URL (http(s)://host/clip.mp4): FFmpeg knows how long it is.
            # Read on a thread, it decoded as fast as it could (the loop saw a few of its frames)
            # and its end read as a stall: reconnecting played it again, forever.
            if not _valid_fps(fps):
                log.warning("%s reports no frame rate (%s); assuming %g fps", self._what, fps, DEFAULT_FPS)
                fps = DEFAULT_FPS
            if not known:
                log.info("%s: its server gives its length: read as a file (its frame count unknown)", self._what)
            self.info = SourceInfo(redact(self.target), float(fps), int(count) if known else None, live=False)
            return self
        self._thread = threading.Thread(target=self._read_forever, name=f"camface-{self._what}",
                                        daemon=True)
        self._thread.start()
        try:
            if not _valid_fps(fps):
                fps = self._measure_fps()
        except BaseException:  # e.g. Ctrl-C while measuring: `with` will not call __exit__
            self.__exit__(None, None, None)
            raise
        self.info = SourceInfo(redact(str(self.target)), float(fps), None, live=True)
        return self

    def _measure_fps(self, frames: int = 10) -> float:
        """Frame rate from the arrival times of the next `frames` frames (N frames: N-1 gaps)."""
        start_seq, start = self._seq, time.perf_counter()
        deadline = start + 2.0
        with self._cond:
            while self._seq - start_seq < frames and self._error is None and time.perf_counter() < deadline:
                self._cond.wait(0.1)
            got = self._seq - start_seq
        elapsed = time.perf_counter() - start
        fps = got / elapsed if got >= 2 and elapsed > 0 else DEFAULT_FPS
        log.info("%s reports no frame rate; measured %.1f fps", self._what, fps)
        return fps

    def _read_forever(self) -> None:
        """The reader thread. An error it cannot get past ends the iteration with its message
        (never a silent death, after which the consumer would wait out its whole time-out)."""
        try:
            self._read_until_stopped()
        except BaseException as exc:
            with self._cond:
                self._error = f"{self._what} failed after {self._seq} frames: {redact(str(exc))}"
                self._cond.notify_all()
        finally:
            if self._stop.is_set():  # closed: the capture is this thread's to release (see __exit__)
                self._release()

    def _release(self) -> None:
        with self._cond:
            capture, self._capture = self._capture, None
        if capture is not None:
            capture.release()

    def _read_until_stopped(self) -> None:
        failures, attempt = 0, 0
        while not self._stop.is_set():
            try:
                ok, frame = self._capture.read()
            except cv2.error as exc:  # a backend's read error (V4L2 select(), FFmpeg): a failed read
                log.debug("%s: read failed: %s", self._what, exc)
                ok, frame = False, None
            if ok and frame is not None and frame.size:  # some backends say ok with an empty frame
                failures, attempt = 0, 0
                with self._cond:
                    self._frame, self._seq = frame, self._seq + 1
                    self._cond.notify_all()
                continue
            failures += 1
            if failures < 5:  # cameras drop a frame now and then
                time.sleep(0.01)
                continue
            if attempt < self.reconnects:
                delay = self.backoff_s * 2 ** attempt
                attempt += 1
                log.warning("%s stalled; reconnecting in %.1f s (attempt %d of %d)",
                            self._what, delay, attempt, self.reconnects)
                if self._stop.wait(delay):
                    break
                self._capture.release()
                try:
                    self._capture = self._open()
                    failures = 0
                    with self._cond:
                        self._restart = self._seq + 1
                except (SourceError, cv2.error):
                    pass
                continue
            with self._cond:
                self._error = (f"{self._what} stopped delivering frames after {self._seq} frames"
                               + (f" and {self.reconnects} reconnection attempts" if self.reconnects else ""))
                self._cond.notify_all()
            return

    def __iter__(self) -> Iterator[np.ndarray]:
        if not self.info.live:
            yield from self._read_in_order()
            return
        while True:
            with self._cond:
                wait_s = self.timeout_s * (1 + self.reconnects * 2)  # room for the reader's reconnections
                deadline = time.perf_counter() + wait_s
                while self._seq == self._yielded and self._error is None:
                    if self._stop.is_set():
                        return
                    if time.perf_counter() > deadline:
                        self._error = f"{self._what} delivered no frame for {wait_s:g} s"
                        break
                    self._cond.wait(0.05)
                if self._seq == self._yielded and self._error is not None:
                    raise SourceError(self._error)
                if self._yielded < self._restart <= self._seq:  # frames from a reconnection on
                    self.passes += 1
                frame, self._yielded = self._frame, self._seq
            yield self._bgr8(frame)

    def _bgr8(self, frame: np.ndarray) -> np.ndarray:
        """`to_bgr8`, its refusal (a frame format camface cannot use) a SourceError naming the
        camera or stream: a bare ValueError ended `camface live` with a traceback."""
        try:
            return to_bgr8(frame)
        except ValueError as exc:
            raise SourceError(f"{self._what} delivers frames camface cannot use ({exc}): "
                              f"{frame.dtype} {frame.shape}") from exc

    def _read_in_order(self) -> Iterator[np.ndarray]:
        """A video file behind a URL: every frame in order, as a file's (no thread, no reconnection;
        paced like a file in a window). A frame that does not decode with good frames after it
        (within the frames FFmpeg announced, or within MAX_BAD_RUN reads where it announced none:
        a file the server's length said is one) is given as the frame after it, with a warning
        naming it, as VideoFileSource does (`bad_frames` counts them); a read that fails with
        none after it, or times out, ends it, with a warning when fewer frames came than FFmpeg
        announced (none without a count: OpenCV does not say how much of the file it read)."""
        self.bad_frames = 0
        if self._yielded < self._seq:  # the frame read on entering
            self._yielded = self._seq
            yield self._bgr8(self._frame)
        while True:
            try:
                ok, frame = self._capture.read()
            except cv2.error as exc:
                log.debug("%s: read failed: %s", self._what, exc)
                ok, frame = False, None
            if not ok or frame is None or not frame.size:
                # frames announced after the failed one (None: no count, the server's length said file)
                left = None if self.info.frames is None else self.info.frames - self._seq - 1
                bad, frame = read_past_bad_frames(self._capture, left, time.perf_counter() + self.timeout_s)
                if frame is None:
                    break
                frame = self._bgr8(frame)
                for _ in range(bad):  # each in its place, so later frames keep their numbers
                    log.warning("%s: frame %d does not decode; the frame after it is shown in its place",
                                self._what, self._seq)
                    self._seq = self._yielded = self._seq + 1
                    self.bad_frames += 1
                    yield frame.copy()  # a copy: the live loop draws on the frames it is given
            self._seq = self._yielded = self._seq + 1
            yield self._bgr8(frame)
        if self._seq < (self.info.frames or 0):
            log.warning("%s ended early: read %d of %d frames (connection lost or file damaged)",
                        self._what, self._seq, self.info.frames)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 1)
            if self._thread.is_alive():
                # stuck inside the backend (a DNS look-up, a driver): releasing the capture under
                # it can crash FFmpeg, and a reconnection it finishes would open one nobody
                # releases; the thread releases whatever it holds when it returns
                log.warning("%s: its reader did not stop within %g s; it closes the %s when it returns",
                            self._what, self.timeout_s + 1, "camera" if isinstance(self.target, int) else "stream")
                return
        self._release()
