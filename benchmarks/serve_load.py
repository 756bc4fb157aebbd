"""`camface serve` under simulated clients: each a small WebSocket client (no browser) that
sends the sample clip's JPEGs at 30 fps, at most 2 unanswered (as the page does), and reads the
replies. Per setting of --detect-every, interleaved per repeat, each a fresh server:

  fps per client    replies per second each client got (median over clients)
  latency           frame sent -> reply received, p50 and p95 over all replies (ms)
  server CPU/frame  the server process's CPU time (user + system, /proc) over replies

    .venv/bin/python benchmarks/serve_load.py [--clients 4] [--seconds 15] [--repeats 2] \
        [--settings 1 auto]   (or e.g. 1:mediapipe auto:onnx to set --detector-runtime too)

The machine is shared: the load average is printed with each run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
WINDOW = 2  # unanswered frames per client, as serve/static/app.js


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def sample_jpegs(frames: int = 300, quality: int = 80) -> list[bytes]:
    import cv2

    from camface.realtime.sample import SampleSource

    sample = SampleSource(frames)
    return [cv2.imencode(".jpg", sample.frame(i), [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
            for i in range(frames)]


def start_server(folder: Path, setting: str) -> tuple[subprocess.Popen, str]:
    """setting: a --detect-every value, or VALUE:RUNTIME to add --detector-runtime RUNTIME."""
    every, _, runtime = setting.partition(":")
    process = subprocess.Popen(
        [sys.executable, "-m", "camface", "serve", "--port", "0", "--max-clients", "8", "--detect-every", every,
         *(["--detector-runtime", runtime] if runtime else []),
         "--device", "cpu", "--snapshot-dir", str(folder / "snapshots"), "--record-dir", str(folder / "rec")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        match = re.search(r"(https?://\S+)", line)
        if match:
            return process, match.group(1)
        if not line and process.poll() is not None:
            break
    process.kill()
    raise RuntimeError("camface serve printed no URL")


async def client(url: str, jpegs: list[bytes], offset: int, warmup: float, seconds: float, out: dict) -> None:
    import websockets

    ws_url = url.replace("http", "ws", 1).rstrip("/") + "/ws"
    sent_at: dict[int, float] = {}
    latencies, replies = [], 0
    answered = sent = 0
    async with websockets.connect(ws_url, max_size=None) as ws:
        await ws.recv()  # hello
        start = time.perf_counter()
        measure_from, stop_at = start + warmup, start + warmup + seconds

        async def receive():
            nonlocal answered, replies
            async for message in ws:
                if isinstance(message, str):
                    continue
                (length,) = struct.unpack(">I", message[:4])
                seq = json.loads(message[4:4 + length])["seq"]
                now = time.perf_counter()
                answered = max(answered, seq)
                if now >= measure_from and seq in sent_at:
                    latencies.append(1000 * (now - sent_at[seq]))
                    replies += 1
                for old in [s for s in sent_at if s <= seq]:
                    del sent_at[old]

        reader = asyncio.create_task(receive())
        tick = 0
        while time.perf_counter() < stop_at:
            tick += 1
            if sent - answered < WINDOW:  # the page sends a camera frame only then
                sent += 1
                sent_at[sent] = time.perf_counter()
                await ws.send(struct.pack(">I", sent) + jpegs[(offset + tick) % len(jpegs)])
            await asyncio.sleep(max(0.0, start + tick / 30.0 - time.perf_counter()))
        reader.cancel()
    out.update(fps=replies / seconds, latencies=latencies)


async def load(url: str, jpegs, clients: int, warmup: float, seconds: float) -> list[dict]:
    outs = [{} for _ in range(clients)]
    await asyncio.gather(*(client(url, jpegs, 37 * k, warmup, seconds, outs[k]) for k in range(clients)))
    return outs


def run_one(every: str, jpegs, clients: int, warmup: float, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="camface-serve-load-") as tmp:
        process, url = start_server(Path(tmp), every)
        try:
            load_before = os.getloadavg()[0]
            cpu_start = None

            async def measured():
                nonlocal cpu_start
                task = asyncio.create_task(load(url, jpegs, clients, warmup, seconds))
                await asyncio.sleep(warmup)
                cpu_start = cpu_seconds(process.pid)
                return await task

            outs = asyncio.run(measured())
            cpu = cpu_seconds(process.pid) - cpu_start
        finally:
            process.terminate()
            process.wait(timeout=30)
    latencies = sorted(x for o in outs for x in o["latencies"])
    frames = sum(len(o["latencies"]) for o in outs)
    return {"every": every, "fps_per_client": [round(o["fps"], 1) for o in outs],
            "fps_median": statistics.median(o["fps"] for o in outs),
            "latency_p50_ms": latencies[len(latencies) // 2] if latencies else None,
            "latency_p95_ms": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
            "server_cpu_ms_per_frame": 1000 * cpu / frames if frames else None,
            "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=["1", "auto"],
                        help="--detect-every values, interleaved; VALUE:RUNTIME also sets --detector-runtime")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    jpegs = sample_jpegs()
    runs = []
    for repeat in range(args.repeats):
        for every in args.settings:
            run = run_one(every, jpegs, args.clients, args.warmup, args.seconds)
            runs.append(run)
            print(json.dumps(run), flush=True)
    print(f"\n{args.clients} clients at 30 fps, {args.seconds:g} s each, medians over {args.repeats} run(s):")
    print(f"{'--detect-every':<20}{'fps/client':>12}{'p50 ms':>10}{'p95 ms':>10}{'server CPU ms/frame':>22}")
    for every in args.settings:
        mine = [r for r in runs if r["every"] == every]
        med = {k: statistics.median(r[k] for r in mine) for k in
               ("fps_median", "latency_p50_ms", "latency_p95_ms", "server_cpu_ms_per_frame")}
        print(f"{every:<20}{med['fps_median']:>12.1f}{med['latency_p50_ms']:>10.1f}{med['latency_p95_ms']:>10.1f}"
              f"{med['server_cpu_ms_per_frame']:>22.2f}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
