"""`camface serve` as a command: the real server in a subprocess, driven by a Python WebSocket
client (no browser): a token off localhost, SIGTERM finalising a recording, https/wss."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import ssl
import struct
import subprocess
import urllib.request

import cv2
import pytest
from realtime_helpers import count_frames
from serve_helpers import start_server

pytest.importorskip("starlette", reason="camface[serve] is not installed")
from websockets.sync.client import connect  # noqa: E402

from camface.serve import protocol  # noqa: E402
from camface.serve.ws_protocol import ServeWebSocketProtocol  # noqa: E402


def _frame_jpeg() -> bytes:
    from camface.realtime.sample import SampleSource

    return cv2.imencode(".jpg", SampleSource(frames=300, size=(320, 240)).frame(150))[1].tobytes()


def test_sigterm_finalises_a_recording_in_progress(tmp_path):
    """A Python client (no browser) records, and the server is stopped mid-recording."""
    server, url = start_server(tmp_path, "--host", "127.0.0.2")  # not localhost: a token is required
    token = url.split("token=")[1]
    assert len(token) >= 24
    try:
        frame = _frame_jpeg()
        with connect(f"ws://127.0.0.2:{url.split(':')[2].split('/')[0]}/ws?token={token}") as ws:
            assert json.loads(ws.recv())["type"] == "hello"
            ws.send('{"type": "record", "on": true}')
            name = json.loads(ws.recv())["file"]
            for sequence in range(1, 8):
                ws.send(struct.pack(">I", sequence) + frame)
                message, _ = protocol.unpack_result(ws.recv())
                assert message["recording"] and len(message["faces"]) == 3
            server.send_signal(signal.SIGTERM)
            _, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 143, err
    assert count_frames(tmp_path / "recordings" / name) == 7


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl (to make a test certificate) is missing")
def test_https_and_wss_with_a_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server, url = start_server(tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    try:
        assert url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        with urllib.request.urlopen(url, context=context) as response:
            assert response.status == 200 and b'id="view"' in response.read()
        with connect(url.replace("https", "wss") + "ws", ssl=context,
                     origin=url.rstrip("/")) as ws:
            assert json.loads(ws.recv())["type"] == "hello"
            ws.send(struct.pack(">I", 3) + _frame_jpeg())
            message, _ = protocol.unpack_result(ws.recv())
            assert message["seq"] == 3 and len(message["faces"]) == 3
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 130, err  # Ctrl-C
    assert re.search(r"camface serve: [1-9]\d* frames in [1-9]\d* graph calls", err), err


ASYNCIO_READ_BYTES = 256 * 1024  # what asyncio's socket transport reads at most at once (max_size)


def test_one_client_cannot_make_the_server_buffer_more_than_one_read_ahead_of_the_app(tmp_path, monkeypatch):
    """The server `camface serve` configures, with an app that takes no message (a frame that
    decodes slowly), and a client that sends 4 MiB of small messages as fast as it can: uvicorn
    pauses reading after a message, so it queues only what one read of the socket held, reads
    no more until the app takes them, and the client's other sends wait. (This test checked
    ws_max_queue x ws_max_size <= 16 MiB, a limit not enforced: uvicorn 0.54's websockets-sansio
    ignores ws_max_queue, and queues every message of a read, more than WS_QUEUE here. No
    compression is part of the bound: inflated, one read would queue far more.)"""
    import asyncio
    import socket
    import threading
    import time

    import uvicorn

    from camface.cli import main as camface_main

    configs, real_server = [], uvicorn.Server

    class Server:
        def __init__(self, config):
            configs.append(config)

        def run(self, sockets):
            sockets[0].close()
            raise KeyboardInterrupt

    monkeypatch.setattr(uvicorn, "Server", Server)
    code = camface_main(["serve", "--port", "0", "--record-dir", str(tmp_path / "r"),
                         "--snapshot-dir", str(tmp_path / "s")])
    assert code == 130 and len(configs) == 1
    config = configs[0]
    assert config.ws is ServeWebSocketProtocol  # its shutdown: test_shutdown_after_a_client_closed...
    assert config.ws_max_size >= protocol.MAX_MESSAGE_BYTES  # a whole frame message still fits

    sent, seen = [0], {}

    async def app_not_reading(scope, receive, send):
        assert scope["type"] == "websocket"
        await receive()
        await send({"type": "websocket.accept"})
        queue = receive.__self__.queue  # uvicorn's queue of the messages it read for the app
        last, since = -1, time.monotonic()
        while time.monotonic() - since < 0.5:  # the event loop held: the client fills the socket's buffers
            time.sleep(0.02)
            last, since = (sent[0], time.monotonic()) if sent[0] != last else (last, since)
        seen["sent"] = sent[0]
        while queue.empty():  # the server reads again, once
            await asyncio.sleep(0)
        queued = []
        while not queue.empty():  # taken without `receive`, which would let uvicorn read on
            queued.append(queue.get_nowait())
        await asyncio.sleep(0.2)
        seen["queued"], seen["read_later"] = queued, queue.qsize()

    config.app, config.lifespan = app_not_reading, "off"
    server = real_server(config)
    with socket.create_server(("127.0.0.1", 0)) as listening:
        serving = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
        serving.start()

        def client():
            with contextlib.suppress(Exception), \
                    connect(f"ws://127.0.0.1:{listening.getsockname()[1]}/ws") as ws:  # default: offers deflate
                for _ in range(1024):
                    ws.send(bytes(4096))
                    sent[0] += 1

        while not server.started:
            time.sleep(0.01)
        threading.Thread(target=client, daemon=True).start()
        try:
            deadline = time.monotonic() + 60
            while "read_later" not in seen:
                assert time.monotonic() < deadline and serving.is_alive(), "the app never saw a message"
                time.sleep(0.01)
        finally:
            server.should_exit = True
            serving.join(30)
    queued_bytes = sum(len(message.get("bytes") or b"") for message in seen["queued"])
    assert seen["sent"] * 4096 > ASYNCIO_READ_BYTES  # the client had sent more than one read
    assert 0 < queued_bytes <= ASYNCIO_READ_BYTES, (len(seen["queued"]), queued_bytes)
    assert seen["read_later"] == 0  # paused: nothing more read until the app takes what is queued


def test_messages_are_not_compressed_so_a_small_send_cannot_fill_the_servers_memory(tmp_path):
    """uvicorn offered permessage-deflate: the caps (2 MiB a message, 4 MiB for uvicorn) apply
    to the inflated message, and uvicorn inflates and queues every message of a read (256 KiB)
    before the app sees the first, so 251 KB of deflated 4 MiB messages took the server's memory
    up by ~170 MB (per client, and per refused socket). JPEG and PNG frames do not deflate: the
    server now offers no compression, and a client's bytes on the wire are what it costs."""
    server, url = start_server(tmp_path)
    try:
        with connect(url.replace("http", "ws") + "ws", compression="deflate") as ws:
            assert json.loads(ws.recv())["type"] == "hello"
            assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
            ws.send(struct.pack(">I", 1) + _frame_jpeg())
            message, _ = protocol.unpack_result(ws.recv())
            assert message["seq"] == 1 and len(message["faces"]) == 3
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """The port is bound first: a port in use is one error line naming host:port, exit 2, and
    no model is loaded (it was said only after the model had loaded, seconds later)."""
    import socket

    import camface.api
    from camface.cli import main as camface_main

    monkeypatch.setattr(camface.api, "load", lambda **kwargs: pytest.fail("the model loaded before the port"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = camface_main(["serve", "--host", "127.0.0.1", "--port", str(port),
                             "--record-dir", str(tmp_path), "--snapshot-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["camface.serve.app.create_app", "uvicorn.Config"])
def test_a_failure_after_the_model_loaded_closes_the_socket_and_the_pipeline(tmp_path, monkeypatch, where):
    """The port is bound before the model loads: an error in setting up the server after that
    (the app, uvicorn's config) closes the listening socket and the loaded pipeline."""
    import importlib
    import socket

    import camface.api
    import camface.serve.cli
    from camface.cli import main as camface_main

    listened, ports, closed = [], [], []
    real_listen, real_load = camface.serve.cli._listen, camface.api.load

    def listen(host, port):
        listened.append(real_listen(host, port))
        ports.append(listened[-1].getsockname()[1])
        return listened[-1]

    def load(**kwargs):
        pipeline = real_load(**kwargs)
        real_close = pipeline.close

        def close():
            closed.append(True)
            real_close()

        pipeline.close = close
        return pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    module, name = where.rsplit(".", 1)
    monkeypatch.setattr(camface.serve.cli, "_listen", listen)
    monkeypatch.setattr(camface.api, "load", load)
    monkeypatch.setattr(importlib.import_module(module), name, broken)
    with pytest.raises(RuntimeError, match="broken on purpose"):
        camface_main(["serve", "--host", "127.0.0.1", "--port", "0",
                      "--record-dir", str(tmp_path), "--snapshot-dir", str(tmp_path)])
    assert len(listened) == 1 and listened[0].fileno() == -1  # closed
    assert closed == [True]
    with socket.socket() as again:  # the port is free again
        again.bind(("127.0.0.1", ports[0]))


class _Transport:
    """What uvicorn's protocol writes and whether it closed the connection (no socket)."""

    def __init__(self):
        self.written, self.closing = bytearray(), False

    def write(self, data):
        self.written += data

    def close(self):
        self.closing = True

    def is_closing(self):
        return self.closing

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def set_write_buffer_limits(self, *args, **kwargs):
        pass


@pytest.mark.parametrize("client_closed", [True, False], ids=["client closed", "open"])
def test_shutdown_after_a_client_closed_but_before_its_connection_is_gone(client_closed):
    """CI once failed here: Ctrl-C reached the server just after a wss client had closed (the TLS
    shutdown keeps the connection listed), uvicorn sent a second close frame, websockets raised
    InvalidState, and serve exited 1 with a traceback instead of 130. The protocol `serve` gives
    uvicorn shuts such a connection down quietly; an open one still gets close code 1012."""
    import asyncio

    from uvicorn.config import Config
    from uvicorn.server import ServerState
    from websockets.client import ClientProtocol
    from websockets.frames import Close
    from websockets.protocol import State
    from websockets.uri import parse_uri

    async def app(scope, receive, send):
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await receive()

    async def run():
        config = Config(app, ws=ServeWebSocketProtocol, lifespan="off", log_level="warning")
        config.load()
        server = ServeWebSocketProtocol(config, ServerState(), {}, _loop=asyncio.get_running_loop())
        transport = _Transport()
        server.connection_made(transport)
        client = ClientProtocol(parse_uri("ws://127.0.0.1:8000/ws"))
        client.send_request(client.connect())
        server.data_received(b"".join(client.data_to_send()))
        for _ in range(50):  # the app's task accepts
            if server.handshake_complete:
                break
            await asyncio.sleep(0)
        assert server.handshake_complete
        client.receive_data(bytes(transport.written))  # the 101 response
        client.events_received()
        del transport.written[:]
        if client_closed:
            client.send_close(1000)
            server.data_received(b"".join(client.data_to_send()))
            assert transport.closing  # closed by uvicorn, but not yet reported lost
        sent = len(transport.written)
        server.shutdown()
        assert transport.closing
        client.receive_data(bytes(transport.written))
        client.events_received()
        return client, len(transport.written) - sent

    client, written_at_shutdown = asyncio.run(run())
    if client_closed:
        assert written_at_shutdown == 0 and client.close_rcvd.code == 1000  # its own close, answered once
    else:
        assert client.state is State.CLOSING and client.close_rcvd == Close(1012, "")
