"""`camface serve` without a browser: the WebSocket protocol through Starlette's TestClient,
the checks on every message, token / Origin / max-clients, snapshots and recordings, and the
shared inference worker (one graph call for every client's frame)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import struct

import cv2
import numpy as np
import pytest
from realtime_helpers import count_frames, frame_times

pytest.importorskip("starlette", reason="camface[serve] is not installed")
from starlette.testclient import TestClient  # noqa: E402

from camface.graph_spec import auto_method  # noqa: E402
from camface.serve import protocol  # noqa: E402


class Client(TestClient):
    """A TestClient that talks to http(s)://127.0.0.1:8000, as a browser on this machine would
    (the server without a token answers to localhost names only)."""

    def __init__(self, app):
        super().__init__(app, base_url="http://127.0.0.1:8000")

    def websocket_connect(self, url, *args, **kwargs):
        return super().websocket_connect("ws://127.0.0.1:8000" + url, *args, **kwargs)


@pytest.fixture(scope="module")
def graph():
    from camface.models import EMOTION_ONNX
    from camface.realtime.graph import CamGraph

    return CamGraph(EMOTION_ONNX, "cpu", threads=1)


@pytest.fixture
def make_client(graph, tmp_path):
    """make_client(**ServeOptions fields) -> (TestClient entered, ServeState)."""
    from camface.models import EMOTION_ONNX
    from camface.realtime.config import LiveConfig
    from camface.serve.app import create_app
    from camface.serve.state import ServeOptions, ServeState

    opened = []

    def make(config=None, **options):
        options.setdefault("record_dir", tmp_path / "recordings")
        options.setdefault("snapshot_dir", tmp_path / "snapshots")
        state = ServeState(config or LiveConfig(), ServeOptions(**options), graph, EMOTION_ONNX)
        client = Client(create_app(state))
        client.__enter__()
        opened.append(client)
        return client, state

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def send_frame(ws, sequence: int, image: bytes):
    ws.send_bytes(struct.pack(">I", sequence) + image)
    return protocol.unpack_result(ws.receive_bytes())


def closed(ws) -> dict:
    """The close message the server sent (after any replies still on their way)."""
    while True:
        message = ws.receive()
        if message["type"] == "websocket.close":
            return message


@pytest.mark.parametrize("controls", [
    {"hud": False},
    {"hud": False, "method": "gradcampp", "explained_class": 0},
    {"hud": False, "method": "none"},
])
def test_a_frame_comes_back_as_the_frame_explainer_and_renderer_make_it(make_client, graph, astronaut_bgr,
                                                                        controls):
    from camface.api import face_detector
    from camface.realtime.config import LiveConfig
    from camface.realtime.explainer import FrameExplainer
    from camface.realtime.render import Renderer
    from camface.realtime.controls import Controls

    config = LiveConfig(cam_boxes=True, bars=True)
    client, _ = make_client(config, jpeg_quality=85)
    image = jpeg(astronaut_bgr)
    with client.websocket_connect("/ws") as ws:
        hello = ws.receive_json()
        assert hello["type"] == "hello" and hello["methods"] == list(graph.methods)  # the registry's, in the graph
        assert hello["labels"] == list(graph.info.labels)
        assert hello["method"] == auto_method(graph.info)[0]  # --method auto: the graph's top-ranked method
        ws.send_text(json.dumps({"type": "controls", **controls}))
        message, annotated = send_frame(ws, 41, image)
    # the same frame through the same pieces, here
    frame = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
    with face_detector(config) as detector:
        faces = detector.detect(frame)
    want = Controls(controls.get("method", auto_method(graph.info)[0]), controls.get("explained_class"), hud=False)
    result = FrameExplainer.from_config(config, graph).explain(frame, faces, want).result
    assert message["seq"] == 41 and message["index"] == 0 and message["method"] == want.method
    assert message["explained_class"] == want.explained_class and message["batch_frames"] == 1
    assert len(message["faces"]) == len(result.faces) == 1
    got, face, prediction = message["faces"][0], result.faces[0], result.predictions[0]
    assert got["box"] == list(face.box)
    np.testing.assert_allclose(got["probs"], prediction.probs, atol=6e-5)
    assert got["predicted"] == prediction.predicted and got["explained"] == prediction.explained
    assert set(message["stage_ms"]) >= {"decode", "detect", "classify", "render", "encode"}
    Renderer.from_config(config).annotate(frame, result, hud=False)
    assert annotated == jpeg(frame, 85)  # the very bytes: the live loop's pictures


def test_two_clients_at_once_get_their_own_results(make_client, astronaut_bgr):
    client, state = make_client()
    blank = np.full((240, 320, 3), 128, np.uint8)
    with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
        a.receive_json(), b.receive_json()
        a.send_text(json.dumps({"type": "controls", "method": "gradcampp"}))
        for sequence in range(1, 4):
            got_a, jpeg_a = send_frame(a, sequence, jpeg(astronaut_bgr))
            got_b, jpeg_b = send_frame(b, 100 + sequence, jpeg(blank))
            assert got_a["seq"] == sequence and got_b["seq"] == 100 + sequence
            assert len(got_a["faces"]) == 1 and got_b["faces"] == []
            assert got_a["method"] == "gradcampp" and got_b["method"] == state.config.method  # --method auto's
            assert cv2.imdecode(np.frombuffer(jpeg_a, np.uint8), 1).shape == (512, 512, 3)
            assert cv2.imdecode(np.frombuffer(jpeg_b, np.uint8), 1).shape == (240, 320, 3)
        assert state.stats()["clients"] == 2
    stats = state.stats()
    assert stats["frames_processed"] == stats["frames_received"] == 6 and stats["clients_served"] == 2


def test_the_smoothing_switch_gives_the_client_a_smoother(make_client, astronaut_bgr):
    from camface.realtime.config import LiveConfig

    client, _ = make_client(LiveConfig(smooth=0.7))
    dim = cv2.convertScaleAbs(astronaut_bgr, alpha=0.6)
    with client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["smooth"] is True  # --smooth 0.7: on from the start
        first, _ = send_frame(ws, 1, jpeg(astronaut_bgr))
        smoothed, _ = send_frame(ws, 2, jpeg(dim))
        ws.send_text('{"type": "controls", "smooth": false}')
        send_frame(ws, 3, jpeg(astronaut_bgr))
        raw, _ = send_frame(ws, 4, jpeg(dim))
    assert first["faces"][0]["track_id"] == smoothed["faces"][0]["track_id"] == 0
    assert raw["faces"][0]["track_id"] == -1  # no smoother: no tracks
    want = 0.7 * np.array(first["faces"][0]["probs"]) + 0.3 * np.array(raw["faces"][0]["probs"])
    np.testing.assert_allclose(smoothed["faces"][0]["probs"], want, atol=2e-4)


def _many_scans(repeats: int) -> bytes:
    """A progressive JPEG whose last scan (with its Huffman table) is repeated `repeats` times:
    libjpeg decodes each again, over the whole image (warnings only), so such a file takes
    seconds to minutes to decode at 4096x4096; here at 64x48."""
    data = cv2.imencode(".jpg", np.zeros((48, 64), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    last_table = data.rindex(b"\xff\xc4", 0, data.rindex(b"\xff\xda"))
    return data[:-2] + data[last_table:-2] * repeats + b"\xff\xd9"


def _png_header(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", width, height) + b"\x08\x02\0\0\0"


def _zero_height_jpeg() -> bytes:
    """A JPEG whose frame header (SOF0) gives a height of 0 (the height would come in a DNL marker)."""
    data = cv2.imencode(".jpg", np.zeros((48, 64, 3), np.uint8))[1].tobytes()
    sof = data.index(b"\xff\xc0")
    return data[:sof + 5] + b"\0\0" + data[sof + 7:]


@pytest.mark.parametrize("message, code, reason", [
    (b"\0\0\0\1" + b"\xff\xd8\xff" + b"\0" * protocol.MAX_MESSAGE_BYTES, 1009, "over the 2 MiB cap"),
    (b"\0\0\0\1hello", 1003, "not a JPEG or PNG"),
    (b"\0\0", 1003, "expected a 4-byte sequence number"),
    (b"\0\0\0\1" + _png_header(5000, 10), 1009, "5000x10 pixels is over the 4096x4096 cap"),
    # a side of 0 is a corrupt header, not a frame too big (it was 1009, "over the cap")
    (b"\0\0\0\1" + _png_header(0, 10), 1003, "frame of 0x10 pixels: its PNG header gives a side of 0"),
    (b"\0\0\0\1" + _zero_height_jpeg(), 1003, "frame of 64x0 pixels: its JPEG header gives a side of 0"),
    (b"\0\0\0\1" + _png_header(64, 64) + b"garbage", 1003, "does not decode"),
    (b"\0\0\0\1\xff\xd8\xff\xe0\0\x10JFIF", 1003, "truncated or corrupt JPEG"),
    (b"\0\0\0\1" + _many_scans(40), 1009, r"JPEG of \d+ scans, over the 32 cap"),  # decoded, slowly, before
    ("not json", 1003, "not JSON"),
    ("[1, 2]", 1003, "needs a type among controls, snapshot, record"),
    ('{"type": "reboot"}', 1003, "needs a type"),
    ('{"type": []}', 1003, "needs a type among"),  # unhashable: a TypeError before the fix
    ('{"type": {}}', 1003, "needs a type among"),
    ('{"type": ["controls"]}', 1003, "needs a type among"),
    ("[" * 3000, 1003, "nested too deeply"),  # a RecursionError in json.loads before the fix
    ('{"type": "controls", "hud": ' + "[" * 2000 + "]" * 2000 + "}", 1003, "nested too deeply"),
    ('{"type": "controls", "colour": "red"}', 1003, "unknown field 'colour' in 'controls'"),
    ('{"type": "controls", "hud": 1}', 1003, "field 'hud' of 'controls' has the wrong type"),
    ('{"type": "controls", "explained_class": true}', 1003, "field 'explained_class' .* wrong type"),
    ('{"type": "controls", "method": "lime"}', 1003, "method 'lime' unknown; the graph offers gradcam"),
    ('{"type": "controls", "explained_class": 7}', 1003, "explained_class 7 out of range 0..6"),
    ('{"type": "record", "on": true, "fps": 0}', 1003, "fps 0 out of range"),
    ('{"type": "snapshot", "x": "' + "y" * 5000 + '"}', 1009, "control message over 4096 bytes"),
])
def test_a_bad_message_closes_that_client_only(make_client, astronaut_bgr, message, code, reason):
    import re

    client, _ = make_client()
    with client.websocket_connect("/ws") as good, client.websocket_connect("/ws") as bad:
        good.receive_json(), bad.receive_json()
        if isinstance(message, bytes):
            bad.send_bytes(message)
        else:
            bad.send_text(message)
        close = closed(bad)
        assert close["code"] == code and re.search(reason, close["reason"]), close
        got, _ = send_frame(good, 5, jpeg(astronaut_bgr))  # the other client keeps running
        assert got["seq"] == 5 and len(got["faces"]) == 1


def test_the_token_is_needed_by_the_page_the_socket_and_the_files(make_client):
    client, _ = make_client(token="s3cret-token")
    for path in ("/", "/?token=wrong", "/stats", "/recordings/x.mp4"):
        response = client.get(path)
        assert response.status_code == 403 and "token" in response.text
    assert client.get("/?token=s3cret-token").status_code == 200
    assert client.get("/app.js").status_code == 200  # the script holds no secret
    assert client.get("/stats?token=s3cret-token").json()["clients"] == 0
    for path in ("/ws", "/ws?token=nope"):
        with client.websocket_connect(path) as ws:
            close = closed(ws)
            assert close["code"] == 1008 and close["reason"] == "missing or wrong token"
    with client.websocket_connect("/ws?token=s3cret-token") as ws:
        assert ws.receive_json()["type"] == "hello"


@pytest.mark.parametrize("path", ["/", "/app.js", "/app.css", "/stats", "/recordings/x.mp4", "/?token=wrong"])
def test_every_response_carries_a_policy_that_allows_only_this_server(make_client, path):
    """The camera page runs only its own script and style, connects only to its own server
    (and WebSocket), cannot be framed by another site (a click on snapshot or record through
    a transparent frame), and names no token in a Referer."""
    client, _ = make_client()
    response = client.get(path)
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == policy["style-src"] == "'self'"  # no inline script or style, no eval
    assert policy["connect-src"] == "'self'"  # its own WebSocket included (CSP level 3)
    assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_the_page_has_no_inline_script_or_style_its_policy_would_block(make_client):
    client, _ = make_client()
    page = client.get("/").text
    assert not re.search(r"<style|\sstyle=|<script(?![^>]*\ssrc=)|\son[a-z]+=", page)
    for link in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert client.get("/" + link.lstrip("/")).status_code == 200, link
    assert client.get("/app.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize("origin, accepted", [
    ("http://127.0.0.1:8000", True),  # the page's own origin
    (None, True),  # not a browser
    ("http://evil.example", False),
    ("http://127.0.0.1:8001", False),
    ("https://127.0.0.1:8000.evil.example", False),
    ("null", False),
])
def test_the_socket_checks_the_origin(make_client, origin, accepted):
    client, _ = make_client()
    headers = {"origin": origin} if origin else {}
    with client.websocket_connect("/ws", headers=headers) as ws:
        if accepted:
            assert ws.receive_json()["type"] == "hello"
        else:
            close = closed(ws)
            assert close["code"] == 1008 and f"origin {origin} is not this server's (127.0.0.1:8000)" in close["reason"]


@pytest.mark.parametrize("host, token, accepted", [
    ("localhost:8000", None, True), ("[::1]:8000", None, True),
    ("rebound.evil.example:8000", None, False),  # DNS rebinding: another name for 127.0.0.1
    ("rebound.evil.example:8000", "s3cret-token", True),  # the token guards it then
])
def test_without_a_token_only_localhost_names_are_answered(make_client, host, token, accepted):
    client, _ = make_client(token=token)
    query = f"?token={token}" if token else ""
    response = client.get("/" + query, headers={"host": host})
    assert response.status_code == (200 if accepted else 403)
    with client.websocket_connect("/ws" + query, headers={"host": host}) as ws:
        if accepted:
            assert ws.receive_json()["type"] == "hello"
        else:
            close = closed(ws)
            assert close["code"] == 1008
            assert close["reason"] == f"host '{host}' refused: without --token this server answers to localhost only"
            assert "answers to localhost only" in response.text


def wait_until(condition, timeout: float = 60.0) -> None:
    """Poll until `condition()`; the timeout only ends a hang (it returns as soon as it holds:
    a short one failed on a loaded machine, where closing a detector or a recording is slower)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_max_clients_is_enforced_with_a_clear_message(make_client):
    client, state = make_client(max_clients=1)
    with client.websocket_connect("/ws") as first:
        first.receive_json()
        with client.websocket_connect("/ws") as extra:
            close = closed(extra)
            assert close["code"] == 1013
            assert close["reason"] == "server full: 1 client(s) connected (--max-clients 1); try later"
    wait_until(lambda: state.connected == 0)  # the server has closed the first one's detector
    with client.websocket_connect("/ws") as again:  # the place is free once the first left
        assert again.receive_json()["type"] == "hello"


