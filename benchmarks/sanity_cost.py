"""What `camface evaluate --sanity` costs on the bundled graph: the sample's scored crops (every 5th
of 300 frames, as `camface evaluate`), the ONNX cascade and random-logit test for every method,
then Guided Backprop / Guided Grad-CAM in TensorFlow, each timed separately.

    .venv/bin/python benchmarks/sanity_cost.py [--repeats 3] [--frames 300] [--every 5]

Prints the median wall time of each part over the repeats (crops are detected once).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()

    import keras
    import onnx

    from camface import methods
    from camface.evaluate import crops as crop_sources
    from camface.evaluate import sanity
    from camface.evaluate.randomize import Randomizer
    from camface.guided.snapshot import Preprocessing
    from camface.models import EMOTION_KERAS, EMOTION_ONNX
    from camface.realtime.config import LiveConfig
    from camface.realtime.graph import CamGraph

    graph = CamGraph(EMOTION_ONNX, "cpu")
    crops, _ = crop_sources.from_source(LiveConfig(source="sample"), graph, args.frames, args.every)
    names = tuple(n for n in methods.names() if n in graph.info.heatmaps)
    cam = onnx.load(str(EMOTION_ONNX))
    info = graph.info
    guided = (keras.models.load_model(EMOTION_KERAS, compile=False),
              Preprocessing.from_normalization(info.color_order, info.normalization), info.target_layer)
    timings: dict[str, list[float]] = {"onnx (every method)": [], "onnx + guided (TensorFlow)": []}
    for _ in range(args.repeats):
        for label, extra in (("onnx (every method)", None), ("onnx + guided (TensorFlow)", guided)):
            started = time.perf_counter()
            sanity.check(Randomizer(cam, seed=0), crops, names, guided=extra)
            timings[label].append(time.perf_counter() - started)
    print(f"{len(crops)} crops, {len(names)} methods, os.cpu_count() = {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}")
    for label, values in timings.items():
        print(f"{label:<28} median {statistics.median(values):6.1f} s  (min {min(values):.1f}, max {max(values):.1f})")


if __name__ == "__main__":
    main()
