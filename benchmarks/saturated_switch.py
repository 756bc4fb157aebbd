"""The gallery graph's saturated-similarity switch (export/gallery.py `_saturated_switch`): what
the per-frame graph call pays for explaining the projection e . g where 1 - cosine < 1e-4.

The embedder is benchmarks/enroll.py's ArcFace-shaped one (random weights, 112x112 RGB -> 512).
Two gallery graphs of it (Grad-CAM only, no self-check) are built from the same rows: with the
switch (as `camface enroll` builds them) and without it (the switch's nodes replaced by one
Identity, as before). Each is run at batch 1 and 8 on random crops, class_index -1, for 5 and
1000 identities: median ms per call over --repeats interleaved pairs (the order alternating),
CPU time of the process (`time.process_time`: one ORT thread) and wall time.

    .venv/bin/python benchmarks/saturated_switch.py [--repeats 60] [--threads 1]

Measured 2026-12-03 on the shared 2-core development machine (other helpers' tests running):
--repeats 150, CPU ms median without / with the switch: batch 1, 5 identities 7.55 / 7.62
(+1.0%); batch 8, 5: 46.35 / 47.24 (+1.9%); batch 1, 1000: 6.99 / 7.13 (+2.0%); batch 8, 1000:
43.60 / 43.72 (+0.3%). --repeats 60: -1.1% to +2.1%. benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def graphs(embedder, rows, options):
    """(graph with the switch, graph without it), ModelProtos of `gallery.build`."""
    from onnx import helper

    from camface.export import gallery

    with_switch = gallery.build(embedder, rows, [f"p{k}" for k in range(len(rows))], options, {})[0]
    switch = gallery._saturated_switch
    gallery._saturated_switch = lambda e, cos: [helper.make_node("Identity", [cos], [gallery.COSINE])]
    try:
        without = gallery.build(embedder, rows, [f"p{k}" for k in range(len(rows))], options, {})[0]
    finally:
        gallery._saturated_switch = switch
    return with_switch, without


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60, help="interleaved pairs per row")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from enroll import arcface_like, session
    from gallery_helpers import to_onnx

    from camface import graph_spec
    from camface.export import gallery
    from camface.export.exporter import ExportOptions

    options = ExportOptions(preset="arcface", heads=("gradcam",), verify=False)
    rng = np.random.default_rng(0)
    tmp = tempfile.TemporaryDirectory()  # the build hashes the embedder's file
    path = to_onnx(arcface_like(), Path(tmp.name) / "arcface_like.onnx", size=112)
    embedder = gallery.load(path, options)
    print(f"embedder 112x112 RGB -> 512, Grad-CAM, ORT threads {args.threads}, {args.repeats} interleaved pairs")
    print("\n| batch | identities | without CPU ms | with switch CPU ms | overhead CPU | overhead wall |")
    print("|---|---|---|---|---|---|")
    for identities in (5, 1000):
        rows = gallery.normalise(rng.standard_normal((identities, 512)))
        switched, plain = (session(g, args.threads) for g in graphs(embedder, rows, options))
        for batch in (1, 8):
            feed = {graph_spec.INPUT_IMAGE: rng.integers(0, 256, (batch, 112, 112, 3), dtype=np.uint8),
                    graph_spec.INPUT_CLASS: np.full(batch, -1, np.int64)}
            for _ in range(3):  # warm up both
                plain.run(["gradcam"], feed)
                switched.run(["gradcam"], feed)
            times = {"plain": ([], []), "switched": ([], [])}
            for i in range(args.repeats):
                pairs = (("plain", plain), ("switched", switched))
                for name, graph in pairs[::(1 if i % 2 else -1)]:
                    started, started_cpu = time.perf_counter(), time.process_time()
                    graph.run(["gradcam"], feed)
                    times[name][0].append((time.process_time() - started_cpu) * 1e3)
                    times[name][1].append((time.perf_counter() - started) * 1e3)
            (a, wa), (b, wb) = ((statistics.median(c), statistics.median(w))
                                for c, w in (times["plain"], times["switched"]))
            print(f"| {batch} | {identities} | {a:.2f} | {b:.2f} | {100 * (b - a) / a:+.1f}% | "
                  f"{100 * (wb - wa) / wa:+.1f}% |")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
