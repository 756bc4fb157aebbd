"""Issue 27, session 6: two levers on auto's detection stage in the live loop, measured.

  reduced   key frames on a smaller whole-frame input: the full-range BlazeFace with its input
            set to S x S (S = 192, the model's own, 160, 128, 96; the two Reshapes patched in
            memory, anchors on the S/4 grid), the frame letterboxed into it as for 192. CPU ms per
            call (interleaved), and how its boxes agree with the 192 model's (IoU >= 0.9) per frame
            and as auto's key frames (carried boxes against every-frame detection at 192)
  carrying  BoxCarrier with fewer points (GRID), fewer pyramid levels (LK maxLevel), a smaller flow
            image (FLOW_WIDTH), a tighter region (REGION_MARGIN) and the flow image taken by
            striding instead of area halving: accuracy on the sample and the moving-faces clips
            (as `detect_every.py accuracy`), CPU ms per carried frame of the sample
  stages    every stage of the live loop in one thread (BoxCarrier.detect, explain, annotate,
            VideoSink.write; decoding left out: the sample is drawn), CPU (process time) per
            frame over frames 30-299 of the sample, every frame / auto / auto with the cheapest
            carrying, interleaved; the detection stage split into detector runs and carrying
  bench     `camface bench --source sample --record --detect-workers 1` (the live loop, its
            threads) with today's carrying and with the cheapest, alternately first: CPU ms per
            frame of auto and of every frame in each run

    .venv/bin/python benchmarks/detect_levers.py [reduced] [carrying] [stages] [bench] [--repeats 7]

Medians over repeats; the machine is shared, so CPU time (not wall time) is what is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SIZES = (192, 160, 128, 96)
# BoxCarrier's module constants changed by each setting, and how its flow image is made
CARRYING = {
    "today (5 x 5 points, 2 levels, 32 px, margin 0.25)": ({}, "halving"),
    "3 x 3 points": ({"GRID": 3}, "halving"),
    "1 pyramid level": ({"LK": {"maxLevel": 1}}, "halving"),
    "no pyramid (level 0)": ({"LK": {"maxLevel": 0}}, "halving"),
    "flow width 16 (one more halving)": ({"FLOW_WIDTH": 16}, "halving"),
    "region margin 0.15": ({"REGION_MARGIN": 0.15}, "halving"),
    "3 x 3, level 0, flow 16, margin 0.15": ({"GRID": 3, "LK": {"maxLevel": 0}, "FLOW_WIDTH": 16,
                                               "REGION_MARGIN": 0.15}, "halving"),
    "the same, flow image by striding": ({"GRID": 3, "LK": {"maxLevel": 0}, "FLOW_WIDTH": 16,
                                          "REGION_MARGIN": 0.15}, "stride"),
}
CHEAPEST = "the same, flow image by striding"
SAVED: dict = {}  # BoxCarrier's own constants, put back by set_carrying


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


class SizedDetector:
    """The full-range BlazeFace on an S x S letterbox of the whole frame (OnnxFaceDetector's
    steps with the input side S): `detect(frame) -> tuple[Face, ...]`, one ONNX Runtime thread."""

    def __init__(self, size: int, min_confidence: float = 0.5):
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        from camface.models import DETECTORS_ONNX
        from camface.realtime import blazeface

        model = onnx.load(str(DETECTORS_ONNX["full"]))
        anchors = (size // 4) ** 2  # stride 4, one anchor a cell
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[1].dim_value = dims[2].dim_value = size
        for output in model.graph.output:
            output.type.tensor_type.shape.dim[1].dim_value = anchors
        constants = {c.name: c for c in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Reshape":  # [1, 2304, C] -> [1, anchors, C]
                shape = numpy_helper.to_array(constants[node.input[1]]).copy()
                shape[1] = anchors
                constants[node.input[1]].CopyFrom(numpy_helper.from_array(shape, node.input[1]))
        del model.graph.value_info[:]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name
        by_width = {o.shape[-1]: o.name for o in self.session.get_outputs()}
        self.outputs = [by_width[16], by_width[1]]
        self.anchors = blazeface.anchor_centers(blazeface.AnchorSpec(size, (4,), False))
        self.size, self.min_confidence = size, min_confidence

    def close(self) -> None:
        pass

    def detect(self, frame):
        from camface.realtime import blazeface
        from camface.realtime.results import Face

        height, width = frame.shape[:2]
        tensor, x0, y0, side = blazeface.letterbox(frame, self.size)
        raw_boxes, raw_scores = self.session.run(self.outputs, {self.name: tensor})
        boxes, scores = blazeface.decode(raw_boxes[0], raw_scores[0], self.anchors, self.size, self.min_confidence)
        faces = []
        for box, score in zip(*(a.tolist() for a in blazeface.weighted_nms(boxes, scores))):
            pixels = blazeface.frame_box(box, x0, y0, side, width, height)
            if pixels is not None:
                faces.append(Face(box=pixels, score=float(score)))
        return tuple(sorted(faces, key=lambda f: f.area, reverse=True))


class Cached:
    """A detector whose answer for a frame (the same array object) is computed once."""

    def __init__(self, detector):
        self.detector, self.memo = detector, {}

    def detect(self, frame):
        if id(frame) not in self.memo:
            self.memo[id(frame)] = self.detector.detect(frame)
        return self.memo[id(frame)]

    def close(self) -> None:
        pass


def clips() -> dict:
    from camface.realtime.sample import SampleSource
    from realtime_helpers import moving_faces_clip

    sample = SampleSource(300)
    out = {"sample": ([sample.frame(i) for i in range(300)], None)}
    for frames in (60, 120, 180):
        out[f"moving {frames}"] = moving_faces_clip(frames)
    return out


def reduced(repeats: int) -> None:
    import numpy as np

    from camface.realtime.carry import BoxCarrier
    from camface.realtime.smooth import iou
    from realtime_helpers import carry_accuracy

    detectors = {size: SizedDetector(size) for size in SIZES}
    videos = clips()
    print(f"\nreduced input, whole frame letterboxed into S x S, {load()}")
    print("| S | IoU >= 0.9 with S = 192, per frame: sample / moving 120 | median IoU | "
          "auto with S on key frames, IoU >= 0.9 with every-frame 192: " + " / ".join(videos) + " |")
    print("|---|---|---|---|")
    every_frame = {name: [detectors[192].detect(f) for f in frames] for name, (frames, _) in videos.items()}
    for size, detector in detectors.items():
        agree, ious, auto = [], [], []
        for name, (frames, truth) in videos.items():
            mine = [detector.detect(f) for f in frames]
            if name in ("sample", "moving 120"):
                best = [max((iou(f.box, m.box) for m in faces), default=0.0)
                        for theirs, faces in zip(every_frame[name], mine) for f in theirs]
                agree.append(f"{np.mean(np.array(best) >= 0.9):.1%}")
                ious += best
            carrier = BoxCarrier(detector, 4)
            carried = [carrier.detect(f, i) for i, f in enumerate(frames)]
            a = carry_accuracy(carried, every_frame[name], truth)
            auto.append(f"{a['iou90']:.1%} ({a['late']}/{a['stale']})")
        print(f"| {size} | {' / '.join(agree)} | {np.median(ious):.3f} | {' / '.join(auto)} |")
    frames = videos["sample"][0][::10]
    times: dict[int, list[float]] = {size: [] for size in SIZES}
    for repeat in range(repeats + 1):
        for size, detector in detectors.items():  # interleaved
            cpu = time.thread_time()
            for frame in frames:
                detector.detect(frame)
            if repeat:  # the first round warms up
                times[size].append(1000 * (time.thread_time() - cpu) / len(frames))
    print("CPU ms per call (whole detect: letterbox, model, decoding, NMS), median of "
          f"{repeats} x {len(frames)} sample frames: "
          + ", ".join(f"S = {s}: {statistics.median(t):.2f} ({statistics.median(t) / statistics.median(times[192]):.2f}x)"
                      for s, t in times.items()))


def set_carrying(setting: str) -> None:
    """Set BoxCarrier's module constants (and its flow image's maker) to `setting`'s."""
    import cv2
    import numpy as np

    import camface.realtime.carry as carry

    if not SAVED:
        SAVED.update({k: getattr(carry, k) for k in ("GRID", "LK", "FLOW_WIDTH", "REGION_MARGIN", "_grey")})
    constants, grey = CARRYING[setting]
    for key, value in SAVED.items():
        setattr(carry, key, value)
    for key, value in constants.items():
        setattr(carry, key, {**SAVED["LK"], **value} if key == "LK" else value)
    if grey == "stride":  # every factor-th pixel of the region, no averaging
        carry._grey = lambda frame, region, factor: cv2.cvtColor(
            np.ascontiguousarray(frame[region[1]:region[3]:factor, region[0]:region[2]:factor]), cv2.COLOR_BGR2GRAY)


