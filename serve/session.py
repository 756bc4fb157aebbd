"""One browser client: its newest camera frame, its controls and smoother, its face detector,
and what is done with each processed frame (snapshot, drawing, recording, JPEG encoding).

Threads: the client's WebSocket handler puts frames and controls in (event loop), the shared
inference worker takes the newest frame and detects faces in it (worker thread), and
`finish` draws, records and encodes a processed frame (a thread of the event loop's pool, one
frame of this client at a time). Every piece of state two of them share is behind a lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camface.errors import OutputError
from camface.realtime.explainer import Explained, FrameExplainer
from camface.realtime.timing import RateMeter, StageTimer
from camface.realtime.controls import Controls
from camface.serve import protocol

log = logging.getLogger(__name__)

HUD_STAGES = ("decode", "detect", "classify", "render", "encode")
HUD_EVERY = 15  # frames between refreshes of the HUD's stage times
MAX_PENDING = 2  # processed frames waiting to be sent, per client: the worker skips the client beyond
_ids = itertools.count(1)


@dataclass(frozen=True)
class Frame:
    """A decoded camera frame. frame: uint8 BGR [H, W, 3]. decode_ms: JPEG/PNG decoding time.
    received: when it arrived (time.monotonic(), seconds): a recording keeps each frame until
    the next one recorded arrived, so it plays at the speed it was filmed even when the worker
    skips frames."""

    sequence: int
    frame: np.ndarray
    decode_ms: float
    received: float | None = None


@dataclass(frozen=True)
class Work:
    """A frame the worker processed: detection and the (shared) graph call done, not drawn yet.
    batch_frames: how many frames, of all clients, shared the graph call."""

    frame: Frame
    explained: Explained
    detect_ms: float
    classify_ms: float
    batch_frames: int
    hud: bool


class Session:
    """One client. server: the ServeState (graph, renderer, config, folders). detector: an
    entered face detector of its own (carried boxes and MediaPipe VIDEO mode follow one stream), run
    through a BoxCarrier with the config's `detect_every` (boxes carried along this client's
    frames)."""

    def __init__(self, server, detector):
        from camface.realtime.snapshot import SnapshotWriter

        self.id = next(_ids)
        from camface.realtime.carry import BoxCarrier, every_for

        cfg = server.config
        self.server = server
        self.detector = None if detector is None else BoxCarrier(detector, every_for(cfg.detect_every))
        self.controls = Controls(method=cfg.method)
        self.smooth_factor = cfg.smooth if cfg.smooth > 0 else 0.5  # the page's smoothing switch
        self.explainer = FrameExplainer.from_config(cfg, server.graph)
        self.snapshots = SnapshotWriter(server.snapshot_dir, f"browser client {self.id}", server.model_path,
                                        server.graph.info)
        self.timer, self.rate = StageTimer(HUD_STAGES), RateMeter()
        self.lock = threading.Lock()  # the slot, the controls, the explainer, counters
        self.detect_lock = threading.Lock()  # the detector: used by the worker, closed on disconnect
        self.record_lock = threading.Lock()  # the recording: written by `finish`, stopped by the page
        self.slot: Frame | None = None
        self.pending = 0  # processed frames not yet sent
        self.received = self.dropped = self.processed = 0
        self.index = 0
        self.snapshot_due = False
        self.sink = None
        self.closed = False
        self._hud_ms: dict[str, float] = {}

    # ---------------------------------------------------------------- event loop side

    def put(self, frame: Frame) -> None:
        """Keep only the newest frame: one still waiting is dropped (and counted)."""
        with self.lock:
            if self.slot is not None:
                self.dropped += 1
            self.slot = frame
            self.received += 1

    def set_controls(self, fields: dict) -> None:
        """Apply a checked "controls" message (see protocol.parse_control)."""
        from dataclasses import replace

        with self.lock:
            changes = {k: fields[k] for k in ("method", "explained_class", "hud") if k in fields}
            self.controls = replace(self.controls, **changes)
            if "smooth" in fields and fields["smooth"] != (self.explainer.smoother is not None):
                cfg = self.server.config
                self.explainer = FrameExplainer(self.server.graph, cfg.margin, cfg.max_faces,
                                                self.smooth_factor if fields["smooth"] else 0.0)

    def sent(self) -> None:
        with self.lock:
            self.pending -= 1

    def start_recording(self, fps: float) -> tuple[Path, float, bool]:
        """Open a new recording in the server's record folder (written from the next frame):
        (its path, its fps, True). While one is in progress it goes on, at its own fps:
        (its path, its fps, False)."""
        from camface.realtime.sinks import VideoSink

        with self.record_lock:
            if self.sink is not None:
                return self.sink.path, self.sink.fps, False
            self.sink = VideoSink(self.server.next_recording_path(self.id), fps, overwrite=False,
                                  codec=self.server.config.codec)
            log.info("client %d: recording to %s", self.id, self.sink.path)
            return self.sink.path, self.sink.fps, True

    def stop_recording(self) -> tuple[Path, int] | None:
        """Finalise the recording in progress (idempotent): (path, frames written), or None.
        A file that cannot be finished (a full disk) is logged; it keeps its complete
        fragments. One that holds no frame was removed by the sink, or (mp4v, its index lost) kept
        for a repair tool: (path, 0), not listed."""
        with self.record_lock:
            sink, self.sink = self.sink, None
            if sink is None:
                return None
            try:
                sink.close(say_removed=False)  # said below, with the client
            except OutputError as exc:
                log.warning("client %d: %s", self.id, exc)
        if getattr(sink, "removed", None) is not None:  # it held no frame: gone, not a recording to offer
            log.warning("client %d: removed %s: %s", self.id, sink.path, sink.removed)
            return sink.path, 0
        if sink.frames_written and not sink.frames_kept:  # mp4v whose index was lost: kept for a repair tool
            log.warning("client %d: %s holds none of its %d frames that a player reads (its index was lost); "
                        "it is kept, not offered", self.id, sink.path, sink.frames_written)
            return sink.path, 0
        if sink.frames_kept:
            self.server.recorded(sink.path)
        log.info("client %d: recorded %d frames to %s", self.id, sink.frames_kept, sink.path)
        return sink.path, sink.frames_kept

    def close(self) -> None:
        """Finalise the recording and close the detector (after the worker's current use; also
        when the recording fails to close, whose error is raised after)."""
        self.closed = True
        try:
            self.stop_recording()
        finally:
            with self.detect_lock:
                if self.detector is not None:
                    self.detector.close()
                    self.detector = None

    # ---------------------------------------------------------------- worker side

    def take(self):
        """(frame, explainer, controls, index) for the worker, or None when there is no new
        frame or MAX_PENDING processed frames are still unsent (the slot then keeps the
        newest frame until the client reads)."""
        with self.lock:
            if self.slot is None or self.pending >= MAX_PENDING or self.closed:
                return None
            frame, self.slot = self.slot, None
            self.pending += 1
            self.index += 1
            return frame, self.explainer, self.controls, self.index - 1

    def detect(self, frame: np.ndarray, index: int):
        """Faces of this client's frame `index` (the count of frames the worker took)."""
        with self.detect_lock:
            if self.detector is None:
                return ()
            return self.detector.detect(frame, index)

    def hud(self) -> tuple[float, dict[str, float]]:
        """(rolling fps, per-stage median ms) for the frame being explained."""
        if self.processed % HUD_EVERY == 0:
            stats = self.timer.medians_ms()
            self._hud_ms = {s: stats[s] for s in HUD_STAGES if s in stats}
        return self.rate.rolling_fps, self._hud_ms

    # ---------------------------------------------------------------- finishing a frame

    def finish(self, work: Work) -> tuple[bytes, list[dict]]:
        """Snapshot (when asked), draw, record and encode one processed frame: the binary
        reply (protocol.pack_result) and the text notes to send after it."""
        notes = []
        frame, result = work.frame.frame, work.explained.result
        if self.snapshot_due:
            self.snapshot_due = False
            folder = self.snapshots.save(frame.copy(), work.explained.crops, result)
            notes.append({"type": "snapshot", "folder": folder.name, "faces": len(result.faces)})
        start = time.perf_counter()
        self.server.renderer.annotate(frame, result, work.hud)
        drawn = time.perf_counter()
        with self.record_lock:
            recording = self.sink is not None
            if recording:
                self.sink.write(frame, work.frame.received)
        written = time.perf_counter()
        jpeg = self.server.encode(frame)
        encoded = time.perf_counter()
        stage_ms = {"decode": work.frame.decode_ms, "detect": work.detect_ms, "classify": work.classify_ms,
                    "render": (drawn - start) * 1000, "encode": (encoded - written) * 1000}
        if recording:
            stage_ms["record"] = (written - drawn) * 1000
        for name in HUD_STAGES:
            self.timer.add(name, stage_ms[name] / 1000)
        with self.lock:
            self.processed += 1
            dropped = self.dropped
        self.rate.tick()
        message = protocol.result_message(work.frame.sequence, result, stage_ms, dropped, work.batch_frames,
                                          recording)
        return protocol.pack_result(message, jpeg), notes
