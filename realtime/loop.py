"""The live loop: source -> detect -> explain (crop, classify + explain, smooth) -> render -> sink.

Threads joined by bounded queues, so decoding and encoding overlap detection and inference
on another core (OpenCV, MediaPipe and ONNX Runtime release the GIL):

  reader      decodes frames from the source                      -> frames queue
  detector(s) BlazeFace face detection (`--detector-runtime`)      -> detections queue
  main        FrameExplainer, render, window + keys               -> output queue
  writer      recording and snapshots (camface.realtime.recorder)

Detection is the costliest stage, and one detector runs on one core. With `detect_workers` > 1,
that many detectors (each its own ONNX Runtime session, or MediaPipe instance in VIDEO mode
with its own increasing timestamps) take frames from the one frames queue; the main thread puts
their results back in frame order, so every later stage still sees frames 0, 1, 2, ...

The main thread owns the window (GUI toolkits want it) and receives the signals: Ctrl-C
raises KeyboardInterrupt and SIGTERM raises `Terminated` there; every exit path then stops
the reader and detector, lets the writer drain what was already processed and finalises the
recording, so the file holds every processed frame and stays playable. The queue and signal
plumbing is `camface.realtime.threads`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import sys
import threading
import time

from camface.errors import CamfaceError
from camface.realtime.config import LiveConfig
from camface.realtime.recorder import Output, Recorder
from camface.realtime.summary import RunSummary, detect_workers_for, hud_stage_ms
from camface.realtime.threads import (END, Failure, Terminated, acquire, get, in_order, opencv_single_threaded,
                                      put, sigterm_raises, signals_deferred, stop_then_held)
from camface.realtime.timing import RateMeter, StageTimer
from camface.realtime.controls import QUIT, RECORD, SNAPSHOT, Controls
from camface.realtime.viewer import SNAPSHOT_SHOWN, Viewer

log = logging.getLogger(__name__)

__all__ = ["LiveConfig", "LiveLoop", "RunSummary", "Terminated", "detect_workers_for", "sigterm_raises"]

STAGES = ("decode", "detect", "crop", "classify", "render", "encode")
HUD_EVERY = 15  # frames between refreshes of the HUD's stage times
QUEUE_SIZE = 4  # items between each pair of threads
JOIN_TIMEOUT_S = 5.0  # how long the shutdown waits for the reader and detectors, all together
NOTICE_S = 5.0  # how long a notice (a recording key r could not start) stays on screen


class LiveLoop:
    """Runs `config` once: `run() -> RunSummary`.

    source: an un-entered source to use instead of `config.source` (tests, benchmarks).
    window: a Window-like object (`show(frame) -> key`, `closed`) for window mode; by default
    an OpenCV window when `config.show`.
    cpu_marks: (first, last) frame counts, 0 < first < last: the summary's `cpu_ms_per_frame`
    is then the process CPU time from the moment `first` frames were done to the moment `last`
    were, over last - first (benchmarks: the steady state of one run, without start-up; both
    marks while the reader and detector still run ahead, so each thread's work in between is
    that of last - first frames).
    clock: seconds, monotonic; stamps a live source's frames as the reader reads them, for a
    recording (tests: a fake).
    """

    def __init__(self, config: LiveConfig, source=None, window=None, cpu_marks: tuple[int, int] | None = None,
                 clock=time.monotonic):
        if cpu_marks is not None and not 0 < cpu_marks[0] < cpu_marks[1]:
            raise ValueError(f"cpu_marks must be 0 < first < last, got {cpu_marks}")
        self.config = config
        self.cpu_marks = cpu_marks
        self.timer = StageTimer(STAGES)
        self.rate = RateMeter()
        self._source = source
        self._window = window
        self._clock = clock  # times a camera's frames for recordings (tests pass a fake one)
        self._read_at: dict[int, float] = {}  # frame index -> self._clock() when the reader read it
        self.summary: RunSummary | None = None
        self._busy_detectors: set[int] = set()  # detectors whose thread outlived the shutdown's wait

    # ---------------------------------------------------------------- worker threads

    def _read(self, source, out: queue.Queue, stop: threading.Event, consumers: int,
              slots: threading.Semaphore) -> None:
        """Decode frames into `out`, then one END per consumer (each detector stops on its own).

        A frame is read only when one of `slots` is free: the main thread frees one per frame
        it takes, which bounds the frames between here and there even if one detector stalls
        while another runs ahead. A failure goes to one consumer, END to the others.
        """
        failed = 0
        try:
            frames = iter(source)
            stamp = source.info.live  # a camera's frame is timed when it was read, not when it was shown
            index = 0
            limit = self.config.max_frames
            # a LoopingSource's passes, a LiveSource's reconnections: a new one is a cut
            passes = getattr(source, "passes", 0)
            while not stop.is_set() and (limit is None or index < limit):
                if not acquire(slots, stop):
                    return
                start = time.perf_counter()
                frame = next(frames, None)
                if frame is None:
                    break
                self.timer.add("decode", time.perf_counter() - start)
                if stamp:
                    self._read_at[index] = self._clock()  # popped by the main thread (a dict: GIL-atomic)
                now = getattr(source, "passes", 0)
                cut, passes = now != passes, now
                if not put(out, (index, frame, cut), stop):
                    return
                index += 1
        except BaseException as exc:
            put(out, Failure(exc), stop)
            failed = 1
        for _ in range(consumers - failed):
            put(out, END, stop)

    def _detect(self, detector, inbox: queue.Queue, out: queue.Queue, stop: threading.Event) -> None:
        """detector: a BoxCarrier (`detect(frame, index, cut)`; cut: a looped source's first
        frame of a pass, or a stream's first after a reconnection, which does not follow the
        frame before it)."""
        index = None
        try:
            while True:
                item = get(inbox, stop)
                if item is END or isinstance(item, Failure):
                    put(out, item, stop)
                    return
                index, frame, cut = item
                start = time.perf_counter()
                faces = detector.detect(frame, index, cut)
                self.timer.add("detect", time.perf_counter() - start)
                if not put(out, (index, frame, faces, cut), stop):
                    return
        except BaseException as exc:
            put(out, Failure(exc, index), stop)

    # ---------------------------------------------------------------- main thread

    def run(self) -> RunSummary:
        from camface.api import load
        from camface.realtime.carry import BoxCarrier, every_for
        from camface.outputs import check_not_an_input
        from camface.realtime.pace import LoopingSource
        from camface.realtime.sinks import check_record_file, encoder_for
        from camface.realtime.snapshot import SnapshotWriter
        from camface.realtime.sources import check_source, make_source

        cfg = self.config
        if cfg.record is not None:  # fail before any model or camera is opened
            check_not_an_input(cfg.record, [cfg.source], "--record")  # --overwrite would wipe the video read
            check_record_file(cfg.record, cfg.overwrite)
        if cfg.record is not None or cfg.show or self._window is not None:
            # --codec h264 without an H.264 encoder: an error now, not at key r; a run that
            # records nothing (no --record, no window for key r) never uses the codec
            encoder_for(cfg.codec)
        if cfg.snapshot_every or cfg.show:
            SnapshotWriter.check_folder(cfg.snapshot_dir)
        # a source that is not there is said before the model loads (nothing is opened yet), and
        # so are a folder without images and a file that is no video (a damaged clip was said only
        # once the model had loaded); None tries camera 0, else plays the sample
        source = self._source
        if source is None:
            source = make_source(None) if cfg.source is None else check_source(cfg.source, "--source")
        pipeline = load(config=cfg, timer=self.timer, cli=True)
        cfg = self.config = pipeline.config  # method "auto" resolved
        renderer, model_path = pipeline.renderer, pipeline.model_path
        graph, explainer = pipeline.graph, pipeline.explainer
        if cfg.loop:
            source = LoopingSource(source)
        with pipeline, source, contextlib.ExitStack() as detectors_open:
            # Carrying boxes needs the frames in order: one detection thread, whose average cost
            # (one detection every N frames, flow on the others) is then below the main thread's.
            every = every_for(cfg.detect_every, bool(getattr(source.info, "still", False)), cfg.detect_workers)
            workers = 1 if every > 1 else detect_workers_for(cfg.detect_workers, cfg.graph_threads, source.info.live)
            # one exit stack per detector: one whose thread is still detecting at the end is left open
            detector_stacks = [detectors_open.enter_context(contextlib.ExitStack()) for _ in range(workers)]
            detectors = [BoxCarrier(stack.enter_context(pipeline.face_detector()), every)
                         for stack in detector_stacks]
            snapshots = None
            if cfg.snapshot_every or cfg.show:
                snapshots = SnapshotWriter(cfg.snapshot_dir, source.info.name, model_path, graph.info)
            recorder = Recorder(cfg.record, source.info.fps, cfg.overwrite, snapshots, self.timer, cfg.codec)
            window = self._window
            if window is None and cfg.show:
                from camface.realtime.window import Window
                window = Window()
            with contextlib.ExitStack() as stack:
                if window is not None and hasattr(window, "__enter__"):
                    stack.enter_context(window)
                stack.enter_context(opencv_single_threaded())
                try:
                    self._pipeline(source, detectors, explainer, renderer, recorder, window)
                finally:
                    for n in self._busy_detectors:
                        detector_stacks[n].pop_all()  # never closed under its thread (it is a daemon)
        return self.summary

    def _progress(self, source):
        """A tqdm bar on stderr when asked for, else None."""
        if not self.config.progress:
            return None
        from tqdm import tqdm

        total, limit = source.info.frames, self.config.max_frames
        if limit is not None:  # an endless source (--loop, a camera) then stops at the limit too
            total = limit if total is None else min(total, limit)
        return tqdm(total=total, unit="frame", file=sys.stderr, mininterval=0.5, leave=False)

    @staticmethod
    def _snapshot_shown(shown, output_q: queue.Queue):
        """Have the writer save the frame shown before (`shown`: its (raw, explained, saved)),
        unless it was saved already; returns `shown` marked saved."""
        if shown is None or shown[2]:
            return shown
        put(output_q, Output(None, shown[1], shown[0], True), None)
        return shown[0], shown[1], True

    def _pipeline(self, source, detectors, explainer, renderer, recorder, window) -> None:
        from camface.realtime.pace import Pacer, pace_period

        cfg = self.config
        period = pace_period(cfg.pace, source.info, window is not None, cfg.image_seconds)
        pacer = Pacer(period) if period else None
        viewer = Viewer(window, pacer, explainer.graph.methods, len(explainer.graph.info.labels))
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
        writer_thread = threading.Thread(target=recorder.run, args=(output_q,), name="camface-writer", daemon=True)

        controls = Controls(method=cfg.method)
        frames = faces_total = dropped_total = 0
        hud_ms: dict[str, float] = {}
        # with a window, key s saves the frame on screen: its undrawn copy is kept until the next
        # frame replaces it (shown: (raw, explained, already saved) of the frame shown last)
        keep_raw = window is not None and recorder.snapshots is not None
        shown = None
        stopped_by = "end of input"
        first_mark, last_mark = self.cpu_marks or (0, 0)
        cpu_at: dict[int, float] = {}
        pauses: list[tuple[float, float]] = []  # (start, end) of each pause, on self._clock
        notice, notice_until = None, 0.0  # the recorder's latest notice, and until when it is shown
        progress = self._progress(source)
        started = time.perf_counter()
        # the first SIGINT / SIGTERM stops the run (KeyboardInterrupt, Terminated); from then on
        # signals are held while the recording is finished, the third ending the process. The
        # threads start inside: a signal as they started escaped, the reader and detectors never
        # told to stop (in a process that goes on, bench's, they held the source and detectors)
        with stop_then_held(lambda: stuck_writer_line(recorder.sink)) as signals:
            try:
                writer_thread.start()
                for thread in threads:
                    thread.start()
                # a first Ctrl-C that library code caught (a finaliser's) still stops the run: at
                # the next frame, or while none comes (a stalled camera), where a second was held
                for index, frame, faces, cut in in_order(detections_q, len(detectors), slots, signals.check):
                    signals.check()
                    if recorder.error is not None:
                        raise recorder.error
                    snapshot = cfg.snapshot_every > 0 and index % cfg.snapshot_every == 0
                    raw = frame.copy() if (snapshot or keep_raw) and recorder.snapshots is not None else None
                    if frames % HUD_EVERY == 0:
                        hud_ms = hud_stage_ms(self.timer, detectors[0].every)
                    explained = explainer.explain(frame, faces, controls, index, self.rate.rolling_fps, hud_ms,
                                                  pacer.fps if pacer is not None else 0.0, cut=cut)
                    while not recorder.notices.empty():
                        notice, notice_until = recorder.notices.get(), time.perf_counter() + NOTICE_S
                    if notice is not None and time.perf_counter() > notice_until:
                        notice = None
                    with self.timer.stage("render"):
                        renderer.annotate(frame, explained.result, controls.hud, notice)
                    held = viewer.paused_s
                    controls, commands = viewer.show(frame, controls)
                    if viewer.paused_s > held:  # a pause just ended: its span on the clock that stamps frames
                        end = self._clock()
                        pauses.append((end - (viewer.paused_s - held), end))
                    if SNAPSHOT_SHOWN in commands:
                        shown = self._snapshot_shown(shown, output_q)
                    snapshot = snapshot or SNAPSHOT in commands
                    toggle = commands.count(RECORD) % 2 == 1  # r pressed twice while held: no change
                    if QUIT in commands or viewer.closed:
                        stopped_by = "quit"
                    # a camera's frame lasts in a recording until the next one was read (pauses
                    # left out); stamped by the reader, as a detection's cost varies by frame
                    read_at = self._read_at.pop(index, None)
                    at = read_at - paused_before(read_at, pauses) if read_at is not None else None
                    # counted and handed to the writer as one step: a signal handled on the put's
                    # return left a frame recorded but not counted ("1148 frames ...; recorded
                    # 1149 frames"), one that came while the put waited for room in a full queue a
                    # frame counted but not recorded; it now takes effect once the frame is in both
                    with signals_deferred():
                        frames += 1
                        if frames in (first_mark, last_mark):
                            cpu_at[frames] = time.process_time()
                        faces_total += len(explained.result.faces)
                        dropped_total += explained.result.dropped
                        put(output_q, Output(frame, explained, raw, snapshot, toggle, at), None)
                    shown = (raw, explained, snapshot) if keep_raw else None
                    self.rate.tick()
                    if progress is not None:
                        progress.update(1)
                    if stopped_by == "quit":
                        break
                if stopped_by == "end of input" and SNAPSHOT_SHOWN in viewer.hold_last(controls):
                    self._snapshot_shown(shown, output_q)
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
                signals.finishing = True  # first: a signal from here on is held, whatever ended the run
                sink = recorder.sink  # (read once: the writer thread may close it meanwhile, key r)
                signals.forced = functools.partial(stuck_writer_line, sink)
                stop.set()
                output_q.put(END)
                if writer_thread.ident is not None:  # (started)
                    writer_thread.join()
                deadline = time.monotonic() + JOIN_TIMEOUT_S
                for thread in threads:
                    if thread.ident is not None:
                        thread.join(timeout=max(0.0, deadline - time.monotonic()))
                self._busy_detectors = {n for n, thread in enumerate(threads[1:]) if thread.is_alive()}
                for thread in threads:
                    if not thread.is_alive():
                        continue
                    if thread is threads[0]:
                        doing, then = "a read", "the source is closed under it"
                    else:
                        doing, then = "a detection", "its face detector is left open, and the thread ends when it returns"
                    log.warning("camface: %s is still running %g s after the stop (%s that does not return); %s",
                                thread.name, JOIN_TIMEOUT_S, doing, then)
                recorder.close_sink()
                if recorder.error is not None and stopped_by in ("interrupted", "terminated"):
                    say_lost_error(recorder)  # the signal's exit code wins, but the error is not lost
                if progress is not None:
                    finish_progress(progress, stopped_by == "end of input")
                self.summary = RunSummary(
                    frames=frames, faces=faces_total, dropped=dropped_total, fps=self.rate.overall_fps,
                    wall_s=time.perf_counter() - started, stages=self.timer.stats(),
                    provider=explainer.graph.provider, source=source.info.name,
                    recordings=tuple(recorder.recordings),
                    snapshots=recorder.snapshots.count if recorder.snapshots is not None else 0,
                    stopped_by=stopped_by, detectors=len(detectors), detect_every=detectors[0].every,
                    detections=sum(d.detections for d in detectors), pace_fps=pacer.fps if pacer else 0.0,
                    cpu_ms_per_frame=(1000 * (cpu_at[last_mark] - cpu_at[first_mark]) / (last_mark - first_mark)
                                      if len(cpu_at) == 2 else None),
                    paused_s=viewer.paused_s, still=bool(getattr(source.info, "still", False)))
        if recorder.error is not None:
            raise recorder.error



def stuck_writer_line(sink) -> str:
    """The line a run whose writer did not return ends with (`signals_held`): where the frames
    of `sink` (a VideoSink, or None) that reached the disk are as it ends: the recording's path,
    or the file beside it that a recording over an earlier one is written to until it takes its
    place, which the next recording to the path removes (a killed run's), or is copied from while
    it takes its place (an "unplaced" file, which nothing removes)."""
    line = "camface: stopped without finishing: the writer of recordings and snapshots did not return"
    if sink is None:
        return line
    held = sink.kept_in
    if sink.in_place:  # (from memory: a realpath here waited on the file system that hangs)
        return f"{line}; {held} holds what reached the disk"
    return f"{line}; what reached the disk is in {held}, not in {sink.path}: move it away before recording to " \
           f"{sink.path} again"


def say_lost_error(recorder: Recorder) -> None:
    """Log the recorder's error (a full disk on the final flush) that a Ctrl-C or SIGTERM on its
    way out would otherwise hide: the run exits with the signal's code, not with this error."""
    error = recorder.error
    where = f"recording {recorder.error_path} failed: " if recorder.error_path is not None else ""
    log.error("camface: error: %s%s", where, error if str(error) else type(error).__name__)


def paused_before(at: float, pauses: list[tuple[float, float]]) -> float:
    """Seconds of `pauses` ((start, end), seconds on one clock) that passed before time `at`,
    to leave them out of a recording's timeline. Frames are read ahead of the one paused on, so
    a frame read before a pause keeps its time, one read during it is placed at its start, and
    one read after it comes the pause's length earlier: the times never go back."""
    return sum(max(0.0, min(at, end) - start) for start, end in pauses)


def finish_progress(progress, ended: bool) -> None:
    """Close the tqdm bar `progress`; at the end of input (`ended`) first make it full: the
    source's announced count (`SourceInfo.frames`) can exceed the frames that came (an image
    folder counts its unreadable files, which it skips with a warning; a video file cut short
    announces its header's count), and a bar left at 8/9 reads as a run that stopped early.
    Checking every image up front for an honest count would decode each twice."""
    if ended and progress.total is not None and progress.n < progress.total:
        progress.total = progress.n
        progress.refresh()
    progress.close()
