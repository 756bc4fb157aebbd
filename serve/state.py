"""What `camface serve` shares between its clients: the options it adds to the LiveConfig, and
the state (the counted graph, the renderer, the inference worker, the sessions, the finished
recordings)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from camface.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """What `camface serve` adds to the LiveConfig. token: required on every request when not
    None. max_clients: WebSockets at once. idle_timeout_s: a client that sends nothing for
    this long is closed, freeing its place. send_timeout_s: a client that does not take a
    message (an annotated frame) within this long is closed too. record_dir / snapshot_dir:
    server-side folders (created on first use; their parent must exist). jpeg_quality: of the
    annotated frames."""

    token: str | None = None
    max_clients: int = 4
    idle_timeout_s: float = 60.0  # the page sends every camera frame; a minute of nothing is a gone client
    send_timeout_s: float = 10.0  # one annotated frame (tens of kB) in 10 s: slower is a client not reading
    record_dir: Path = Path("recordings")
    snapshot_dir: Path = Path("snapshots")
    jpeg_quality: int = 80

    def __post_init__(self) -> None:
        if self.max_clients < 1:
            raise UsageError(f"--max-clients must be >= 1, got {self.max_clients}")
        for flag, value in (("--idle-timeout", self.idle_timeout_s), ("--send-timeout", self.send_timeout_s)):
            if not 0 < value < math.inf:  # inf: the page's hello would hold Infinity, not JSON (the page broke)
                raise UsageError(f"{flag} must be a finite number of seconds > 0, got {value}")
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.token is not None and len(self.token) < 8:
            raise UsageError("--token must have at least 8 characters")
        for flag, folder in (("--record-dir", self.record_dir), ("--snapshot-dir", self.snapshot_dir)):
            if folder.exists() and not folder.is_dir():
                raise UsageError(f"{flag} {folder} is a file")
            if not folder.exists() and not folder.resolve().parent.is_dir():
                raise UsageError(f"{flag} {folder}: folder {folder.resolve().parent} does not exist")
            # now, not at a client's first snapshot or recording (each client would fail with 1011)
            existing = folder if folder.exists() else folder.resolve().parent
            if not os.access(existing, os.W_OK):
                raise UsageError(f"{flag} {folder}: folder {existing} is not writable")


class ServeState:
    """Everything the app shares between clients: the graph (counted), the renderer, the
    inference worker, the sessions, the finished recordings. `close()` finalises every
    recording in progress and stops the worker (idempotent)."""

    def __init__(self, config, options: ServeOptions, graph, model_path: Path):
        import cv2

        from camface.realtime.explainer import check_method
        from camface.realtime.render import Renderer
        from camface.serve.worker import CountingGraph, InferenceWorker

        config = config.replace(method=check_method(graph, config.method))  # "auto" -> a heatmap
        self.config, self.options, self.model_path = config, options, Path(model_path)
        self.graph = CountingGraph(graph)
        self.renderer = Renderer.from_config(config)
        self.snapshot_dir, self.record_dir = options.snapshot_dir, options.record_dir
        self.sessions: dict[int, object] = {}
        self.recordings: dict[str, Path] = {}
        self.lock = threading.Lock()
        self.worker = InferenceWorker(self.active, self._deliver)
        self.started = time.monotonic()
        self._jpeg = [int(cv2.IMWRITE_JPEG_QUALITY), options.jpeg_quality]
        self._loops: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = False
        self.clients_served = 0
        self.connected = 0  # sockets past the checks (the event loop's only: no lock needed)
        self._gone = {"received": 0, "dropped": 0}  # counters of clients that left

    def encode(self, frame) -> bytes:
        import cv2

        ok, data = cv2.imencode(".jpg", frame, self._jpeg)
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return data.tobytes()

    def next_recording_path(self, client: int) -> Path:
        self.record_dir.mkdir(exist_ok=True)
        base = self.record_dir / time.strftime(f"camface-client{client}-%Y%m%d-%H%M%S.mp4")
        candidate, n = base, 1
        while candidate.exists():
            n += 1
            candidate = base.with_name(f"{base.stem}-{n}{base.suffix}")
        return candidate

    def recorded(self, path: Path) -> None:
        with self.lock:
            self.recordings[path.name] = path

    def _deliver(self, session, work) -> None:
        """From the worker thread: hand a processed frame to the client's sender task."""
        target = self._loops.get(session.id)
        if target is None:  # the client has just left
            session.sent()
            return
        loop, outbox = target
        try:
            loop.call_soon_threadsafe(outbox.put_nowait, work)
        except RuntimeError:  # the client's loop is gone
            session.sent()

    def add(self, session) -> bool:
        """Serve a session: True, or False once the server is closing (`close` has run or
        runs now: the caller closes the session, which nothing else would close)."""
        with self.lock:
            if self._closed:
                return False
            self.sessions[session.id] = session
            self.clients_served += 1
            return True

    def active(self) -> list:
        with self.lock:
            return list(self.sessions.values())

    def retire(self, session) -> None:
        """Forget a client that left, keeping its counts."""
        with self.lock:
            if self.sessions.pop(session.id, None) is not None:
                self._gone["received"] += session.received
                self._gone["dropped"] += session.dropped

    def stats(self) -> dict:
        """Counters since start: clients (now / served), frames received, dropped as stale and
        processed, graph calls and the crops they carried, worker rounds."""
        with self.lock:
            sessions = list(self.sessions.values())
            gone = dict(self._gone)
        return {"clients": len(sessions), "clients_served": self.clients_served, "provider": self.graph.provider,
                "uptime_s": round(time.monotonic() - self.started, 3),
                "graph_calls": self.graph.calls, "graph_crops": self.graph.crops,
                "rounds": self.worker.rounds, "frames_processed": self.worker.frames,
                "frames_received": gone["received"] + sum(s.received for s in sessions),
                "frames_dropped": gone["dropped"] + sum(s.dropped for s in sessions)}

    def close(self) -> None:
        with self.lock:  # a session still opening is either among these or refused by `add`
            if self._closed:
                return
            self._closed = True
            sessions = list(self.sessions.values())
        for session in sessions:
            try:
                session.close()
            except Exception:  # one recording that will not close must not leave the others unfinished
                log.exception("camface serve: client %d did not close cleanly", session.id)
        self.worker.stop()
