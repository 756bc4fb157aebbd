"""Soak run of the live loop: the sample clip looped for --frames frames, headless, recording on.

Reports resident-memory growth after warm-up, open file descriptors before and after, and
fps of the first versus the last thousand frames (from the times frames left the source;
with bounded queues the source runs at the loop's pace).

    .venv/bin/python benchmarks/live_soak.py [--frames 20000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from camface.realtime.loop import LiveConfig, LiveLoop  # noqa: E402
from camface.realtime.sample import SampleSource  # noqa: E402
from camface.realtime.sources import SourceInfo  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class LoopedSample:
    """The sample clip, replayed until `frames` frames were delivered; records when each left."""

    def __init__(self, frames: int):
        self.frames = frames
        self.times: list[float] = []
        self.info = SourceInfo("sample (looped)", 30.0, frames, live=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def __iter__(self):
        delivered = 0
        while delivered < self.frames:
            with SampleSource() as clip:
                for frame in clip:
                    if delivered >= self.frames:
                        return
                    self.times.append(time.perf_counter())
                    delivered += 1
                    yield frame


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--detector", choices=("short", "full"), default="full")
    args = parser.parse_args()

    fds_before = open_fds()
    samples: list[tuple[int, float]] = []
    source = LoopedSample(args.frames)
    done = threading.Event()

    def watch():
        while not done.wait(1.0):
            samples.append((len(source.times), rss_mb()))

    watcher = threading.Thread(target=watch, daemon=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = LiveConfig(source="sample", detector=args.detector, record=Path(tmp) / "soak.mp4",
                            snapshot_every=1000, snapshot_dir=Path(tmp) / "snaps")
        loop = LiveLoop(config, source=source)
        watcher.start()
        summary = loop.run()
        done.set()
        watcher.join()
        fds_after = open_fds()
    print(summary.line())
    warm = [rss for frames, rss in samples if frames >= 1000] or [rss for _, rss in samples]
    times = source.times
    first = (1000 - 1) / (times[999] - times[0]) if len(times) >= 1000 else float("nan")
    last = (1000 - 1) / (times[-1] - times[-1000]) if len(times) >= 2000 else float("nan")
    print(f"frames {summary.frames}; RSS after warm-up (1000 frames) {warm[0]:.1f} MB, at the end "
          f"{warm[-1]:.1f} MB, peak {max(warm):.1f} MB: growth {warm[-1] - warm[0]:+.1f} MB (target < 30 MB)")
    print(f"open file descriptors: {fds_before} before, {fds_after} after")
    print(f"fps first 1000 frames {first:.0f}, last 1000 frames {last:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
