"""The ASGI app of `camface serve` (Starlette): one page, its script, one WebSocket per client,
the finished recordings, and a small JSON of counters.

Routes (each refuses a request without the token when the server has one, or, without a
token, one whose Host is not localhost: HTTP 403, or WebSocket close code 1008):
  GET /                  the page (static/index.html)
  GET /app.js, /app.css  the page's script and style (no secrets in them: served without the token)
  WS  /ws                the protocol of camface.serve.protocol; the Origin must be the page's
  GET /recordings/NAME   a finished recording of this server (video/mp4)
  GET /stats             counters: clients, frames received/dropped/processed, graph calls
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

from camface.errors import CamfaceError
from camface.serve import protocol
from camface.serve.protocol import ProtocolError
from camface.serve.state import ServeOptions, ServeState

__all__ = ["ServeOptions", "ServeState", "create_app"]

log = logging.getLogger(__name__)
CLOCK = time.monotonic  # stamps each frame's arrival, for recordings (tests: a fake)

STATIC = Path(__file__).resolve().parent / "static"
# On every HTTP response: the page runs only its own script and style and connects only to its
# own server ('self' covers its ws:/wss:), no other site may frame it (clicks on snapshot or
# record through a transparent frame), and the ?token= of its URL goes out in no Referer.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
CLOSE_WAIT_S = 2.0  # for the close frame to go out; a client that does not read may never take it


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

    async def style(request):
        return FileResponse(STATIC / "app.css", media_type="text/css", headers={"Cache-Control": "no-store"})

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
        except BaseException as exc:
            state.connected -= 1
            if not isinstance(exc, Exception):
                raise
            # its face detector would not open: say why (else the socket is cut, 1006, and the page retries)
            log.warning("camface serve: a client's session did not open: %s", exc, exc_info=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(1011, _reason(f"server error: {exc}")), CLOSE_WAIT_S)
            return
        if session is None:  # the server closed while it opened (the session is closed)
            state.connected -= 1
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(protocol.SHUTTING_DOWN, "server shutting down"), CLOSE_WAIT_S)
            return
        loop, outbox = asyncio.get_running_loop(), asyncio.Queue()
        state._loops[session.id] = (loop, outbox)
        sender = asyncio.create_task(_send(ws, state, session, outbox))
        receiver = None
        graph, options = state.graph, state.options
        try:
            await _timed_send(ws.send_json({
                "type": "hello", "client": session.id, "methods": list(graph.methods),
                "method": session.controls.method, "labels": list(graph.info.labels), "provider": graph.provider,
                "smooth": session.explainer.smoother is not None,
                "limits": {"message_bytes": protocol.MAX_MESSAGE_BYTES, "side": protocol.MAX_SIDE,
                           "idle_timeout_s": options.idle_timeout_s, "send_timeout_s": options.send_timeout_s}}),
                options.send_timeout_s)
            # whichever ends first ends the client: it left, sent a bad message or nothing for
            # too long (receiver), or did not read its frames (sender)
            receiver = asyncio.create_task(_receive(ws, state, session))
            await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
            for task in (receiver, sender):
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()
        except ProtocolError as exc:
            log.info("client %d closed: %s", session.id, exc)
            with contextlib.suppress(Exception):  # bounded: a client that does not read may not take it
                await asyncio.wait_for(ws.close(exc.code, _reason(str(exc))), CLOSE_WAIT_S)
        except WebSocketDisconnect:
            pass
        except Exception as exc:  # e.g. a recording that cannot start: say why, as for a failed frame (else: cut, 1006)
            log.warning("client %d: %s", session.id, exc, exc_info=not isinstance(exc, CamfaceError))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(1011, _reason(f"server error: {exc}")), CLOSE_WAIT_S)
        finally:
            # bookkeeping first, without awaiting: the handler may be cancelled at the next await
            state.retire(session)
            state.connected -= 1
            state._loops.pop(session.id, None)
            sender.cancel()
            if receiver is not None:
                receiver.cancel()
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

    app = Starlette(routes=[Route("/", page), Route("/app.js", script), Route("/app.css", style),
                            Route("/stats", stats), Route("/recordings/{name}", recording),
                            WebSocketRoute("/ws", socket)],
                    lifespan=lifespan)
    return _with_headers(app, SECURITY_HEADERS)


def _with_headers(app, headers: dict[str, str]):
    """The ASGI app `app` with `headers` added to every HTTP response (404s and 403s too)."""
    extra = [(k.encode(), v.encode()) for k, v in headers.items()]

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def sending(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await app(scope, receive, sending)

    return wrapped


def _open_session(state: ServeState):
    """A new client's Session, served (`state.add`), or None when the server closed while its
    detector opened: then it is closed here. Registered in this thread, not by the handler
    after it: a handler cancelled at shutdown meanwhile would leave it to no one, its face
    detector open."""
    from camface.api import face_detector
    from camface.serve.session import Session

    with contextlib.ExitStack() as opened:  # the session closes its detector; until it exists, this does
        session = Session(state, opened.enter_context(face_detector(state.config)))
        opened.pop_all()
    if state.add(session):
        return session
    session.close()
    return None


async def _timed_send(sending, seconds: float) -> None:
    """Await a send; a client that has not taken it within `seconds` raises ProtocolError
    (closed, its place freed: a never-reading client would otherwise hold it for ever)."""
    try:
        await asyncio.wait_for(sending, seconds)
    except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11
        raise ProtocolError(f"client did not read for {seconds:g} s (--send-timeout)", protocol.POLICY) from None


async def _receive(ws, state: ServeState, session) -> None:
    """Read the client's messages until it leaves; a bad one raises ProtocolError, and so
    does nothing at all for the idle timeout."""
    from camface.serve.session import Frame

    graph, idle = state.graph, state.options.idle_timeout_s
    while True:
        try:
            message = await asyncio.wait_for(ws.receive(), idle)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11
            raise ProtocolError(f"idle: no message for {idle:g} s (--idle-timeout)", protocol.POLICY) from None
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes") is not None:
            sequence, image = protocol.parse_frame(message["bytes"])
            received = CLOCK()
            start = time.perf_counter()
            frame = await asyncio.to_thread(protocol.decode_image, image)
            session.put(Frame(sequence, frame, (time.perf_counter() - start) * 1000, received))
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
        asked = control.fields.get("fps")
        path, fps, started = await asyncio.to_thread(session.start_recording, float(30 if asked is None else asked))
        reply = {"type": "recording", "on": True, "file": path.name, "fps": fps}
        if not started:  # one file per recording: its fps stays what it was opened with
            ignored = f": fps {asked:g} is ignored (stop, then record again)" if asked not in (None, fps) else ""
            reply.update(already=True, note=f"already recording to {path.name} at {fps:g} fps{ignored}")
        await _timed_send(ws.send_json(reply), state.options.send_timeout_s)
    else:
        done = await asyncio.to_thread(session.stop_recording)
        path, frames = done if done else (None, 0)
        await _timed_send(ws.send_json({"type": "recorded", "file": path.name if path else None, "frames": frames,
                                         "url": f"/recordings/{path.name}" if frames else None}),
                          state.options.send_timeout_s)


async def _send(ws, state: ServeState, session, outbox: asyncio.Queue) -> None:
    """The client's sender: draw, record and encode each processed frame off the event loop,
    then send it (and any notes, e.g. a snapshot taken)."""
    from starlette.websockets import WebSocketDisconnect

    while True:
        work = await outbox.get()
        try:
            if isinstance(work, Exception):  # the worker could not process this client's frame
                raise work
            data, notes = await asyncio.to_thread(session.finish, work)
            await _timed_send(ws.send_bytes(data), state.options.send_timeout_s)
            for note in notes:
                await _timed_send(ws.send_json(note), state.options.send_timeout_s)
        except ProtocolError:
            raise  # the handler closes the client
        except WebSocketDisconnect:  # the client left under the send: nothing failed, nothing to close
            return
        except Exception as exc:  # the snapshot folder became unwritable, the frame failed (FrameFailed): say so, end this client
            log.warning("client %d: %s", session.id, exc)
            with contextlib.suppress(Exception):  # bounded: a client that does not read may not take it
                await asyncio.wait_for(ws.close(1011, _reason(f"server error: {exc}")), CLOSE_WAIT_S)
            return
        finally:
            session.sent()
            state.worker.wake()
