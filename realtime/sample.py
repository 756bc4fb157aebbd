"""The `sample` source: a short deterministic clip with real faces, made from a bundled photo.

Three copies of the astronaut's face (NASA, public domain; see assets/CREDIT.md) move over a
smooth background: face A drifts and grows/shrinks, face B (mirrored) enters from the right
and leaves on the left, face C (a darker copy) appears, grows and disappears. Frame `i` is a
pure function of `i`, so every run, test and benchmark sees the same pixels.

Drawing a frame costs about 1.7 ms on a 2-core CPU, more than decoding one (about 0.5 ms), so
the clip is drawn once, cached as an mp4 in the temporary folder, and decoded from there.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from camface.errors import OutputError
from camface.native import opencv_path
from camface.realtime.sinks import VideoSink
from camface.realtime.sources import SourceInfo

log = logging.getLogger(__name__)

CLIP_VERSION = 1  # bump when the drawing changes, so cached clips are redrawn
ASTRONAUT = Path(__file__).resolve().parent / "assets" / "astronaut.jpg"
# Head region of the astronaut photo (pixels, x0, y0, x1, y1); the face is about (177, 82, 95, 95).
HEAD = (137, 37, 313, 233)
FACE_IN_HEAD = (177 - 137, 82 - 37, 95, 95)  # face box inside the head sprite, (x, y, w, h)


@dataclass(frozen=True)
class Placement:
    """Where one face sprite goes in a frame: centre (cx, cy) and face height, in pixels."""

    cx: float
    cy: float
    face_size: float
    mirror: bool = False
    gain: float = 1.0  # brightness factor


def placements(index: int, frames: int, width: int, height: int) -> list[Placement]:
    """The faces visible in frame `index` of a `frames`-long clip of `width` x `height` pixels."""
    t = index / max(frames - 1, 1)  # 0..1 over the clip
    s = height / 480  # everything scales with the frame height
    out = [Placement(cx=width * (0.28 + 0.10 * math.sin(2 * math.pi * t)),
                     cy=height * 0.32,
                     face_size=s * (130 + 60 * math.sin(4 * math.pi * t)))]
    if 0.1 <= t <= 0.9:  # B crosses the frame right to left, entering and leaving at the edges
        u = (t - 0.1) / 0.8
        out.append(Placement(cx=width * (1.15 - 1.3 * u), cy=height * 0.74, face_size=s * 110,
                             mirror=True))
    if 0.35 <= t <= 0.75:
        u = (t - 0.35) / 0.4
        out.append(Placement(cx=width * 0.78, cy=height * 0.30, face_size=s * (100 + 60 * u),
                             gain=0.8))
    return out


# The clip is drawn ahead into a temporary file, about 3.5 KB a frame: 20 minutes at 30 fps
# (about 126 MB) at most; `bench --frames 10000000` would have drawn for hours and filled /tmp.
MAX_FRAMES = 36_000


class SampleSource:
    """`frames` frames of `size` (width, height) pixels at `fps`, uint8 BGR.

    Iteration decodes the cached clip (see `cached_clip`); `frame(i)` draws frame i exactly.
    """

    def __init__(self, frames: int = 300, size: tuple[int, int] = (640, 480), fps: float = 30.0):
        if frames < 1:
            raise ValueError("the sample clip needs at least one frame")
        self.frames, self.size, self.fps = frames, size, fps
        self.info = SourceInfo("sample", fps, frames, live=False)
        self._capture = None

    def __enter__(self) -> "SampleSource":
        try:
            path = self.cached_clip()
        except (OSError, OutputError) as exc:  # read-only temp folder: draw frames on the fly instead
            log.debug("cannot cache the sample clip (%s); drawing frames on the fly", exc)
            return self
        self._capture = cv2.VideoCapture(opencv_path(path))
        return self

    def __exit__(self, *exc) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def cached_clip(self) -> Path:
        """Path of the clip as an mp4 in the temporary folder, drawn on first use.

        Written under a private name and renamed, so concurrent runs never see half a file (a
        name of its own for each call: two threads of one process never write the same file)."""
        from camface.outputs import beside

        width, height = self.size
        path = Path(tempfile.gettempdir()) / (
            f"camface-sample-v{CLIP_VERSION}-{width}x{height}-{self.frames}f-{self.fps:g}fps.mp4")
        if path.is_file() and path.stat().st_size > 0:
            return path
        partial = beside(path)
        # mp4v, not H.264: this cache is only ever decoded here, and mp4v decodes in half the
        # time (0.5 vs 1 ms a frame at 640x480), which the reader thread would otherwise pay.
        try:
            with VideoSink(partial, self.fps, overwrite=True, codec="mp4v") as sink:
                for index in range(self.frames):
                    sink.write(self.frame(index))
        except BaseException:
            partial.unlink(missing_ok=True)  # e.g. a full disk: no half clip left behind
            raise
        os.replace(partial, path)
        return path

    @cached_property
    def _head(self) -> tuple[np.ndarray, np.ndarray]:
        """Head sprite (uint8 BGR) and its soft elliptical mask (float32 [h, w] in [0, 1])."""
        photo = cv2.imread(opencv_path(ASTRONAUT), cv2.IMREAD_COLOR)
        if photo is None:
            raise FileNotFoundError(f"bundled sample image missing: {ASTRONAUT}")
        x0, y0, x1, y1 = HEAD
        head = np.ascontiguousarray(photo[y0:y1, x0:x1])
        h, w = head.shape[:2]
        mask = np.zeros((h, w), np.float32)
        cv2.ellipse(mask, (w // 2, h // 2), (int(w * 0.46), int(h * 0.48)), 0, 0, 360, 1.0, -1)
        mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=w * 0.05)
        return head, mask

    @cached_property
    def _background(self) -> np.ndarray:
        width, height = self.size
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        b = 90 + 50 * np.sin(xx / width * 3.0)
        g = 110 + 40 * np.cos(yy / height * 2.5)
        r = 120 + 30 * np.sin((xx + yy) / (width + height) * 4.0)
        return np.clip(np.dstack([b, g, r]), 0, 255).astype(np.uint8)

    def frame(self, index: int) -> np.ndarray:
        """Frame `index` (0-based), uint8 BGR [height, width, 3]."""
        frame = self._background.copy()
        for place in placements(index, self.frames, *self.size):
            self._paste(frame, place)
        return frame

    def face_boxes(self, index: int) -> list[tuple[int, int, int, int]]:
        """Where the faces of frame `index` are, (x, y, w, h) pixels, clipped to the frame;
        faces less than half inside the frame are left out. For tests."""
        width, height = self.size
        boxes = []
        for place in placements(index, self.frames, *self.size):
            x, y, w, h = self._face_box(place)
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
            if (x1 - x0) * (y1 - y0) >= 0.5 * w * h:
                boxes.append((x0, y0, x1 - x0, y1 - y0))
        return boxes

    def _scale(self, place: Placement) -> float:
        return place.face_size / FACE_IN_HEAD[3]

    def _face_box(self, place: Placement) -> tuple[int, int, int, int]:
        head, _ = self._head
        k = self._scale(place)
        fx, fy, fw, fh = FACE_IN_HEAD
        if place.mirror:
            fx = head.shape[1] - fx - fw
        left = place.cx - head.shape[1] * k / 2
        top = place.cy - head.shape[0] * k / 2
        return round(left + fx * k), round(top + fy * k), round(fw * k), round(fh * k)

    def _paste(self, frame: np.ndarray, place: Placement) -> None:
        """Blend one head sprite into `frame` in place, clipped at the frame edges."""
        head, mask = self._head
        k = self._scale(place)
        w, h = max(1, round(head.shape[1] * k)), max(1, round(head.shape[0] * k))
        left, top = round(place.cx - w / 2), round(place.cy - h / 2)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + w, frame.shape[1]), min(top + h, frame.shape[0])
        if x1 <= x0 or y1 <= y0:
            return
        sprite = cv2.resize(head, (w, h), interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(mask, (w, h), interpolation=cv2.INTER_LINEAR)
        if place.mirror:
            sprite, alpha = cv2.flip(sprite, 1), cv2.flip(alpha, 1)
        if place.gain != 1.0:
            sprite = cv2.convertScaleAbs(sprite, alpha=place.gain)
        sprite = np.ascontiguousarray(sprite[y0 - top:y1 - top, x0 - left:x1 - left])
        alpha = np.ascontiguousarray(alpha[y0 - top:y1 - top, x0 - left:x1 - left])
        region = frame[y0:y1, x0:x1]
        region[:] = cv2.blendLinear(sprite, np.ascontiguousarray(region), alpha, 1.0 - alpha)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._capture is not None and self._capture.get(cv2.CAP_PROP_POS_FRAMES) != 0:
            # iterated again: the clip from its start (the capture at its end drew the frames
            # instead, whose pixels differ from the decoded ones by the codec's loss)
            self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
        for index in range(self.frames):
            if self._capture is None:
                yield self.frame(index)
                continue
            ok, frame = self._capture.read()
            yield frame if ok else self.frame(index)
