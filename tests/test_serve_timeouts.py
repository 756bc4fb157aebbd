"""`camface serve` frees the place of a client that sends nothing (--idle-timeout) or does not
read what it is sent (--send-timeout): closed with 1008 and the reason, so idle or stuck
sockets cannot lock everyone else out with "server full"."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="camface[serve] is not installed")

from tests.test_serve import closed, graph, jpeg, make_client, wait_until  # noqa: E402, F401 (fixtures)


def close_of(ws, limit: float = 60.0) -> dict:
    """The close message the server sends, read in a thread so that a server that never
    closes fails the test instead of hanging it."""
    got = {}
    reader = threading.Thread(target=lambda: got.update(closed(ws)), daemon=True)
    reader.start()
    reader.join(limit)
    assert got, f"the server did not close the socket in {limit:g} s"
    return got


def test_an_idle_client_is_closed_and_its_place_freed(make_client):
    client, state = make_client(max_clients=1, idle_timeout_s=0.3)
    with client.websocket_connect("/ws") as idle:
        hello = idle.receive_json()
        assert hello["limits"]["idle_timeout_s"] == 0.3
        close = close_of(idle)
        assert close["code"] == 1008 and close["reason"] == "idle: no message for 0.3 s (--idle-timeout)"
    wait_until(lambda: state.connected == 0)
    with client.websocket_connect("/ws") as next_one:  # not "server full"
        assert next_one.receive_json()["type"] == "hello"


def test_a_client_that_keeps_sending_is_not_idle(make_client, astronaut_bgr):
    client, _ = make_client(idle_timeout_s=5.0)
    with client.websocket_connect("/ws") as ws:
        ws.receive_json()
        for sequence in range(3):
            ws.send_bytes(struct.pack(">I", sequence) + jpeg(astronaut_bgr))
            assert isinstance(ws.receive_bytes(), bytes)


def test_a_client_that_does_not_read_is_closed_and_its_place_freed(make_client, astronaut_bgr, monkeypatch):
    from starlette.websockets import WebSocket

    async def never_taken(self, data):  # a socket whose peer never reads: the send never completes
        import asyncio

        await asyncio.Event().wait()

    monkeypatch.setattr(WebSocket, "send_bytes", never_taken)
    client, state = make_client(max_clients=1, send_timeout_s=0.3)
    with client.websocket_connect("/ws") as stuck:
        stuck.receive_json()
        stuck.send_bytes(struct.pack(">I", 1) + jpeg(astronaut_bgr))
        close = close_of(stuck)
        assert close["code"] == 1008 and close["reason"] == "client did not read for 0.3 s (--send-timeout)"
    wait_until(lambda: state.connected == 0)
    with client.websocket_connect("/ws") as next_one:
        assert next_one.receive_json()["type"] == "hello"


def test_a_client_whose_frame_failed_and_that_does_not_read_is_freed(make_client, astronaut_bgr, monkeypatch):
    """A frame that fails (FrameFailed) closes its client; when the client does not read, the
    close frame cannot go out (its send waits for the socket to drain), and the sender waited
    for it without a bound: a client that went on sending (never idle) kept its place."""
    import asyncio
    import contextlib

    import camface.api
    from starlette.websockets import WebSocket

    from tests.test_serve import _BrokenDetector

    async def never_taken(self, code=1000, reason=None):
        await asyncio.Event().wait()

    monkeypatch.setattr(WebSocket, "close", never_taken)
    monkeypatch.setattr(camface.api, "face_detector", lambda config: contextlib.nullcontext(_BrokenDetector()))
    client, state = make_client(max_clients=1, idle_timeout_s=600)
    with client.websocket_connect("/ws") as stuck:
        stuck.receive_json()
        stuck.send_bytes(struct.pack(">I", 1) + jpeg(astronaut_bgr))
        wait_until(lambda: state.connected == 0)  # not after 600 s of --idle-timeout


def test_a_client_that_leaves_while_its_frame_is_sent_is_no_warning(make_client, astronaut_bgr, monkeypatch, caplog):
    """The socket gone under a send (WebSocketDisconnect, 1006) is a client leaving: the
    sender logged it as a failure, 'client 1: 1006', and tried to close the closed socket."""
    import logging

    from starlette.websockets import WebSocket, WebSocketDisconnect

    async def gone(self, data):
        raise WebSocketDisconnect(1006)

    monkeypatch.setattr(WebSocket, "send_bytes", gone)
    client, state = make_client()
    with caplog.at_level(logging.INFO, logger="camface"), client.websocket_connect("/ws") as ws:
        ws.receive_json()
        ws.send_bytes(struct.pack(">I", 1) + jpeg(astronaut_bgr))
        wait_until(lambda: state.connected == 0)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("options, message", [
    ({"idle_timeout_s": 0}, "--idle-timeout must be a finite number of seconds > 0, got 0"),
    ({"send_timeout_s": -1.0}, "--send-timeout must be a finite number of seconds > 0, got -1.0"),
    ({"idle_timeout_s": float("nan")}, "--idle-timeout must be .* got nan"),
    # the hello carries the timeouts: Infinity is not JSON, the page could not read it (and broke)
    ({"idle_timeout_s": float("inf")}, "--idle-timeout must be a finite number of seconds > 0, got inf"),
    ({"send_timeout_s": float("inf")}, "--send-timeout must be .* got inf"),
])
def test_timeouts_must_be_positive(options, message, tmp_path):
    from camface.serve.state import ServeOptions

    with pytest.raises(ValueError, match=message):
        ServeOptions(record_dir=tmp_path / "r", snapshot_dir=tmp_path / "s", **options)


@pytest.mark.parametrize("flag, field", [("--snapshot-dir", "snapshot_dir"), ("--record-dir", "record_dir")])
@pytest.mark.parametrize("exists", [True, False])
def test_the_folders_must_be_writable_at_start(flag, field, exists, tmp_path, monkeypatch):
    """An unwritable --snapshot-dir (e.g. the default `snapshots` in a read-only working folder)
    is refused at start: before, the server started and every client failed (1011, a traceback
    in the log) when its session opened the snapshot writer."""
    import os

    from camface.serve.state import ServeOptions

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    folder = read_only / "out" if not exists else read_only
    writable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: writable(path, mode) and Path(path) != read_only)  # root may write anywhere
    options = {"record_dir": tmp_path / "r", "snapshot_dir": tmp_path / "s", field: folder}
    with pytest.raises(ValueError, match=f"{flag} {folder}: folder {read_only} is not writable"):
        ServeOptions(**options)
