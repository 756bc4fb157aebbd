"""Quieting native libraries (LiteRT/XNNPACK, CUDA stubs, absl, x264, TensorFlow's import) that
write straight to file descriptor 2, bypassing Python's logging (used by the detector, the Keras
baseline, the H.264 writer and the command line), and
handing OpenCV the paths it can take (`opencv_path`)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading


class _Fd2Silencer:
    """File descriptor 2 is one per process, so its silencing is too: the first block to enter
    points fd 2 at /dev/null, the last one to leave points it back. `camface serve` opens and
    closes detectors from several threads at once; with one dup/dup2 per block, two blocks
    interleaving would "restore" /dev/null and lose the server's log for good."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: int | None = None

    def enter(self, target: int | None = None) -> bool:
        """Point fd 2 at `target` (a file descriptor; None: /dev/null) unless an outer block has
        already pointed it elsewhere: True when this block's target gets the lines."""
        with self._lock:
            first = self._depth == 0
            if first:
                sys.stderr.flush()
                self._saved = os.dup(2)
                if target is not None:
                    os.dup2(target, 2)
                else:
                    with open(os.devnull, "wb") as devnull:
                        os.dup2(devnull.fileno(), 2)
            self._depth += 1
            return first

    def leave(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                os.dup2(self._saved, 2)
                os.close(self._saved)
                self._saved = None


_FD2 = _Fd2Silencer()  # one per process, as fd 2 is


def write_to_stderr(data: bytes) -> None:
    """Write `data` to the stderr the process had before any block here pointed fd 2 elsewhere (a
    capture's file, /dev/null): for a line that must be seen even while another thread's block
    holds fd 2 (an encoder's capture whose writer hangs: the forced exit's line went into the
    capture's file, which the exit dropped). Takes no lock, so it may run in a signal handler
    (the lock's holder may be the thread it interrupted); a block that ends meanwhile closes the
    saved descriptor, and fd 2 itself is then written. Errors are dropped (a stderr nobody reads:
    EPIPE)."""
    saved = _FD2._saved
    for fd in (2,) if saved is None else (saved, 2):
        try:
            os.write(fd, data)
            return
        except OSError:
            continue


# One capture at a time: fd 2 goes to one capture's file, so a second capture entering meanwhile
# (serve opening two clients' encoders at once) got none of its lines, and the first got both
# encoders' (one client's error naming the other's refusal). Re-entrant: a capture nested in
# the same thread gets no lines (as inside a silencing block) instead of waiting for itself.
_CAPTURE = threading.RLock()


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool = True):
    """Silence C++ log lines written straight to file descriptor 2 (LiteRT/XNNPACK start-up
    chatter) while the block runs. Python-level logging is unaffected after the block. Safe
    from several threads at once: fd 2 is restored when the last block ends (so lines written
    to fd 2 by any thread while some block runs are silenced too)."""
    if not enabled:
        yield
        return
    _FD2.enter()
    try:
        yield
    finally:
        _FD2.leave()


@contextlib.contextmanager
def native_stderr_captured(prefix: str = ""):
    """Hold back what native code writes straight to file descriptor 2 while the block runs
    (x264 prints why it refuses a preset there, beside the error camface raises): yields a list
    that gets those lines starting with `prefix` once the block ends, for the caller to put in
    its own message. fd 2 is the process's: the other lines (another thread's log line written
    meanwhile) are written back to it then, not taken for the caller's. Empty when a
    `quiet_native_stderr` block of another thread had fd 2 silenced already. Captures of several
    threads take turns (each gets its own lines): the blocks should be short (an encoder's open)."""
    import tempfile

    lines: list[str] = []
    with _CAPTURE, tempfile.TemporaryFile() as file:
        mine = _FD2.enter(file.fileno())
        try:
            yield lines
        finally:
            _FD2.leave()
            if mine:
                file.seek(0)
                others = []
                for raw in file.read().splitlines(keepends=True):
                    line = raw.decode("utf-8", "replace").strip()
                    if not line:
                        continue
                    if line.startswith(prefix):
                        lines.append(line)
                    else:
                        others.append(raw)
                if others:
                    with contextlib.suppress(OSError):
                        os.write(2, b"".join(others))


class QuietImport:
    """A `sys.meta_path` entry that finds nothing itself: the import of module `name` found by
    the finders after it runs with file descriptor 2 silenced (`quiet_native_stderr`). TensorFlow
    2.21 writes absl's "All log messages before absl::InitializeLog() is called are written to
    STDERR", oneDNN's and the CUDA stub's lines (six lines) to fd 2 as it is imported, whatever
    TF_CPP_MIN_LOG_LEVEL says, before every `camface export`, `train`, `guided` or `enroll`
    output. An import that fails still says why: the exception is raised once fd 2 is back."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            run = loader.exec_module

            def exec_module(module):
                with quiet_native_stderr():
                    run(module)

            loader.exec_module = exec_module  # (this spec's own loader: nothing else's)
        return spec


def quiet_tensorflow_import() -> None:
    """Silence TensorFlow's start-up lines (`QuietImport`) wherever this process imports it
    later; nothing when it is imported already. Importing it stays where it is needed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules and not any(isinstance(f, QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, QuietImport("tensorflow"))


def quiet_opencv_logs() -> None:
    """Silence OpenCV's and FFmpeg's own log lines, which camface's one error line says better:
    a camera index that does not open printed a dozen WARN and ERROR lines and an OpenCV
    exception's text, a damaged clip FFmpeg's "moov atom not found". For the OpenCV this
    process imports later, and the one it has imported."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # read when FFmpeg first opens a file
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and os.environ["OPENCV_LOG_LEVEL"] == "SILENT":
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def opencv_path(path: str | os.PathLike[str]) -> str | bytes:
    """`path` as OpenCV's functions (imread, imwrite, VideoCapture, VideoWriter) take it: a
    str, or the file system's bytes when the name is not valid UTF-8 (a name in Latin-1 from an
    old archive or camera card, which Python holds with surrogates: OpenCV 5.1 crashed the
    process on such a str, a segmentation fault that left no error and no finalised recording)."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text)
    return text
