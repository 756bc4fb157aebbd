"""`camface serve`: the live overlays in a web browser, from any laptop camera to the machine
with the model.

Top-level imports stay light (no onnxruntime, mediapipe, cv2 or starlette): `camface --help`
imports this.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import secrets
import socket
import sys
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

LIVE_OPTIONS = ("model", "method", "detector", "detector_runtime", "min_confidence", "max_faces", "margin", "device", "smooth",
                "cam_boxes", "bars", "colormap", "alpha", "snapshot_dir", "graph_threads", "codec", "detect_every")
LOOPBACK = ("127.0.0.1", "localhost", "::1")

# What one client can make the server buffer: uvicorn 0.54's WebSocket protocol (websockets-sansio,
# which it picks when `websockets` is installed; wsproto's does the same) pauses reading the socket
# after each complete message until the app has taken every message it queued. So besides the
# message the app holds, the server holds the messages of one read (asyncio reads at most 256 KiB
# at a time; over TLS about twice that, with the buffer of bytes not yet decrypted) and one message
# still arriving (at most ws_max_size, 4 MiB: a longer one is refused with 1009), under 5 MiB per
# client; past that the socket is not read and the client's sends wait: backpressure. These
# protocols ignore ws_max_queue: WS_QUEUE bounds only uvicorn's legacy `websockets` protocol (its
# default of 32 messages of 4 MiB let one fast client hold 128 MiB there). No permessage-deflate:
# the bounds are bytes on the wire only while messages are not inflated (uvicorn inflates every
# message of a read before the app sees one: 251 KB of deflated 4 MiB messages took ~170 MB);
# JPEG and PNG frames do not deflate anyway.
WS_QUEUE = 4


def configure(parser: argparse.ArgumentParser) -> None:
    from camface.realtime.config import add_arguments
    from camface.outputs import input_path, output_path

    parser.description = (
        "Serve the live demo to web browsers: open the printed URL, allow the camera, and the page shows "
        "the annotated frames. Browsers allow the camera only on https or localhost: for a remote machine "
        "run `ssh -L 8000:localhost:8000 HOST` and open http://localhost:8000, or give --ssl-certfile/"
        "--ssl-keyfile.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; any other than 127.0.0.1/localhost/::1 requires a token")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    parser.add_argument("--max-clients", type=int, default=4, help="browsers served at once")
    parser.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                        help="close a client that sends nothing for S seconds (frees its place)")
    parser.add_argument("--send-timeout", type=float, default=10.0, metavar="S",
                        help="close a client that does not read an annotated frame within S seconds")
    parser.add_argument("--token", help="secret every request must carry (?token=...); default: none on "
                                        "localhost, a random one (printed) on any other address")
    parser.add_argument("--ssl-certfile", type=input_path, help="TLS certificate (PEM): serve https/wss")
    parser.add_argument("--ssl-keyfile", type=input_path, help="TLS private key (PEM)")
    parser.add_argument("--record-dir", type=output_path, default=Path("recordings"),
                        help="folder for recordings started from the page")
    parser.add_argument("--jpeg-quality", type=int, default=80, help="JPEG quality of the annotated frames")
    add_arguments(parser, *LIVE_OPTIONS)


def _urls(host: str, port: int, tls: bool, token: str | None) -> list[str]:
    scheme = "https" if tls else "http"
    query = f"/?token={quote(token, safe='')}" if token else "/"  # a --token may hold + & # % or spaces
    if host in ("0.0.0.0", "::", ""):
        names = [socket.gethostname(), "127.0.0.1"]
    else:
        names = [f"[{host}]" if ":" in host else host]
    return [f"{scheme}://{name}:{port}{query}" for name in names]


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (so --port 0 is known before the URL is printed)."""
    from camface.errors import CamfaceError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise CamfaceError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    sock.listen(128)
    return sock


