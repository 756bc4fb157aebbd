"""Detection every N frames, face boxes carried by optical flow in between (`--detect-every`).

Why: BlazeFace is the costliest stage of a frame, about 2.6-3.5 ms of CPU for the full-range
model on 640x480 on a 2-core CPU (MediaPipe Tasks or ONNX Runtime; downscaling the frame buys
little), while carrying a frame's 1-3 boxes with pyramidal Lucas-Kanade flow costs 0.15-0.4 ms
(benchmarks/detect_every.py costs). In videos, files and a camera's stream faces move little
between frames. The flow runs on a region around each box, downscaled so the box is about
32-64 pixels wide, so its cost grows far less than the frame's size (one face: 0.26 ms at
640x480, 0.69 ms at 1920x1440; flow on the whole half-size frame took 0.38 and 1.48 ms).

The rule, a pure function of the frames (so `camface batch` segments give the rows that live
gives, see `keyframe`):
  - frame i is a *key frame* when i % N == 0 (i: the frame's index in its video or stream,
    counting from 0): the detector runs and its faces replace every carried box;
  - on other frames each carried box follows the median flow of a grid of points inside it
    (forward and backward Lucas-Kanade, Kalal et al., "Forward-Backward Error", ICPR 2010),
    and its size follows the median change of the points' distances from their centre; the
    flow runs in a region around the box, fixed at its detection (`_region`);
  - the detector also runs, and replaces the boxes, when any box's points are lost (fewer
    than half pass the forward-backward check: the face turned, was covered or its content
    changed a lot), or when a box has moved, since the detection it comes from, by more than
    MAX_MOVE (10%) of its width or changed its width by more (a fast face: the detector's own
    box would have changed) -- a *re-detection*. Slow faces are detected every N frames, fast
    ones about every other frame or every frame;
  - a carried box that goes more than half out of the frame is dropped (the face leaves).
A face that enters is boxed at the next key frame, at most N - 1 frames late, and a face that
leaves loses its box at the latest at the next key frame, so N <= 4 keeps both within 3 frames.

State kept between frames (the carried boxes and their regions' grey images) depends only on the
frames since the last key frame or re-detection. A run that starts at frame s (a batch segment)
therefore starts decoding at `keyframe(s, N)` and drops the frames before s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from camface.realtime.results import Face

AUTO_EVERY = 4  # what --detect-every auto gives for videos, cameras and streams (see every_for)
GRID = 5  # points per side of the grid followed inside a box
FB_MAX_PX = 1.0  # forward-backward error (pixels of the flow image) for a point to count
MIN_KEPT = 0.5  # fraction of a box's points that must pass, else re-detect
MIN_VISIBLE = 0.5  # fraction of a carried box's area inside the frame, else the box is dropped
# Flow runs on a region around each box, not the whole frame (the image pyramids cost more than
# the points: benchmarks/detect_every.py costs): the box grown by REGION_MARGIN of its size plus
# REGION_PAD frame pixels on every side, grey and downscaled by the power of two that leaves the
# box FLOW_WIDTH flow pixels wide or more (faces are >= ~40 px: small ones are not downscaled).
REGION_MARGIN = 0.25
REGION_PAD = 8
FLOW_WIDTH = 32
MAX_DOWNSCALE = 8
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


def _downscale(width: float, shape=None) -> int:
    """The flow image's downscale factor for a box `width` frame pixels wide: the largest power
    of two <= MAX_DOWNSCALE that leaves it FLOW_WIDTH flow pixels wide or more (1 when smaller),
    and, in a frame of `shape`, no larger than the frame's height and width (a region is at
    least one flow pixel of the frame)."""
    factor = 1
    while factor < MAX_DOWNSCALE and width / (2 * factor) >= FLOW_WIDTH:
        factor *= 2
    if shape is not None:
        while factor > 1 and min(shape[:2]) < factor:
            factor //= 2
    return factor


def _region(box: np.ndarray, factor: int, shape) -> tuple[int, int, int, int]:
    """The part of the frame (x0, y0, x1, y1 frame pixels, multiples of `factor`) whose flow
    image a box's points are followed in: the box (frame pixels) grown by REGION_MARGIN of its
    size plus REGION_PAD on every side, clipped to the frame. A box moves at most MAX_MOVE of
    its width before it is detected again, so its points stay inside the region it was
    detected with. (Without that limit, `max_move` None, a box whose points leave its region
    loses them, and the detector runs again: the region bounds how far a box is carried.)"""
    height, width = shape[:2]
    x0, y0, x1, y1 = box
    grow_x, grow_y = (x1 - x0) * REGION_MARGIN + REGION_PAD, (y1 - y0) * REGION_MARGIN + REGION_PAD
    left = max(0, math.floor((x0 - grow_x) / factor) * factor)
    top = max(0, math.floor((y0 - grow_y) / factor) * factor)
    right = min(width - width % factor, math.ceil((x1 + grow_x) / factor) * factor)
    bottom = min(height - height % factor, math.ceil((y1 + grow_y) / factor) * factor)
    return left, top, max(right, left + factor), max(bottom, top + factor)


def _grey(frame: np.ndarray, region: tuple[int, int, int, int], factor: int) -> np.ndarray:
    """The flow image of `region` of `frame`: grey, area-averaged over `factor` x `factor`
    blocks, by halving (OpenCV's INTER_AREA is fast at 2x, two to three times slower than
    repeated halving at 4x and 8x)."""
    x0, y0, x1, y1 = region
    grey = cv2.cvtColor(frame[y0:y1, x0:x1], cv2.COLOR_BGR2GRAY)
    while factor > 1:
        grey = cv2.resize(grey, (grey.shape[1] // 2, grey.shape[0] // 2), interpolation=cv2.INTER_AREA)
        factor //= 2
    return grey


@dataclass(slots=True)
class _Carried:
    """One box being carried: where it is (x0, y0, x1, y1 float, frame pixels), its
    detection's score and box, and, fixed from the detection on, the downscale factor and the
    region of the frame its points are followed in, with that region's flow image in the
    last frame."""

    box: np.ndarray
    score: float
    detected: np.ndarray
    factor: int
    region: tuple[int, int, int, int]
    grey: np.ndarray


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
        self._boxes: list[_Carried] = []
        self._last: int | None = None
        self._shape: tuple | None = None  # of the last frame: a new size starts over at a detection

    def close(self) -> None:
        """Close the detector (for owners that hold only the carrier, as `camface serve`)."""
        self.detector.close()

    def detect(self, frame: np.ndarray, index: int, cut: bool = False) -> tuple[Face, ...]:
        """Faces in `frame` (uint8 BGR [H, W, 3], frame `index` of its stream), boxes in pixels
        clipped to the frame, largest first (as FaceDetector.detect). `cut`: the frame does not
        follow the one before it although its index does (a looped file starting again, a stream
        reconnected after a stall): it is detected. A call that raises (the detector's error)
        leaves nothing to carry: the next frame is detected."""
        self.frames += 1
        if self.every == 1:
            self.detections += 1
            return self.detector.detect(frame)
        follows = not cut and self._last is not None and index == self._last + 1 and frame.shape == self._shape
        self._boxes, boxes = [], self._boxes
        self._last, self._shape = None, frame.shape  # until this frame's boxes are known
        if index % self.every == 0 or not follows:
            faces = self._detect(frame)
        else:
            carried = self._carry(frame, boxes)
            if carried is None:
                self.redetections += 1
                faces = self._detect(frame)
            else:
                self._boxes, faces = carried, self._faces(carried, frame.shape)
        self._last = index
        return faces

    def _detect(self, frame: np.ndarray) -> tuple[Face, ...]:
        faces = self.detector.detect(frame)
        self.detections += 1
        boxes = []
        for face in faces:
            x, y, w, h = face.box
            box = np.array([x, y, x + w, y + h], np.float64)
            factor = _downscale(w, frame.shape)
            region = _region(box, factor, frame.shape)
            boxes.append(_Carried(box, face.score, box, factor, region, _grey(frame, region, factor)))
        self._boxes = boxes
        return faces

    def _carry(self, frame: np.ndarray, boxes: list[_Carried]) -> list[_Carried] | None:
        """`boxes` moved to `frame`, or None when one box lost its points or moved too far
        from where it was detected (re-detect). Boxes that leave the frame are dropped."""
        height, width = frame.shape[:2]
        steps = (np.arange(GRID) + 0.5) / GRID * 0.8 + 0.1  # the middle 80% of the box
        carried = []
        for old in boxes:
            x0, y0, x1, y1 = old.box
            origin = np.array(old.region[:2], np.float64)
            gx, gy = np.meshgrid(x0 + steps * (x1 - x0), y0 + steps * (y1 - y0))
            points = (np.stack([gx.ravel(), gy.ravel()], axis=1) - origin) / old.factor  # flow pixels
            start = points.astype(np.float32).reshape(-1, 1, 2)
            grey = _grey(frame, old.region, old.factor)
            moved, status, _ = cv2.calcOpticalFlowPyrLK(old.grey, grey, start, None, **LK)
            back, status_back, _ = cv2.calcOpticalFlowPyrLK(grey, old.grey, moved, None, **LK)
            start, moved = start.reshape(-1, 2), moved.reshape(-1, 2)
            keep = ((status.ravel() == 1) & (status_back.ravel() == 1)
                    & (np.linalg.norm(back.reshape(-1, 2) - start, axis=1) < FB_MAX_PX))
            if keep.mean() < MIN_KEPT:
                return None
            a, b = start[keep], moved[keep]
            shift = _median(b - a) * old.factor  # frame pixels
            spread_a = np.linalg.norm(a - _median(a), axis=1)
            spread_b = np.linalg.norm(b - _median(b), axis=1)
            usable = spread_a > 1.0
            scale = float(_median(spread_b[usable] / spread_a[usable])) if usable.sum() >= 3 else 1.0
            cx, cy = (x0 + x1) / 2 + shift[0], (y0 + y1) / 2 + shift[1]
            half_w, half_h = (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
            new = np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h])
            if self.max_move is not None and _moved(old.detected, new) > self.max_move:
                return None
            inside = (max(0.0, min(new[2], width) - max(new[0], 0.0))
                      * max(0.0, min(new[3], height) - max(new[1], 0.0)))
            if not math.isfinite(scale) or inside < MIN_VISIBLE * (new[2] - new[0]) * (new[3] - new[1]):
                continue  # leaving the frame
            carried.append(_Carried(new, old.score, old.detected, old.factor, old.region, grey))
        return carried

    @staticmethod
    def _faces(boxes: list[_Carried], shape) -> tuple[Face, ...]:
        height, width = shape[:2]
        faces = []
        for carried in boxes:
            x0, y0, x1, y1 = carried.box
            x0, y0 = max(int(round(x0)), 0), max(int(round(y0)), 0)
            x1, y1 = min(int(round(x1)), width), min(int(round(y1)), height)
            if x1 - x0 >= 1 and y1 - y0 >= 1:
                faces.append(Face(box=(x0, y0, x1 - x0, y1 - y0), score=carried.score))
        faces.sort(key=lambda f: f.area, reverse=True)
        return tuple(faces)


def _median(values: np.ndarray) -> np.ndarray:
    """np.median over the first axis (the same values), without its overhead: a tenth of the
    time on the 25 points of a box."""
    ordered = np.sort(values, axis=0)
    middle = len(ordered) // 2
    return (ordered[(len(ordered) - 1) // 2] + ordered[middle]) / 2


def _moved(detected: np.ndarray, carried: np.ndarray) -> float:
    """How far `carried` is from `detected` (x0, y0, x1, y1): the larger of its centre's shift
    in widths of the detected box and its relative change of width."""
    width = detected[2] - detected[0]
    if width <= 0:
        return 0.0
    shift = math.hypot((carried[0] + carried[2] - detected[0] - detected[2]) / 2,
                       (carried[1] + carried[3] - detected[1] - detected[3]) / 2)
    return max(shift / width, abs((carried[2] - carried[0]) / width - 1.0))
