"""Window mode: what the keys do (pure, testable without a display) and the OpenCV window.

Keys: m cycles the method, 0-9 explains class k, a returns to the predicted class,
s takes a snapshot, r starts/stops recording, h toggles the HUD, space pauses and resumes
(the frame stays on screen; nothing is read, processed or recorded meanwhile), q or Esc quits.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace

import numpy as np

ESC = 27
SNAPSHOT, RECORD, QUIT = "snapshot", "record", "quit"


@dataclass(frozen=True)
class Controls:
    """What the user chose: heatmap method, class to explain (None = each face's predicted
    class), HUD on or off, paused or playing."""

    method: str
    explained_class: int | None = None
    hud: bool = True
    paused: bool = False


def apply_key(controls: Controls, key: int, methods: tuple[str, ...], classes: int) -> tuple[Controls, str | None]:
    """New controls after `key` (a cv2.waitKey code, -1 = none), and the command it asks for
    (SNAPSHOT, RECORD, QUIT or None). `methods`: heatmaps the graph offers; "none" is added
    to the cycle. Digits beyond the class count are ignored."""
    if key < 0:
        return controls, None
    key &= 0xFF
    char = chr(key).lower()
    if key == ESC or char == "q":
        return controls, QUIT
    if char == "m":
        cycle = tuple(methods) + ("none",)
        position = cycle.index(controls.method) if controls.method in cycle else -1
        return replace(controls, method=cycle[(position + 1) % len(cycle)]), None
    if "0" <= char <= "9":  # not str.isdigit(): '²' (0xB2, an AZERTY key) is a digit to it
        k = int(char)
        return (replace(controls, explained_class=k), None) if k < classes else (controls, None)
    if char == "a":
        return replace(controls, explained_class=None), None
    if char == "h":
        return replace(controls, hud=not controls.hud), None
    if char == " ":
        return replace(controls, paused=not controls.paused), None
    if char == "s":
        return controls, SNAPSHOT
    if char == "r":
        return controls, RECORD
    return controls, None


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
