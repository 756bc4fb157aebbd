"""`--detect-every`: accuracy of carried boxes and what they save, measured on this machine.

  accuracy  per clip and N: carried boxes against detection on every frame (IoU >= 0.9 on
            what fraction of face-frames; the longest delay boxing a face that appears and
            dropping one that leaves), and the detector's own consistency (its boxes on the
            frame against its boxes on the frame shifted by 2 pixels) as the bound; the clips
            are tests/realtime_helpers.py's `moving_faces_clip` and the sample
  costs     ms per call: MediaPipe full / short range at 640x480 and at 320x240 (detecting on a
            downscaled frame), one carried frame with 1..3 faces, a carried frame at 640x480,
            1280x960 and 1920x1440
  windows   re-detecting only around a face: the full-range model (made size-free) on a K x K
            window of its 192 x 192 input centred on each face of the sample, against the
            whole input: CPU ms per call and IoU of the window's box with the whole input's
  threads   CPU ms per frame of each thread of `camface live --record` on the sample (Linux: from
            /proc), auto against every frame: what limits the ratio of the two
  bench     `camface bench --source sample --record` --repeats times: each run has both rows
            (auto and every frame) on the same frames, one after the other
  batch     `camface batch` on --copies sample clips, --detect-every 1 and auto interleaved:
            decode + detect + crop frames/s per detection actor (one core), from the records

    .venv/bin/python benchmarks/detect_every.py [accuracy] [costs] [windows] [threads] [bench] [batch]
                                                 [--repeats 3]

Medians over repeats; the machine is shared, so the load average is printed with each part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def accuracy(runtime: str, settings: list[str]) -> None:
    """`settings`: "N" or "N/M" (detect every N, re-detect when a box moved by more than M of its
    width since its detection; "N/-": no such re-detection)."""
    import numpy as np

    from camface.api import face_detector
    from camface.realtime.carry import MAX_MOVE, BoxCarrier
    from camface.realtime.config import LiveConfig
    from camface.realtime.sample import SampleSource
    from camface.realtime.smooth import iou
    from realtime_helpers import carry_accuracy, moving_faces_clip

    sample = SampleSource(300)
    clips = {"sample (300 frames)": ([sample.frame(i) for i in range(300)], None)}
    for frames in (60, 120, 180):
        clips[f"moving faces ({frames} frames)"] = moving_faces_clip(frames)
    print(f"accuracy, full-range detector on {runtime}, {load()}")
    print("| clip | N / max move | IoU >= 0.9 with every-frame detection | appearing face boxed after (frames) "
          "| leaving face unboxed after (frames) | detector runs |")
    print("|---|---|---|---|---|---|")
    with face_detector(LiveConfig(detector_runtime=runtime)) as detector:
        for name, (frames, truth) in clips.items():
            every_frame = [detector.detect(f) for f in frames]
            shifted = []
            for frame, faces in zip(frames, every_frame):
                moved = detector.detect(np.roll(frame, 2, axis=1))
                shifted += [max((iou((f.box[0] + 2, *f.box[1:]), m.box) for m in moved), default=0.0) >= 0.9
                            for f in faces]
            print(f"| {name} | detector vs itself, 2 px shift | {np.mean(shifted):.1%} | | | |")
            if truth is not None:
                oracle = perfect_motion(every_frame, truth, 4)
                a = carry_accuracy(oracle, every_frame, truth)
                print(f"| {name} | 4, key-frame boxes moved by the true motion | {a['iou90']:.1%} | | | |")
            for setting in settings:
                every, _, move = setting.partition("/")
                max_move = MAX_MOVE if not move else None if move == "-" else float(move)
                carrier = BoxCarrier(detector, int(every), max_move)
                carried = [carrier.detect(f, i) for i, f in enumerate(frames)]
                a = carry_accuracy(carried, every_frame, truth)
                print(f"| {name} | {every} / {max_move if max_move is not None else '-'} | {a['iou90']:.1%} of "
                      f"{a['face_frames']} | {a['late']} | {a['stale']} | "
                      f"{carrier.detections} of {len(frames)} ({carrier.redetections} re-detections) |")


def perfect_motion(every_frame: list, truth: list[dict], every: int) -> list:
    """Boxes carried with perfect knowledge of the motion: each key frame's detected boxes,
    moved and scaled as the true face box they overlap most moved and scaled since then (the
    best any carrying of a key frame's boxes can do)."""
    from camface.realtime.results import Face
    from camface.realtime.smooth import iou

    out = []
    for index in range(len(every_frame)):
        key = index - index % every
        faces = []
        for face in every_frame[key]:
            name = max(truth[key], key=lambda n: iou(truth[key][n], face.box))
            if name not in truth[index]:
                continue
            (ax, ay, aw, ah), (bx, by, bw, bh) = truth[key][name], truth[index][name]
            scale = bw / aw
            x, y, w, h = face.box
            cx = bx + bw / 2 + (x + w / 2 - ax - aw / 2) * scale
            cy = by + bh / 2 + (y + h / 2 - ay - ah / 2) * scale
            faces.append(Face(box=(round(cx - w * scale / 2), round(cy - h * scale / 2), round(w * scale),
                                   round(h * scale)), score=face.score))
        out.append(tuple(faces))
    return out


def costs() -> None:
    import cv2

    from camface.api import face_detector
    from camface.models import DETECTORS
    from camface.realtime.carry import BoxCarrier
    from camface.realtime.config import LiveConfig
    from camface.realtime.detect import FaceDetector
    from realtime_helpers import moving_faces_clip

    cv2.setNumThreads(1)
    frames, _ = moving_faces_clip(120)

    def median_ms(call, items):
        times = []
        for item in items:
            start = time.perf_counter()
            call(item)
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times)

    print(f"\ncosts (ms per call, median over 120 frames; CPU ms: process time / calls), {load()}")
    small = [cv2.resize(f, (320, 240), interpolation=cv2.INTER_AREA) for f in frames]
    for model in ("full", "short"):
        cells: dict[str, list] = {runtime: [] for runtime in RUNTIMES}
        for _ in range(3):  # runtimes interleaved
            for runtime in RUNTIMES:
                with face_detector(LiveConfig(detector=model, detector_runtime=runtime)) as detector:
                    cpu = time.process_time()
                    wall = median_ms(detector.detect, frames)
                    cpu = 1000 * (time.process_time() - cpu) / len(frames)
                    cells[runtime].append((wall, cpu, median_ms(detector.detect, small)))
        for runtime, rows in cells.items():
            print(f"  {runtime} {model}-range 640x480: {statistics.median(r[0] for r in rows):.2f} wall, "
                  f"{statistics.median(r[1] for r in rows):.2f} CPU; "
                  f"320x240: {statistics.median(r[2] for r in rows):.2f} wall")
    with FaceDetector(DETECTORS["full"]) as detector:
        faces = [detector.detect(f) for f in frames]
        by_count: dict[int, list[float]] = {}
        for i in range(1, len(frames)):
            carrier = BoxCarrier(detector, 1000)
            carrier.detect(frames[i - 1], 0)  # key frame
            start = time.perf_counter()
            carrier.detect(frames[i], 1)  # carried (or re-detected, rarely)
            if carrier.detections == 1:
                by_count.setdefault(len(faces[i - 1]), []).append(1000 * (time.perf_counter() - start))
    for count, times in sorted(by_count.items()):
        print(f"  carried frame with {count} face(s): {statistics.median(times):.2f} ms ({len(times)} frames)")
    carried_by_size()
    # MediaPipe runs each call on threads of its own graph executor: called on one frame in N,
    # with other work in between (here a 3 ms sleep), a call costs more than in a tight loop.
    for runtime in RUNTIMES:
        with face_detector(LiveConfig(detector="full", detector_runtime=runtime)) as detector:
            for every in (1, 4):
                cpu, wall, calls = time.process_time(), time.perf_counter(), 0
                for index, frame in enumerate(frames * 2):
                    if index % every == 0:
                        detector.detect(frame)
                        calls += 1
                    else:
                        time.sleep(0.003)
                slept = 0.003 * (2 * len(frames) - calls)
                print(f"  {runtime} full-range called on 1 frame in {every}: "
                      f"{1000 * (time.process_time() - cpu) / calls:.2f} ms CPU, "
                      f"{1000 * (time.perf_counter() - wall - slept) / calls:.2f} ms wall per call")


