"""Quieting native libraries (LiteRT/XNNPACK, CUDA stubs, absl) that write straight to file
descriptor 2, bypassing Python's logging. Used by the detector and the Keras baseline."""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool = True):
    """Silence C++ log lines written straight to file descriptor 2 (LiteRT/XNNPACK start-up
    chatter) while the block runs. Python-level logging is unaffected after the block."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
