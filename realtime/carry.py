"""Detection every N frames, face boxes carried by optical flow in between (`--detect-every`).

Why: BlazeFace is the costliest stage of a frame, about 2.6-3.5 ms of CPU for the full-range
model on 640x480 on a 2-core CPU (MediaPipe Tasks or ONNX Runtime; downscaling the frame buys
little), while carrying a frame's 1-3 boxes with pyramidal Lucas-Kanade flow costs 0.5-1 ms
(benchmarks/detect_every.py costs). In videos, files and a camera's stream faces move little
between frames.

The rule, a pure function of the frames (so `camface batch` segments give the rows that live
gives, see `keyframe`):
  - frame i is a *key frame* when i % N == 0 (i: the frame's index in its video or stream,
    counting from 0): the detector runs and its faces replace every carried box;
  - on other frames each carried box follows the median flow of a grid of points inside it
    (forward and backward Lucas-Kanade, Kalal et al., "Forward-Backward Error", ICPR 2010),
    and its size follows the median change of the points' distances from their centre;
  - the detector also runs, and replaces the boxes, when any box's points are lost (fewer
    than half pass the forward-backward check: the face turned, was covered or its content
    changed a lot), or when a box has moved, since the detection it comes from, by more than
    MAX_MOVE (10%) of its width or changed its width by more (a fast face: the detector's own
    box would have changed) -- a *re-detection*. Slow faces are detected every N frames, fast
    ones about every other frame or every frame;
  - a carried box that goes more than half out of the frame is dropped (the face leaves).
A face that enters is boxed at the next key frame, at most N - 1 frames late, and a face that
leaves loses its box at the latest at the next key frame, so N <= 4 keeps both within 3 frames.

State kept between frames (the previous grey frame and the carried boxes) depends only on the
frames since the last key frame or re-detection. A run that starts at frame s (a batch segment)
therefore starts decoding at `keyframe(s, N)` and drops the frames before s.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from camface.realtime.results import Face

AUTO_EVERY = 4  # what --detect-every auto gives for videos, cameras and streams (see every_for)
GRID = 5  # points per side of the grid followed inside a box
FB_MAX_PX = 1.0  # forward-backward error (pixels of the flow image) for a point to count
MIN_KEPT = 0.5  # fraction of a box's points that must pass, else re-detect
MIN_VISIBLE = 0.5  # fraction of a carried box's area inside the frame, else the box is dropped
FLOW_SCALE = 0.5  # flow runs on the frame downscaled by this (faces are >= ~40 px: still >= 20)
# A carried box that has moved, since the detection it comes from, by more than this fraction of
# its width (centre) or grown or shrunk by more than it: the detector runs now. The detector's
# box for a face is not a rigid function of the face's position (it jitters by 5-10% of its size
# as the face crosses its anchor grid): a box carried far from where it was detected drifts from
# what detection would give, so fast faces are detected more often and slow ones every N frames.
MAX_MOVE = 0.1
LK = dict(winSize=(11, 11), maxLevel=2, criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03))


def every_for(requested: str | int, still: bool = False, detect_workers: int = 0) -> int:
    """The detection period N for `--detect-every` (an int >= 1 or "auto").

    auto: AUTO_EVERY for videos, cameras, streams and the sample, whose consecutive frames show
    the same faces; 1 for folders of images (`still`: SourceInfo.still), whose consecutive
    frames may be unrelated photos, and when several detectors side by side were asked for
    (`detect_workers` > 1: carrying boxes takes the frames in order, in one thread)."""
    if requested == "auto":
        return 1 if still or detect_workers > 1 else AUTO_EVERY
    return int(requested)


def keyframe(index: int, every: int) -> int:
    """The key frame at or before frame `index`: where a run that must give frame `index`
    the boxes of a whole-video run starts decoding."""
    return index - index % every


def _grey(frame: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    if FLOW_SCALE == 1.0:
        return grey
    height, width = grey.shape
    return cv2.resize(grey, (round(width * FLOW_SCALE), round(height * FLOW_SCALE)), interpolation=cv2.INTER_AREA)


class BoxCarrier:
    """`detect(frame, index) -> tuple[Face, ...]`: the detector's faces on key frames and
    re-detections, carried boxes in between (see the module's rule).

    detector: an entered FaceDetector-like object (`detect(frame) -> tuple[Face, ...]`).
    every: N >= 1; 1 runs the detector on every frame and carries nothing.
    Frames must come in order of `index` (each one after the previous); a jump back or a gap
    starts over at a detection. Counters `detections` and `frames` say what was done.
    """

    def __init__(self, detector, every: int = 1, max_move: float | None = MAX_MOVE):
        if every < 1:
            raise ValueError(f"detect every must be >= 1, got {every}")
        self.detector, self.every, self.max_move = detector, every, max_move
        self.detections = self.redetections = self.frames = 0
        self._grey: np.ndarray | None = None
        # (x0, y0, x1, y1) float in flow pixels, score, and the box as detected
        self._boxes: list[tuple[np.ndarray, float, np.ndarray]] = []
        self._last: int | None = None

    def close(self) -> None:
        """Close the detector (for owners that hold only the carrier, as `camface serve`)."""
        self.detector.close()

    def detect(self, frame: np.ndarray, index: int) -> tuple[Face, ...]:
        """Faces in `frame` (uint8 BGR [H, W, 3], frame `index` of its stream), boxes in pixels
        clipped to the frame, largest first (as FaceDetector.detect)."""
        self.frames += 1
        if self.every == 1:
            self.detections += 1
            return self.detector.detect(frame)
        follows = self._last is not None and index == self._last + 1
        self._last = index
        if index % self.every == 0 or not follows or self._grey is None:
            return self._detect(frame, _grey(frame))
        grey = _grey(frame)
        carried = self._carry(self._grey, grey)
        if carried is None:
            self.redetections += 1
            return self._detect(frame, grey)
        self._grey, self._boxes = grey, carried
        return self._faces(frame.shape)

    def _detect(self, frame: np.ndarray, grey: np.ndarray) -> tuple[Face, ...]:
        self.detections += 1
        faces = self.detector.detect(frame)
        self._grey = grey
        self._boxes = [(box, face.score, box) for face in faces for x, y, w, h in [face.box]
                       for box in [np.array([x, y, x + w, y + h], np.float64) * FLOW_SCALE]]
        return faces

    def _carry(self, before: np.ndarray, after: np.ndarray) -> list | None:
        """The boxes moved from `before` to `after` (grey flow images), or None when one box
        lost its points or moved too far from where it was detected (re-detect). Boxes that
        leave the frame are dropped."""
        if not self._boxes:
            return []
        height, width = after.shape
        steps = (np.arange(GRID) + 0.5) / GRID * 0.8 + 0.1  # the middle 80% of the box
        points = []
        for (x0, y0, x1, y1), _, _ in self._boxes:
            gx, gy = np.meshgrid(x0 + steps * (x1 - x0), y0 + steps * (y1 - y0))
            points.append(np.stack([gx.ravel(), gy.ravel()], axis=1))
        start = np.concatenate(points).astype(np.float32).reshape(-1, 1, 2)
        moved, status, _ = cv2.calcOpticalFlowPyrLK(before, after, start, None, **LK)
        back, status_back, _ = cv2.calcOpticalFlowPyrLK(after, before, moved, None, **LK)
        start, moved = start.reshape(-1, 2), moved.reshape(-1, 2)
        good = ((status.ravel() == 1) & (status_back.ravel() == 1)
                & (np.linalg.norm(back.reshape(-1, 2) - start, axis=1) < FB_MAX_PX))
        carried = []
        per_box = GRID * GRID
        for n, (box, score, detected) in enumerate(self._boxes):
            keep = good[n * per_box:(n + 1) * per_box]
            if keep.mean() < MIN_KEPT:
                return None
            a, b = start[n * per_box:(n + 1) * per_box][keep], moved[n * per_box:(n + 1) * per_box][keep]
            shift = np.median(b - a, axis=0)
            spread_a = np.linalg.norm(a - np.median(a, axis=0), axis=1)
            spread_b = np.linalg.norm(b - np.median(b, axis=0), axis=1)
            usable = spread_a > 1.0
            scale = float(np.median(spread_b[usable] / spread_a[usable])) if usable.sum() >= 3 else 1.0
            cx, cy = (box[0] + box[2]) / 2 + shift[0], (box[1] + box[3]) / 2 + shift[1]
            half_w, half_h = (box[2] - box[0]) * scale / 2, (box[3] - box[1]) * scale / 2
            new = np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h])
            if self.max_move is not None and _moved(detected, new) > self.max_move:
                return None
            inside = (max(0.0, min(new[2], width) - max(new[0], 0.0))
                      * max(0.0, min(new[3], height) - max(new[1], 0.0)))
            if not math.isfinite(scale) or inside < MIN_VISIBLE * (new[2] - new[0]) * (new[3] - new[1]):
                continue  # leaving the frame
            carried.append((new, score, detected))
        return carried

    def _faces(self, shape) -> tuple[Face, ...]:
        height, width = shape[:2]
        faces = []
        for box, score, _ in self._boxes:
            x0, y0, x1, y1 = box / FLOW_SCALE
            x0, y0 = max(int(round(x0)), 0), max(int(round(y0)), 0)
            x1, y1 = min(int(round(x1)), width), min(int(round(y1)), height)
            if x1 - x0 >= 1 and y1 - y0 >= 1:
                faces.append(Face(box=(x0, y0, x1 - x0, y1 - y0), score=score))
        faces.sort(key=lambda f: f.area, reverse=True)
        return tuple(faces)


def _moved(detected: np.ndarray, carried: np.ndarray) -> float:
    """How far `carried` is from `detected` (x0, y0, x1, y1): the larger of its centre's shift
    in widths of the detected box and its relative change of width."""
    width = detected[2] - detected[0]
    if width <= 0:
        return 0.0
    shift = math.hypot((carried[0] + carried[2] - detected[0] - detected[2]) / 2,
                       (carried[1] + carried[3] - detected[1] - detected[3]) / 2)
    return max(shift / width, abs((carried[2] - carried[0]) / width - 1.0))
