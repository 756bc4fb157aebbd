"""Helpers for the `camface serve` tests that run the real command in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from realtime_helpers import sigint_as_from_a_terminal


def start_server(tmp_path: Path, *argv: str):
    """`camface serve --port 0 ...` in a subprocess (folders under tmp_path); returns
    (process, the URL it printed)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "camface", "serve", "--port", "0", "--snapshot-dir", str(tmp_path / "snapshots"),
         "--record-dir", str(tmp_path / "recordings"), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_from_a_terminal)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        match = re.search(r"(https?://\S+)", line)
        if match:
            return process, match.group(1)
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"camface serve printed no URL: {process.stderr.read()}")
