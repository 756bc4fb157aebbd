"""Issue 5's speed targets, measured with `camface bench`, repeated, as markdown tables.

    .venv/bin/python benchmarks/targets.py [--repeats 3] [--only live baseline ...] [--out DIR]

Each configuration below runs `camface bench ... --json` in a fresh process `--repeats` times
(one after the other, interleaved across configurations so that a burst of load from other
users of a shared machine does not land on one configuration only). Tables quote, per figure,
the median over the repeats; every run's JSON is kept in --out. benchmarks/RESULTS.md is
this script's output, with the date, the machine and the load average of the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS: dict[str, tuple[str, list[str]]] = {
    "live": ("emotion graph, sample 640x480, headless, recording on",
             ["--source", "sample", "--record", "--frames", "300", "--warmup", "30"]),
    "live-1det": ("the same with one face detector (`--detect-workers 1`, the loop before 2 detectors)",
                  ["--source", "sample", "--record", "--frames", "300", "--warmup", "30", "--detect-workers", "1"]),
    "live-short": ("the same with the short-range detector",
                   ["--source", "sample", "--record", "--frames", "300", "--warmup", "30", "--detector", "short"]),
    "baseline": ("the same with the Keras GradientTape baseline (100 frames: the baseline is slow)",
                 ["--source", "sample", "--record", "--frames", "100", "--warmup", "10", "--baseline", "keras"]),
    "resnet50": ("ResNet50-GAP 224x224 (random weights), one face per frame, recording on, 1 graph thread",
                 ["--backbone", "resnet50", "--source", "sample", "--record", "--frames", "100", "--warmup", "10"]),
    "resnet50-t0": ("the same with ONNX Runtime's default threads (all cores)",
                    ["--backbone", "resnet50", "--source", "sample", "--record", "--frames", "100", "--warmup", "10",
                     "--graph-threads", "0"]),
    "heads": ("ResNet50-GAP 224x224 graph with vs without gradient outputs, 1 thread",
              ["--backbone", "resnet50", "--frames", "5", "--warmup", "0", "--compare-heads", "--batches", "1", "8",
               "--repeats", "20"]),
    "heads-t0": ("the same with ONNX Runtime's default threads (all cores)",
                 ["--backbone", "resnet50", "--frames", "5", "--warmup", "0", "--compare-heads", "--batches", "1", "8",
                  "--repeats", "20", "--graph-threads", "0"]),
}
STAGES = {"decode": "decode", "detect": "detect", "crop": "crop", "classify": "classify+explain",
          "render": "render", "encode": "encode"}


def run_once(name: str, out: Path, repeat: int) -> dict:
    path = out / f"{name}-{repeat}.json"
    command = [sys.executable, "-m", "camface", "bench", *CONFIGS[name][1], "--json", str(path)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    print(f"{name} #{repeat + 1}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return json.loads(path.read_text())


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def rows_table(reports: list[dict]) -> list[str]:
    """Stages down, rows across: median over repeats of each run's median / p95 ms."""
    names = [run["name"] for run in reports[0]["runs"]]
    lines = ["| ms per frame, median / p95 | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]

    def runs(name):
        return [next(r for r in report["runs"] if r["name"] == name) for report in reports]

    for stage, label in STAGES.items():
        if stage not in reports[0]["runs"][0]["stages"]:
            continue
        cells = []
        for name in names:
            stats = [r["stages"][stage] for r in runs(name)]
            cells.append(f"{median(s['median_ms'] for s in stats):.2f} / {median(s['p95_ms'] for s in stats):.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, key, fmt in (("**end to end, fps**", "fps", "**{:.1f}**"), ("end to end, ms per frame", "ms_per_frame", "{:.2f}"),
                            ("faces per frame", "faces_per_frame", "{:.2f}"),
                            ("CPU ms per frame, all threads", "cpu_ms_per_frame", "{:.2f}"),
                            ("peak RSS, MB", "peak_rss_mb", "{:.0f}")):
        lines.append(f"| {label} | " + " | ".join(fmt.format(median(r[key] for r in runs(n))) for n in names) + " |")
    fps = {n: ", ".join(f"{r['fps']:.1f}" for r in runs(n)) for n in names}
    lines.append("| fps of each repeat | " + " | ".join(fps[n] for n in names) + " |")
    return lines


def heads_table(reports: list[dict]) -> list[str]:
    lines = ["| batch | with gradients, ms (median / p95) | forward only, ms | gradients add | each repeat |",
             "|---:|---:|---:|---:|---|"]
    for batch in reports[0]["heads"]["batches"]:
        entries = [r["heads"]["batches"][batch] for r in reports]
        full = [e["with_gradients"] for e in entries]
        forward = [e["forward_only"] for e in entries]
        lines.append(f"| {batch} | {median(f['median_ms'] for f in full):.1f} / {median(f['p95_ms'] for f in full):.1f} | "
                     f"{median(f['median_ms'] for f in forward):.1f} / {median(f['p95_ms'] for f in forward):.1f} | "
                     f"**{median(e['overhead_pct'] for e in entries):+.1f}%** | "
                     + ", ".join(f"{e['overhead_pct']:+.1f}%" for e in entries) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    reports: dict[str, list[dict]] = {name: [] for name in args.only}
    for repeat in range(args.repeats):
        for name in args.only:
            reports[name].append(run_once(name, args.out, repeat))

    first = next(iter(reports.values()))[0]
    machine = first["machine"]
    loads = [r["load_average"][k] for rs in reports.values() for r in rs for k in ("before", "after")]
    print(f"Measured {first['date'][:10]} on {machine['cpu']}, {machine['usable_cores']} cores, "
          f"{machine['memory_gb']} GB, {', '.join(machine['gpus']) or 'no GPU'}; {machine['os']}; "
          f"Python {machine['python']}, ONNX Runtime {machine['onnxruntime']}, MediaPipe {machine['mediapipe']}, "
          f"OpenCV {machine['opencv']}. 1-minute load average during the runs: {min(loads):.2f} to {max(loads):.2f}. "
          f"Each figure is the median over {args.repeats} runs.\n")
    for name, runs in reports.items():
        title, argv = CONFIGS[name]
        print(f"### {name}: {title}\n\n`camface bench {' '.join(argv)}`\n")
        print("\n".join(heads_table(runs) if name.startswith("heads") else rows_table(runs)))
        speedups = [r["speedup"] for r in runs if r.get("speedup")]
        if speedups:
            each = ", ".join(f"{s['end_to_end']:.1f}x" for s in speedups)
            print(f"\nSpeedup over the Keras baseline (median of {len(speedups)}): "
                  f"**{median(s['end_to_end'] for s in speedups):.1f}x end to end** (camface live vs Keras; "
                  f"each repeat: {each}), "
                  f"{median(s['same_loop'] for s in speedups):.1f}x with the same one-thread loop, "
                  f"{median(s['classify'] for s in speedups):.1f}x in classify+explain alone.")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
