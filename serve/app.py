"""The ASGI app of `camface serve` (Starlette): one page, its script, one WebSocket per client,
the finished recordings, and a small JSON of counters.

Routes (each refuses a request without the token when the server has one, or, without a
token, one whose Host is not localhost: HTTP 403, or WebSocket close code 1008):
  GET /                  the page (static/index.html)
  GET /app.js            the page's script (no secrets in it: served without the token)
  WS  /ws                the protocol of camface.serve.protocol; the Origin must be the page's
  GET /recordings/NAME   a finished recording of this server (video/mp4)
  GET /stats             counters: clients, frames received/dropped/processed, graph calls
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from camface.serve import protocol
from camface.serve.protocol import ProtocolError

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True)
class ServeOptions:
    """What `camface serve` adds to the LiveConfig. token: required on every request when not
    None. max_clients: WebSockets at once. record_dir / snapshot_dir: server-side folders
    (created on first use; their parent must exist). jpeg_quality: of the annotated frames."""

    token: str | None = None
    max_clients: int = 4
    record_dir: Path = Path("recordings")
    snapshot_dir: Path = Path("snapshots")
    jpeg_quality: int = 80

    def __post_init__(self) -> None:
        if self.max_clients < 1:
            raise ValueError(f"--max-clients must be >= 1, got {self.max_clients}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.token is not None and len(self.token) < 8:
            raise ValueError("--token must have at least 8 characters")
        for flag, folder in (("--record-dir", self.record_dir), ("--snapshot-dir", self.snapshot_dir)):
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"{flag} {folder} is a file")
            if not folder.exists() and not folder.resolve().parent.is_dir():
                raise ValueError(f"{flag} {folder}: folder {folder.resolve().parent} does not exist")


class ServeState:
    """Everything the app shares between clients: the graph (counted), the renderer, the
    inference worker, the sessions, the finished recordings. `close()` finalises every
    recording in progress and stops the worker (idempotent)."""

    def __init__(self, config, options: ServeOptions, graph, model_path: Path):
        import cv2

        from camface.realtime.render import Renderer
        from camface.serve.worker import CountingGraph, InferenceWorker

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

    def add(self, session) -> None:
        with self.lock:
            self.sessions[session.id] = session
            self.clients_served += 1

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
        if self._closed:
            return
        self._closed = True
        for session in self.active():
            session.close()
        self.worker.stop()


# ------------------------------------------------------------------ checks


def token_ok(state: ServeState, given: str | None) -> bool:
    expected = state.options.token
    return expected is None or (given is not None and hmac.compare_digest(given.encode(), expected.encode()))


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def host_error(state: ServeState, headers) -> str | None:
    """Without a token the server is for this machine only: the Host header must name it
    (localhost, 127.0.0.1 or [::1]), so a web page cannot reach it by DNS rebinding (a name
    of its own that resolves to 127.0.0.1 would pass the Origin check)."""
    if state.options.token is not None:
        return None
    host = (headers.get("host") or "").lower()
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name in LOOPBACK_NAMES:
        return None
    return f"host {host!r} refused: without --token this server answers to localhost only"


def origin_error(headers) -> str | None:
    """Why the WebSocket's Origin is refused (it must be the page's own scheme://host:port,
    i.e. match the Host header), or None. No Origin (a non-browser client) is allowed: only
    browsers send other sites' requests on a user's behalf, and they always send Origin."""
    origin = headers.get("origin")
    if origin is None:
        return None
    host = (headers.get("host") or "").lower()
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or parts.netloc.lower() != host:
        return f"origin {origin} is not this server's ({host})"
    return None


def _reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8 (RFC 6455 sec. 5.5)."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


# ------------------------------------------------------------------ the app


def create_app(state: ServeState):
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    forbidden = PlainTextResponse("camface: this server needs its token: open the URL that `camface serve` "
                                  "printed (it ends in ?token=...)\n", status_code=403)

    def refused(request):
        """The 403 for a request without the token or to a foreign Host, or None."""
        if not token_ok(state, request.query_params.get("token")):
            return forbidden
        why = host_error(state, request.headers)
        return None if why is None else PlainTextResponse(f"camface: {why}\n", status_code=403)

    async def page(request):
        if (refusal := refused(request)) is not None:
            return refusal
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def script(request):
        return FileResponse(STATIC / "app.js", media_type="text/javascript", headers={"Cache-Control": "no-store"})

    async def recording(request):
        if (refusal := refused(request)) is not None:
            return refusal
        path = state.recordings.get(request.path_params["name"])
        if path is None or not path.is_file():
            return PlainTextResponse("camface: no such recording\n", status_code=404)
        return FileResponse(path, media_type="video/mp4", filename=path.name)

    async def stats(request):
        if (refusal := refused(request)) is not None:
            return refusal
        return JSONResponse(state.stats())

    async def socket(ws: WebSocket):
        await ws.accept()
        refusal = None
        if not token_ok(state, ws.query_params.get("token")):
            refusal = (protocol.POLICY, "missing or wrong token")
        elif (why := host_error(state, ws.headers)) is not None:
            refusal = (protocol.POLICY, why)
        elif (why := origin_error(ws.headers)) is not None:
            refusal = (protocol.POLICY, why)
        elif state.connected >= state.options.max_clients:
            n = state.options.max_clients
            refusal = (protocol.TRY_LATER, f"server full: {n} client(s) connected (--max-clients {n}); try later")
        if refusal is not None:
            await ws.close(refusal[0], _reason(refusal[1]))
            return
        state.connected += 1  # counted before the first await: two at once cannot both take the last place
        try:
            session = await asyncio.to_thread(_open_session, state)
        except BaseException:
            state.connected -= 1
            raise
        loop, outbox = asyncio.get_running_loop(), asyncio.Queue()
        state._loops[session.id] = (loop, outbox)
        state.add(session)
        sender = asyncio.create_task(_send(ws, state, session, outbox))
        graph = state.graph
        try:
            await ws.send_json({"type": "hello", "client": session.id, "methods": list(graph.methods),
                                "method": session.controls.method, "labels": list(graph.info.labels),
                                "provider": graph.provider, "smooth": session.explainer.smoother is not None,
                                "limits": {"message_bytes": protocol.MAX_MESSAGE_BYTES,
                                           "side": protocol.MAX_SIDE}})
            await _receive(ws, state, session)
        except ProtocolError as exc:
            log.info("client %d closed: %s", session.id, exc)
            with contextlib.suppress(Exception):
                await ws.close(exc.code, _reason(str(exc)))
        except WebSocketDisconnect:
            pass
        finally:
            # bookkeeping first, without awaiting: the handler may be cancelled at the next await
            state.retire(session)
            state.connected -= 1
            state._loops.pop(session.id, None)
            sender.cancel()
            # the recording is finalised (playable) and the detector closed even if this handler
            # is cancelled meanwhile: the thread runs to its end
            await asyncio.shield(asyncio.to_thread(session.close))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.close)

    return Starlette(routes=[Route("/", page), Route("/app.js", script), Route("/stats", stats),
                             Route("/recordings/{name}", recording), WebSocketRoute("/ws", socket)],
                     lifespan=lifespan)


def _open_session(state: ServeState):
    from camface.models import DETECTORS
    from camface.realtime.detect import FaceDetector
    from camface.serve.session import Session

    cfg = state.config
    detector = FaceDetector(DETECTORS[cfg.detector], cfg.min_confidence, cfg.quiet_native).__enter__()
    try:
        return Session(state, detector)
    except BaseException:
        detector.close()
        raise


async def _receive(ws, state: ServeState, session) -> None:
    """Read the client's messages until it leaves; a bad one raises ProtocolError."""
    from camface.serve.session import Frame

    graph = state.graph
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes") is not None:
            sequence, image = protocol.parse_frame(message["bytes"])
            start = time.perf_counter()
            frame = await asyncio.to_thread(protocol.decode_image, image)
            session.put(Frame(sequence, frame, (time.perf_counter() - start) * 1000))
            state.worker.wake()
        elif message.get("text") is not None:
            control = protocol.parse_control(message["text"], graph.methods, len(graph.info.labels))
            await _apply(ws, state, session, control)


