"""The live loop: source -> detect -> crop -> classify + explain -> smooth -> render -> sink.

Threads joined by bounded queues, so decoding and encoding overlap detection and inference
on another core (OpenCV, MediaPipe and ONNX Runtime release the GIL):

  reader      decodes frames from the source                      -> frames queue
  detector(s) MediaPipe face detection                            -> detections queue
  main        crop, one graph call, smooth, render, window + keys -> output queue
  writer      mp4 recording and snapshots

Detection is the costliest stage, and MediaPipe runs one detector on one core. With
`detect_workers` > 1, that many detectors (each its own MediaPipe instance, in VIDEO mode with
its own increasing timestamps) take frames from the one frames queue; the main thread puts
their results back in frame order, so every later stage still sees frames 0, 1, 2, ...

The main thread owns the window (GUI toolkits want it) and receives the signals: Ctrl-C
raises KeyboardInterrupt and SIGTERM raises `Terminated` there; every exit path then stops
the reader and detector, lets the writer drain what was already processed and finalises the
recording, so the file holds every processed frame and stays playable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camface.errors import CamfaceError, ModelError
from camface.realtime.results import FrameResult, Prediction
from camface.realtime.timing import RateMeter, StageStats, StageTimer
from camface.realtime.window import QUIT, RECORD, SNAPSHOT, Controls, apply_key

log = logging.getLogger(__name__)

STAGES = ("decode", "detect", "crop", "classify", "render", "encode")
HUD_STAGES = ("detect", "classify", "render")
QUEUE_SIZE = 4  # items between each pair of threads
MAX_DETECT_WORKERS = 8
_END = object()


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt, so `except Exception` in
    library code cannot swallow it)."""

    exit_code = 143


class _Failure:
    """An exception travelling down the pipeline from a worker thread.

    index: the frame a detector failed on; None for the reader (after every frame it read).
    """

    def __init__(self, exc: BaseException, index: int | None = None):
        self.exc = exc
        self.index = index