def carrying(repeats: int) -> None:
    import cv2

    from camface.models import DETECTORS_ONNX
    from camface.realtime.blazeface import OnnxFaceDetector
    from camface.realtime.carry import BoxCarrier
    from realtime_helpers import carry_accuracy

    cv2.setNumThreads(1)
    videos = clips()
    print(f"\ncarrying (auto: N = 4, max move 0.1), {load()}")
    print("| setting | IoU >= 0.9 with every-frame detection (late / stale frames), detector runs: "
          + " / ".join(videos) + " |")
    print("|---|---|")
    with OnnxFaceDetector(DETECTORS_ONNX["full"]) as onnx_detector:
        detector = Cached(onnx_detector)
        every_frame = {name: [detector.detect(f) for f in frames] for name, (frames, _) in videos.items()}
        for setting in CARRYING:
            set_carrying(setting)
            cells = []
            for name, (frames, truth) in videos.items():
                carrier = BoxCarrier(detector, 4)
                carried = [carrier.detect(f, i) for i, f in enumerate(frames)]
                a = carry_accuracy(carried, every_frame[name], truth)
                cells.append(f"{a['iou90']:.1%} ({a['late']}/{a['stale']}), {carrier.detections}")
            print(f"| {setting} | {' / '.join(cells)} |")
        frames = videos["sample"][0]
        times: dict[str, list[tuple[float, float]]] = {setting: [] for setting in CARRYING}
        settings = list(CARRYING)
        for repeat in range(repeats + 1):
            for setting in settings[repeat % len(settings):] + settings[:repeat % len(settings)]:  # interleaved
                set_carrying(setting)
                carrier = BoxCarrier(detector, 4)
                spent = carried = faces = 0
                for index, frame in enumerate(frames):
                    runs = carrier.detections
                    cpu = time.thread_time_ns()
                    found = carrier.detect(frame, index)
                    if carrier.detections == runs:
                        spent += time.thread_time_ns() - cpu
                        carried, faces = carried + 1, faces + len(found)
                if repeat:
                    times[setting].append((spent / carried / 1e6, spent / faces / 1e6))
        set_carrying(next(iter(CARRYING)))
    print(f"CPU ms per carried frame of the sample (2 faces; median of {repeats} x its carried frames), per face:")
    for setting, rows in times.items():
        print(f"  {setting}: {statistics.median(r[0] for r in rows):.3f}, {statistics.median(r[1] for r in rows):.3f}")


