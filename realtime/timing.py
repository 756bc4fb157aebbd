"""Per-stage timing with `time.perf_counter`: median and p95 milliseconds per stage, and
frames per second from frame completion times (N timestamps hold N-1 intervals).

Buffers are fixed-size rings, so a run of any length uses bounded memory; statistics cover
the last `capacity` samples. A ring may be written from several threads (the detectors share
the "detect" stage).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


class Ring:
    """The last `capacity` float samples."""

    def __init__(self, capacity: int = 4096):
        self._data = np.zeros(capacity, np.float64)
        self._count = 0
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:  # `_count += 1` is a read then a write: not atomic without a GIL
            self._data[self._count % len(self._data)] = value
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def values(self) -> np.ndarray:
        return self._data[: min(self._count, len(self._data))].copy()


@dataclass(frozen=True)
class StageStats:
    name: str
    count: int
    median_ms: float
    p95_ms: float
    mean_ms: float


class StageTimer:
    """Named stages; `with timer.stage("detect"): ...` or `timer.add("detect", seconds)`."""

    def __init__(self, stages: tuple[str, ...] = (), capacity: int = 4096):
        self._capacity = capacity
        self._rings: dict[str, Ring] = {name: Ring(capacity) for name in stages}
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        ring = self._rings.get(name)
        if ring is None:
            with self._lock:
                ring = self._rings.setdefault(name, Ring(self._capacity))
        ring.add(seconds)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def stats(self) -> dict[str, StageStats]:
        out = {}
        for name, ring in list(self._rings.items()):
            values = ring.values() * 1000.0
            if values.size:
                out[name] = StageStats(name, ring.count, float(np.median(values)),
                                       float(np.percentile(values, 95)), float(values.mean()))
        return out

    def medians_ms(self) -> dict[str, float]:
        return {name: s.median_ms for name, s in self.stats().items()}


def fps_text(fps: float) -> str:
    """A frame rate as the HUD and the summary line print it: whole numbers from 10 fps up,
    two significant digits below (a folder's images held 2 s each run at 0.5 fps, not 0)."""
    return f"{fps:.0f}" if fps >= 10 or fps == 0 else f"{fps:.2g}"


class RateMeter:
    """Frames per second over the last `window` frame completions, and over the whole run."""

    def __init__(self, window: int = 60):
        self._times = Ring(window)
        self._first: float | None = None
        self._last: float | None = None
        self.frames = 0

    def tick(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self._first is None:
            self._first = now
        self._last = now
        self._times.add(now)
        self.frames += 1

    @property
    def rolling_fps(self) -> float:
        times = self._times.values()
        if times.size < 2:
            return 0.0
        span = times.max() - times.min()
        return (times.size - 1) / span if span > 0 else 0.0

    @property
    def overall_fps(self) -> float:
        if self.frames < 2 or self._last is None or self._last <= self._first:
            return 0.0
        return (self.frames - 1) / (self._last - self._first)