def test_snapshot_and_recording_from_the_page(make_client, astronaut_bgr, tmp_path):
    from camface.guided.snapshot import read_snapshot

    client, state = make_client()
    image = jpeg(astronaut_bgr)
    with client.websocket_connect("/ws") as ws:
        ws.receive_json()
        ws.send_text('{"type": "snapshot"}')
        got, _ = send_frame(ws, 1, image)
        note = ws.receive_json()
        assert note["type"] == "snapshot" and note["faces"] == 1
        ws.send_text('{"type": "record", "on": true, "fps": 15}')
        started = ws.receive_json()
        assert started["type"] == "recording" and started["file"].endswith(".mp4")
        recorded_flags = [send_frame(ws, 1 + k, image)[0]["recording"] for k in range(1, 6)]
        ws.send_text('{"type": "record", "on": false}')
        done = ws.receive_json()
    assert recorded_flags == [True] * 5
    assert done == {"type": "recorded", "file": started["file"], "frames": 5, "url": f"/recordings/{started['file']}"}
    path = tmp_path / "recordings" / started["file"]
    assert count_frames(path) == 5
    times = frame_times(path)  # when the frames came (see the test below), not 1 / 15 s apart
    assert times[0] == 0.0 and all(later > earlier for earlier, later in zip(times, times[1:]))
    response = client.get(done["url"])
    assert response.status_code == 200 and response.content == path.read_bytes()
    assert client.get("/recordings/..%2Fsecret").status_code == 404
    snapshot = read_snapshot(tmp_path / "snapshots" / note["folder"])  # what `camface guided` reads
    assert len(snapshot.faces) == 1 and tuple(snapshot.labels) == state.graph.info.labels