@dataclass(frozen=True)
class LiveConfig:
    """Everything `camface live` was asked to do (built from the command line)."""

    source: str | None = None
    model: Path | None = None  # None: the bundled emotion graph
    method: str = "gradcam"
    record: Path | None = None
    show: bool = False
    detector: str = "full"
    min_confidence: float = 0.5
    max_faces: int = 8
    margin: float = 0.1
    device: str = "auto"
    smooth: float = 0.0
    cam_boxes: bool = False
    bars: bool = False
    colormap: str = "jet"
    alpha: float = 0.45
    snapshot_every: int = 0
    snapshot_dir: Path = Path("snapshots")
    overwrite: bool = False
    max_frames: int | None = None
    progress: bool = False
    graph_threads: int = 1
    detect_workers: int = 0  # 0: auto (see detect_workers_for)
    quiet_native: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.max_faces <= 32:
            raise ValueError(f"--max-faces must be 1..32 (the graph's batch range), got {self.max_faces}")
        if self.margin < 0:
            raise ValueError(f"--margin must be >= 0, got {self.margin}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"--min-confidence must be in [0, 1], got {self.min_confidence}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"--max-frames must be >= 1, got {self.max_frames}")
        if self.snapshot_every < 0:
            raise ValueError(f"--snapshot-every must be >= 0, got {self.snapshot_every}")
        if not 0 <= self.detect_workers <= MAX_DETECT_WORKERS:
            raise ValueError(f"--detect-workers must be 0 (auto) .. {MAX_DETECT_WORKERS}, got {self.detect_workers}")


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

    @property
    def faces_per_frame(self) -> float:
        return self.faces / self.frames if self.frames else 0.0

    def _stage_text(self, stage: str) -> str:
        text = f"{self.stages[stage].median_ms:.1f} ms {stage}"
        if stage == "detect" and self.detectors > 1:  # each detector's own frames: a latency
            text += f" ({self.detectors} detectors side by side)"
        return text

    def line(self) -> str:
        """One line: 'Speed: 2.3 ms detect, 1.1 ms classify, 0.4 ms render per frame; ...'."""
        ms = ", ".join(self._stage_text(s) for s in HUD_STAGES if s in self.stages)
        text = (f"Speed: {ms or 'n/a'} per frame; {self.frames} frames, "
                f"{self.faces_per_frame:.1f} faces/frame, {self.fps:.0f} fps")
        for path, written in self.recordings:
            text += f"; recorded {written} frames to {path}"
        if self.snapshots:
            text += f"; {self.snapshots} snapshot(s)"
        if self.stopped_by != "end of input":
            text += f" ({self.stopped_by})"
        return text


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put, waiting while the queue is full; False if `stop` was set meanwhile."""
    while True:
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            if stop.is_set():
                return False


def _get(q: queue.Queue, stop: threading.Event | None = None):
    """Get, waiting (interruptibly) for an item; _END once `stop` is set and nothing comes."""
    while True:
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            if stop is not None and stop.is_set():
                return _END


def _in_order(inbox: queue.Queue, producers: int, slots: threading.Semaphore | None = None):
    """Yield (index, frame, faces) from `producers` detector threads in frame order.

    Each producer sends increasing indices and then one _END (or a _Failure, after which it
    stops); together they cover 0, 1, 2, ... without gaps. A failure is raised once every
    frame before it has been yielded, so nothing already read is lost: a detector's failure
    on frame k after frames 0..k-1, the reader's after every frame it read. `slots` gets one
    release per frame yielded (the reader takes one per frame read: see LiveLoop._read).
    """
    pending: dict[int, tuple] = {}
    wanted = ended = 0
    failure: _Failure | None = None
    while True:
        while wanted in pending:
            if slots is not None:
                slots.release()
            yield pending.pop(wanted)
            wanted += 1
        if failure is not None and (ended == producers or (failure.index is not None and wanted >= failure.index)):
            raise failure.exc
        if ended == producers:
            return
        item = _get(inbox)
        if item is _END:
            ended += 1
        elif isinstance(item, _Failure):
            ended += 1  # its producer has stopped
            earlier = item.index is not None and (failure is None or failure.index is None or item.index < failure.index)
            if failure is None or earlier:
                failure = item
        else:
            pending[item[0]] = item


def _acquire(slots: threading.Semaphore, stop: threading.Event) -> bool:
    """Take a slot, waiting while none is free; False if `stop` was set meanwhile."""
    while not slots.acquire(timeout=0.05):
        if stop.is_set():
            return False
    return True


@contextlib.contextmanager
def sigterm_raises():
    """While the block runs, SIGTERM raises Terminated in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_held():
    """Ignore SIGINT/SIGTERM while the block runs (finalising the recording must finish)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _opencv_single_threaded():
    """OpenCV's own worker threads only add contention: the pipeline's stages already run
    in parallel, one thread each."""
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


class _Writer:
    """The writer thread's work: recording (toggled by key r) and snapshots."""

    def __init__(self, first_record: Path | None, fps: float, overwrite: bool, snapshots, timer: StageTimer):
        from camface.realtime.sinks import VideoSink

        self._make_sink = lambda path, ow: VideoSink(path, fps, ow)
        self.sink = self._make_sink(first_record, overwrite) if first_record else None
        self.first_record, self.overwrite = first_record, overwrite
        self.snapshots, self.timer = snapshots, timer
        self.recordings: list[tuple[str, int]] = []
        self.error: BaseException | None = None
        self._takes = 0

    def _next_path(self) -> Path:
        self._takes += 1
        base = self.first_record or Path(time.strftime("camface-%Y%m%d-%H%M%S.mp4"))
        candidate = base
        n = 1
        while candidate.exists():
            n += 1
            candidate = base.with_name(f"{base.stem}-{n}{base.suffix}")
        return candidate

    def toggle(self) -> None:
        if self.sink is not None:
            self.close_sink()
            log.info("recording stopped")
        else:
            self.sink = self._make_sink(self._next_path(), False)
            log.info("recording to %s", self.sink.path)

    def close_sink(self) -> None:
        if self.sink is not None:
            self.sink.close()
            if self.sink.frames_written:
                self.recordings.append((str(self.sink.path), self.sink.frames_written))
            self.sink = None

    def handle(self, item) -> None:
        frame, raw, crops, result, snapshot, toggle = item
        if toggle:
            self.toggle()
        if self.sink is not None:
            with self.timer.stage("encode"):
                self.sink.write(frame)
        if snapshot and self.snapshots is not None and raw is not None:
            with self.timer.stage("snapshot"):
                self.snapshots.save(raw, crops, result)

    def run(self, inbox: queue.Queue) -> None:
        try:
            while True:
                item = inbox.get()
                if item is _END:
                    return
                if self.error is None:
                    try:
                        self.handle(item)
                    except BaseException as exc:  # reported by the main thread; keep draining
                        self.error = exc
        finally:
            self.close_sink()