def stages(repeats: int) -> None:
    import cv2

    import camface.realtime.carry as carry
    from camface.api import load as load_pipeline
    from camface.realtime.config import LiveConfig
    from camface.realtime.controls import Controls
    from camface.realtime.sample import SampleSource
    from camface.realtime.sinks import VideoSink

    cv2.setNumThreads(1)
    frames = [SampleSource(300).frame(i) for i in range(300)]
    settings = {"every frame": (1, next(iter(CARRYING))), "auto (today)": (4, next(iter(CARRYING))),
                "auto, cheapest carrying": (4, CHEAPEST)}
    names = ("detect", "key frames", "carrying", "explain", "render", "encode")
    rows: dict[str, list[dict]] = {name: [] for name in settings}
    started = time.strftime("%H:%M", time.gmtime())
    config = LiveConfig(detector_runtime="onnx", graph_threads=1)
    with load_pipeline(config=config) as pipeline, pipeline.face_detector() as detector, \
            tempfile.TemporaryDirectory() as folder:
        controls = Controls(method=pipeline.config.method)
        for repeat in range(repeats + 1):
            order = list(settings)[repeat % 3:] + list(settings)[:repeat % 3]  # interleaved, each first in turn
            for name in order:
                every, setting = settings[name]
                set_carrying(setting)
                carrier = carry.BoxCarrier(detector, every)
                spent = dict.fromkeys(names, 0.0)
                with VideoSink(Path(folder) / f"{repeat}-{every}.mp4", 30.0, overwrite=True) as sink:
                    for index, drawn in enumerate(frames):
                        frame = drawn.copy()
                        runs = carrier.detections
                        marks = [time.process_time()]
                        faces = carrier.detect(frame, index)
                        marks.append(time.process_time())
                        explained = pipeline.explainer.explain(frame, faces, controls, index)
                        marks.append(time.process_time())
                        pipeline.renderer.annotate(frame, explained.result, True)
                        marks.append(time.process_time())
                        sink.write(frame)
                        marks.append(time.process_time())
                        if index >= 30:
                            for stage, (a, b) in zip(("detect", "explain", "render", "encode"), zip(marks, marks[1:])):
                                spent[stage] += 1000 * (b - a) / 270
                            part = "key frames" if carrier.detections > runs else "carrying"
                            spent[part] += 1000 * (marks[1] - marks[0]) / 270
                if repeat:  # the first round warms up
                    rows[name].append(spent)
        set_carrying(next(iter(CARRYING)))
    total = {name: [sum(r[s] for s in ("detect", "explain", "render", "encode")) for r in runs]
             for name, runs in rows.items()}
    print(f"\nevery stage in one thread, CPU ms per frame (frames 30-299 of the sample, recording on), median of "
          f"{repeats} interleaved repeats, {started}-{time.strftime('%H:%M', time.gmtime())} UTC, {load()}")
    print("| setting | total | detect | of which detector runs | of which carrying | explain | render | encode | totals |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        print(f"| {name} | {statistics.median(total[name]):.2f} | "
              + " | ".join(f"{statistics.median(r[s] for r in runs):.2f}" for s in names)
              + " | " + ", ".join(f"{t:.2f}" for t in total[name]) + " |")
    for name in list(settings)[1:]:
        ratios = [e / a for e, a in zip(total["every frame"], total[name])]
        print(f"every frame / {name}, same repeat: {statistics.median(ratios):.2f}x ("
              + ", ".join(f"{x:.2f}" for x in ratios) + ")")


