"""What a frame is inside camface: a uint8 BGR image [H, W, 3], and the check that says how to
make one of what a caller gave instead (`check_frame`); `RangeWatch` says once per process when
a valid frame's values look like a mask's (0 and 1, in regions). Light: numpy only, so that the API and the face
detectors share it."""

from __future__ import annotations

import logging
import os
import threading
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


class Once:
    """Something said once in the process, by whichever thread comes first: `claim()` is True
    for one caller only (under a lock: two detector threads seeing the same frames both said it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.said = False

    def claim(self) -> bool:
        with self._lock:
            if self.said:
                return False
            self.said = True
            return True


MASK_WARNING = Once()  # RangeWatch's warning, once per process whatever the detectors


class RangeWatch:
    """Says once per process (`Once`), a log warning, when a uint8 frame looks like a boolean
    mask or a 0..1 image cast to uint8: a valid frame, but no face is ever found in it. Each face
    detector keeps one, so the frames of every front end are watched; the first to see one says it.
    once: where "said" is kept (MASK_WARNING, the process's; a test gives its own).

    Such a frame holds 0s and 1s only, both a noticeable share (1/256 or more of the sampled
    values), in regions whose edges follow the image: a pixel's right neighbour differs from it
    under half as often as independent values with the same share of 1s would, and under half of
    those changes fall on a 4-pixel grid (at random, a quarter do). What a dark frame of a real
    camera or clip holds is not said: sensor noise with an offset puts values above 1 in a frame
    (a noise sd of 0.3 already makes a few of 640x480x3); the rare frame whose noise stays in 0..1
    (or a capped lens's few hot pixels) has its 1s scattered, not in regions; a near-black video
    decodes to 1s only (x264 makes a dark frame dithered with 0s and 2s a uniform Y of 17, read
    back as 1), or to 0s and 1s in the codec's blocks: all their edges on the 4-pixel grid (x264
    at CRF 18-30 and MPEG-4 part 2 on dark noise, measured), or no edge along the rows at all.

    Cost per frame (640x480): the max of 4 rows, about 2 us. Only when those rows hold nothing
    above 1 (a dark frame) is more read: the whole frame's max (about 12 us), and when that is 1,
    16 rows' share of 1s and neighbours (about 19 us), for the first DARK_EVERY dark frames, then
    one in DARK_EVERY: a black stream costs about 2.5 us a frame after its first second, a dark
    stream of 0s and 1s that is no mask about 3.2 us. Nothing once said."""

    DARK_EVERY = 30
    SAMPLED_ROWS = 16
    MIN_SHARE = 1 / 256  # of the sampled values, for each of 0 and 1

    def __init__(self, once: Once = MASK_WARNING) -> None:
        self._once = once
        self._dark = 0  # dark frames seen

    @property
    def said(self) -> bool:
        """Whether the warning was said in this process (by any detector's watch)."""
        return self._once.said

    def __call__(self, frame: np.ndarray) -> None:
        """frame: uint8 [H, W, C] (as `check_frame` returns it)."""
        if self._once.said or frame[:: max(1, len(frame) // 4)].max() > 1:
            return
        self._dark += 1
        if (self._dark > self.DARK_EVERY and self._dark % self.DARK_EVERY) or frame.max() != 1 \
                or not self.looks_like_a_mask(frame) or not self._once.claim():
            return
        log.warning("camface: a %dx%d frame holds values 0..1 only, but frames are uint8 BGR 0..255 (a boolean "
                    "mask, or a 0..1 image cast to uint8?): no face is found in it; scale it to 0..255 "
                    "(frame * 255). Said once", frame.shape[1], frame.shape[0])

    @classmethod
    def looks_like_a_mask(cls, frame: np.ndarray) -> bool:
        """Whether `frame`, uint8 [H, W, C] of 0s and 1s only, has both a noticeable share and
        its 1s in regions (see the class), from SAMPLED_ROWS rows spread over it."""
        rows = frame[:: max(1, len(frame) // cls.SAMPLED_ROWS)]
        ones = np.count_nonzero(rows) / rows.size
        if min(ones, 1 - ones) < cls.MIN_SHARE:
            return False
        differs = rows[:, 1:] != rows[:, :-1]  # [j]: pixel j and j + 1 differ
        changes = np.count_nonzero(differs)
        on_grid = np.count_nonzero(differs[:, 3::4])  # between pixels 4k - 1 and 4k: codec block edges
        # independent values with a share p of 1s: 2p(1 - p) of neighbours differ
        return 0 < changes < 0.5 * 2 * ones * (1 - ones) * differs.size and on_grid < 0.5 * changes
