"""What drawing labels costs per frame: the face box's caption and the three probability bars
(BoxAnnotator + BarsAnnotator, one face, 640x480) as before issue "labels in any script"
(cv2.getTextSize/putText called directly) against camface.realtime.text.TextPainter, for ASCII,
Cyrillic and Greek gallery names.

    .venv/bin/python benchmarks/label_cost.py [--frames 300] [--rounds 5]

The score in the caption drifts frame to frame (a random walk of 0.01 steps, fixed seed), as a
live probability does, so the caption text changes and the Pillow path's LRU is exercised as in
the loop; `greek-uncached` renders every caption anew (cache_size=0: what a cache miss costs).
Each round draws every configuration once, in rotating order, so load on a shared machine hits
all alike. Prints, per configuration, the median over rounds of the median per-frame
milliseconds, and which path drew the caption.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np

from camface.realtime.render import BarsAnnotator, BoxAnnotator
from camface.realtime.results import Face, FrameResult, Prediction
from camface.realtime.text import FONT, TextPainter

NAMES = {"ascii": ("Ivan", "Maria", "Sofia"), "cyrillic": ("Иван", "Мария", "Софья"),
         "greek": ("Νίκος", "Μαρία", "Σοφία")}


class Before:
    """BoxAnnotator + BarsAnnotator's text as drawn before TextPainter (same geometry)."""

    def annotate(self, frame: np.ndarray, result: FrameResult) -> np.ndarray:
        face, prediction = result.faces[0], result.predictions[0]
        x, y, w, h = face.box
        cv2.rectangle(frame, (x, y), (x + w - 1, y + h - 1), (0, 200, 0), 2)
        text = prediction.caption(result.labels)
        (tw, th), base = cv2.getTextSize(text, FONT, 0.5, 1)
        top = y - th - base - 2
        cv2.rectangle(frame, (x, top), (x + tw + 4, top + th + base + 2), (0, 200, 0), -1)
        cv2.putText(frame, text, (x + 2, top + th + 1), FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        for rank, k in enumerate(np.argsort(prediction.probs)[::-1][:3]):
            row_y = y + h + 2 + rank * 14
            filled = int(round(float(prediction.probs[k]) * 90))
            cv2.rectangle(frame, (x, row_y), (x + 90, row_y + 11), (0, 0, 0), -1)
            cv2.rectangle(frame, (x, row_y), (x + filled, row_y + 11), (0, 200, 0), -1)
            cv2.putText(frame, f"{result.labels[k]} {prediction.probs[k]:.2f}", (x + 94, row_y + 10), FONT, 0.4,
                        (255, 255, 255), 1, cv2.LINE_AA)
        return frame


class After:
    def __init__(self, cache_size: int = 256):
        text = TextPainter(cache_size=cache_size)
        self.layers = (BoxAnnotator(text=text), BarsAnnotator(text=text))
        self.text = text

    def annotate(self, frame: np.ndarray, result: FrameResult) -> np.ndarray:
        for layer in self.layers:
            layer.annotate(frame, result)
        return frame


def results(names: tuple[str, ...], frames: int) -> list[FrameResult]:
    rng = np.random.default_rng(0)
    p = 0.85
    out = []
    for index in range(frames):
        p = float(np.clip(p + rng.choice((-0.01, 0.0, 0.01)), 0.6, 0.98))
        probs = np.array([p, (1 - p) * 0.7, (1 - p) * 0.3], np.float32)
        prediction = Prediction(probs=probs, heatmap=np.ones((4, 4), np.float32), predicted=0, explained=0,
                                method="gradcam")
        box = (260, 180, 120, 120)
        out.append(FrameResult(index=index, faces=(Face(box, 0.9, crop_box=box),), predictions=(prediction,),
                               method="gradcam", labels=names))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    configs = {f"{script}-before": (Before(), results(names, args.frames)) for script, names in NAMES.items()
               if script == "ascii"}
    for script, names in NAMES.items():
        configs[f"{script}-after"] = (After(), results(names, args.frames))
    configs["greek-uncached"] = (After(cache_size=0), results(NAMES["greek"], args.frames))
    background = np.full((480, 640, 3), 90, np.uint8)
    medians: dict[str, list[float]] = {name: [] for name in configs}
    order = list(configs)
    for round_index in range(args.rounds):
        for name in order[round_index % len(order):] + order[:round_index % len(order)]:
            annotator, frame_results = configs[name]
            per_frame = []
            for result in frame_results:
                frame = background.copy()
                started = time.perf_counter()
                annotator.annotate(frame, result)
                per_frame.append(time.perf_counter() - started)
            medians[name].append(1000 * statistics.median(per_frame))
    print(f"{'configuration':<16} {'ms/frame':>9}  caption drawn by")
    for name, values in medians.items():
        annotator, frame_results = configs[name]
        caption = frame_results[0].predictions[0].caption(frame_results[0].labels)
        path = ("cv2.putText" if not isinstance(annotator, After) or annotator.text.opencv_draws(caption)
                else "Pillow")
        print(f"{name:<16} {statistics.median(values):9.4f}  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
