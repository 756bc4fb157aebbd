"""`camface batch` (local Ray) against `camface live` run on the same clips one after another.

8 copies of the sample clip (640x480, --frames each), recording on in both. Per repeat, in one
sitting and interleaved: the plain loop (`LiveLoop`, in this process, one clip after the
other: its wall time includes loading the graph and detectors per clip, as `camface live`
does), then `camface batch` in a fresh process (a local Ray each time). Reported per run:

  live fps       total frames / total wall time of the 8 loops
  batch fps      total frames / wall time of the Ray pipeline (summary.json run.fps: actors
                 starting, detect, graph, render, encode; not Ray's start)
  ray start s    ray.init() on this machine (summary.json run.ray_start_s)
  command fps    total frames / wall time of the whole `camface batch` process

    .venv/bin/python benchmarks/batch_fps.py [--copies 8] [--frames 300] [--repeats 3] [--json OUT]

Medians over --repeats; the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_live(clips: list[Path], out: Path) -> float:
    from camface.realtime.loop import LiveConfig, LiveLoop

    frames, start = 0, time.perf_counter()
    for k, clip in enumerate(clips):
        loop = LiveLoop(LiveConfig(source=str(clip), record=out / f"live-{k}.mp4", overwrite=True))
        frames += loop.run().frames
    return frames / (time.perf_counter() - start)


def run_batch(folder: Path, out: Path, frames: int, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    camface = Path(sys.executable).with_name("camface")
    start = time.perf_counter()
    done = subprocess.run([str(camface), "batch", str(folder), "-o", str(out), "--no-progress", *extra],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"camface batch failed ({done.returncode}):\n{done.stderr}")
    run = json.loads((out / "summary.json").read_text())["run"]
    return {"batch_fps": run["fps"], "ray_start_s": run["ray_start_s"], "command_fps": frames / wall,
            "graph_calls": run["graph_calls"], "plan": run["plan"], "units": run.get("units", "")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("batch_args", nargs="*", help="extra `camface batch` flags (after --)")
    args = parser.parse_args()
    from camface.realtime.sample import SampleSource

    work = Path(tempfile.mkdtemp(prefix="camface-batch-bench-"))
    clip = SampleSource(frames=args.frames).cached_clip()
    folder = work / "clips"
    folder.mkdir()
    clips = [Path(shutil.copy(clip, folder / f"clip{k}.mp4")) for k in range(args.copies)]
    total = args.copies * args.frames
    runs = []
    for repeat in range(args.repeats):
        live = run_live(clips, work)
        batch = run_batch(folder, work / "out", total, args.batch_args)
        runs.append({"live_fps": live, **batch})
        print(f"repeat {repeat}: live {live:.1f} fps, batch {batch['batch_fps']:.1f} fps "
              f"({batch['batch_fps'] / live:.2f}x), whole command {batch['command_fps']:.1f} fps, "
              f"Ray start {batch['ray_start_s']:.1f} s", file=sys.stderr)
    median = {key: statistics.median(r[key] for r in runs)
              for key in ("live_fps", "batch_fps", "command_fps", "ray_start_s")}
    ratios = [r["batch_fps"] / r["live_fps"] for r in runs]
    crops_per_call = None
    summary = json.loads((work / "out" / "summary.json").read_text())
    if runs[-1]["graph_calls"]:
        crops_per_call = summary["totals"]["faces"] / runs[-1]["graph_calls"]
    print(f"\n{args.copies} x {args.frames} frames ({total}), {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"plan: {runs[-1]['plan']}")
    print("| | median | runs |\n|---|---|---|")
    print(f"| camface live, one clip after another (fps) | {median['live_fps']:.1f} | "
          + ", ".join(f"{r['live_fps']:.1f}" for r in runs) + " |")
    print(f"| camface batch, pipeline (fps) | {median['batch_fps']:.1f} | "
          + ", ".join(f"{r['batch_fps']:.1f}" for r in runs) + " |")
    print(f"| batch / live | {statistics.median(ratios):.2f}x | " + ", ".join(f"{x:.2f}" for x in ratios) + " |")
    print(f"| camface batch, whole command incl. Python + Ray start (fps) | {median['command_fps']:.1f} | "
          + ", ".join(f"{r['command_fps']:.1f}" for r in runs) + " |")
    print(f"| Ray start-up (s) | {median['ray_start_s']:.1f} | " + ", ".join(f"{r['ray_start_s']:.1f}" for r in runs) + " |")
    if crops_per_call:
        print(f"| crops per graph call | {crops_per_call:.1f} | |")
    # The scaling model's terms, from the last run's per-video records (seconds inside each stage)
    videos = [r for r in summary["videos"] if r["status"] == "done"]
    frames = sum(r["frames"] for r in videos)
    faces = summary["totals"]["faces"]
    detect_s, graph_s, render_s = (sum(r[key] for r in videos) for key in ("detect_s", "graph_s", "render_s"))
    calls = sum(r["graph_calls"] for r in videos)
    model = {"detect_fps_per_actor": frames / detect_s, "graph_ms_per_call": 1000 * graph_s / calls,
             "graph_fps_per_actor": frames / graph_s, "render_fps_per_actor": frames / render_s,
             "faces_per_frame": faces / frames}
    print(f"| decode + detect + crop, frames/s per detector actor (one core) | {model['detect_fps_per_actor']:.0f} | |")
    print(f"| graph, ms per call ({crops_per_call:.1f} crops), frames/s per graph actor on CPU | "
          f"{model['graph_ms_per_call']:.0f} ms, {model['graph_fps_per_actor']:.0f} fps | |")
    print(f"| decode + draw + encode + rows, frames/s per render actor | {model['render_fps_per_actor']:.0f} | |")
    print(f"| faces per frame | {model['faces_per_frame']:.2f} | |")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median": median, "crops_per_call": crops_per_call,
                                         "model": model}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
