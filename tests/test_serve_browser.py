"""`camface serve` in a real browser: headless Chromium (Debian's `chromium` package, driven
by Playwright by path; never `playwright install`) with a fake camera playing a .y4m made from
the sample clip. The server is the real command in a subprocess, stopped with SIGTERM.

Skipped only where Chromium is not installed (`.ci/run` installs it with apt-get)."""

from __future__ import annotations

import base64
import os
import re
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest
from realtime_helpers import count_frames
from serve_helpers import start_server

CHROMIUM = Path(os.environ.get("CAMFACE_CHROMIUM", "/usr/lib/chromium/chromium"))

pytest.importorskip("starlette", reason="camface[serve] is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (camface[dev])")
if not CHROMIUM.is_file():
    pytest.skip(f"Chromium is not installed here ({CHROMIUM} missing; `apt-get install chromium` or "
                "CAMFACE_CHROMIUM=/path/to/chromium)", allow_module_level=True)


def launch(playwright, clip: Path):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={clip}"])


def page_of(browser, policy: bool = False):
    """A new page in a context of its own. Playwright's wait_for_function evaluates its string in
    the page, which the page's Content-Security-Policy forbids: it is bypassed unless `policy`."""
    return browser.new_context(bypass_csp=not policy).new_page()


def shown(page, more: int = 0, timeout: float = 20_000) -> int:
    """Wait until `more` frames beyond those shown now were shown; returns the count."""
    now = page.evaluate("window.camface ? window.camface.stats.framesShown : 0")
    page.wait_for_function(f"window.camface && window.camface.stats.framesShown >= {now + more}", timeout=timeout)
    return page.evaluate("window.camface.stats.framesShown")


def showing(playwright, clip: Path, url: str, frames: int, script: str | None = None):
    """(browser, page): Chromium on the fake camera `clip`, a page at `url` (with the init
    `script`, if any) that has shown `frames` frames."""
    browser = launch(playwright, clip)
    page = page_of(browser)
    if script is not None:
        page.add_init_script(script)
    page.goto(url)
    shown(page, frames)
    return browser, page


def view_pixels(page) -> np.ndarray:
    """The pixels #view shows, uint8 BGR."""
    url = page.evaluate("document.getElementById('view').toDataURL('image/png')")
    data = base64.b64decode(url.split(",", 1)[1])
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def interiors(shape, boxes, inset: int = 4) -> np.ndarray:
    """Mask of the face boxes' insides (borders left out)."""
    mask = np.zeros(shape[:2], bool)
    for x, y, w, h in boxes:
        mask[y + inset:y + h - inset, x + inset:x + w - inset] = True
    return mask


def far_from(shape, boxes, pad: int = 32) -> np.ndarray:
    """Mask of pixels away from every box and its label (JPEG blocks near a box change too)."""
    mask = np.ones(shape[:2], bool)
    for x, y, w, h in boxes:
        mask[max(0, y - pad):y + h + pad, max(0, x - pad):x + w + pad] = False
    return mask


