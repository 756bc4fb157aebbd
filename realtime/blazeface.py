"""BlazeFace on ONNX Runtime: the bundled MediaPipe face detectors without the Tasks wrapper.

The `.onnx` files in models/detectors are the bundled `.tflite` models converted (full-range densified)
(`camface.export.detectors`, `make detectors`); this module does what MediaPipe's
`FaceDetectorGraph` (mediapipe/tasks/cc/vision/face_detector/face_detector_graph.cc) does
around the model, with the same options, so the boxes are MediaPipe's:

1. ImageToTensorCalculator, keep_aspect_ratio, BORDER_ZERO: the frame is letterboxed into a
   square S x S input (S = 128 short-range, 192 full-range) by bilinear warping, padding black,
   RGB scaled to [-1, 1] (`letterbox`).
2. SsdAnchorsCalculator (`anchor_centers`): short-range 4 layers, strides 8, 16, 16, 16,
   interpolated aspect ratio 1.0 (2 anchors per 16x16 cell, 6 per 8x8 cell: 896); full-range
   1 layer, stride 4 (one per 48x48 cell: 2304); anchor offset 0.5, fixed anchor size (w = h = 1).
3. TensorsToDetectionsCalculator (`decode`): boxes x, y, w, h in input pixels (reverse output
   order) divided by S, centres added to the anchor's; scores sigmoid of logits clipped to
   [-100, 100]; kept when score >= min_detection_confidence.
4. NonMaxSuppressionCalculator (`weighted_nms`): WEIGHTED, IoU > 0.3 (the Tasks default
   min_suppression_threshold) merges a box into the best one, by score-weighted corners.
5. DetectionProjection + DetectionTransformation (`OnnxFaceDetector.detect`): back to the
   frame's normalised coordinates, then integer pixels truncated toward zero as MediaPipe
   does. One departure: MediaPipe bounds the corner and the size each to [0, W] / [0, H], so a
   face partly out of the frame's left or top edge gets a box moved inside, as wide as the
   whole face (a face 40% out on the left: a box over the visible face and as much again of
   what lies right of it); here the box's edges are clipped to the frame instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from camface.errors import ModelError, UsageError
from camface.realtime.frames import RangeWatch, check_frame
from camface.realtime.results import Face

SCORE_CLIP = 100.0  # TensorsToDetectionsCalculatorOptions.score_clipping_thresh
NMS_IOU = 0.3  # FaceDetectorOptions.min_suppression_threshold (the Tasks API's default)


@dataclass(frozen=True)
class AnchorSpec:
    """SsdAnchorsCalculatorOptions of one BlazeFace model (fixed anchor size, offset 0.5)."""

    input_size: int  # square input side S, pixels; also the decoder's x/y/w/h scale
    strides: tuple[int, ...]
    interpolated_ratio: bool  # interpolated_scale_aspect_ratio > 0: one more anchor per layer


# keyed by input side, as MediaPipe chooses its defaults for models without anchor metadata
ANCHORS = {
    128: AnchorSpec(128, (8, 16, 16, 16), True),  # short-range
    192: AnchorSpec(192, (4,), False),  # full-range
}


def anchor_centers(spec: AnchorSpec) -> np.ndarray:
    """Anchor centres, float32 [N, 2] (x, y) normalised to the input, in the model's output
    order: layers of equal stride merged, then rows, columns, anchors per cell."""
    centers = []
    layer = 0
    while layer < len(spec.strides):
        same = layer
        per_cell = 0
        while same < len(spec.strides) and spec.strides[same] == spec.strides[layer]:
            per_cell += 1 + int(spec.interpolated_ratio)
            same += 1
        cells = int(np.ceil(spec.input_size / spec.strides[layer]))
        grid = (np.arange(cells, dtype=np.float32) + 0.5) / cells
        ys, xs = np.meshgrid(grid, grid, indexing="ij")
        xy = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centers.append(np.repeat(xy, per_cell, axis=0))
        layer = same
    return np.concatenate(centers).astype(np.float32)


def decode(raw_boxes: np.ndarray, raw_scores: np.ndarray, anchors: np.ndarray, scale: float,
           min_score: float) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and scores of the anchors that pass `min_score`.

    raw_boxes: float32 [N, 16] (x, y, w, h, then 6 keypoints) in input pixels; raw_scores:
    float32 [N] or [N, 1] logits; anchors: [N, 2] centres. Returns boxes float32 [K, 4]
    (xmin, ymin, xmax, ymax) normalised to the input, and scores float32 [K] in [0, 1].
    Boxes with negative or NaN width or height are dropped, as MediaPipe drops them.
    """
    logits = np.clip(raw_scores.reshape(-1).astype(np.float64), -SCORE_CLIP, SCORE_CLIP)
    scores = 1.0 / (1.0 + np.exp(-logits))
    keep = np.flatnonzero(scores >= min_score)
    raw = raw_boxes.reshape(len(anchors), -1)[keep, :4] / np.float32(scale)
    centre = raw[:, :2] + anchors[keep]
    half = raw[:, 2:4] / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    sizes = raw[:, 2:4]
    ok = np.all(sizes >= 0, axis=1)  # NaN compares False: dropped too
    return boxes[ok].astype(np.float32), scores[keep][ok].astype(np.float32)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> tuple[np.ndarray, np.ndarray]:
    """MediaPipe's WEIGHTED non-maximum suppression.

    boxes: [K, 4] (xmin, ymin, xmax, ymax); scores: [K]. The best remaining box takes every
    remaining box whose IoU with it is above `iou` (itself included) and becomes their
    score-weighted mean box, with its own score. Returns boxes [M, 4], scores [M], best first.
    """
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order].astype(np.float64), scores[order]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    out_boxes, out_scores = [], []
    remaining = np.arange(len(boxes))
    while remaining.size:
        top = boxes[remaining[0]]
        rest = boxes[remaining]
        w = np.clip(np.minimum(rest[:, 2], top[2]) - np.maximum(rest[:, 0], top[0]), 0, None)
        h = np.clip(np.minimum(rest[:, 3], top[3]) - np.maximum(rest[:, 1], top[1]), 0, None)
        inter = w * h
        union = areas[remaining] + areas[remaining[0]] - inter
        overlap = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        merged = overlap > iou
        if not merged.any():  # a degenerate box overlaps nothing, not even itself
            merged[0] = True
        weights = scores[remaining[merged]].astype(np.float64)
        out_boxes.append(weights @ rest[merged] / weights.sum())
        out_scores.append(scores[remaining[0]])
        remaining = remaining[~merged]
    if not out_boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    return np.array(out_boxes, np.float32), np.array(out_scores, np.float32)