def carried_by_size() -> None:
    """CPU ms per carried frame (no detection: N huge, no re-detection) of the sample's frames
    40-99 (one face, 145-215 px at 640x480) scaled to larger frames: the flow's regions follow
    the face's size, not the frame's."""
    import cv2

    from camface.api import face_detector
    from camface.realtime.carry import BoxCarrier
    from camface.realtime.config import LiveConfig
    from camface.realtime.sample import SampleSource

    sample = SampleSource(300)
    base = [sample.frame(i) for i in range(40, 100)]
    with face_detector(LiveConfig()) as detector:
        for size in ((640, 480), (1280, 960), (1920, 1440)):
            frames = [cv2.resize(f, size, interpolation=cv2.INTER_LINEAR) for f in base]
            times = []
            for _ in range(7):
                carrier = BoxCarrier(detector, 10 ** 6, None)
                carrier.detect(frames[0], 0)
                cpu = time.process_time()
                for index in range(1, len(frames)):
                    carrier.detect(frames[index], index)
                times.append(1000 * (time.process_time() - cpu) / (len(frames) - 1))
            cpu = time.process_time()
            for frame in frames[:20]:
                detector.detect(frame)
            detect = 1000 * (time.process_time() - cpu) / 20
            print(f"  carried frame at {size[0]}x{size[1]}, one face: {statistics.median(times):.3f} ms CPU "
                  f"(median of 7 x 59 frames); a detection there: {detect:.2f} ms CPU")


