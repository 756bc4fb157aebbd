"""What a live run did (`RunSummary`, the one line printed at its end), and how many detector
threads a run gets (`detect_workers_for`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from camface.realtime.timing import StageStats, fps_text

HUD_STAGES = ("detect", "classify", "render")


def hud_stage_ms(timer, detect_every: int = 1) -> dict[str, float]:
    """The HUD's stage figures: median milliseconds of HUD_STAGES from a StageTimer; for
    detect with `detect_every` > 1 the mean, as the summary line says it (the median would be
    a carried frame's, a tenth of what the detector costs on the frames it runs on)."""
    stats = timer.stats()
    return {stage: stats[stage].mean_ms if stage == "detect" and detect_every > 1 else stats[stage].median_ms
            for stage in HUD_STAGES if stage in stats}


def detect_workers_for(requested: int, graph_threads: int = 1, live: bool = False, cpus: int | None = None) -> int:
    """How many detector threads to run: `requested`, or for 0 (auto) one per core, at most 2.

    Two detectors raise throughput, not latency: on two cores (sample clip, 1,500 frames, 5
    interleaved pairs) they ran 1.03-1.13x the frames per second of one (median 1.10x), while
    each detection took about twice as long. So auto gives 1 for a `live` source (a camera or
    stream sends 30-60 frames a second, which one detector keeps up with, and a frame should
    reach the screen soon), and 1 when the graph gets every core (`graph_threads` 0, for large
    graphs: the graph is then the slow stage and a second detector only competes with it).
    More cores may gain from more detectors, which `--detect-workers N` asks for.
    """
    if requested:
        return requested
    if live or graph_threads == 0:
        return 1
    cpus = cpus if cpus is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                          else os.cpu_count() or 1)
    return max(1, min(2, cpus))


@dataclass(frozen=True)
class RunSummary:
    """What a run did. fps: end-to-end throughput (frame completions, N-1 intervals)."""

    frames: int
    faces: int
    dropped: int
    fps: float
    wall_s: float
    stages: dict[str, StageStats]
    provider: str
    source: str
    recordings: tuple[tuple[str, int], ...] = ()  # (path, frames written)
    snapshots: int = 0
    stopped_by: str = "end of input"
    detectors: int = 1  # detector threads, each timing its own frames
    pace_fps: float = 0.0  # frames held to this rate for display (0: as fast as possible)
    paused_s: float = 0.0  # time spent paused (space key)
    still: bool = False  # the source was a folder of images (pacing holds each one)
    detect_every: int = 1  # the detector ran on key frames 0, N, 2N, ... (camface.realtime.carry)
    detections: int = 0  # detector runs: key frames and re-detections
    # Process CPU time per frame between LiveLoop's `cpu_marks`: the steady state, without
    # start-up (camface bench); None without marks or when the run stopped before the last.
    cpu_ms_per_frame: float | None = None

    @property
    def faces_per_frame(self) -> float:
        return self.faces / self.frames if self.frames else 0.0

    def _stage_text(self, stage: str) -> str:
        text = f"{self.stages[stage].median_ms:.1f} ms {stage}"
        if stage == "detect" and self.detect_every > 1:  # the median is a carried frame's
            carried = ", boxes carried on the others" if self.detections < self.frames else ""
            text = (f"{self.stages[stage].mean_ms:.1f} ms detect (mean; detector on {self.detections} of "
                    f"{self.frames} frames{carried})")
        elif stage == "detect" and self.detectors > 1:  # each detector's own frames: a latency
            text += f" ({self.detectors} detectors side by side)"
        return text

    def line(self) -> str:
        """One line: 'Speed: 2.3 ms detect, 1.1 ms classify, 0.4 ms render per frame; ...'."""
        ms = ", ".join(self._stage_text(s) for s in HUD_STAGES if s in self.stages)
        # one frame has no interval to time: its rate is no 0 fps (a photo given as --source)
        rate = f"{fps_text(self.fps)} fps" if self.frames != 1 else "no rate (one frame)"
        text = (f"Speed: {ms or 'n/a'} per frame; {self.frames} frame{'s' if self.frames != 1 else ''}, "
                f"{self.faces_per_frame:.1f} faces/frame, {rate}")
        if self.pace_fps and self.frames != 1:
            text += (f" (each image held {1 / self.pace_fps:.3g} s)" if self.still else
                     f" (paced to the source's {self.pace_fps:.3g} fps)")
        for path, written in self.recordings:
            text += f"; recorded {written} frames to {path}"
        if self.snapshots:
            text += f"; {self.snapshots} snapshot(s)"
        if self.paused_s:
            text += f"; paused {self.paused_s:.1f} s"
        if self.stopped_by != "end of input":
            text += f" ({self.stopped_by})"
        return text
