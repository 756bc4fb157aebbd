"""The window side of the live loop: each frame shown at its time (when paced), the keys read,
and the frame held on screen while paused.

`Viewer.show(frame, controls)` returns the new controls and every command the keys asked for
meanwhile (SNAPSHOT, RECORD, QUIT), so nothing pressed during a long hold or a pause is lost.
Keys that change the view (m, h, 0-9) while paused apply from the next frame on. Space pauses
on the frame on screen, also while it waits for the next frame's time (a folder's image).

A snapshot is of the frame on screen when s was pressed: SNAPSHOT for the frame just shown
(or paused on), SNAPSHOT_SHOWN for the one before it, on screen while `show` waited for the
new frame's time (a folder's image is held for seconds), and for the last frame while
`hold_last` keeps it.
"""

from __future__ import annotations

import time

from camface.realtime.controls import QUIT, SNAPSHOT, Controls, apply_key

SNAPSHOT_SHOWN = "snapshot of the frame shown before"


class Viewer:
    """window: a Window-like object (`show(frame) -> key`, `closed`), or None (headless).
    pacer: a Pacer or None. methods: the graph's heatmap methods (key m). classes: class count."""

    def __init__(self, window, pacer, methods: tuple[str, ...], classes: int):
        self.window, self.pacer, self.methods, self.classes = window, pacer, methods, classes
        self.paused_s = 0.0
        self._shown = None  # the frame on screen

    @property
    def closed(self) -> bool:
        return self.window is not None and bool(getattr(self.window, "closed", False))

    def _key(self, frame, controls: Controls, commands: list) -> Controls:
        controls, command = apply_key(controls, self.window.show(frame), self.methods, self.classes)
        if command is not None:
            commands.append(command)
        return controls

    def _wait(self, controls: Controls, commands: list) -> Controls:
        """Wait for the next frame's time, keeping the shown frame on screen and reading keys."""
        if self.pacer is None:
            return controls
        if self.window is None or self._shown is None:
            self.pacer.wait()
            return controls
        box = [controls]
        asked: list[str] = []

        def poll() -> bool:
            box[0] = self._key(self._shown, box[0], asked)
            if box[0].paused:  # space while this frame waits its time: it stays, paused
                box[0] = self._hold_paused(self._shown, box[0], asked)
            return QUIT in asked or self.closed

        self.pacer.wait(poll)
        commands += [SNAPSHOT_SHOWN if command == SNAPSHOT else command for command in asked]
        return box[0]

    def show(self, frame, controls: Controls) -> tuple[Controls, tuple[str, ...]]:
        """Show `frame` when its time comes; while paused keep it on screen until space or quit."""
        commands: list[str] = []
        controls = self._wait(controls, commands)
        if self.window is None:
            return controls, tuple(commands)
        controls = self._key(frame, controls, commands)
        self._shown = frame
        if controls.paused:
            controls = self._hold_paused(frame, controls, commands)
        return controls, tuple(commands)

    def _hold_paused(self, frame, controls: Controls, commands: list) -> Controls:
        """Keep `frame` (on screen) until space or quit; the pacer's schedule moves on by the
        time held, so play resumes where it stopped."""
        paused_at = time.perf_counter()
        while controls.paused and QUIT not in commands and not self.closed:
            time.sleep(0.02)  # the window keeps the frame; poll its keys
            controls = self._key(frame, controls, commands)
        held = time.perf_counter() - paused_at
        self.paused_s += held
        if self.pacer is not None:
            self.pacer.hold(held)
        return controls

    def hold_last(self, controls: Controls) -> tuple[str, ...]:
        """At the end of the input: keep the last frame on screen for its time (a folder's last
        image, or a single one, is held --image-seconds like the others). Returns the commands
        asked for meanwhile (SNAPSHOT_SHOWN: of that last frame)."""
        commands: list[str] = []
        if self.window is not None and self._shown is not None:
            self._wait(controls, commands)
        return tuple(commands)