def windows() -> None:
    """The full-range model's input is 192 x 192 whatever the frame; a re-detection of one face
    could run it on a window of that input around the face instead (the model is convolutional:
    its two Reshapes are its only fixed sizes). Per window side K and alignment of its corner
    (input pixels): CPU ms per call, and how often the window's box for a face has IoU >= 0.9
    with the whole input's (the sample, every 5th frame)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from camface.models import DETECTORS_ONNX
    from camface.realtime import blazeface
    from camface.realtime.sample import SampleSource
    from camface.realtime.smooth import iou

    model = onnx.load(str(DETECTORS_ONNX["full"]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_param, dims[2].dim_param = "height", "width"
    for output in model.graph.output:
        output.type.tensor_type.shape.dim[1].dim_param = "anchors"
    constants = {c.name: c for c in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Reshape":  # [1, 2304, C] -> [1, -1, C]
            shape = numpy_helper.to_array(constants[node.input[1]]).copy()
            shape[1] = -1
            constants[node.input[1]].CopyFrom(numpy_helper.from_array(shape, node.input[1]))
    del model.graph.value_info[:]
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    by_width = {o.shape[-1]: o.name for o in session.get_outputs()}

    def detect(tensor, x0=0, y0=0):
        raw_boxes, raw_scores = session.run([by_width[16], by_width[1]], {name: tensor})
        rows, cols = tensor.shape[1] // 4, tensor.shape[2] // 4  # one anchor per 4 x 4 input pixels
        ys, xs = np.meshgrid(np.arange(rows) * 4 + 2 + y0, np.arange(cols) * 4 + 2 + x0, indexing="ij")
        anchors = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32) / 192
        boxes, _ = blazeface.weighted_nms(*blazeface.decode(raw_boxes[0], raw_scores[0], anchors, 192, 0.5))
        return [tuple(b) for b in (boxes * 192).tolist()]

    sample = SampleSource(300)
    inputs = [blazeface.letterbox(sample.frame(i), 192)[0] for i in range(0, 300, 5)]
    whole = [detect(t) for t in inputs]
    print(f"\nwindows (full-range ONNX, sample every 5th frame, {sum(map(len, whole))} faces), {load()}")
    for side in (192, 128, 96, 64):
        window = np.ascontiguousarray(inputs[0][:, :side, :side])
        for _ in range(10):
            detect(window)
        times = []
        for _ in range(7):
            cpu = time.process_time()
            for _ in range(30):
                detect(window)
            times.append(1000 * (time.process_time() - cpu) / 30)
        cells = [f"{side} x {side}: {statistics.median(times):.2f} ms CPU"]
        for align in ((4, 8, 32) if side < 192 else ()):
            hits = []
            for tensor, boxes in zip(inputs, whole):
                for box in boxes:
                    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                    x0, y0 = (int(min(max(round((c - side / 2) / align) * align, 0), 192 - side)) for c in (cx, cy))
                    found = detect(np.ascontiguousarray(tensor[:, y0:y0 + side, x0:x0 + side]), x0, y0)
                    hits.append(max((iou(_xywh(box), _xywh(f)) for f in found), default=0.0) >= 0.9)
            cells.append(f"aligned to {align}: IoU >= 0.9 on {np.mean(hits):.1%}")
        print("  " + "; ".join(cells))


def _xywh(box):
    return box[0], box[1], box[2] - box[0], box[3] - box[1]


def thread_costs(repeats: int, frames: int) -> None:
    """Each repeat runs the live loop (sample, recording on) with auto and with every-frame
    detection, each for 60 and for `frames` frames in fresh processes; the difference of the
    two runs' CPU time per thread, over the extra frames, is that thread's CPU per frame
    without start-up."""
    from camface.realtime.sample import SampleSource

    for count in (60, frames):  # drawn and cached now, not inside a timed run
        SampleSource(count).cached_clip()
    rows: dict[str, list[dict]] = {"auto": [], "1": []}
    for _ in range(repeats):
        for every in rows:
            cpu = {}
            for count in (60, frames):
                out = subprocess.run([sys.executable, __file__, "_threads", every, str(count)],
                                     capture_output=True, text=True, check=True).stdout
                cpu[count] = json.loads(out.strip().splitlines()[-1])
            names = set(cpu[frames]) | set(cpu[60])
            rows[every].append({name: 1000 * (cpu[frames].get(name, 0.0) - cpu[60].get(name, 0.0)) / (frames - 60)
                                for name in names})
    names = sorted(rows["1"][0], key=lambda n: -rows["1"][0][n])
    print(f"\nCPU ms per frame by thread, `camface live --source sample --record` ({frames} - 60 frames), "
          f"median of {repeats} interleaved repeats, {load()}")
    print("| thread | auto | every frame (2 detector threads) | every frame - auto |")
    print("|---|---|---|---|")
    for name in names:
        auto = statistics.median(r.get(name, 0.0) for r in rows["auto"])
        every = statistics.median(r.get(name, 0.0) for r in rows["1"])
        print(f"| {name} | {auto:.2f} | {every:.2f} | {every - auto:+.2f} |")
    ratios = [e["process"] / a["process"] for a, e in zip(rows["auto"], rows["1"])]
    print("ratio of the process totals, same repeat: " + ", ".join(f"{x:.2f}x" for x in ratios))


def _threads(every: str, frames: int) -> None:
    """(In a fresh process) run the live loop, print {thread: CPU seconds} as one JSON line."""
    import collections
    import ctypes
    import threading

    from camface.realtime.config import LiveConfig
    from camface.realtime.loop import LiveLoop
    from camface.realtime.sources import make_source

    libc = ctypes.CDLL(None)
    bootstrap = threading.Thread._bootstrap_inner

    def named(thread):  # the thread's name where /proc shows it (15 bytes)
        libc.prctl(15, thread.name.removeprefix("camface-")[:15].encode(), 0, 0, 0)
        bootstrap(thread)

    threading.Thread._bootstrap_inner = named
    ticks = os.sysconf("SC_CLK_TCK")
    seen: dict[int, tuple[str, float]] = {}

    def snapshot():
        for tid in os.listdir("/proc/self/task"):
            try:
                stat = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            except FileNotFoundError:  # the thread ended meanwhile
                continue
            main = int(tid) == threading.main_thread().native_id
            seen[int(tid)] = ("main" if main else comm, (int(stat[11]) + int(stat[12])) / ticks)

    done = threading.Event()

    def watch():
        while not done.wait(0.05):
            snapshot()

    watcher = threading.Thread(target=watch, name="watcher", daemon=True)
    watcher.start()
    with tempfile.TemporaryDirectory() as folder:
        config = LiveConfig(source="sample", record=Path(folder) / "run.mp4", show=False, overwrite=True,
                            max_frames=frames, progress=False, detect_every="auto" if every == "auto" else int(every))
        start = time.process_time()
        LiveLoop(config, source=make_source("sample", sample_frames=frames)).run()
        snapshot()
        total = time.process_time() - start
    done.set()
    watcher.join()
    by_name: collections.Counter = collections.Counter()
    for comm, seconds in seen.values():
        name = ("main (crop, classify, render)" if comm == "main" else "detector" if comm.startswith("detector")
                else "decoder threads (FFmpeg)" if comm.startswith("av:") else comm)
        by_name[name] += seconds
    by_name["process"] = total
    print(json.dumps(dict(by_name)))


RUNTIMES = ("mediapipe", "onnx")  # --detector-runtime: MediaPipe Tasks (today's baseline) and ONNX Runtime


def bench(repeats: int, variants: list[str]) -> None:
    """Each repeat runs `camface bench` once per (variant, runtime), interleaved; each run has
    both rows (auto, then every frame) on the same frames. Ratios: auto against every frame in
    the same run, and auto on ONNX against every frame on MediaPipe (today's default) in the
    same repeat."""
    camface = Path(sys.executable).with_name("camface")
    known = {"default": ("default (every frame: 2 detector threads)", []),
             "workers1": ("--detect-workers 1", ["--detect-workers", "1"]),
             "bound": ("bound: --detect-every 300 (detector on frame 0 only)", ["--detect-every", "300"])}
    runs: dict[tuple[str, str], list] = {}
    started = time.strftime("%H:%M", time.gmtime())
    for repeat in range(repeats):
        for key in variants:
            variant, extra = known[key]
            for runtime in RUNTIMES:
                with tempfile.NamedTemporaryFile(suffix=".json") as out:
                    subprocess.run([str(camface), "bench", "--source", "sample", "--record", "--frames", "300",
                                    "--json", out.name, "--detector-runtime", runtime, *extra],
                                   check=True, capture_output=True)
                    report = json.loads(Path(out.name).read_text())
                runs.setdefault((variant, runtime), []).append(
                    (report["runs"][0], report["runs"][1], report["load_average"]))
    print(f"\ncamface bench --source sample --record --frames 300 (640x480, 2 faces), each run both rows; "
          f"{repeats} repeats, runtimes and variants interleaved, {started}-{time.strftime('%H:%M', time.gmtime())} UTC")
    print("| variant | runtime | CPU ms/frame, auto | CPU ms/frame, every frame | ratio in the run | "
          "fps auto | fps every frame | detect ms mean, auto / every frame | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (variant, runtime), cells in runs.items():
        rows = [(a["cpu_ms_per_frame"], e["cpu_ms_per_frame"], e["cpu_ms_per_frame"] / a["cpu_ms_per_frame"],
                 a["fps"], e["fps"], a["stages"]["detect"]["mean_ms"], e["stages"]["detect"]["mean_ms"],
                 f"{load_average['before']:.1f}-{load_average['after']:.1f}") for a, e, load_average in cells]
        med = [statistics.median(r[k] for r in rows) for k in range(7)]
        print(f"| {variant} | {runtime} | {med[0]:.2f} | {med[1]:.2f} | **{med[2]:.2f}x** ("
              + ", ".join(f"{r[2]:.2f}" for r in rows) + f") | {med[3]:.0f} | {med[4]:.0f} | "
              f"{med[5]:.2f} / {med[6]:.2f} | " + ", ".join(r[7] for r in rows) + " |")
    print("\nauto on ONNX Runtime against every frame on MediaPipe (today's default), same repeat:")
    for key in variants:
        variant = known[key][0]
        onnx, mediapipe = runs[(variant, "onnx")], runs[(variant, "mediapipe")]
        ratios = [m[1]["cpu_ms_per_frame"] / o[0]["cpu_ms_per_frame"] for o, m in zip(onnx, mediapipe)]
        every = [m[1]["cpu_ms_per_frame"] / o[1]["cpu_ms_per_frame"] for o, m in zip(onnx, mediapipe)]
        print(f"  {variant}: auto/onnx vs every frame/mediapipe **{statistics.median(ratios):.2f}x** ("
              + ", ".join(f"{x:.2f}" for x in ratios) + "); every frame, onnx vs mediapipe "
              f"{statistics.median(every):.2f}x (" + ", ".join(f"{x:.2f}" for x in every) + ")")


def batch(repeats: int, copies: int, frames: int) -> None:
    from batch_fps import run_batch

    from camface.realtime.sample import SampleSource

    work = Path(tempfile.mkdtemp(prefix="camface-detect-every-"))
    clip = SampleSource(frames=frames).cached_clip()
    folder = work / "clips"
    folder.mkdir()
    for k in range(copies):
        shutil.copy(clip, folder / f"clip{k}.mp4")
    results: dict[str, list] = {"1 mediapipe": [], "1 onnx": [], "auto onnx": [], "auto mediapipe": []}
    for repeat in range(repeats):
        for setting in results:
            every, runtime = setting.split()
            out = work / f"out-{every}-{runtime}"
            run = run_batch(folder, out, copies * frames, ["--detect-every", every, "--detector-runtime", runtime])
            videos = [r for r in json.loads((out / "summary.json").read_text())["videos"] if r["status"] == "done"]
            per_core = sum(r["frames"] for r in videos) / sum(r["detect_s"] for r in videos)
            results[setting].append((per_core, run["batch_fps"], os.getloadavg()[0]))
    print(f"\ncamface batch, {copies} x {frames} sample frames, recording on, interleaved")
    print("| --detect-every, --detector-runtime | decode+detect+crop frames/s per detection actor | pipeline fps | load |")
    print("|---|---|---|---|")
    for every, rows in results.items():
        print(f"| {every} | {statistics.median(r[0] for r in rows):.0f} (" + ", ".join(f"{r[0]:.0f}" for r in rows)
              + f") | {statistics.median(r[1] for r in rows):.1f} | " + ", ".join(f"{r[2]:.1f}" for r in rows) + " |")
    for runtime in ("onnx", "mediapipe"):
        ratios = [a[0] / b[0] for a, b in zip(results[f"auto {runtime}"], results["1 mediapipe"])]
        print(f"per detection core: auto on {runtime} / every frame on mediapipe = {statistics.median(ratios):.2f}x ("
              + ", ".join(f"{x:.2f}" for x in ratios) + ")")
    ratios = [a[0] / b[0] for a, b in zip(results["1 onnx"], results["1 mediapipe"])]
    print(f"per detection core: every frame, onnx / mediapipe = {statistics.median(ratios):.2f}x ("
          + ", ".join(f"{x:.2f}" for x in ratios) + ")")
    shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if sys.argv[1:2] == ["_threads"]:
        _threads(sys.argv[2], int(sys.argv[3]))
        return 0
    parser.add_argument("parts", nargs="*", default=["accuracy", "costs", "bench", "batch"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnx", help="detector runtime for accuracy")
    parser.add_argument("--settings", nargs="+", default=["2/-", "3/-", "4/-", "5/-", "6/-", "4", "6", "8"],
                        help="accuracy: N, or N/M with M the re-detection move (- for none; default MAX_MOVE)")
    parser.add_argument("--variants", nargs="+", default=["default", "workers1"],
                        help="bench variants: default, workers1 (--detect-workers 1), bound (--detect-every 300)")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--frames", type=int, default=300)
    args = parser.parse_args()
    if "accuracy" in args.parts:
        accuracy(args.runtime, args.settings)
    if "costs" in args.parts:
        costs()
    if "windows" in args.parts:
        windows()
    if "threads" in args.parts:
        thread_costs(args.repeats, args.frames * 8)
    if "bench" in args.parts:
        bench(args.repeats, args.variants)
    if "batch" in args.parts:
        batch(args.repeats, args.copies, args.frames)
    return 0


if __name__ == "__main__":
    sys.exit(main())