class LiveLoop:
    """Runs `config` once: `run() -> RunSummary`.

    source: an un-entered source to use instead of `config.source` (tests, benchmarks).
    window: a Window-like object (`show(frame) -> key`, `closed`) for window mode; by default
    an OpenCV window when `config.show`.
    """

    def __init__(self, config: LiveConfig, source=None, window=None):
        self.config = config
        self.timer = StageTimer(STAGES)
        self.rate = RateMeter()
        self._source = source
        self._window = window
        self.summary: RunSummary | None = None

    # ---------------------------------------------------------------- worker threads

    def _read(self, source, out: queue.Queue, stop: threading.Event, consumers: int,
              slots: threading.Semaphore) -> None:
        """Decode frames into `out`, then one _END per consumer (each detector stops on its own).

        A frame is read only when one of `slots` is free: the main thread frees one per frame
        it takes, which bounds the frames between here and there even if one detector stalls
        while another runs ahead. A failure goes to one consumer, _END to the others.
        """
        failed = 0
        try:
            frames = iter(source)
            index = 0
            limit = self.config.max_frames
            while not stop.is_set() and (limit is None or index < limit):
                if not _acquire(slots, stop):
                    return
                start = time.perf_counter()
                frame = next(frames, None)
                if frame is None:
                    break
                self.timer.add("decode", time.perf_counter() - start)
                if not _put(out, (index, frame), stop):
                    return
                index += 1
        except BaseException as exc:
            _put(out, _Failure(exc), stop)
            failed = 1
        for _ in range(consumers - failed):
            _put(out, _END, stop)

    def _detect(self, detector, inbox: queue.Queue, out: queue.Queue, stop: threading.Event) -> None:
        index = None
        try:
            while True:
                item = _get(inbox, stop)
                if item is _END or isinstance(item, _Failure):
                    _put(out, item, stop)
                    return
                index, frame = item
                start = time.perf_counter()
                faces = detector.detect(frame)
                self.timer.add("detect", time.perf_counter() - start)
                if not _put(out, (index, frame, faces), stop):
                    return
        except BaseException as exc:
            _put(out, _Failure(exc, index), stop)

    # ---------------------------------------------------------------- main thread

    def run(self) -> RunSummary:
        from camface.models import DETECTORS, EMOTION_ONNX
        from camface.realtime.detect import FaceDetector
        from camface.realtime.graph import CamGraph
        from camface.realtime.render import Renderer
        from camface.outputs import check_output_file
        from camface.realtime.smooth import Smoother
        from camface.realtime.snapshot import SnapshotWriter
        from camface.realtime.sources import make_source

        cfg = self.config
        if cfg.record is not None:  # fail before any model or camera is opened
            check_output_file(cfg.record, cfg.overwrite)
        renderer = Renderer(cfg.colormap, cfg.alpha, cfg.cam_boxes, cfg.bars)
        model_path = Path(cfg.model) if cfg.model else EMOTION_ONNX
        graph = CamGraph(model_path, cfg.device, threads=cfg.graph_threads)
        if cfg.method != "none" and cfg.method not in graph.methods:
            reason = f" ({graph.info.cam_unavailable_reason})" if graph.info.cam_unavailable_reason else ""
            raise ModelError(f"{model_path} has no {cfg.method!r} heatmap{reason}; "
                             f"it offers {', '.join(graph.methods) or 'none'}")
        graph.run(np.zeros((1, *graph.info.input_size, graph.info.channels), np.uint8),
                  np.array([-1], np.int64), cfg.method)  # warm-up: first ORT run allocates
        source = self._source if self._source is not None else make_source(cfg.source)
        with source, contextlib.ExitStack() as detectors_open:
            detectors = [detectors_open.enter_context(FaceDetector(DETECTORS[cfg.detector], cfg.min_confidence,
                                                                   cfg.quiet_native))
                         for _ in range(detect_workers_for(cfg.detect_workers, cfg.graph_threads, source.info.live))]
            snapshots = None
            if cfg.snapshot_every or cfg.show:
                snapshots = SnapshotWriter(cfg.snapshot_dir, source.info.name, model_path, graph.info)
            writer = _Writer(cfg.record, source.info.fps, cfg.overwrite, snapshots, self.timer)
            smoother = Smoother(cfg.smooth) if cfg.smooth > 0 else None
            window = self._window
            if window is None and cfg.show:
                from camface.realtime.window import Window
                window = Window()
            with contextlib.ExitStack() as stack:
                if window is not None and hasattr(window, "__enter__"):
                    stack.enter_context(window)
                stack.enter_context(_opencv_single_threaded())
                self._pipeline(cfg, source, detectors, graph, renderer, smoother, writer, window)
        return self.summary

    def _pipeline(self, cfg, source, detectors, graph, renderer, smoother, writer, window) -> None:
        from camface.realtime.crop import crop_faces

        stop = threading.Event()
        frames_q: queue.Queue = queue.Queue(QUEUE_SIZE)
        detections_q: queue.Queue = queue.Queue(QUEUE_SIZE)
        output_q: queue.Queue = queue.Queue(QUEUE_SIZE)
        slots = threading.Semaphore(2 * QUEUE_SIZE + len(detectors))  # frames read but not yet taken
        threads = [threading.Thread(target=self._read, args=(source, frames_q, stop, len(detectors), slots),
                                    name="camface-reader", daemon=True)]
        threads += [threading.Thread(target=self._detect, args=(detector, frames_q, detections_q, stop),
                                     name=f"camface-detector-{n}", daemon=True)
                    for n, detector in enumerate(detectors)]
        writer_thread = threading.Thread(target=writer.run, args=(output_q,), name="camface-writer", daemon=True)

        info = graph.info
        controls = Controls(method=cfg.method)
        methods = graph.methods
        frames = faces_total = dropped_total = 0
        hud_ms: dict[str, float] = {}
        snapshot_requested = False
        stopped_by = "end of input"
        progress = None
        if cfg.progress:
            from tqdm import tqdm
            total = source.info.frames
            if cfg.max_frames is not None and total is not None:
                total = min(total, cfg.max_frames)
            progress = tqdm(total=total, unit="frame", file=sys.stderr, mininterval=0.5, leave=False)
        empty = np.zeros((0, *info.input_size, info.channels), np.uint8)
        started = time.perf_counter()
        writer_thread.start()
        for thread in threads:
            thread.start()
        try:
            with sigterm_raises():
                for index, frame, faces in _in_order(detections_q, len(detectors), slots):
                    if writer.error is not None:
                        raise writer.error
                    start = time.perf_counter()
                    dropped = max(0, len(faces) - cfg.max_faces)
                    faces = faces[: cfg.max_faces]
                    snapshot = (snapshot_requested or (cfg.snapshot_every > 0 and index % cfg.snapshot_every == 0))
                    snapshot_requested = False
                    raw = frame.copy() if snapshot and writer.snapshots is not None else None
                    crops, faces = crop_faces(frame, faces, cfg.margin, info.input_size, info.color_order) \
                        if faces else (empty, ())
                    after_crop = time.perf_counter()
                    self.timer.add("crop", after_crop - start)
                    predictions: tuple[Prediction, ...] = ()
                    if faces:
                        if controls.explained is not None:
                            wanted = np.full(len(faces), controls.explained, np.int64)
                        elif smoother is not None:  # explain what the smoothed label will say
                            wanted = smoother.explain_classes(faces)
                        else:
                            wanted = np.full(len(faces), -1, np.int64)
                        probs, heatmaps = graph.run(crops, wanted, controls.method)
                        predicted = probs.argmax(axis=1)
                        predictions = tuple(
                            Prediction(probs=probs[i], heatmap=heatmaps[i], predicted=int(predicted[i]),
                                       explained=int(predicted[i]) if wanted[i] < 0 else int(wanted[i]),
                                       method=controls.method)
                            for i in range(len(faces)))
                    after_classify = time.perf_counter()
                    self.timer.add("classify", after_classify - after_crop)
                    if frames % 15 == 0:
                        stats = self.timer.medians_ms()
                        hud_ms = {s: stats[s] for s in HUD_STAGES if s in stats}
                    result = FrameResult(index=index, faces=faces, predictions=predictions, dropped=dropped,
                                         method=controls.method, explained_class=controls.explained,
                                         labels=info.labels, fps=self.rate.rolling_fps, stage_ms=hud_ms,
                                         provider=graph.provider)
                    if smoother is not None:
                        result = smoother.update(result)
                    renderer.hud = controls.hud
                    renderer.annotate(frame, result)
                    self.timer.add("render", time.perf_counter() - after_classify)
                    toggle = False
                    if window is not None:
                        key = window.show(frame)
                        controls, command = apply_key(controls, key, methods, len(info.labels))
                        if command == SNAPSHOT:
                            snapshot_requested = True
                        elif command == RECORD:
                            toggle = True
                        elif command == QUIT or getattr(window, "closed", False):
                            stopped_by = "quit"
                    _put(output_q, (frame, raw, crops, result, snapshot, toggle), threading.Event())
                    frames += 1
                    faces_total += len(faces)
                    dropped_total += dropped
                    self.rate.tick()
                    if progress is not None:
                        progress.update(1)
                    if stopped_by == "quit":
                        break
        except KeyboardInterrupt:
            stopped_by = "interrupted"
            raise
        except Terminated:
            stopped_by = "terminated"
            raise
        except BaseException as exc:
            stopped_by = f"stopped: {exc}" if isinstance(exc, CamfaceError) else f"failed: {type(exc).__name__}"
            raise
        finally:
            with _signals_held():
                stop.set()
                output_q.put(_END)
                writer_thread.join()
                deadline = time.monotonic() + 5
                for thread in threads:
                    thread.join(timeout=max(0.0, deadline - time.monotonic()))
                writer.close_sink()
                if progress is not None:
                    progress.close()
                self.summary = RunSummary(
                    frames=frames, faces=faces_total, dropped=dropped_total, fps=self.rate.overall_fps,
                    wall_s=time.perf_counter() - started, stages=self.timer.stats(), provider=graph.provider,
                    source=source.info.name, recordings=tuple(writer.recordings),
                    snapshots=writer.snapshots.count if writer.snapshots is not None else 0,
                    stopped_by=stopped_by, detectors=len(detectors))
        if writer.error is not None:
            raise writer.error
