"""Quieting native libraries (LiteRT/XNNPACK, CUDA stubs, absl) that write straight to file
descriptor 2, bypassing Python's logging. Used by the detector and the Keras baseline."""

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
