"""Recording annotated frames to an mp4 file.

`check_output_file` runs before any frame is processed, so a recording that cannot be written
fails at once; `VideoSink` is a context manager whose exit (normal end, error, Ctrl-C,
SIGTERM) always finalises the file so it stays playable.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from camface.errors import OutputError
from camface.outputs import check_output_file

log = logging.getLogger(__name__)


class VideoSink:
    """Writes uint8 BGR frames to an mp4 (MPEG-4 Part 2, `mp4v`, which every OpenCV build can
    encode) at `fps`.

    The writer opens on the first frame, at that frame's size rounded down to even numbers
    (the codec needs even sizes; odd frames lose their last row/column). Later frames of
    another size are resized to it. `frames_written` counts frames in the file.
    """

    def __init__(self, path: str | Path, fps: float, overwrite: bool = False):
        self.path = check_output_file(path, overwrite)
        self.fps = fps
        self.frames_written = 0
        self._writer = None
        self._size: tuple[int, int] | None = None  # (width, height)

    def __enter__(self) -> "VideoSink":
        return self

    def _open(self, frame: np.ndarray) -> None:
        height, width = frame.shape[:2]
        self._size = (max(2, width - width % 2), max(2, height - height % 2))
        # MPEG-4 caps the time base denominator at 65535: a measured rate like 192.103 fps
        # must be rounded (to 1/100 fps, or to whole frames when that is still too fine).
        fps = round(self.fps, 2) if self.fps * 100 < 65535 else float(round(self.fps))
        writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), fps, self._size)
        if not writer.isOpened():
            raise OutputError(f"cannot open {self.path} for writing (mp4v codec unavailable?)")
        self._writer = writer

    def write(self, frame: np.ndarray) -> None:
        """Append one uint8 BGR [H, W, 3] frame."""
        if self._writer is None:
            self._open(frame)
        width, height = self._size
        if frame.shape[1] != width or frame.shape[0] != height:
            if frame.shape[1] in (width, width + 1) and frame.shape[0] in (height, height + 1):
                frame = frame[:height, :width]
            else:
                frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
        self._writer.write(np.ascontiguousarray(frame))
        self.frames_written += 1

    def close(self) -> None:
        """Finalise the file (idempotent)."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            log.debug("recording %s finalised: %d frames", self.path, self.frames_written)

    def __exit__(self, *exc) -> None:
        self.close()
