"""`--detect-every`: accuracy of carried boxes and what they save, measured on this machine.

  accuracy  per clip and N: carried boxes against detection on every frame (IoU >= 0.9 on
            what fraction of face-frames; the longest delay boxing a face that appears and
            dropping one that leaves), and the detector's own consistency (its boxes on the
            frame against its boxes on the frame shifted by 2 pixels) as the bound; the clips
            are tests/realtime_helpers.py's `moving_faces_clip` and the sample
  costs     ms per call: MediaPipe full / short range at 640x480 and at 320x240 (detecting on a
            downscaled frame), one carried frame with 1..3 faces
  bench     `camface bench --source sample --record` --repeats times: each run has both rows
            (auto and every frame) on the same frames, one after the other
  batch     `camface batch` on --copies sample clips, --detect-every 1 and auto interleaved:
            decode + detect + crop frames/s per detection actor (one core), from the records

    .venv/bin/python benchmarks/detect_every.py [accuracy] [costs] [bench] [batch] [--repeats 3]

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


def accuracy() -> None:
    import numpy as np

    from camface.models import DETECTORS
    from camface.realtime.carry import BoxCarrier
    from camface.realtime.detect import FaceDetector
    from camface.realtime.sample import SampleSource
    from camface.realtime.smooth import iou
    from realtime_helpers import carry_accuracy, moving_faces_clip

    sample = SampleSource(300)
    clips = {"sample (300 frames)": ([sample.frame(i) for i in range(300)], None)}
    for frames in (60, 120, 180):
        clips[f"moving faces ({frames} frames)"] = moving_faces_clip(frames)
    print(f"accuracy, {load()}")
    print("| clip | N | IoU >= 0.9 with every-frame detection | appearing face boxed after (frames) "
          "| leaving face unboxed after (frames) | detector runs |")
    print("|---|---|---|---|---|---|")
    with FaceDetector(DETECTORS["full"]) as detector:
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
            for every in (2, 3, 4, 5, 6):
                carrier = BoxCarrier(detector, every)
                carried = [carrier.detect(f, i) for i, f in enumerate(frames)]
                a = carry_accuracy(carried, every_frame, truth)
                print(f"| {name} | {every} | {a['iou90']:.1%} of {a['face_frames']} | {a['late']} | {a['stale']} | "
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

    from camface.models import DETECTORS
    from camface.realtime.carry import BoxCarrier
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

    print(f"\ncosts (ms per call, median over 120 frames), {load()}")
    small = [cv2.resize(f, (320, 240), interpolation=cv2.INTER_AREA) for f in frames]
    for model in ("full", "short"):
        with FaceDetector(DETECTORS[model]) as detector:
            print(f"  MediaPipe {model}-range 640x480: {median_ms(detector.detect, frames):.2f}; "
                  f"320x240: {median_ms(detector.detect, small):.2f}")
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
    # MediaPipe runs each call on threads of its own graph executor: called on one frame in N,
    # with other work in between (here a 3 ms sleep), a call costs more than in a tight loop.
    with FaceDetector(DETECTORS["full"]) as detector:
        for every in (1, 4):
            cpu, wall, calls = time.process_time(), time.perf_counter(), 0
            for index, frame in enumerate(frames * 2):
                if index % every == 0:
                    detector.detect(frame)
                    calls += 1
                else:
                    time.sleep(0.003)
            slept = 0.003 * (2 * len(frames) - calls)
            print(f"  MediaPipe full-range called on 1 frame in {every}: "
                  f"{1000 * (time.process_time() - cpu) / calls:.2f} ms CPU, "
                  f"{1000 * (time.perf_counter() - wall - slept) / calls:.2f} ms wall per call")


def bench(repeats: int) -> None:
    camface = Path(sys.executable).with_name("camface")
    runs = []
    for variant, extra in (("default (2 detector threads on every frame)", []),
                           ("--detect-workers 1", ["--detect-workers", "1"]),
                           ("bound: --detect-every 300 (detector on frame 0 only)", ["--detect-every", "300"])):
        for repeat in range(repeats):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                subprocess.run([str(camface), "bench", "--source", "sample", "--record", "--frames", "300",
                                "--json", out.name, *extra], check=True, capture_output=True)
                report = json.loads(Path(out.name).read_text())
            carried, every = report["runs"][0], report["runs"][1]
            runs.append((variant, carried, every, report["load_average"]))
    print("\ncamface bench --source sample --record --frames 300 (640x480, 2 faces), each run both rows")
    print("| variant | CPU ms/frame, carried | CPU ms/frame, every frame | ratio | fps auto | fps every frame "
          "| detect ms mean, auto / every frame | load |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in dict.fromkeys(r[0] for r in runs):
        mine = [r for r in runs if r[0] == variant]
        cells = []
        for _, carried, every, load_average in mine:
            cells.append((carried["cpu_ms_per_frame"], every["cpu_ms_per_frame"],
                          every["cpu_ms_per_frame"] / carried["cpu_ms_per_frame"], carried["fps"], every["fps"],
                          carried["stages"]["detect"]["mean_ms"], every["stages"]["detect"]["mean_ms"],
                          f"{load_average['before']:.1f}-{load_average['after']:.1f}"))
        med = [statistics.median(c[k] for c in cells) for k in range(7)]
        print(f"| {variant} | {med[0]:.2f} | {med[1]:.2f} | **{med[2]:.2f}x** ("
              + ", ".join(f"{c[2]:.2f}" for c in cells) + f") | {med[3]:.0f} | {med[4]:.0f} | "
              f"{med[5]:.2f} / {med[6]:.2f} | " + ", ".join(c[7] for c in cells) + " |")


def batch(repeats: int, copies: int, frames: int) -> None:
    from batch_fps import run_batch

    from camface.realtime.sample import SampleSource

    work = Path(tempfile.mkdtemp(prefix="camface-detect-every-"))
    clip = SampleSource(frames=frames).cached_clip()
    folder = work / "clips"
    folder.mkdir()
    for k in range(copies):
        shutil.copy(clip, folder / f"clip{k}.mp4")
    results: dict[str, list] = {"1": [], "auto": []}
    for repeat in range(repeats):
        for every in results:
            out = work / f"out-{every}"
            run = run_batch(folder, out, copies * frames, ["--detect-every", every])
            videos = [r for r in json.loads((out / "summary.json").read_text())["videos"] if r["status"] == "done"]
            per_core = sum(r["frames"] for r in videos) / sum(r["detect_s"] for r in videos)
            results[every].append((per_core, run["batch_fps"], os.getloadavg()[0]))
    print(f"\ncamface batch, {copies} x {frames} sample frames, recording on, interleaved")
    print("| --detect-every | decode+detect+crop frames/s per detection actor | pipeline fps | load |")
    print("|---|---|---|---|")
    for every, rows in results.items():
        print(f"| {every} | {statistics.median(r[0] for r in rows):.0f} (" + ", ".join(f"{r[0]:.0f}" for r in rows)
              + f") | {statistics.median(r[1] for r in rows):.1f} | " + ", ".join(f"{r[2]:.1f}" for r in rows) + " |")
    ratios = [a[0] / b[0] for a, b in zip(results["auto"], results["1"])]
    print(f"per detection core: auto / every frame = {statistics.median(ratios):.2f}x ("
          + ", ".join(f"{x:.2f}" for x in ratios) + ")")
    shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["accuracy", "costs", "bench", "batch"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--frames", type=int, default=300)
    args = parser.parse_args()
    if "accuracy" in args.parts:
        accuracy()
    if "costs" in args.parts:
        costs()
    if "bench" in args.parts:
        bench(args.repeats)
    if "batch" in args.parts:
        batch(args.repeats, args.copies, args.frames)
    return 0


if __name__ == "__main__":
    sys.exit(main())