def main(args: argparse.Namespace) -> int:
    from camface.errors import UsageError
    from camface.realtime.config import from_args
    from camface.serve.state import ServeOptions

    config = from_args(args, LIVE_OPTIONS)
    if not args.host.strip():  # a shell variable left unset: the socket listened on every interface
        raise UsageError("--host is empty; give an address: 127.0.0.1 (this machine only, the default) or "
                         "0.0.0.0 (every interface)")
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise UsageError("--ssl-certfile and --ssl-keyfile go together")
    for flag, path in (("--ssl-certfile", args.ssl_certfile), ("--ssl-keyfile", args.ssl_keyfile)):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag} {path}: no such file")
    if args.ssl_certfile is not None:
        _check_tls(args.ssl_certfile, args.ssl_keyfile)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    token = args.token
    if token is None and args.host not in LOOPBACK:
        token = secrets.token_urlsafe(24)  # another address: never serve the camera page without one
    options = ServeOptions(token=token, max_clients=args.max_clients, idle_timeout_s=args.idle_timeout,
                           send_timeout_s=args.send_timeout, record_dir=args.record_dir,
                           snapshot_dir=config.snapshot_dir, jpeg_quality=args.jpeg_quality)
    return serve(config, options, args.host, args.port, args.ssl_certfile, args.ssl_keyfile)


def _check_tls(certfile: Path, keyfile: Path) -> None:
    """UsageError naming both files when they are not a PEM certificate and its private key
    (uvicorn would say so in a traceback, after the URL was printed). An encrypted key is left
    to uvicorn, which asks for its passphrase."""
    import ssl

    from camface.errors import UsageError

    asked = []

    def password() -> str:  # called only for an encrypted key
        asked.append(True)
        return ""

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile, password)
    except (ssl.SSLError, OSError) as exc:
        if not asked:
            raise UsageError(f"cannot serve https with --ssl-certfile {certfile} and --ssl-keyfile {keyfile}: "
                             f"{getattr(exc, 'reason', None) or exc} (expected a PEM certificate and its "
                             "private key)") from exc


def serve(config, options, host: str, port: int, certfile: Path | None = None, keyfile: Path | None = None) -> int:
    """Listen (a port in use is an error before anything loads), load the graph, print the URL,
    serve until Ctrl-C / SIGTERM; every recording in progress is finalised before this returns
    (130 after Ctrl-C, 143 after SIGTERM)."""
    import uvicorn

    from camface.api import load
    from camface.realtime.threads import Terminated, sigterm_raises
    from camface.serve import protocol
    from camface.serve.app import create_app
    from camface.serve.state import ServeState
    from camface.serve.ws_protocol import ServeWebSocketProtocol

    with contextlib.ExitStack() as on_error:  # whatever fails before serving closes what was opened
        sock = _listen(host, port)  # first: a port in use is said at once, not after the model has loaded
        on_error.callback(sock.close)
        pipeline = load(config=config, cli=True)
        on_error.callback(pipeline.close)
        config, model_path, graph = pipeline.config, pipeline.model_path, pipeline.graph  # method "auto" resolved
        state = ServeState(config, options, graph, model_path)
        on_error.callback(state.close)
        import cv2

        cv2.setNumThreads(1)  # the stages already run side by side (worker, decoding, encoding threads)
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(
            create_app(state), log_level="warning", ws=ServeWebSocketProtocol, ws_max_size=2 * protocol.MAX_MESSAGE_BYTES,
            ws_max_queue=WS_QUEUE, ws_per_message_deflate=False,  # see WS_QUEUE
            ssl_certfile=str(certfile) if certfile else None,
            ssl_keyfile=str(keyfile) if keyfile else None, timeout_graceful_shutdown=5, lifespan="on"))
        urls = _urls(host, port, certfile is not None, options.token)
        print(f"camface serve: {model_path.name} on {graph.provider.replace('ExecutionProvider', '')}; "
              f"open this URL in a browser (Ctrl-C stops):\n    " + "\n or " .join(urls), flush=True)
        on_error.pop_all()  # from here the finally below closes them
    code = 0
    try:
        with sigterm_raises():  # uvicorn re-raises the signal it caught once it has shut down
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        code = 130
    except Terminated:
        code = Terminated.exit_code
    finally:
        state.close()
        pipeline.close()
        sock.close()
        stats = state.stats()
        wall = max(stats["uptime_s"], 1e-9)
        recorded = f"; {len(state.recordings)} recording(s) in {options.record_dir}" if state.recordings else ""
        print(f"camface serve: {stats['frames_processed']} frames in {stats['graph_calls']} graph calls "
              f"({stats['frames_processed'] / wall:.1f} frames/s, {stats['graph_calls'] / wall:.1f} calls/s), "
              f"{stats['frames_dropped']} stale frames dropped{recorded}", file=sys.stderr)
    return code
