"""Window mode: the OpenCV window. What its keys do is camface.realtime.controls."""

from __future__ import annotations

import os
import socket
import sys

import numpy as np

X11_TCP_PORT = 6000  # X display N listens on TCP port 6000 + N (ssh -X forwards localhost:10 and up)


def display_problem() -> str | None:
    """Why no window can be shown, or None when one can: on Linux and BSD an X11 or Wayland
    display must be set, and an X display set (DISPLAY) must accept a connection. OpenCV's Qt
    aborts the whole process (no error to catch) on a DISPLAY left over from a closed session."""
    if not sys.platform.startswith(("linux", "freebsd", "openbsd")):
        return None
    display = os.environ.get("DISPLAY")
    if not display:
        return None if os.environ.get("WAYLAND_DISPLAY") else "DISPLAY / WAYLAND_DISPLAY is not set"
    if _x_display_answers(display) is False:
        return f"no X server answers on DISPLAY={display}"
    return None


def display_available() -> bool:
    """Whether a window can be shown (see `display_problem`)."""
    return display_problem() is None


def _x_display_answers(display: str, timeout_s: float = 1.0) -> bool | None:
    """Whether X display `display` ("[host]:N[.screen]") accepts a connection: its Unix socket
    (abstract or /tmp/.X11-unix/XN) for a local one, TCP port 6000 + N for host:N. None when
    the name is not of that form (not checked)."""
    host, colon, rest = display.rpartition(":")
    number = rest.split(".")[0]
    if not colon or not number.isdigit() or "/" in host:
        return None
    if host not in ("", "unix"):  # every address of the host (ssh -X may listen on ::1 only)
        try:
            socket.create_connection((host.strip("[]"), X11_TCP_PORT + int(number)), timeout_s).close()
            return True
        except (OSError, ValueError):
            return False
    path = f"/tmp/.X11-unix/X{number}"
    for address in ("\0" + path, path):  # Linux's abstract socket, then the file
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(timeout_s)
                probe.connect(address)
            return True
        except (OSError, ValueError):
            continue
    return False


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
