"""What ranking the methods adds to `camface export`: the bundled emotion graph exported as
`make models` does, with the ranking (no budget, all 116 sample crops, as `make models`; and the
default --rank-seconds budget) and with --no-rank, each a fresh `camface` process, the variants
alternating run by run so that load on a shared machine hits them alike.

    .venv/bin/python benchmarks/export_ranking.py [--repeats 3] [--json out.json]

Prints, per variant, the median and range of wall seconds and of CPU seconds (user + system of
the process and its children: what the export costs whatever else the machine runs), the crops
the ranking used and the method it put first, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMFACE = Path(sys.executable).with_name("camface")
EXPORT = ["export", "models/emotion/emotion_mini_xception_fer2013.hdf5", "--labels", "models/emotion/labels.txt",
          "--preset", "emotion", "--target-layer", "add_3"]
VARIANTS = {"--no-rank": ["--no-rank"], "ranked, no budget (make models)": ["--rank-seconds", "0"],
            "ranked, default budget": []}


def run_once(flags: list[str], out: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([str(CAMFACE), *EXPORT, "-o", str(out), *flags], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    from camface.export.info import read

    ranking = read(out).info.ranking
    return {"wall_s": wall, "cpu_s": cpu, "crops": ranking.get("settings", {}).get("crops"),
            "first": (ranking.get("ranking") or [None])[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    load_before = os.getloadavg()
    runs = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="camface-export-ranking-") as tmp:
        for repeat in range(args.repeats):
            for name, flags in VARIANTS.items():
                runs[name].append(run_once(flags, Path(tmp) / "emotion.onnx"))
                print(f"run {repeat + 1}/{args.repeats} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    print(f"camface export of the bundled graph, {args.repeats} runs per variant (medians, [min, max]); "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, {os.cpu_count()} CPUs")
    base = {key: statistics.median(r[key] for r in runs["--no-rank"]) for key in ("wall_s", "cpu_s")}
    for name, rows in runs.items():
        wall, cpu = [r["wall_s"] for r in rows], [r["cpu_s"] for r in rows]
        line = (f"  {name:<34} wall {statistics.median(wall):6.1f} s [{min(wall):.1f}, {max(wall):.1f}]  "
                f"cpu {statistics.median(cpu):6.1f} s [{min(cpu):.1f}, {max(cpu):.1f}]")
        if name != "--no-rank":
            line += (f"  +{statistics.median(wall) - base['wall_s']:.1f} s wall, "
                     f"+{statistics.median(cpu) - base['cpu_s']:.1f} s cpu; crops {sorted({r['crops'] for r in rows})}, "
                     f"first {sorted({r['first'] for r in rows})}")
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"load_average": [load_before, load_after], "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