def test_the_page_shows_live_overlays_switches_methods_snapshots_and_records(tmp_path):
    from camface.graph_spec import auto_method
    from camface.models import EMOTION_ONNX
    from camface.realtime.graph import CamGraph
    from camface.realtime.sample import SampleSource
    from camface.serve.y4m import write_y4m

    raw = SampleSource(frames=300, size=(320, 240)).frame(150)  # three faces, standing still
    clip = write_y4m(tmp_path / "camera.y4m", [raw] * 15)
    server, url = start_server(tmp_path)
    try:
        with sync_api.sync_playwright() as playwright:
            browser, page = showing(playwright, clip, url, 5)
            stats = page.evaluate("window.camface.stats")
            assert stats["framesSent"] >= stats["framesShown"] >= 5
            assert stats["method"] == auto_method(CamGraph(EMOTION_ONNX, "cpu").info)[0]  # the panel names it
            assert 0 < stats["lastLatencyMs"] < 5000
            last = page.evaluate("window.camface.last")
            boxes = [face["box"] for face in last["faces"]]
            assert len(boxes) == 3, last
            assert page.locator("#faces .face").count() == 3  # the side panel's bars, one set per face

            page.keyboard.press("h")  # the live window's key: the HUD's changing figures would cover a face
            assert not page.is_checked("#hud")
            shown(page, 4)
            pictures = {}
            for method in ("none", "gradcam", "gradcampp"):
                page.select_option("#method", method)
                page.wait_for_function(f"window.camface.stats.method === '{method}'", timeout=10_000)
                shown(page, 3)
                pictures[method] = view_pixels(page).astype(np.int16)
            assert pictures["none"].shape == raw.shape
            inside, outside = interiors(raw.shape, boxes), far_from(raw.shape, boxes)

            def difference(a, b, mask):
                return float(np.abs(a - b).mean(axis=2)[mask].mean())

            # no heatmap: the camera's own pixels (through two JPEG encodings)
            assert difference(pictures["none"], raw.astype(np.int16), inside) < 6
            # the heatmap is inside the face boxes, and only there
            assert difference(pictures["gradcam"], pictures["none"], inside) > 20
            assert difference(pictures["gradcam"], pictures["none"], outside) < 1
            # another method, another heatmap
            assert difference(pictures["gradcampp"], pictures["gradcam"], inside) > 5

            page.click("#snapshot")
            page.wait_for_function("window.camface.notes.some(n => n.type === 'snapshot')", timeout=10_000)
            folder = page.evaluate("window.camface.notes.find(n => n.type === 'snapshot').folder")
            snapshot = tmp_path / "snapshots" / folder
            assert (snapshot / "snapshot.json").is_file() and (snapshot / "face_02.png").is_file()
            assert page.locator("#downloads a", has_text=folder).count() == 1  # the annotated frame's download
            # the key held down (it repeats): one more snapshot, not one per repeat
            snapshots = "window.camface.notes.filter(n => n.type === 'snapshot').length"
            for _ in range(4):
                page.keyboard.down("s")
            page.keyboard.up("s")
            page.wait_for_function(f"{snapshots} === 2", timeout=10_000)
            shown(page, 5)  # any further snapshot would have come by now, each after its frame
            assert page.evaluate(snapshots) == 2 and len(list((tmp_path / "snapshots").iterdir())) == 2

            page.click("#record")
            page.wait_for_function("window.camface.notes.some(n => n.type === 'recording')", timeout=10_000)
            sent_before, shown_before = page.evaluate("[camface.stats.framesSent, camface.stats.framesShown]")
            shown(page, 15)
            page.click("#record")
            page.wait_for_function("window.camface.notes.some(n => n.type === 'recorded')", timeout=10_000)
            sent_after, shown_after = page.evaluate("[camface.stats.framesSent, camface.stats.framesShown]")
            note = page.evaluate("window.camface.notes.find(n => n.type === 'recorded')")
            path = tmp_path / "recordings" / note["file"]
            # every frame processed while recording is in the file: no more than were sent, and
            # at least those shown in between (up to the two in flight at either end)
            assert count_frames(path) == note["frames"]
            assert shown_after - shown_before - 2 <= note["frames"] <= sent_after - sent_before + 2
            href = page.locator("#downloads a", has_text=note["file"]).get_attribute("href")
            assert href.startswith(f"/recordings/{note['file']}")
            assert page.request.get(url.rstrip("/") + href).body() == path.read_bytes()
            page.screenshot(path=str(tmp_path / "page.png"))
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 143, err
    assert re.search(r"camface serve: \d+ frames in \d+ graph calls", err), err