def test_a_recording_keeps_the_time_between_the_frames_that_came(make_client, astronaut_bgr, tmp_path,
                                                                  monkeypatch):
    """Frames that arrive every 0.2 s (a slow client, or the worker skipping frames) are
    recorded 0.2 s apart, not 1 / fps: the file plays at the speed it was filmed."""
    from camface.serve import app

    arrivals = iter(500.0 + 0.2 * k for k in range(100))
    monkeypatch.setattr(app, "CLOCK", lambda: next(arrivals))
    client, _ = make_client()
    with client.websocket_connect("/ws") as ws:
        name = _record(ws, 4, jpeg(astronaut_bgr), '"fps": 15')
        ws.send_text('{"type": "record", "on": false}')
        assert ws.receive_json()["frames"] == 4
    times = frame_times(tmp_path / "recordings" / name)
    assert times == pytest.approx([0.0, 0.2, 0.4, 0.6], abs=1e-3)  # 3 periods at 15 fps each


def _record(ws, frames: int, image: bytes, fields: str = "") -> str:
    """After the hello: start recording (with JSON `fields`), send `frames` frames; the file's name."""
    ws.receive_json()
    ws.send_text('{"type": "record", "on": true' + (", " + fields if fields else "") + "}")
    name = ws.receive_json()["file"]
    for k in range(frames):
        send_frame(ws, k + 1, image)
    return name