def letterbox(frame: np.ndarray, size: int) -> tuple[np.ndarray, float, float, float]:
    """frame uint8 BGR [H, W, 3] -> (input float32 [1, size, size, 3] RGB in [-1, 1], x0, y0, side).

    The square of side max(W, H) centred on the frame (x0, y0 its top-left corner, in frame
    pixels) is warped bilinearly onto size x size; outside the frame is black (-1), as
    MediaPipe's ImageToTensorCalculator does with keep_aspect_ratio and BORDER_ZERO.
    """
    height, width = frame.shape[:2]
    side = float(max(width, height))
    x0, y0 = (width - side) / 2, (height - side) / 2
    s = size / side
    matrix = np.array([[s, 0, -x0 * s], [0, s, -y0 * s]], np.float64)
    warped = cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    rgb = cv2.cvtColor(warped, cv2.COLOR_BGR2RGB)
    tensor = np.empty((1, size, size, 3), np.float32)
    np.multiply(rgb, np.float32(1 / 127.5), out=tensor[0], casting="unsafe")  # one pass each, in place
    np.subtract(tensor, np.float32(1.0), out=tensor)
    return tensor, x0, y0, side


class OnnxFaceDetector:
    """`detect(frame) -> tuple[Face, ...]` with a bundled BlazeFace model converted to ONNX,
    run by ONNX Runtime on the CPU with `threads` intra-op threads.

    Same interface and same boxes as `camface.realtime.detect.FaceDetector` (MediaPipe Tasks):
    frame uint8 BGR [H, W, 3]; boxes in pixels clipped to the frame, largest first. Stateless
    between frames (no VIDEO-mode timestamps). Use as a context manager (or call close()).
    """

    def __init__(self, model_path: str | Path, min_confidence: float = 0.5, quiet: bool = True, threads: int = 1):
        self.model_path = Path(model_path)
        self.min_confidence = min_confidence
        self.quiet = quiet
        self.threads = threads
        self._session = None
        self._range = RangeWatch()  # a 0/1 frame (a mask) finds no face: said once per process

    def __enter__(self) -> "OnnxFaceDetector":
        if not self.model_path.is_file():
            raise ModelError(f"face detector model not found: {self.model_path}")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load face detector {self.model_path}: {first_line}") from exc
        shape = session.get_inputs()[0].shape
        outputs = session.get_outputs()
        spec = ANCHORS.get(shape[1]) if len(shape) == 4 and shape[1] == shape[2] else None
        if spec is None or len(outputs) != 2:
            raise ModelError(f"face detector {self.model_path}: input {shape} and {len(outputs)} outputs are not "
                             f"a BlazeFace model's (1x128x128x3 or 1x192x192x3, boxes and scores)")
        self._spec, self._anchors = spec, anchor_centers(spec)
        self._input = session.get_inputs()[0].name
        by_width = {o.shape[-1]: o.name for o in outputs}  # boxes [1, N, 16], scores [1, N, 1]
        if set(by_width) != {16, 1}:
            raise ModelError(f"face detector {self.model_path}: outputs {[o.shape for o in outputs]} are not "
                             f"BlazeFace's boxes [1, N, 16] and scores [1, N, 1]")
        self._outputs = [by_width[16], by_width[1]]
        self._session = session
        return self

    def close(self) -> None:
        self._session = None

    def __exit__(self, *exc) -> None:
        self.close()

    def detect(self, frame: np.ndarray) -> tuple[Face, ...]:
        """Faces in `frame` (uint8 BGR [H, W, 3]), boxes in pixels clipped to the frame,
        largest first. Boxes entirely outside the frame are dropped. UsageError for another
        frame (a float, gray or BGRA image, a list: `camface.realtime.frames.check_frame`) or when used
        outside its `with` block."""
        if self._session is None:
            raise UsageError("OnnxFaceDetector used outside its `with` block (or after close())")
        frame = check_frame(frame)  # a float frame in [0, 1] found no face, an empty one raised inside OpenCV
        self._range(frame)
        height, width = frame.shape[:2]
        size = self._spec.input_size
        tensor, x0, y0, side = letterbox(frame, size)
        raw_boxes, raw_scores = self._session.run(self._outputs, {self._input: tensor})
        boxes, scores = decode(raw_boxes[0], raw_scores[0], self._anchors, size, self.min_confidence)
        boxes, scores = weighted_nms(boxes, scores)
        faces = []
        for box, score in zip(boxes.tolist(), scores.tolist()):
            pixels = frame_box(box, x0, y0, side, width, height)
            if pixels is not None:
                faces.append(Face(box=pixels, score=float(score)))
        faces.sort(key=lambda f: f.area, reverse=True)
        return tuple(faces)


def frame_box(box, x0: float, y0: float, side: float, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A box (xmin, ymin, xmax, ymax) normalised to the letterboxed input -> (x, y, w, h) integer
    pixels of the `width` x `height` frame, its edges clipped to the frame; None when less than a
    pixel of it is inside. x0, y0, side: the letterbox square (`letterbox`). Corner and size are
    truncated toward zero as MediaPipe does; the clipping is the edges' (module docstring, step 5)."""
    xmin, ymin, xmax, ymax = box
    rx, ry = (x0 + xmin * side) / width, (y0 + ymin * side) / height  # the frame's normalised coordinates
    rw, rh = (xmax - xmin) * side / width, (ymax - ymin) * side / height
    left, top = int(rx * width), int(ry * height)
    right, bottom = min(left + int(rw * width), width), min(top + int(rh * height), height)
    left, top = min(max(left, 0), width), min(max(top, 0), height)
    if right - left < 1 or bottom - top < 1:
        return None
    return left, top, right - left, bottom - top