def bench(repeats: int) -> None:
    runs: dict[str, list[tuple[float, float]]] = {"today": [], "cheapest": []}
    started = time.strftime("%H:%M", time.gmtime())
    for repeat in range(repeats):
        for carrying_setting in list(runs)[::1 if repeat % 2 == 0 else -1]:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                subprocess.run([sys.executable, __file__, "_bench", carrying_setting, "bench", "--source", "sample",
                                "--record", "--frames", "300", "--json", out.name, "--detector-runtime", "onnx",
                                "--detect-workers", "1"], check=True, capture_output=True)
                report = json.loads(Path(out.name).read_text())
            runs[carrying_setting].append((report["runs"][0]["cpu_ms_per_frame"], report["runs"][1]["cpu_ms_per_frame"]))
    print(f"\ncamface bench --source sample --record --frames 300 --detect-workers 1 (ONNX Runtime), {repeats} repeats, "
          f"{started}-{time.strftime('%H:%M', time.gmtime())} UTC, {load()}")
    print("| carrying | CPU ms/frame, auto | CPU ms/frame, every frame | ratio in the run |")
    print("|---|---|---|---|")
    for name, rows in runs.items():
        print(f"| {name} | {statistics.median(r[0] for r in rows):.2f} | {statistics.median(r[1] for r in rows):.2f} | "
              f"{statistics.median(r[1] / r[0] for r in rows):.2f}x (" + ", ".join(f"{r[1] / r[0]:.2f}" for r in rows) + ") |")
    saved = [t[0] / c[0] for t, c in zip(runs["today"], runs["cheapest"])]
    print(f"auto, today's carrying / the cheapest, same repeat: {statistics.median(saved):.2f}x ("
          + ", ".join(f"{x:.2f}" for x in saved) + ")")


def main() -> int:
    if sys.argv[1:2] == ["_bench"]:  # (in a fresh process) camface with the carrying setting argv[2]
        if sys.argv[2] == "cheapest":
            set_carrying(CHEAPEST)
        from camface.cli import run

        sys.argv[:3] = ["camface"]
        return run()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["reduced", "carrying", "stages", "bench"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if "reduced" in args.parts:
        reduced(args.repeats)
    if "carrying" in args.parts:
        carrying(args.repeats)
    if "stages" in args.parts:
        stages(args.repeats)
    if "bench" in args.parts:
        bench(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
