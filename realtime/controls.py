"""What the user chose (the heatmap method, the class to explain, the HUD, pause), which every
front end passes to the explainer, and what the window's keys change in it: pure, testable
without a display.

Keys: m cycles the method, 0-9 explains class k, a returns to the predicted class,
s takes a snapshot, r starts/stops recording, h toggles the HUD, space pauses and resumes
(the frame stays on screen; nothing is read, processed or recorded meanwhile), q or Esc quits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
