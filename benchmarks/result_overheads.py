"""What the per-frame result bookkeeping added in the review round of 3 Dec 2026 costs: the tied
top probability check of `run_scores` (commit 335533f; a graph whose call costs nothing and
gives no ties, so only the check is timed), and one `Prediction` with and without its read-only
views (commit 366d8d5).

    .venv/bin/python benchmarks/result_overheads.py [--faces 2] [--calls 3000] [--rounds 21]

Each round times every variant once, in turn, so load on a shared machine hits all alike.
Prints the median over rounds of the microseconds per call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from camface.realtime import explainer
from camface.realtime.results import Prediction


class FreeGraph:
    """A graph's `run` that returns fixed probabilities [N, 7] (no ties) and heatmaps [N, 7, 7]."""

    def __init__(self, faces: int):
        rng = np.random.default_rng(0)
        self.info = type("Info", (), {"gallery": None})()
        self.probs = rng.random((faces, 7)).astype(np.float32)
        self.heatmaps = rng.random((faces, 7, 7)).astype(np.float32)

    def run(self, crops, class_index, method):
        return self.probs, self.heatmaps


class PlainPrediction(Prediction):
    """A Prediction without the read-only views (before commit 366d8d5)."""

    def __post_init__(self) -> None:
        pass


def per_call_us(work, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        work()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--faces", type=int, default=2, help="faces per frame")
    parser.add_argument("--calls", type=int, default=3000, help="calls per variant and round")
    parser.add_argument("--rounds", type=int, default=21, help="rounds")
    args = parser.parse_args(argv)
    graph = FreeGraph(args.faces)
    crops = np.zeros((args.faces, 64, 64, 1), np.uint8)
    wanted = np.full(args.faces, -1, np.int64)
    probs, heatmaps = graph.probs[0], graph.heatmaps[0]
    variants = {
        "graph call only (no tie check)": lambda: explainer._run_once(graph, crops, wanted, "gradcam"),
        "run_scores (with the tie check)": lambda: explainer.run_scores(graph, crops, wanted, "gradcam"),
        "Prediction, writeable arrays": lambda: PlainPrediction(probs=probs, heatmap=heatmaps, predicted=0,
                                                                explained=0, method="gradcam"),
        "Prediction, read-only views": lambda: Prediction(probs=probs, heatmap=heatmaps, predicted=0, explained=0,
                                                          method="gradcam"),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, work in variants.items():
            times[name].append(per_call_us(work, args.calls))
    for name, values in times.items():
        print(f"{name:34s} {statistics.median(values):7.2f} us per call ({args.faces} faces, median of {args.rounds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
