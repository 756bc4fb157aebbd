"""`camface serve` end to end in headless Chromium: frames per second each browser shows,
frame-sent-to-frame-shown latency, JPEG sizes, and how many graph calls served how many frames.

A fake camera (Chromium's --use-file-for-fake-video-capture) plays the sample clip (640x480,
30 fps, moving faces) as a .y4m; the server is the real `camface serve` in a subprocess on
localhost; each client is its own headless browser. Each run warms up, then measures for
--seconds. The load average is printed too: on a shared machine it says what else ran.

    .venv/bin/python benchmarks/serve_fps.py [--clients 1 4] [--seconds 15] [--repeats 3]

Needs camface[serve], playwright and Debian's chromium (/usr/lib/chromium/chromium, or
CAMFACE_CHROMIUM). Machines are shared: each figure is the median over --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

CHROMIUM = Path(os.environ.get("CAMFACE_CHROMIUM", "/usr/lib/chromium/chromium"))
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def descendants(pid: int) -> list[int]:
    """Processes under `pid` (the Playwright driver and the browsers, for this script)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def cpu_of(pids) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            out[pid] = cpu_seconds(pid)
        except (OSError, ValueError):
            continue
    return out


def start_server(folder: Path, argv: list[str]):
    process = subprocess.Popen([sys.executable, "-m", "camface", "serve", "--port", "0", "--max-clients", "8",
                                "--snapshot-dir", str(folder / "snapshots"), "--record-dir",
                                str(folder / "recordings"), *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        match = re.search(r"(https?://\S+)", process.stdout.readline())
        if match:
            return process, match.group(1)
    process.kill()
    raise SystemExit(f"camface serve did not start: {process.stderr.read()}")


def server_stats(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/stats") as response:
        return json.load(response)


def page_figures(page) -> dict:
    return page.evaluate("({shown: camface.stats.framesShown, sent: camface.stats.framesSent, "
                         "latencies: camface.latenciesMs.length, bytesSent: camface.bytesSent, "
                         "bytesReceived: camface.bytesReceived})")


def run(playwright, clip: Path, url: str, server_pid: int, clients: int, warmup: float, seconds: float,
        browser_args: tuple[str, ...] = ()) -> dict:
    # One browser per client, as on N laptops: contexts of one browser share its fake capture
    # device, which then delivered about 1.6 frames a second to each of 4 (measured here).
    browsers = [playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={clip}", *browser_args]) for _ in range(clients)]
    try:
        # wait_for_function evaluates its string in the page, which the page's policy forbids
        pages = [browser.new_context(bypass_csp=True).new_page() for browser in browsers]
        for page in pages:
            page.goto(url)
        for page in pages:
            page.wait_for_function("window.camface && camface.stats.framesShown > 5", timeout=60_000)
        time.sleep(warmup)
        before = [page_figures(page) for page in pages]
        browser_pids = [pid for pid in descendants(os.getpid()) if pid != server_pid]
        stats_before, cpu_before, started = server_stats(url), cpu_seconds(server_pid), time.perf_counter()
        browser_before = cpu_of(browser_pids)
        time.sleep(seconds)
        after = [page_figures(page) for page in pages]
        wall = time.perf_counter() - started
        stats_after, cpu_after = server_stats(url), cpu_seconds(server_pid)
        browser_after = cpu_of(browser_pids)
        latencies = []
        for page, b, a in zip(pages, before, after):
            latencies += page.evaluate(f"camface.latenciesMs.slice({b['latencies']}, {a['latencies']})")
        sent = sum(a["sent"] - b["sent"] for a, b in zip(after, before))
        shown = sum(a["shown"] - b["shown"] for a, b in zip(after, before))
        processed = stats_after["frames_processed"] - stats_before["frames_processed"]
        calls = stats_after["graph_calls"] - stats_before["graph_calls"]
        return {
            "clients": clients,
            "fps_per_client": [(a["shown"] - b["shown"]) / wall for a, b in zip(after, before)],
            "latency_p50_ms": float(np.percentile(latencies, 50)),
            "latency_p95_ms": float(np.percentile(latencies, 95)),
            "jpeg_up_kb": sum(a["bytesSent"] - b["bytesSent"] for a, b in zip(after, before)) / max(sent, 1) / 1024,
            "jpeg_down_kb": sum(a["bytesReceived"] - b["bytesReceived"]
                                for a, b in zip(after, before)) / max(shown, 1) / 1024,
            "frames_per_s": processed / wall, "graph_calls_per_s": calls / wall,
            "frames_per_call": processed / max(calls, 1),
            "dropped_per_s": (stats_after["frames_dropped"] - stats_before["frames_dropped"]) / wall,
            "server_cpu_percent": 100 * (cpu_after - cpu_before) / wall,
            "browsers_cpu_percent": 100 * sum(browser_after[p] - browser_before[p]
                                              for p in browser_after if p in browser_before) / wall,
            "load_average": os.getloadavg()[0],
        }
    finally:
        for browser in browsers:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=150, help="frames of the sample clip in the fake camera")
    parser.add_argument("serve_args", nargs="*", help="more `camface serve` flags (after --)")
    args = parser.parse_args()
    if not CHROMIUM.is_file():
        raise SystemExit(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set CAMFACE_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    from camface.realtime.sample import SampleSource
    from camface.serve.y4m import write_y4m

    with tempfile.TemporaryDirectory(prefix="camface-serve-bench-") as tmp:
        folder = Path(tmp)
        sample = SampleSource(frames=args.frames, size=(640, 480))
        clip = write_y4m(folder / "sample.y4m", (sample.frame(i) for i in range(args.frames)))
        server, url = start_server(folder, args.serve_args)
        rows: dict[int, list[dict]] = {n: [] for n in args.clients}
        try:
            with sync_playwright() as playwright:
                for repeat in range(args.repeats):  # interleaved: 1, 4, 1, 4, ...
                    for clients in args.clients:
                        row = run(playwright, clip, url, server.pid, clients, args.warmup, args.seconds)
                        rows[clients].append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.communicate(timeout=30)
    print(f"camface serve, headless Chromium, fake camera 640x480 at 30 fps (sample clip), localhost, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; median of "
          f"{args.repeats} runs of {args.seconds:g} s")
    print("| clients | fps per client (min) | latency p50 / p95 ms | JPEG up / down KB per frame | "
          "frames/s served | graph calls/s | frames per call | stale dropped/s | server CPU % | browsers CPU % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for clients, runs in rows.items():
        med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
        fps = statistics.median(min(r["fps_per_client"]) for r in runs)
        print(f"| {clients} | {fps:.1f} | {med('latency_p50_ms'):.1f} / {med('latency_p95_ms'):.1f} | "
              f"{med('jpeg_up_kb'):.1f} / {med('jpeg_down_kb'):.1f} | {med('frames_per_s'):.1f} | "
              f"{med('graph_calls_per_s'):.1f} | {med('frames_per_call'):.2f} | {med('dropped_per_s'):.1f} | "
              f"{med('server_cpu_percent'):.0f} | {med('browsers_cpu_percent'):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