def test_record_while_recording_says_the_file_and_its_fps_are_kept(make_client, astronaut_bgr, tmp_path):
    """A second {"record", "on": true} with another fps: the recording goes on in the same
    file at its own fps, and the reply says so (it replied as if the new fps were taken)."""
    client, _ = make_client()
    with client.websocket_connect("/ws") as ws:
        name = _record(ws, 2, jpeg(astronaut_bgr), '"fps": 15')
        ws.send_text('{"type": "record", "on": true, "fps": 30}')
        again = ws.receive_json()
        send_frame(ws, 3, jpeg(astronaut_bgr))
        ws.send_text('{"type": "record", "on": false}')
        done = ws.receive_json()
    assert again["type"] == "recording" and again["on"] is True
    assert (again["file"], again["fps"], again["already"]) == (name, 15, True)
    assert again["note"] == f"already recording to {name} at 15 fps: fps 30 is ignored (stop, then record again)"
    assert (done["file"], done["frames"]) == (name, 3)
    assert sorted(p.name for p in (tmp_path / "recordings").iterdir()) == [name]


def test_a_client_leaving_mid_recording_leaves_a_playable_file(make_client, astronaut_bgr, tmp_path):
    client, state = make_client()
    with client.websocket_connect("/ws") as ws:
        name = _record(ws, 3, jpeg(astronaut_bgr))
    # the socket is gone without a "stop": the server finalised the file
    path = tmp_path / "recordings" / name
    wait_until(lambda: state.connected == 0 and name in state.recordings)
    assert count_frames(path) == 3 and state.recordings[name] == path


# ------------------------------------------------------------------ the shared worker


