"""The real OpenCV window on a virtual display: keys typed with xdotool drive the loop.

Needs Xvfb and xdotool (Debian packages `xvfb`, `xdotool`; `.ci/run` installs them when it
can). Skipped where they are missing: the key handling itself is tested without a display in
test_live_loop.py (`apply_key`, fake window)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from realtime_helpers import count_frames, write_clip

from camface.realtime.sample import SampleSource

pytestmark = pytest.mark.skipif(not (shutil.which("Xvfb") and shutil.which("xdotool")),
                                reason="needs Xvfb and xdotool")


@pytest.fixture
def display():
    number = 90 + os.getpid() % 9
    server = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = Path(f"/tmp/.X11-unix/X{number}")  # Xvfb's socket: it answers clients once this exists
    deadline = time.monotonic() + 60
    while not ready.exists() and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # not a fixed second: a loaded machine may start Xvfb slower
    if not ready.exists():
        server.kill()
        raise AssertionError(f"Xvfb :{number} did not start (exit code {server.poll()})")
    try:
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def _window_id(env: dict, process: subprocess.Popen, timeout_s: float = 60.0) -> str:
    """The X window id of camface's window, once it appears; else an AssertionError with what
    the camface `process` wrote (it may have ended, or run on without a window)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        found = subprocess.run(["xdotool", "search", "--name", "^camface$"], env=env,
                               capture_output=True, text=True)
        if found.stdout.strip():
            return found.stdout.split()[0]
        time.sleep(0.2)
    if process.poll() is None:
        process.kill()
    _, err = process.communicate(timeout=30)
    raise AssertionError(f"the camface window never appeared (camface exit {process.returncode}): {err[-3000:]}")


def test_keys_in_a_real_window(tmp_path, display):
    clip = SampleSource()
    frames = [clip.frame(i) for i in range(300)]
    source = write_clip(tmp_path / "long.mp4", frames * 4)  # 1,200 frames: outlasts the keys
    out = tmp_path / "window.mp4"
    env = {**os.environ, "DISPLAY": display, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen(
        [sys.executable, "-m", "camface", "live", "--source", str(source), "--record", str(out),
         "--snapshot-dir", str(tmp_path / "snaps"), "--method", "gradcam"],  # --show is automatic with a display
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        window = _window_id(env, process)
        # arrows and Shift must do nothing (their low bytes read as 'Q', 'R', 'S', 'T'), then:
        # next method, pause for 1.5 s and resume (space), one snapshot, quit
        for key, wait in (("Left", 0.3), ("Up", 0.3), ("Right", 0.3), ("Down", 0.3), ("shift", 0.3), ("m", 0.3),
                          ("space", 1.5), ("space", 0.3), ("s", 0.3), ("q", 0.3)):
            subprocess.run(["xdotool", "key", "--window", window, key], env=env, check=True)
            time.sleep(wait)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "(quit)" in err, err
    processed = int(err.split(" frames, ")[0].rsplit(" ", 1)[-1])
    assert 0 < processed < 1200 and count_frames(out) == processed
    # the window played the file at its 30 fps (about 4 s of keys, 1.5 s of them paused)
    assert "paced to the source's 30 fps" in err, err
    paused = float(err.split("; paused ")[1].split(" s")[0])
    assert 1.0 <= paused <= 3.0, err
    assert processed <= 30 * 6, err
    snapshots = list((tmp_path / "snaps").iterdir())
    assert len(snapshots) == 1 and (snapshots[0] / "snapshot.json").is_file()
    assert '"method": "gradcampp"' in (snapshots[0] / "snapshot.json").read_text()  # after m
