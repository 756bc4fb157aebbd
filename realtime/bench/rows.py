"""The rows of `camface bench`: the real live loop, and the same stages one after the other in
one thread (with the CAM graph, or with the Keras baseline), each on the same frames.
End-to-end fps counts frame completions: N completion times hold N-1 intervals."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from camface.realtime.bench.machine import peak_rss_mb
from camface.realtime.loop import QUEUE_SIZE, STAGES

if TYPE_CHECKING:
    from camface.realtime.bench.config import BenchConfig


@dataclass(frozen=True)
class Row:
    """One pipeline's figures over `frames` timed frames.

    fps: end-to-end frames per second from frame completion times ((frames - 1) / span_s).
    wall_s: from the first frame requested to the pipeline shut down (>= span_s).
    stages: stage name -> StageStats (milliseconds). peak_rss_mb: the process's peak resident
    memory after this row (cumulative: rows run in order, the live row first).
    cpu_ms_per_frame: CPU time of all threads per frame (less sensitive than wall time to other
    work on a shared machine; 1000 x cores / cpu_ms_per_frame bounds the fps of an idle machine);
    None when it cannot be separated from start-up.
    """

    name: str
    frames: int
    faces: int
    fps: float
    wall_s: float
    stages: dict = field(default_factory=dict)
    provider: str = ""
    peak_rss_mb: float = 0.0
    cpu_ms_per_frame: float | None = None

    @property
    def faces_per_frame(self) -> float:
        return self.faces / self.frames if self.frames else 0.0

    @property
    def ms_per_frame(self) -> float:
        return 1000.0 / self.fps if self.fps > 0 else float("inf")

    @property
    def span_s(self) -> float:
        return (self.frames - 1) / self.fps if self.fps > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "name": self.name, "frames": self.frames, "faces": self.faces,
            "faces_per_frame": self.faces_per_frame, "fps": self.fps, "ms_per_frame": self.ms_per_frame,
            "span_s": self.span_s, "wall_s": self.wall_s, "provider": self.provider,
            "peak_rss_mb": self.peak_rss_mb, "cpu_ms_per_frame": self.cpu_ms_per_frame,
            "stages": {name: {"median_ms": s.median_ms, "p95_ms": s.p95_ms, "mean_ms": s.mean_ms,
                              "count": s.count} for name, s in self.stages.items()},
        }


# Frames before the end of a run for the last CPU mark: more than are in flight in the loop's
# queues (read ahead of the main thread: 2 x QUEUE_SIZE + one per detector; waiting for the
# writer: QUEUE_SIZE), so the reader and detectors still run at that mark as at the first.
MARK_TAIL = 3 * QUEUE_SIZE + 6  # room for up to 6 detectors


def cpu_marks(frames: int, detectors: int = 2) -> tuple[int, int] | None:
    """(first, last) frames between which a run of `frames` frames is timed for CPU: after its
    first tenth (first-frame costs) and far enough before its end that the reader and the
    `detectors` detector threads still run at the last mark as they did at the first (after
    it they stop, and the threads' work in flight differs from the rest of the run); None
    when that leaves fewer than 20 frames."""
    first, last = max(1, frames // 10), frames - max(MARK_TAIL, 3 * QUEUE_SIZE + detectors)
    return (first, last) if last - first >= 20 else None


def run_live(config: BenchConfig, model: Path, record_dir: Path | None, name: str = "camface live") -> Row:
    """The real live loop on the first `config.frames` frames, after an untimed run on the
    first `config.warmup` frames (first-frame costs: codec set-up, caches, page faults). CPU
    per frame: between `cpu_marks` of the timed run."""
    from camface.realtime.loop import LiveLoop
    from camface.realtime.sources import make_source

    def loop_config(frames: int, record: Path | None):
        return config.pipeline.replace(model=model, record=record, show=False, overwrite=True, max_frames=frames,
                                       progress=False)

    def record(stem: str) -> Path | None:
        return record_dir / f"{name.replace(' ', '-')}-{stem}.mp4" if record_dir is not None else None

    warmup_cpu_s, warmup_frames = 0.0, 0
    if config.warmup:
        cpu_start = time.process_time()
        warmup_frames = LiveLoop(loop_config(config.warmup, record("live-warmup")),
                                 source=make_source(config.pipeline.source, sample_frames=config.frames)).run().frames
        warmup_cpu_s = time.process_time() - cpu_start
    marks = cpu_marks(config.frames, max(2, config.pipeline.detect_workers))
    cpu_start = time.process_time()
    summary = LiveLoop(loop_config(config.frames, record("live")),
                       source=make_source(config.pipeline.source, sample_frames=config.frames), cpu_marks=marks).run()
    cpu_s = time.process_time() - cpu_start
    # CPU per frame of the steady state: between the marks inside the timed run; else (a run
    # too short, or a source that ended early) the timed run less the warm-up run, which pay
    # the same start-up (graph session, detector, threads).
    cpu_ms = summary.cpu_ms_per_frame
    if cpu_ms is None and warmup_frames and summary.frames > warmup_frames and cpu_s > warmup_cpu_s:
        cpu_ms = 1000 * (cpu_s - warmup_cpu_s) / (summary.frames - warmup_frames)
    return Row(name, summary.frames, summary.faces, summary.fps, summary.wall_s,
               dict(summary.stages), summary.provider, peak_rss_mb(), cpu_ms)


def compare_detect_every(every: int, carried: Row, every_frame: Row) -> dict:
    """The live row with the detector on every `every`-th frame against the one with it on
    every frame (same frames, same run): CPU time per frame and fps, and their ratios."""
    def ratio(a, b):
        return a / b if a and b else None

    return {"every": every, "cpu_ms_per_frame": carried.cpu_ms_per_frame,
            "every_frame_cpu_ms_per_frame": every_frame.cpu_ms_per_frame,
            "cpu_ratio": ratio(every_frame.cpu_ms_per_frame, carried.cpu_ms_per_frame),
            "fps_ratio": ratio(carried.fps, every_frame.fps)}


class ExplainerGraph:
    """Another explainer (the Keras baseline: `explain(crops, class_index) -> (probs, heatmaps)`)
    dressed as the CamGraph that FrameExplainer calls, so the baseline row runs the same frame
    pipeline as the ONNX row; it computes Grad-CAM only."""

    def __init__(self, explainer, info, method: str = "gradcam"):
        self._explainer, self.info, self.method = explainer, info, method
        self.provider, self.path, self.methods = explainer.provider, Path(info.source_model or "keras"), (method,)

    def run(self, crops, class_index, method):
        return self._explainer.explain(crops, class_index)


def run_sequential(name: str, config: BenchConfig, graph, method: str, record_dir: Path | None,
                   every: int) -> Row:
    """decode -> detect -> explain -> render -> encode, one frame after the other in this
    thread, on the same frames as `run_live`, with the detector on every `every`-th frame as the
    live row has it (`every_for` of the source and options); `graph` is a CamGraph (or an
    ExplainerGraph). CPU per frame: the whole timed pass (opening the source and the sink
    included), which the baseline's per-frame cost dwarfs."""
    from camface.api import face_detector
    from camface.realtime.carry import BoxCarrier
    from camface.realtime.render import Renderer
    from camface.realtime.timing import RateMeter, StageTimer

    pipeline = config.pipeline.replace(method=method)
    renderer = Renderer.from_config(pipeline)
    with face_detector(pipeline) as blazeface:
        detector = BoxCarrier(blazeface, every)  # a fresh one per pass: frames from 0
        if config.warmup:
            _sequential_pass(config, pipeline, graph, detector, renderer, config.warmup,
                             record_dir / f"{name}-warmup.mp4" if record_dir else None, StageTimer(), RateMeter())
            detector = BoxCarrier(blazeface, detector.every)
        timer, rate = StageTimer(STAGES), RateMeter()
        started, cpu_start = time.perf_counter(), time.process_time()
        frames, faces = _sequential_pass(config, pipeline, graph, detector, renderer, config.frames,
                                         record_dir / f"{name}.mp4" if record_dir else None, timer, rate)
        wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_start
    return Row(name, frames, faces, rate.overall_fps, wall_s, timer.stats(), graph.provider, peak_rss_mb(),
               1000 * cpu_s / frames if frames else None)


def _sequential_pass(config, pipeline, graph, detector, renderer, limit, record, timer, rate):
    from camface.realtime.explainer import FrameExplainer
    from camface.realtime.loop import HUD_EVERY
    from camface.realtime.summary import hud_stage_ms
    from camface.realtime.sinks import VideoSink
    from camface.realtime.sources import make_source
    from camface.realtime.controls import Controls

    explainer = FrameExplainer(graph, pipeline.margin, pipeline.max_faces, pipeline.smooth, timer)
    controls = Controls(method=pipeline.method)
    hud_ms: dict[str, float] = {}
    frames = faces_total = 0
    with make_source(pipeline.source, sample_frames=config.frames) as source, contextlib.ExitStack() as stack:
        sink = stack.enter_context(VideoSink(record, source.info.fps, overwrite=True, codec=pipeline.codec)) if record else None
        stream = iter(source)
        while frames < limit:
            start = time.perf_counter()
            frame = next(stream, None)
            if frame is None:
                break
            timer.add("decode", time.perf_counter() - start)
            with timer.stage("detect"):
                faces = detector.detect(frame, frames)
            if frames % HUD_EVERY == 0:
                hud_ms = hud_stage_ms(timer, detector.every)
            result = explainer.explain(frame, faces, controls, frames, rate.rolling_fps, hud_ms).result
            with timer.stage("render"):
                renderer.annotate(frame, result)
            if sink is not None:
                with timer.stage("encode"):
                    sink.write(frame)
            rate.tick()
            frames += 1
            faces_total += len(result.faces)
    return frames, faces_total
