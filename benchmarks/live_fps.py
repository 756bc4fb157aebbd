"""End-to-end fps of the live loop on the `sample` clip (640x480), headless, recording on.

Also measures the detector's and the CAM graph's own inference time on the same frames,
one after the other on one thread, to check that the loop's glue stays cheap:
end-to-end ms per frame <= 1.5 x (detect + classify ms).

    .venv/bin/python benchmarks/live_fps.py [--frames 600] [--repeats 3] [--detector full|short]

Machines are shared: each figure is the median over --repeats runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from camface.models import DETECTORS, EMOTION_ONNX  # noqa: E402
from camface.realtime.crop import crop_faces  # noqa: E402
from camface.realtime.detect import FaceDetector  # noqa: E402
from camface.realtime.graph import CamGraph  # noqa: E402
from camface.realtime.loop import LiveConfig, LiveLoop  # noqa: E402
from camface.realtime.sample import SampleSource  # noqa: E402


def inference_only(frames: list[np.ndarray], detector_name: str, method: str) -> tuple[float, float]:
    """Median ms per frame of detection alone and of the graph call alone (same faces)."""
    graph = CamGraph(EMOTION_ONNX, "auto", threads=1)
    detect_ms, classify_ms = [], []
    with FaceDetector(DETECTORS[detector_name]) as detector:
        for frame in frames:
            start = time.perf_counter()
            faces = detector.detect(frame)
            detect_ms.append((time.perf_counter() - start) * 1000)
            if faces:
                crops, faces = crop_faces(frame, faces[:8], 0.1, graph.info.input_size, graph.info.color_order)
                index = np.full(len(faces), -1, np.int64)
                start = time.perf_counter()
                graph.run(crops, index, method)
                classify_ms.append((time.perf_counter() - start) * 1000)
            else:
                classify_ms.append(0.0)
    return float(np.median(detect_ms)), float(np.median(classify_ms))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--detector", choices=("short", "full"), default="full")
    parser.add_argument("--method", default="gradcam")
    args = parser.parse_args()

    runs, cpu_ms = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            config = LiveConfig(source="sample", method=args.method, detector=args.detector,
                                record=Path(tmp) / f"bench{repeat}.mp4", max_frames=args.frames)
            loop = LiveLoop(config, source=SampleSource(frames=args.frames))
            cpu_start = time.process_time()
            summary = loop.run()
            cpu_ms.append((time.process_time() - cpu_start) * 1000 / max(summary.frames, 1))
            runs.append(summary)
            print(f"run {repeat + 1}: {summary.line()}", file=sys.stderr)

    with SampleSource(frames=min(args.frames, 300)) as clip:
        frames = list(clip)
    detect_ms, classify_ms = inference_only(frames, args.detector, args.method)

    fps = statistics.median(r.fps for r in runs)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"provider {runs[0].provider}; detector {args.detector}; method {args.method}; "
          f"{args.frames} frames x {args.repeats} runs; {runs[0].faces_per_frame:.2f} faces/frame")
    print(f"{'stage':<10} {'median ms':>10} {'p95 ms':>8}")
    for stage in ("decode", "detect", "crop", "classify", "render", "encode"):
        medians = [r.stages[stage].median_ms for r in runs if stage in r.stages]
        p95s = [r.stages[stage].p95_ms for r in runs if stage in r.stages]
        if medians:
            print(f"{stage:<10} {statistics.median(medians):>10.2f} {statistics.median(p95s):>8.2f}")
    e2e_ms = 1000.0 / fps if fps else float("inf")
    inference = detect_ms + classify_ms
    print(f"end to end: {fps:.0f} fps = {e2e_ms:.2f} ms/frame (median of runs: "
          f"{', '.join(f'{r.fps:.0f}' for r in runs)})")
    print(f"inference alone, one thread: detect {detect_ms:.2f} + classify {classify_ms:.2f} = {inference:.2f} ms; "
          f"end-to-end / inference = {e2e_ms / inference:.2f} (target <= 1.5)")
    cpu = statistics.median(cpu_ms)
    cores = os.cpu_count() or 1
    print(f"CPU time: {cpu:.2f} ms per frame over all threads (start-up included); on {cores} idle cores "
          f"the loop could reach at most ~{1000 * cores / cpu:.0f} fps")
    print(f"target >= 250 fps: {'met' if fps >= 250 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