async def _apply(ws, state: ServeState, session, control) -> None:
    if control.kind == "controls":
        session.set_controls(control.fields)
    elif control.kind == "snapshot":
        session.snapshot_due = True
    elif control.fields.get("on", True):
        path = await asyncio.to_thread(session.start_recording, float(control.fields.get("fps", 30)))
        await ws.send_json({"type": "recording", "on": True, "file": path.name})
    else:
        done = await asyncio.to_thread(session.stop_recording)
        path, frames = done if done else (None, 0)
        await ws.send_json({"type": "recorded", "file": path.name if path else None, "frames": frames,
                            "url": f"/recordings/{path.name}" if frames else None})


async def _send(ws, state: ServeState, session, outbox: asyncio.Queue) -> None:
    """The client's sender: draw, record and encode each processed frame off the event loop,
    then send it (and any notes, e.g. a snapshot taken)."""
    while True:
        work = await outbox.get()
        try:
            data, notes = await asyncio.to_thread(session.finish, work)
            await ws.send_bytes(data)
            for note in notes:
                await ws.send_json(note)
        except Exception as exc:  # e.g. the snapshot folder became unwritable: say so, end this client
            log.warning("client %d: %s", session.id, exc)
            with contextlib.suppress(Exception):
                await ws.close(1011, _reason(f"server error: {exc}"))
            return
        finally:
            session.sent()
            state.worker.wake()
