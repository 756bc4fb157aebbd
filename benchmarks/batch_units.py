"""`camface batch`'s unit of work: whole videos against segments, measured on this machine.

Two archives, each run both ways in one sitting, interleaved per repeat (fresh `camface batch`
process each time, local Ray, recording on):

  one long video   the sample clip at --long frames: whole (--segment-frames 0) against
                   the automatic split; `camface live` on it as the plain loop's reference
  many clips       --copies copies at --frames: the automatic rule (whole videos here)
                   against forced segments of half a clip (--segment-frames frames/2)

Reported: pipeline fps (summary.json run.fps: actors starting, detect, graph, render, encode,
joining the parts) and whole-command fps, medians over --repeats.

    .venv/bin/python benchmarks/batch_units.py [--long 2400] [--copies 8] [--frames 300] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from batch_fps import run_batch, run_live  # noqa: E402  (the same runners as the throughput benchmark)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", type=int, default=2400, help="frames of the long video")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from camface.realtime.sample import SampleSource

    work = Path(tempfile.mkdtemp(prefix="camface-batch-units-"))
    long_folder, clips_folder = work / "long", work / "clips"
    long_folder.mkdir()
    clips_folder.mkdir()
    long_clip = Path(shutil.copy(SampleSource(frames=args.long).cached_clip(), long_folder / "long.mp4"))
    clip = SampleSource(frames=args.frames).cached_clip()
    for k in range(args.copies):
        shutil.copy(clip, clips_folder / f"clip{k}.mp4")
    many = args.copies * args.frames
    cases = {  # name: (folder, frames, camface batch flags)
        "long, whole video": (long_folder, args.long, ["--segment-frames", "0"]),
        "long, automatic (segments)": (long_folder, args.long, []),
        "clips, automatic (whole videos)": (clips_folder, many, []),
        f"clips, segments of {args.frames // 2}": (clips_folder, many, ["--segment-frames", str(args.frames // 2)]),
    }
    runs: dict[str, list[dict]] = {name: [] for name in (*cases, "long, camface live")}
    units: dict[str, str] = {}
    for repeat in range(args.repeats):
        runs["long, camface live"].append({"batch_fps": run_live([long_clip], work), "command_fps": float("nan")})
        for name, (folder, frames, flags) in cases.items():
            result = run_batch(folder, work / "out", frames, flags)
            runs[name].append(result)
            units[name] = result.get("units", "")
            print(f"repeat {repeat}: {name}: pipeline {result['batch_fps']:.1f} fps, "
                  f"command {result['command_fps']:.1f} fps", file=sys.stderr)
    print(f"\n{os.cpu_count()} CPUs; long video {args.long} frames; {args.copies} clips x {args.frames} frames")
    print("| archive, unit of work | pipeline fps (median) | runs | whole command fps | unit chosen |")
    print("|---|---|---|---|---|")
    for name, rows in runs.items():
        fps = [r["batch_fps"] for r in rows]
        command = statistics.median(r["command_fps"] for r in rows)
        print(f"| {name} | {statistics.median(fps):.1f} | {', '.join(f'{x:.1f}' for x in fps)} | "
              f"{'' if command != command else f'{command:.1f}'} | {units.get(name, 'plain loop')} |")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
