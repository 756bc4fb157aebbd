"""Window mode: the OpenCV window. What its keys do is camface.realtime.controls."""

from __future__ import annotations

import os
import sys

import numpy as np


def display_available() -> bool:
    """Whether a window can be shown: on Linux and BSD, an X11 or Wayland display must be set."""
    if sys.platform.startswith(("linux", "freebsd", "openbsd")):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


class Window:
    """An OpenCV window: `show(frame) -> key` (cv2.waitKey code, -1 when none); `closed` is
    True once the user closed it with the window manager."""

    def __init__(self, title: str = "camface"):
        self.title = title
        self._sized = False

    def __enter__(self) -> "Window":
        import cv2

        cv2.namedWindow(self.title, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO | cv2.WINDOW_GUI_NORMAL)
        return self

    def show(self, frame: np.ndarray) -> int:
        import cv2

        if not self._sized:  # a resizable window starts small: open it at the frame's size
            cv2.resizeWindow(self.title, frame.shape[1], frame.shape[0])
            self._sized = True
        cv2.imshow(self.title, frame)
        key = cv2.waitKeyEx(1)
        # Arrows, Shift, F-keys... come as 0xFF51 and the like: cv2.waitKey keeps the low byte,
        # so Left would read as 'Q' (quit), Up as 'R', Right as 'S'. Only Latin-1 keys count.
        return key if key <= 0xFF else -1

    @property
    def closed(self) -> bool:
        import cv2

        return cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1

    def __exit__(self, *exc) -> None:
        import cv2

        cv2.destroyWindow(self.title)
        cv2.waitKey(1)
