"""A .y4m clip (YUV4MPEG2, 4:2:0) from BGR frames: what Chromium's fake camera plays
(`--use-fake-device-for-media-stream --use-file-for-fake-video-capture=clip.y4m`), for the
browser test, the benchmark and demos on a machine without a camera. Chromium loops the file
and delivers its resolution."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np


def write_y4m(path: str | Path, frames: Iterable[np.ndarray], fps: int = 30) -> Path:
    """Write uint8 BGR [H, W, 3] frames (even width and height, all the same size) to `path`."""
    path = Path(path)
    with path.open("wb") as out:
        size = None
        for frame in frames:
            height, width = frame.shape[:2]
            if size is None:
                if width % 2 or height % 2:
                    raise ValueError(f"y4m 4:2:0 needs even sizes, got {width}x{height}")
                size = (width, height)
                out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
            elif (width, height) != size:
                raise ValueError(f"frame of {width}x{height} in a {size[0]}x{size[1]} clip")
            out.write(b"FRAME\n")
            out.write(cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes())  # Y, then U, then V planes
        if size is None:
            raise ValueError("a y4m clip needs at least one frame")
    return path
