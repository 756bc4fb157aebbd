"""Quieting native libraries (LiteRT/XNNPACK, CUDA stubs, absl) that write straight to file
descriptor 2, bypassing Python's logging (used by the detector and the Keras baseline), and
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

    def enter(self) -> None:
        with self._lock:
            if self._depth == 0:
                sys.stderr.flush()
                self._saved = os.dup(2)
                with open(os.devnull, "wb") as devnull:
                    os.dup2(devnull.fileno(), 2)
            self._depth += 1

    def leave(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                os.dup2(self._saved, 2)
                os.close(self._saved)
                self._saved = None


_FD2 = _Fd2Silencer()  # one per process, as fd 2 is


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
