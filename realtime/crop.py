"""Face crops for the CAM graph: square, with a margin, padded (not shifted) at frame edges.

Keeping the square centred on the face even at the border means the heatmap, which covers
the whole crop, maps back onto the frame by the same square (`Face.crop_box`).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from camface.color_order import ColorOrder
from camface.realtime.results import Box, Face


def square_box(box: Box, margin: float) -> Box:
    """The square (x, y, side, side) centred on `box` (to the pixel) whose side is the box's
    longer side times (1 + margin), rounded up; it always contains `box` and may extend
    past the frame."""
    x, y, w, h = box
    side = max(1, w, h, math.ceil(max(w, h) * (1.0 + margin) - 1e-9))
    return x - (side - w) // 2, y - (side - h) // 2, side, side


def crop_square(frame: np.ndarray, square: Box) -> np.ndarray:
    """Pixels of `square` from `frame` (uint8 [H, W, C]); parts outside the frame are black.
    Returns [side, side, C]: a view of `frame` when the square lies inside it, else a new array."""
    x, y, side, _ = square
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + side, width), min(y + side, height)
    if x0 == x and y0 == y and x1 == x + side and y1 == y + side:
        return frame[y0:y1, x0:x1]
    out = np.zeros((side, side) + frame.shape[2:], frame.dtype)
    if x1 > x0 and y1 > y0:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = frame[y0:y1, x0:x1]
    return out


def resize_down(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize to (width, height) pixels. Shrinking by more than 2x goes bilinear to twice the
    size, then area-averages 2x2 blocks: anti-aliased like INTER_AREA, which is ~7x slower
    at non-integer ratios. Enlarging is bilinear."""
    if image.shape[1] > 2 * width and image.shape[0] > 2 * height:
        image = cv2.resize(image, (2 * width, 2 * height), interpolation=cv2.INTER_LINEAR)
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    interpolation = cv2.INTER_AREA if image.shape[1] > width else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def crop_faces(frame: np.ndarray, faces: tuple[Face, ...], margin: float,
               size: tuple[int, int], color_order: str) -> tuple[np.ndarray, tuple[Face, ...]]:
    """Batch of crops for the graph, and the faces with their `crop_box` filled in.

    frame: uint8 BGR [H, W, 3]. size: graph input (H, W) pixels. color_order: GRAY, RGB or BGR.
    Returns uint8 [N, H, W, C] (C = 1 for GRAY, else 3) in `color_order`, and N faces.
    """
    order = ColorOrder.of(color_order)
    out_h, out_w = size
    channels = order.channels
    batch = np.empty((len(faces), out_h, out_w, channels), np.uint8)
    placed = []
    for i, face in enumerate(faces):
        square = square_box(face.box, margin)
        crop = resize_down(crop_square(frame, square), out_w, out_h)
        batch[i] = order.from_bgr(crop).reshape(out_h, out_w, channels)
        placed.append(Face(box=face.box, score=face.score, crop_box=square, track_id=face.track_id))
    return batch, tuple(placed)
