"""What a frame is inside camface: a uint8 BGR image [H, W, 3], and the check that says how to
make one of what a caller gave instead (`check_frame`); `RangeWatch` says once when a valid
frame's values look like a mask's (0 and 1). Light: numpy only, so that the API and the face
detectors share it."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from camface.errors import UsageError

log = logging.getLogger(__name__)


def refuse_masked(array: np.ndarray, name: str) -> None:
    """UsageError naming `name` when `array` is a numpy masked array with masked values: camface
    reads pixel values only, so its mask was dropped without a word (the pixels under it read as
    whatever they held). One with nothing masked is read as its data."""
    if isinstance(array, np.ma.MaskedArray) and np.ma.is_masked(array):
        raise UsageError(f"{name} is a masked array with {np.ma.count_masked(array)} masked values, and camface "
                         "reads pixel values only: fill them (array.filled(0), black) or keep what they hold "
                         "(array.data)")


def check_frame(frame: Any, name: str = "a frame") -> np.ndarray:
    """frame itself when it is a uint8 BGR image [H, W, 3] (made contiguous), else UsageError
    naming it as `name`: the pipeline's verbs (`camface.api`) and both face detectors check
    their frames with it."""
    if not isinstance(frame, np.ndarray):
        if isinstance(frame, (str, os.PathLike)):
            how = " (a path: read it with cv2.imread, or give it to process_video)"
        elif hasattr(frame, "getbands"):  # a PIL image: RGB(A) or L
            how = " (a PIL image: cv2.cvtColor(np.asarray(image.convert('RGB')), cv2.COLOR_RGB2BGR))"
        elif isinstance(frame, (list, tuple)):
            how = " (one frame per call, as a numpy array; explain_crops takes a batch of face crops)"
        else:
            how = ""
        raise UsageError(f"{name} must be a numpy array, uint8 BGR [H, W, 3]; got {type(frame).__name__}{how}")
    refuse_masked(frame, name)
    if frame.dtype != np.uint8:
        if frame.dtype.kind == "f":
            how = "scale floats in [0, 1] by 255 and convert with .astype(np.uint8)"
        elif frame.dtype == np.uint16:
            how = "16-bit: divide by 257 and convert with .astype(np.uint8)"
        else:
            how = "scale to 0..255 and convert with .astype(np.uint8)"
        raise UsageError(f"{name} must be uint8 BGR [H, W, 3]; got dtype {frame.dtype} ({how})")
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] < 1 or frame.shape[1] < 1:
        if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
            how = " (grayscale: cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))"
        elif frame.ndim == 3 and frame.shape[2] == 4:
            how = " (with alpha: cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR), or COLOR_RGBA2BGR for RGBA)"
        elif frame.ndim == 3 and frame.shape[0] == 3:  # [3, H, W], as torchvision and PIL-to-tensor give
            how = " (channels first: np.ascontiguousarray(frame.transpose(1, 2, 0)), BGR)"
        elif frame.ndim == 4:
            how = " (one frame per call; explain_crops takes a batch of face crops)"
        else:
            how = ""
        raise UsageError(f"{name} must be uint8 BGR [H, W, 3]; got shape {frame.shape}{how}")
    return np.ascontiguousarray(frame)


class RangeWatch:
    """Says once, a log warning, when a uint8 frame's values are all 0 or 1, both found: a
    boolean mask or a 0..1 image cast to uint8 (a valid frame, but no face is ever found in it).
    An all-black frame is not said, nor one of 1s only: a near-black video decodes to it (x264
    makes a dark frame dithered with 0s and 2s a uniform Y of 17, read back as 1). Each face
    detector keeps one, so the frames of every front end are watched.

    Cost per frame (640x480): the max of 4 rows, about 2 us. Only when those rows hold nothing
    above 1 (a dark frame) is the whole frame read (about 11 us more): the first DARK_EVERY dark
    frames, then one in DARK_EVERY, so a black stream costs about 2.4 us a frame after its
    first second. Nothing once said."""

    DARK_EVERY = 30

    def __init__(self) -> None:
        self.said = False
        self._dark = 0  # dark frames seen

    def __call__(self, frame: np.ndarray) -> None:
        """frame: uint8 [H, W, C] (as `check_frame` returns it)."""
        if self.said or frame[:: max(1, len(frame) // 4)].max() > 1:
            return
        self._dark += 1
        if (self._dark > self.DARK_EVERY and self._dark % self.DARK_EVERY) or frame.max() != 1 or frame.min() != 0:
            return  # (all 1s: a near-black video's frame, as H.264 decodes a dark dithered one: no mask)
        self.said = True
        log.warning("camface: a %dx%d frame holds values 0..1 only, but frames are uint8 BGR 0..255 (a boolean "
                    "mask, or a 0..1 image cast to uint8?): no face is found in it; scale it to 0..255 "
                    "(frame * 255). Said once", frame.shape[1], frame.shape[0])
