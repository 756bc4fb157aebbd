"""Playing a file in a window at its own speed, and starting it again at its end.

`Pacer` holds each shown frame until its time on a schedule (frame k at start + k x period),
so the time spent processing a frame is absorbed instead of added, and a late frame re-bases
the schedule rather than piling up a debt that would then play in fast motion. It never
drops a frame: it only waits. `pace_period` decides when pacing applies: files, folders and
the sample shown in a window (or always with `--pace source`); never cameras and streams,
which the device already paces. `LoopingSource` starts a file, folder or the sample again
at its end until the run is stopped (`--loop`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from camface.errors import SourceError
from camface.realtime.config import PACES

log = logging.getLogger(__name__)


def pace_period(pace: str, info, shown: bool, image_seconds: float) -> float | None:
    """Seconds between shown frames, or None for no pacing.

    pace: auto (paced when `shown` in a window), source (always), none. info: the source's
    SourceInfo: live sources are never paced; folders of images (`info.still`) hold each image
    `image_seconds`; files and the sample play at `info.fps`."""
    if pace not in PACES:
        raise ValueError(f"--pace must be one of {', '.join(PACES)}, got {pace!r}")
    if pace == "none" or info.live or (pace == "auto" and not shown):
        return None
    if getattr(info, "still", False):
        return image_seconds
    return 1.0 / info.fps if info.fps > 0 else None


class Pacer:
    """`wait()` before showing each frame: returns once the frame's time has come.

    period: seconds per frame. clock / sleep: injectable for tests (perf_counter, time.sleep).
    `hold(seconds)` shifts the schedule after a pause so play resumes where it stopped."""

    def __init__(self, period: float, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep):
        if period <= 0:
            raise ValueError(f"pacing period must be > 0 s, got {period}")
        self.period, self._clock, self._sleep = period, clock, sleep
        self._due: float | None = None

    def wait(self, poll: Callable[[], bool] | None = None, slice_s: float = 0.05) -> None:
        """Return once the next frame's time has come. poll: called every `slice_s` while
        waiting longer than that (a window keeps drawing and reading keys: a folder's image is
        held for seconds); it returns True to stop waiting (the user quit)."""
        now = self._clock()
        if self._due is None or now > self._due + self.period:  # first frame, or late: re-base
            self._due = now
        while now < self._due:
            step = self._due - now
            if poll is not None and step > slice_s:
                self._sleep(slice_s)
                if poll():
                    break
            else:
                self._sleep(step)
            now = self._clock()
        self._due += self.period

    def hold(self, seconds: float) -> None:
        """The schedule moves on by `seconds` (time spent paused)."""
        if self._due is not None:
            self._due += seconds

    @property
    def fps(self) -> float:
        return 1.0 / self.period


class LoopingSource:
    """A file, folder or sample source played again from the start at its end, until the
    consumer stops iterating. Its info says frames=None (endless). Each pass re-enters the
    wrapped source; a pass that yields no frame ends the loop (instead of spinning)."""

    def __init__(self, source):
        self.source = source
        self.passes = 0

    def __enter__(self) -> "LoopingSource":
        self.source.__enter__()
        if self.source.info.live:
            self.source.__exit__(None, None, None)
            raise SourceError(f"--loop plays files, folders and the sample again; {self.source.info.name} "
                              "is a camera or stream")
        self.info = replace(self.source.info, frames=None)
        return self

    def __exit__(self, *exc) -> None:
        self.source.__exit__(*exc)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            got = 0
            for frame in self.source:
                got += 1
                yield frame
            self.passes += 1
            if got == 0:
                return
            log.debug("%s: pass %d done, starting again", self.info.name, self.passes)
            self.source.__exit__(None, None, None)
            self.source.__enter__()