# Each annotated frame's JPEG as the page received it, in order, with the notes between them;
# and a camera-frame decode (createImageBitmap) made slow, as on a weak laptop.
_RECEIVED_AND_SLOW_DECODE = """
window.received = [];
const Socket = window.WebSocket;
window.WebSocket = class extends Socket {
  constructor(...args) {
    super(...args);
    this.addEventListener("message", (event) => {
      if (typeof event.data === "string") { window.received.push(JSON.parse(event.data)); return; }
      const length = new DataView(event.data).getUint32(0);
      window.received.push({ jpeg: new Blob([new Uint8Array(event.data, 4 + length)]) });
    });
  }
};
const decode = window.createImageBitmap;
window.createImageBitmap = (...args) => new Promise((done) => setTimeout(() => done(decode(...args)), 300));
"""

_SAME_BYTES = """async () => {
  const bytes = async (blob) => Array.from(new Uint8Array(await blob.arrayBuffer())).join(",");
  const at = window.received.findIndex((m) => m.type === "snapshot");
  const link = document.querySelector("#downloads a");
  if (!link) return "no download link";
  const offered = await bytes(await (await fetch(link.href)).blob());
  return offered === await bytes(window.received[at - 1].jpeg) ? "the snapshot's frame"
       : window.received.slice(0, at).some((m) => m.jpeg) ? "another frame" : "?";
}"""


def test_the_snapshot_download_is_the_frame_of_the_snapshot_while_decoding_lags(tmp_path):
    """The server sends the snapshot note right after the frame it snapshotted; the page offers
    that frame's JPEG even when drawing lags behind (it once offered the last frame DRAWN: an
    older one, or nothing and a TypeError when none was drawn yet)."""
    from camface.realtime.sample import SampleSource
    from camface.serve.y4m import write_y4m

    sample = SampleSource(frames=300, size=(320, 240))
    clip = write_y4m(tmp_path / "camera.y4m", [sample.frame(150 + k) for k in range(15)])  # each frame its own
    server, url = start_server(tmp_path)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = launch(playwright, clip)
            page = page_of(browser)
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.add_init_script(_RECEIVED_AND_SLOW_DECODE)
            page.goto(url)
            shown(page, 3)
            page.click("#snapshot")
            page.wait_for_function("window.received.some((m) => m.type === 'snapshot')", timeout=10_000)
            page.wait_for_timeout(100)
            assert page.evaluate(_SAME_BYTES) == "the snapshot's frame" and errors == []
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)


# How many of the page's sockets closed (counted before the page's own onclose runs).
_COUNT_CLOSES = """
window.closes = 0;
const Socket = window.WebSocket;
window.WebSocket = class extends Socket {
  constructor(...args) { super(...args); this.addEventListener("close", () => { window.closes += 1; }); }
};
"""