def test_one_graph_call_for_every_clients_newest_frame(make_client, graph, astronaut_bgr):
    """Three clients with a frame waiting (one sent two: the older is dropped as stale): one
    round of the worker makes ONE graph call and gives each what its own explainer would."""
    from camface.api import face_detector
    from camface.realtime.explainer import FrameExplainer
    from camface.realtime.controls import Controls
    from camface.serve.session import Frame, Session

    _, state = make_client()
    state.worker.stop()  # drive rounds by hand
    delivered = []
    state.worker._deliver = lambda session, work: delivered.append((session, work))
    frames = [astronaut_bgr, cv2.flip(astronaut_bgr, 1), np.ascontiguousarray(astronaut_bgr[50:350, 60:400])]
    sessions = [Session(state, face_detector(state.config).__enter__()) for _ in frames]
    state.sessions.update({s.id: s for s in sessions})
    try:
        sessions[0].put(Frame(1, np.zeros((64, 64, 3), np.uint8), 0.0))  # stale: replaced before the round
        for k, (session, frame) in enumerate(zip(sessions, frames)):
            session.put(Frame(10 + k, frame.copy(), 0.0))
        calls = state.graph.calls
        assert state.worker.round() == 3
        assert state.graph.calls == calls + 1 and state.graph.crops >= 3
        assert sessions[0].dropped == 1 and [s.dropped for s in sessions[1:]] == [0, 0]
        assert state.worker.round() == 0  # nothing new: nothing done
        with face_detector(state.config) as detector:
            for (session, work), frame in zip(delivered, frames):
                assert work.frame.sequence == 10 + sessions.index(session) and work.batch_frames == 3
                want = FrameExplainer(graph).explain(frame, detector.detect(frame), Controls(state.config.method)).result
                got = work.explained.result
                assert got.faces == want.faces and len(got.faces) == 1
                np.testing.assert_allclose(got.predictions[0].probs, want.predictions[0].probs, rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(got.predictions[0].heatmap, want.predictions[0].heatmap,
                                           rtol=1e-4, atol=1e-6)
    finally:
        for session in sessions:
            session.close()


def test_a_client_with_unsent_frames_is_skipped_and_keeps_its_newest(make_client):
    from camface.serve.session import MAX_PENDING, Frame, Session

    _, state = make_client()
    state.worker.stop()
    state.worker._deliver = lambda session, work: None
    session = Session(state, None)  # no detector: no faces
    state.sessions[session.id] = session
    for k in range(MAX_PENDING):
        session.put(Frame(k, np.zeros((32, 32, 3), np.uint8), 0.0))
        assert state.worker.round() == 1
    session.put(Frame(7, np.zeros((32, 32, 3), np.uint8), 0.0))
    session.put(Frame(8, np.zeros((32, 32, 3), np.uint8), 0.0))
    assert state.worker.round() == 0 and session.dropped == 1  # the client has not read its replies
    session.sent()
    assert state.worker.round() == 1 and session.slot is None and session.processed == 0


class _BrokenDetector:
    """A face detector whose every call raises (a detector that broke on this client's frames)."""

    def detect(self, frame):
        raise RuntimeError("detector broke on this frame")

    def close(self):
        pass


def test_a_frame_that_fails_fails_only_its_client(make_client, astronaut_bgr, monkeypatch):
    """One client's detection raising, or its faces failing to explain, costs the others
    nothing: their frames of the same round are explained and delivered; the failing client
    gets a FrameFailed naming the stage and the error (its sender closes it, see below)."""
    from camface.api import face_detector
    from camface.serve import worker as worker_module
    from camface.serve.session import Frame, Session
    from camface.serve.worker import FrameFailed

    _, state = make_client()
    state.worker.stop()  # drive rounds by hand
    delivered = []
    state.worker._deliver = lambda session, work: delivered.append((session.id, work))
    good = Session(state, face_detector(state.config).__enter__())
    bad = Session(state, _BrokenDetector())
    later = Session(state, face_detector(state.config).__enter__())
    state.sessions.update({s.id: s for s in (good, bad, later)})
    try:
        for k, session in enumerate((good, bad, later)):
            session.put(Frame(k, astronaut_bgr.copy(), 0.0))
        assert state.worker.round() == 2 and state.worker.errors == 1
        got = dict(delivered)
        assert isinstance(got[bad.id], FrameFailed)
        assert str(got[bad.id]) == "face detection failed: RuntimeError: detector broke on this frame"
        assert bad.pending == good.pending == later.pending == 1  # each frame delivered once: its sender frees it
        for session in (good, later):
            assert len(got[session.id].explained.result.faces) == 1 and got[session.id].batch_frames == 2

        # the graph call for everyone fails once (one client's crops): each frame alone, then
        explain_many, calls = worker_module.explain_many, []

        def flaky(items, **kwargs):
            calls.append(len(items))
            if len(items) > 1 or items[0][1].shape[1] == 100:
                raise ValueError("this crop upset the graph")
            return explain_many(items, **kwargs)

        monkeypatch.setattr(worker_module, "explain_many", flaky)
        delivered.clear()
        good.sent(), later.sent()
        good.put(Frame(5, astronaut_bgr.copy(), 0.0))
        later.put(Frame(6, np.ascontiguousarray(astronaut_bgr[:, :100]), 0.0))
        assert state.worker.round() == 1 and calls == [2, 1, 1] and state.worker.errors == 2
        got = dict(delivered)
        assert len(got[good.id].explained.result.faces) == 1
        assert str(got[later.id]) == "explaining faces failed: ValueError: this crop upset the graph"
        assert good.pending == later.pending == 1
    finally:
        for session in (good, bad, later):
            session.close()


class _CountingSmoother:
    """Wraps a Smoother: records the frame index of each result its update takes; raises on
    each when `broken`."""

    def __init__(self, smoother, broken=False):
        self.smoother, self.broken, self.frames = smoother, broken, []

    def explain_classes(self, faces):
        return self.smoother.explain_classes(faces)

    def update(self, result):
        self.frames.append(result.index)
        if self.broken:
            raise RuntimeError("smoother broke on this frame")
        return self.smoother.update(result)


def test_a_smoother_that_fails_fails_only_its_client_and_the_others_smooth_each_frame_once(make_client,
                                                                                          astronaut_bgr):
    """One client's smoother raising in the shared call: that client gets a FrameFailed, and
    every other client's smoother takes each frame once (the retry one by one updated the
    clients before it a second time with the same frame: their averages counted it twice)."""
    from camface.api import face_detector
    from camface.realtime.config import LiveConfig
    from camface.realtime.controls import Controls
    from camface.realtime.explainer import FrameExplainer
    from camface.serve.session import Frame, Session
    from camface.serve.worker import FrameFailed

    _, state = make_client(LiveConfig(smooth=0.7))
    state.worker.stop()  # drive rounds by hand
    delivered = []
    state.worker._deliver = lambda session, work: delivered.append((session.id, work))
    with face_detector(state.config) as detector:
        faces = detector.detect(astronaut_bgr)
    assert len(faces) == 1
    sessions = [Session(state, None) for _ in range(3)]  # no detector: every frame has the astronaut's face
    for session in sessions:
        session.detect = lambda frame, index: faces
    first, broken, last = sessions
    counted = {s.id: _CountingSmoother(s.explainer.smoother, broken=s is broken) for s in sessions}
    for session in sessions:
        session.explainer.smoother = counted[session.id]
    state.sessions.update({s.id: s for s in sessions})
    frames = (astronaut_bgr, cv2.convertScaleAbs(astronaut_bgr, alpha=0.6))
    try:
        for frame in frames:
            delivered.clear()
            for session in sessions:
                session.put(Frame(0, frame.copy(), 0.0))
            assert state.worker.round() == 2
            got = dict(delivered)
            assert isinstance(got[broken.id], FrameFailed)
            assert str(got[broken.id]) == "explaining faces failed: RuntimeError: smoother broke on this frame"
            for session in sessions:
                session.sent()
        assert counted[first.id].frames == counted[last.id].frames == [0, 1]  # each frame once
        # what one stream's explainer gives for the two frames: each counted once in the average
        alone = FrameExplainer(state.graph, state.config.margin, state.config.max_faces, 0.7)
        want = [alone.explain(frame, faces, Controls(state.config.method), index).result
                for index, frame in enumerate(frames)][-1].predictions[0]
        for session in (first, last):
            prediction = got[session.id].explained.result.predictions[0]
            np.testing.assert_allclose(prediction.probs, want.probs, atol=2e-4)
            np.testing.assert_allclose(prediction.heatmap, want.heatmap, atol=2e-3 * np.abs(want.heatmap).max())
    finally:
        for session in sessions:
            session.close()


def test_a_client_whose_frames_fail_is_closed_saying_why(make_client, astronaut_bgr, monkeypatch):
    """The page is told why (1011, the stage and the error) at once, not closed as idle later;
    another client keeps running."""
    import camface.api

    client, state = make_client(idle_timeout_s=30)
    with client.websocket_connect("/ws") as good:
        good.receive_json()
        opened = camface.api.face_detector
        monkeypatch.setattr(camface.api, "face_detector", lambda config: contextlib.nullcontext(_BrokenDetector()))
        with client.websocket_connect("/ws") as bad:
            bad.receive_json()
            monkeypatch.setattr(camface.api, "face_detector", opened)
            bad.send_bytes(struct.pack(">I", 1) + jpeg(astronaut_bgr))
            close = closed(bad)
            assert close["code"] == 1011, close
            assert close["reason"] == "server error: face detection failed: RuntimeError: detector broke on this frame"
        got, _ = send_frame(good, 2, jpeg(astronaut_bgr))
        assert got["seq"] == 2 and len(got["faces"]) == 1


def test_a_recording_that_cannot_start_closes_that_client_saying_why(make_client, astronaut_bgr, tmp_path):
    """The record folder's parent removed while serving: "record" closes that client with 1011
    and the error (it was an exception out of the app: the socket cut, 1006, no reason), and
    another client keeps running."""
    (tmp_path / "gone").mkdir()
    client, state = make_client(record_dir=tmp_path / "gone" / "recordings")
    (tmp_path / "gone").rmdir()
    with client.websocket_connect("/ws") as good, client.websocket_connect("/ws") as bad:
        good.receive_json(), bad.receive_json()
        bad.send_text('{"type": "record", "on": true}')
        close = closed(bad)
        assert close["code"] == 1011, close
        assert close["reason"].startswith("server error: [Errno 2] No such file or directory"), close
        got, _ = send_frame(good, 3, jpeg(astronaut_bgr))
        assert got["seq"] == 3 and len(got["faces"]) == 1
    wait_until(lambda: state.connected == 0)


def test_a_session_that_cannot_open_closes_the_client_saying_why(make_client, monkeypatch):
    """The client's face detector will not open: 1011 and the error (it escaped the app: the
    socket cut, 1006, which the page retries), its place freed."""
    import camface.api

    def broken(config):
        raise RuntimeError("no detector today")

    client, state = make_client(max_clients=1)
    monkeypatch.setattr(camface.api, "face_detector", broken)
    with client.websocket_connect("/ws") as ws:
        close = closed(ws)
    assert close["code"] == 1011 and close["reason"] == "server error: no detector today", close
    assert state.connected == 0 and state.stats()["clients"] == 0


def test_a_client_whose_session_is_still_opening_at_shutdown_is_told_and_its_detector_closed(make_client,
                                                                                             monkeypatch):
    """The server shuts down while a client's face detector opens (in a thread): the late
    session was served by a closed server (hello, then nothing) and its detector left open;
    now it is closed and the client told with the code uvicorn gives the sockets it holds at
    shutdown (1012), which the page retries (it was 1001, which the page took as final)."""
    import threading

    import camface.api

    client, state = make_client(idle_timeout_s=5)
    opening, release, detector = threading.Event(), threading.Event(), _ClosingDetector()

    def slow(config):
        opening.set()
        assert release.wait(60)
        return contextlib.nullcontext(detector)

    monkeypatch.setattr(camface.api, "face_detector", slow)
    with client.websocket_connect("/ws") as ws:
        assert opening.wait(60)
        state.close()  # what the app's shutdown does
        release.set()
        close = closed(ws)
    assert close["code"] == 1012 and close["reason"] == "server shutting down", close
    from camface.serve.app import STATIC

    retried = re.search(r"retry = \[([\d, ]+)\]\.includes\(event\.code\)", (STATIC / "app.js").read_text())
    assert str(close["code"]) in retried.group(1).split(", ")
    assert detector.closed and state.sessions == {}
    wait_until(lambda: state.connected == 0)


@pytest.mark.parametrize("server_closes", ["before it opens", "after it opens"])
def test_a_session_whose_handler_is_gone_is_closed_at_shutdown(make_client, monkeypatch, server_closes):
    """A handler cancelled at shutdown (uvicorn's graceful timeout) while its session opened
    in a thread: nobody took the session, and its detector stayed open. Now the server closes
    it, or the thread does when the server closed first."""
    import camface.api
    from camface.serve.app import _open_session

    _, state = make_client()
    detector = _ClosingDetector()
    monkeypatch.setattr(camface.api, "face_detector", lambda config: contextlib.nullcontext(detector))
    if server_closes == "before it opens":
        state.close()
    _open_session(state)  # its session dropped, as by a cancelled handler
    if server_closes == "after it opens":
        state.close()
    assert detector.closed


class _ClosingDetector:
    """A face detector that finds nothing and says whether it was closed."""

    closed = False

    def detect(self, frame):
        return ()

    def close(self):
        self.closed = True


class _Sink:
    """A recording in progress whose close fails (`fails`: an encoder's flush error) or works."""

    def __init__(self, path, fails: bool):
        self.path, self.fails, self.closed, self.frames_written, self.frames_kept = path, fails, False, 0, 0

    removed = None

    def close(self, say_removed=True):
        if self.fails:
            raise RuntimeError("the encoder failed to flush")
        self.closed = True


def test_a_recording_that_fails_to_close_leaves_no_detector_recording_or_worker_open(make_client, tmp_path, caplog):
    """Shutting down with two clients recording, the first client's recording failing to
    close (not an OutputError): that error left its face detector open and, out of
    ServeState.close, every later client's recording unfinished and the worker running."""
    from camface.serve.session import Session

    _, state = make_client()
    sessions = [Session(state, _ClosingDetector()) for _ in range(2)]
    for session, fails in zip(sessions, (True, False)):
        session.sink = _Sink(tmp_path / f"client{session.id}.mp4", fails)
        state.add(session)
    detectors, sinks = [s.detector.detector for s in sessions], [s.sink for s in sessions]
    state.close()
    assert [d.closed for d in detectors] == [True, True]
    assert sinks[1].closed and not state.worker._thread.is_alive()
    assert f"client {sessions[0].id} did not close cleanly" in caplog.text and "failed to flush" in caplog.text


def test_a_recording_removed_at_close_is_not_offered(make_client, tmp_path, caplog):
    """A recording none of whose encoded frames reached the disk is removed by its sink at
    close: stop_recording still listed it (a download link to a missing file) and logged
    "recorded 0 frames". It says the removal once, with the client, and offers no file."""
    from camface.serve.session import Session

    _, state = make_client()
    session = Session(state, _ClosingDetector())
    state.add(session)
    sink = session.sink = _Sink(tmp_path / "gone.mp4", False)
    sink.frames_written, sink.removed = 30, "it holds no frame (30 encoded, none written whole), so it would not play"
    with caplog.at_level(logging.INFO):
        assert session.stop_recording() == (sink.path, 0)
    assert "gone.mp4" not in state.recordings
    assert f"client {session.id}: removed {sink.path}: it holds no frame" in caplog.text
    assert "recorded" not in caplog.text
    state.close()


def test_an_mp4v_recording_whose_index_was_lost_is_kept_and_not_offered(make_client, tmp_path, caplog, monkeypatch):
    """An mp4v recording whose index (written last) did not reach the disk plays nowhere: its
    sink keeps it (a repair tool can get its frames back) and the close's error was logged, but
    stop_recording still listed it and offered its link, as for a playable one. It is kept, not
    offered, and said so with the client."""
    from camface.realtime import sinks
    from camface.serve.session import Session

    _, state = make_client()
    session = Session(state, _ClosingDetector())
    state.add(session)
    path = tmp_path / "lost.mp4"
    sink = session.sink = sinks.VideoSink(path, 30.0, codec="mp4v")
    for k in range(5):
        sink.write(np.full((64, 80, 3), 40 * k, np.uint8))
    monkeypatch.setattr(sinks, "mp4v_frames", lambda path: 0)  # what a reader finds in a file without its index
    with caplog.at_level(logging.INFO):
        assert session.stop_recording() == (path, 0)
    assert path.is_file() and "lost.mp4" not in state.recordings
    assert f"cannot finish {path}: it holds 0 of the 5 frames written" in caplog.text
    assert f"client {session.id}: {path} holds none of its 5 frames that a player reads" in caplog.text
    assert "recorded" not in caplog.text
    state.close()


# ------------------------------------------------------------------ protocol pieces and the command


def test_image_size_reads_headers_without_decoding(astronaut_bgr):
    assert protocol.image_size(jpeg(astronaut_bgr)) == ("jpeg", 512, 512)
    png = cv2.imencode(".png", astronaut_bgr[:100, :300])[1].tobytes()
    assert protocol.image_size(png) == ("png", 300, 100)
    progressive = cv2.imencode(".jpg", astronaut_bgr[:70, :90], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert protocol.image_size(progressive) == ("jpeg", 90, 70)
    assert progressive.count(b"\xff\xda") == 10  # libjpeg's progression: well under MAX_SCANS
    assert protocol.parse_frame(b"\0\0\0\7" + progressive) == (7, progressive)


@pytest.mark.parametrize("argv, message", [
    (["--ssl-certfile", "cert.pem"], "--ssl-certfile and --ssl-keyfile go together"),
    (["--ssl-certfile", "nope.pem", "--ssl-keyfile", "nope.key"], "--ssl-certfile nope.pem: no such file"),
    (["--max-clients", "0"], "--max-clients must be >= 1"),
    (["--token", "short"], "--token must have at least 8 characters"),
    (["--record-dir", "missing/deeper"], "--record-dir missing/deeper: folder .* does not exist"),
    (["--alpha", "2"], "--alpha must be in"),
    (["--port", "70000"], "--port must be in 0..65535"),
])
def test_serve_refuses_bad_options(argv, message, capsys, tmp_path, monkeypatch):
    import re

    from camface.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["serve", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_certificate_that_does_not_load_is_refused_before_the_url_is_printed(capsys, tmp_path, monkeypatch):
    """Files that are not a PEM certificate and its key: one error line naming both, exit 2, no
    URL; uvicorn raised ssl.SSLError in a traceback after printing the URL (exit 1)."""
    from camface.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    assert main(["serve", "--port", "0", "--ssl-certfile", "cert.pem", "--ssl-keyfile", "key.pem"]) == 2
    out, err = capsys.readouterr()
    assert "cannot serve https with --ssl-certfile cert.pem and --ssl-keyfile key.pem" in err
    assert "expected a PEM certificate and its private key" in err and "Traceback" not in err
    assert "https://" not in out


def test_the_printed_url_opens_the_page_with_any_token(make_client):
    """A --token with URL-special characters (+ & # % space: a password manager's) still
    works from the URL printed (it was printed raw: `+` read back as a space, `&` and `#` cut
    it, so the page was refused)."""
    from urllib.parse import urlsplit

    from camface.serve.cli import _urls

    token = "pass word+&x=1#%41"
    client, _ = make_client(token=token)
    url = urlsplit(_urls("127.0.0.1", 8000, False, token)[0])
    assert client.get(f"{url.path}?{url.query}").status_code == 200
    with client.websocket_connect(f"/ws?{url.query}") as ws:  # the page sends the query it was opened with
        assert ws.receive_json()["type"] == "hello"


def test_urls_name_the_token_when_one_is_needed():
    from camface.serve.cli import _urls

    assert _urls("127.0.0.1", 8000, False, None) == ["http://127.0.0.1:8000/"]
    assert _urls("::1", 8443, True, "abc") == ["https://[::1]:8443/?token=abc"]
    assert _urls("0.0.0.0", 80, False, "t")[-1] == "http://127.0.0.1:80/?token=t"


def test_write_y4m_makes_what_opencv_reads_back(tmp_path):
    from camface.serve.y4m import write_y4m

    frames = [np.full((48, 64, 3), (40 * k, 100, 200 - 40 * k), np.uint8) for k in range(3)]
    path = write_y4m(tmp_path / "clip.y4m", frames, fps=25)
    assert path.read_bytes().startswith(b"YUV4MPEG2 W64 H48 F25:1 Ip A1:1 C420jpeg\nFRAME\n")
    assert path.stat().st_size == len(b"YUV4MPEG2 W64 H48 F25:1 Ip A1:1 C420jpeg\n") + 3 * (6 + 64 * 48 * 3 // 2)
    y = np.frombuffer(path.read_bytes(), np.uint8)[-(64 * 48 * 3 // 2):][: 64 * 48].reshape(48, 64)
    expected_y = cv2.cvtColor(frames[2], cv2.COLOR_BGR2YUV_I420)[:48]
    np.testing.assert_array_equal(y, expected_y)
    with pytest.raises(ValueError, match="even sizes, got 63x48"):
        write_y4m(tmp_path / "odd.y4m", [np.zeros((48, 63, 3), np.uint8)])
    with pytest.raises(ValueError, match="frame of 32x32 in a 64x48 clip"):
        write_y4m(tmp_path / "mixed.y4m", [frames[0], np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match="at least one frame"):
        write_y4m(tmp_path / "empty.y4m", [])


def test_a_client_gets_boxes_carried_between_key_frames(make_client):
    """--detect-every 3: the client's frames 0 and 3 are detected, 1, 2 and 4 carried, as a
    BoxCarrier gives them on the same decoded frames (frames taken in order, none dropped)."""
    from camface.api import face_detector
    from camface.realtime.carry import BoxCarrier
    from camface.realtime.config import LiveConfig
    from camface.realtime.sample import SampleSource

    sample = SampleSource(300)  # faces that move slowly: carried, not detected again (carry.MAX_MOVE)
    images = [jpeg(sample.frame(i)) for i in range(20, 25)]
    client, state = make_client(LiveConfig(detect_every=3))
    with client.websocket_connect("/ws") as ws:
        ws.receive_json()
        got = [[face["box"] for face in send_frame(ws, k, image)[0]["faces"]] for k, image in enumerate(images)]
    with face_detector(state.config) as detector:
        carrier = BoxCarrier(detector, 3)
        want = [[list(face.box) for face in carrier.detect(cv2.imdecode(np.frombuffer(image, np.uint8),
                                                                         cv2.IMREAD_COLOR), k)]
                for k, image in enumerate(images)]
    assert got == want and carrier.detections == 2 and all(len(boxes) >= 1 for boxes in got)