def test_the_page_reconnects_after_an_idle_close_and_keeps_its_controls(tmp_path):
    """A camera that sends nothing for --idle-timeout (a hidden tab, a sleeping laptop; here the
    video paused) is closed as idle; once it has frames again the page reconnects by itself, with
    the method the user chose, its lists not doubled, and the record button off (it was closed
    for good, showing "stop", before)."""
    from camface.models import EMOTION_ONNX
    from camface.realtime.graph import CamGraph
    from camface.realtime.sample import SampleSource
    from camface.serve.y4m import write_y4m

    info = CamGraph(EMOTION_ONNX, "cpu").info
    clip = write_y4m(tmp_path / "camera.y4m", [SampleSource(frames=300, size=(320, 240)).frame(150)] * 15)
    server, url = start_server(tmp_path, "--idle-timeout", "3")
    try:
        with sync_api.sync_playwright() as playwright:
            browser, page = showing(playwright, clip, url, 3, _COUNT_CLOSES)
            methods = page.evaluate("window.camface.hello.methods")
            chosen = next(m for m in methods if m != page.evaluate("window.camface.hello.method"))
            page.select_option("#method", chosen)
            page.wait_for_function(f"window.camface.stats.method === '{chosen}'", timeout=10_000)
            page.click("#record")
            page.wait_for_function("window.camface.notes.some(n => n.type === 'recording')", timeout=10_000)
            hellos = "window.camface.notes.filter(n => n.type === 'hello').length"
            before = page.evaluate(hellos)
            page.evaluate("document.getElementById('camera').pause()")
            page.wait_for_function("document.getElementById('status').textContent.includes('idle')", timeout=10_000)
            assert page.text_content("#record") == "record"
            page.evaluate("window.camface.last = null; document.getElementById('camera').play()")
            page.wait_for_function(f"{hellos} > {before}", timeout=15_000)
            # a frame of the new socket, explained as chosen: the page told the new session
            page.wait_for_function(f"window.camface.last && window.camface.last.method === '{chosen}'", timeout=10_000)
            assert page.text_content("#status") == "connected"
            assert page.input_value("#method") == chosen
            assert page.locator("#method option").count() == len(methods) + 1  # and "none"
            assert page.locator("#class option").count() == len(info.labels) + 1  # and "predicted"
            # the camera itself ends (unplugged, taken by another program): the page says so, and
            # the idle close that follows does not hide it behind "disconnected"
            closes = page.evaluate("window.closes")
            page.evaluate("const camera = document.getElementById('camera'); camera.pause(); "
                          "camera.srcObject.getVideoTracks()[0].dispatchEvent(new Event('ended'))")
            page.wait_for_function("document.getElementById('status').textContent.includes('camera stopped')",
                                   timeout=5_000)
            page.wait_for_function(f"window.closes === {closes + 1}", timeout=10_000)  # idle, again
            assert "camera stopped" in page.text_content("#status")
            assert page.get_attribute("#status", "class") == "error"
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)


def test_the_page_runs_under_its_own_policy(tmp_path):
    """The page's Content-Security-Policy (its own script, style and WebSocket only) leaves it
    working: frames drawn, the panel filled, and no violation reported. Without a camera it
    says why (it once said "camera refused" when there was none)."""
    import time

    from camface.realtime.sample import SampleSource
    from camface.serve.y4m import write_y4m

    clip = write_y4m(tmp_path / "camera.y4m", [SampleSource(frames=300, size=(320, 240)).frame(150)] * 15)
    server, url = start_server(tmp_path)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = launch(playwright, clip)
            page = page_of(browser, policy=True)
            page.add_init_script("window.violations = []; document.addEventListener('securitypolicyviolation', "
                                 "(e) => window.violations.push(`${e.violatedDirective} ${e.blockedURI}`));")
            response = page.goto(url)
            assert "default-src 'none'" in response.headers["content-security-policy"]
            deadline = time.monotonic() + 30  # wait_for_function cannot run under the policy: poll
            while page.evaluate("window.camface ? window.camface.stats.framesShown : 0") < 5:
                assert time.monotonic() < deadline, page.text_content("#status")
                page.wait_for_timeout(100)
            page.wait_for_timeout(300)  # the panel refreshes every 250 ms
            assert page.locator("#faces .face").count() == 3
            assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(21, 23, 26)"  # app.css
            assert page.evaluate("window.violations") == []
            browser.close()
            # and where there is no camera at all, or the user said no, the page says which
            for args, says in ((["--use-fake-ui-for-media-stream"], "no camera found"),
                               (["--use-fake-device-for-media-stream"], "camera not allowed")):
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
                page = page_of(browser)
                page.goto(url)
                page.wait_for_function("window.camface.error", timeout=10_000)
                assert page.text_content("#status").startswith(says), page.text_content("#status")
                browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)


# Every ImageBitmap the page decodes, and those it closed; every other decode made slow, so
# that a frame decodes after the next one, which is drawn first.
_BITMAPS_OUT_OF_ORDER = """
window.bitmaps = { made: 0, closed: 0 };
const decode = window.createImageBitmap;
window.createImageBitmap = (...args) => decode(...args).then((bitmap) => {
  window.bitmaps.made += 1;
  const close = bitmap.close.bind(bitmap);
  bitmap.close = () => { window.bitmaps.closed += 1; close(); };
  return new Promise((done) => setTimeout(() => done(bitmap), window.bitmaps.made % 2 ? 250 : 0));
});
"""


def test_every_decoded_frame_is_released_also_one_decoded_too_late_to_draw(tmp_path):
    """A frame whose decode ends after a newer one was drawn is not drawn, and its ImageBitmap
    (a decoded frame's pixels, outside the JavaScript heap) is closed all the same: it was left
    to the garbage collector, the page's memory growing with every late frame."""
    from camface.realtime.sample import SampleSource
    from camface.serve.y4m import write_y4m

    clip = write_y4m(tmp_path / "camera.y4m", [SampleSource(frames=300, size=(320, 240)).frame(150)] * 15)
    server, url = start_server(tmp_path)
    try:
        with sync_api.sync_playwright() as playwright:
            browser, page = showing(playwright, clip, url, 10, _BITMAPS_OUT_OF_ORDER)
            page.evaluate("document.getElementById('camera').pause()")
            # once the last replies are decoded, every bitmap was closed: drawn or not
            page.wait_for_function("bitmaps.made === bitmaps.closed", timeout=10_000)
            made, drawn = page.evaluate("[bitmaps.made, camface.stats.framesShown]")
            assert made > drawn, "no frame decoded late: the test did not exercise it"
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)


# Every object URL the page makes and revokes, in order.
_OBJECT_URLS = """
window.objectUrls = { made: [], revoked: [] };
const make = URL.createObjectURL, revoke = URL.revokeObjectURL;
URL.createObjectURL = (blob) => { const url = make(blob); window.objectUrls.made.push(url); return url; };
URL.revokeObjectURL = (url) => { window.objectUrls.revoked.push(url); revoke(url); };
"""

_FETCHES = """async (urls) => Promise.all(urls.map((url) => fetch(url).then((r) => r.blob()).then((b) => b.size > 0,
                                                                                      () => false)))"""


def test_only_the_newest_snapshot_downloads_are_kept_and_the_others_released(tmp_path):
    """Each snapshot's download holds its annotated frame's JPEG in the page through an object URL,
    which was kept as long as the page lived: a page left open all day taking snapshots grew
    without end. The newest SNAPSHOTS_KEPT are offered; an older one's link goes and its URL is
    revoked (its bytes can no longer be fetched)."""
    from camface.realtime.sample import SampleSource
    from camface.serve.y4m import write_y4m

    clip = write_y4m(tmp_path / "camera.y4m", [SampleSource(frames=300, size=(320, 240)).frame(150)] * 15)
    server, url = start_server(tmp_path)
    try:
        with sync_api.sync_playwright() as playwright:
            browser, page = showing(playwright, clip, url, 3, _OBJECT_URLS)
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            kept = page.evaluate("SNAPSHOTS_KEPT")
            page.click("#snapshot")  # one from the server, then more notes as the server sends them
            page.wait_for_function("window.camface.notes.some(n => n.type === 'snapshot')", timeout=10_000)
            first = page.evaluate("window.camface.notes.find(n => n.type === 'snapshot').folder")
            extra = kept + 3
            page.evaluate(f"for (let i = 0; i < {extra}; i++) onNote({{type: 'snapshot', folder: `extra-${{i}}`}})")
            made, revoked = page.evaluate("[window.objectUrls.made, window.objectUrls.revoked]")
            assert len(made) == extra + 1 and revoked == made[:extra + 1 - kept]  # the oldest, in order
            links = page.locator("#downloads a")
            assert links.count() == kept and page.locator("#downloads a", has_text=first).count() == 0
            assert [links.nth(i).get_attribute("href") for i in range(kept)] == made[::-1][:kept]  # newest first
            assert page.evaluate(_FETCHES, made) == [False] * len(revoked) + [True] * kept
            assert errors == []
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
