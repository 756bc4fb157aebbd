"""Drawing a FrameResult on its frame. Every annotator has one verb,
`annotate(frame, result) -> frame`, draws IN PLACE on the uint8 BGR frame and returns it;
style goes to `__init__`, data comes per call. Text (labels are user strings in any script) goes
through one `camface.realtime.text.TextPainter` per renderer.
"""

from __future__ import annotations


import cv2
import numpy as np

from camface.methods import normalize
from camface.realtime.config import option
from camface.realtime.overlay import LIVE, colormap_lut, overlay, upsample
from camface.realtime.results import Box, Face, FrameResult
from camface.realtime.text import TextPainter
from camface.realtime.timing import fps_text

GREEN, WHITE, BLACK, DARK_RED = (0, 200, 0), (255, 255, 255), (0, 0, 0), (0, 0, 160)


def _visible(face: Face, frame: np.ndarray) -> tuple[int, int, int, int, int, int]:
    """The face box (x0, y0, x1, y1) inside the frame, and its offset (dx, dy) in the crop square."""
    x, y, w, h = face.box
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, frame.shape[1]), min(y + h, frame.shape[0])
    return x0, y0, x1, y1, x0 - face.crop_box[0], y0 - face.crop_box[1]


def _explained_faces(frame: np.ndarray, result: FrameResult):
    """(face, prediction, (x0, y0, x1, y1, dx, dy)) for each face that has a heatmap and a
    visible box (see `_visible`); nothing when the method is 'none'."""
    if result.method == "none":
        return
    for face, prediction in zip(result.faces, result.predictions):
        if prediction.heatmap.size == 0:
            continue
        visible = _visible(face, frame)
        x0, y0, x1, y1 = visible[:4]
        if x1 > x0 and y1 > y0:
            yield face, prediction, visible


def localisation_box(heatmap01: np.ndarray, threshold: float = 0.2) -> Box | None:
    """The CAM paper's localisation box (arXiv:1512.04150 sec. 3.1): bounding box (x, y, w, h)
    of the largest connected region above `threshold` x the heatmap's maximum, in the
    heatmap's pixels; None when the heatmap is all zeros."""
    peak = float(heatmap01.max()) if heatmap01.size else 0.0
    if peak <= 0:
        return None
    mask = (heatmap01 > threshold * peak).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = stats[largest, :4]
    return int(x), int(y), int(w), int(h)


class HeatmapAnnotator:
    """Each face's heatmap over its face box only (pixels outside every box are untouched),
    drawn by the one overlay function (`camface.realtime.overlay.overlay`) with the heatmap
    spread over the face's crop square. Each is blended over the frame as it came, never over
    another face's heatmap: where boxes overlap, the face drawn last (the smaller) shows alone."""

    def __init__(self, colormap: str = LIVE["colormap"], alpha: float = LIVE["alpha"]):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.colormap, self.alpha = colormap, alpha
        self._lut = colormap_lut(colormap)

    def annotate(self, frame: np.ndarray, result: FrameResult) -> np.ndarray:
        # every overlay first (each a new image of the undrawn pixels), then into the frame
        drawn = [((y0, y1, x0, x1), overlay(frame[y0:y1, x0:x1], prediction.heatmap, prediction.method,
                                            self.colormap, self.alpha, side=face.crop_box[2], offset=(dx, dy),
                                            lut=self._lut))
                 for face, prediction, (x0, y0, x1, y1, dx, dy) in _explained_faces(frame, result)]
        for (y0, y1, x0, x1), image in drawn:
            frame[y0:y1, x0:x1] = image
        return frame


class CamBoxAnnotator:
    """The CAM paper's localisation box (see `localisation_box`) of each face, in frame pixels."""

    def __init__(self, threshold: float = 0.2, color: tuple[int, int, int] = (0, 255, 255)):
        self.threshold, self.color = threshold, color

    def annotate(self, frame: np.ndarray, result: FrameResult) -> np.ndarray:
        for face, prediction, (x0, y0, x1, y1, dx, dy) in _explained_faces(frame, result):
            heat = upsample(normalize(prediction.heatmap, prediction.method), face.crop_box[2])
            box = localisation_box(heat[dy:dy + (y1 - y0), dx:dx + (x1 - x0)], self.threshold)
            if box is not None:
                bx, by, bw, bh = box
                cv2.rectangle(frame, (x0 + bx, y0 + by), (x0 + bx + bw - 1, y0 + by + bh - 1),
                              self.color, 1)
        return frame


class BoxAnnotator:
    """Face box with the predicted label and its probability (above the box, or inside it at
    the top edge of the frame; moved left as far as needed to stay whole at the right edge);
    the explained class when it differs from the predicted one."""

    def __init__(self, color: tuple[int, int, int] = GREEN, thickness: int = 2, scale: float = 0.5,
                 text: TextPainter | None = None):
        self.color, self.thickness, self.scale = color, thickness, scale
        self.text = text or TextPainter()

    def annotate(self, frame: np.ndarray, result: FrameResult) -> np.ndarray:
        for i, face in enumerate(result.faces):
            x, y, w, h = face.box
            cv2.rectangle(frame, (x, y), (x + w - 1, y + h - 1), self.color, self.thickness)
            if i >= len(result.predictions):
                continue
            text = result.predictions[i].caption(result.labels, result.threshold)
            (tw, th), base = self.text.size(text, self.scale)
            top = y - th - base - 2 if y - th - base - 2 >= 0 else y + self.thickness
            left = max(0, min(x, frame.shape[1] - (tw + 5)))  # a face at the right edge: its label whole
            cv2.rectangle(frame, (left, top), (left + tw + 4, top + th + base + 2), self.color, -1)
            self.text.put(frame, text, (left + 2, top + th + 1), self.scale, BLACK)
        return frame


class BarsAnnotator:
    """The `top` most probable classes of each face as horizontal bars under its box (or
    inside it near the bottom of the frame; moved left as far as needed for bars and names to
    stay whole at the right edge)."""

    def __init__(self, top: int = 3, width: int = 90, row: int = 14, text: TextPainter | None = None):
        self.top, self.width, self.row = top, width, row
        self.text = text or TextPainter()

    def annotate(self, frame: np.ndarray, result: FrameResult) -> np.ndarray:
        for face, prediction in zip(result.faces, result.predictions):
            x, y, w, h = face.box
            order = np.argsort(prediction.probs)[::-1][: self.top]
            top = y + h + 2
            if top + self.row * len(order) > frame.shape[0]:
                top = max(0, y + h - self.row * len(order) - 2)
            names = [f"{result.labels[k] if k < len(result.labels) else str(k)} {prediction.probs[k]:.2f}"
                     for k in order]
            wide = self.width + 4 + max((self.text.size(name, 0.4)[0][0] for name in names), default=0)
            left = max(0, min(x, frame.shape[1] - wide))  # a face at the right edge: bars and names whole
            for rank, (k, name) in enumerate(zip(order, names)):
                row_y = top + rank * self.row
                filled = int(round(float(prediction.probs[k]) * self.width))
                cv2.rectangle(frame, (left, row_y), (left + self.width, row_y + self.row - 3), BLACK, -1)
                cv2.rectangle(frame, (left, row_y), (left + filled, row_y + self.row - 3), GREEN, -1)
                self.text.put(frame, name, (left + self.width + 4, row_y + self.row - 4), 0.4, WHITE)
        return frame


class HudAnnotator:
    """Heads-up display at the top left: rolling fps, per-stage milliseconds, method, class
    explained, provider, and faces dropped beyond --max-faces (api: named `max_faces`, the
    keyword of `camface.load`)."""

    def __init__(self, scale: float = 0.45, text: TextPainter | None = None, api: bool = False):
        self.scale = scale
        self.text = text or TextPainter()
        self.api = api

    def lines(self, result: FrameResult) -> list[str]:
        stages = " ".join(f"{name} {ms:.1f}" for name, ms in result.stage_ms.items())
        best = "similarity to the best match" if result.threshold is not None else "predicted class"
        explained = (best if result.explained_class is None else
                     result.labels[result.explained_class] if result.explained_class < len(result.labels)
                     else f"class {result.explained_class}")
        rate = (f"{fps_text(result.fps)} fps shown (paced to {result.pace_fps:.3g})" if result.pace_fps
                else f"{fps_text(result.fps)} fps")
        lines = [f"{rate} | processing ms: {stages}" if stages and result.pace_fps else
                 f"{rate} | ms: {stages}" if stages else rate,
                 f"{result.method} of {explained} | {result.provider.replace('ExecutionProvider', '')}"]
        if not (result.fps or result.pace_fps or stages):  # nothing timed (an API result): no "0 fps"
            del lines[0]
        if result.dropped:
            lines.append(f"{result.dropped} more face(s) not shown ({option('max_faces', api=self.api)})")
        return lines

    def annotate(self, frame: np.ndarray, result: FrameResult) -> np.ndarray:
        y = 4
        for text in self.lines(result):
            (tw, th), base = self.text.size(text, self.scale)
            cv2.rectangle(frame, (4, y), (8 + tw, y + th + base + 4), BLACK, -1)
            self.text.put(frame, text, (6, y + th + 2), self.scale, WHITE)
            y += th + base + 6
        return frame


class Renderer:
    """Runs annotators in order: `annotate(frame, result, hud) -> frame`, in place; the HUD is
    drawn when `hud` (the window's key h toggles it per frame). api: the HUD names options as
    `camface.load`'s keywords, not as flags."""

    def __init__(self, colormap: str = LIVE["colormap"], alpha: float = LIVE["alpha"], cam_boxes: bool = False,
                 bars: bool = False, api: bool = False):
        text = TextPainter()  # one per renderer: its caches, and one missing-font warning per run
        self.layers = [HeatmapAnnotator(colormap, alpha)]
        if cam_boxes:
            self.layers.append(CamBoxAnnotator())
        self.layers.append(BoxAnnotator(text=text))
        if bars:
            self.layers.append(BarsAnnotator(text=text))
        self.hud_layer = HudAnnotator(text=text, api=api)

    @classmethod
    def from_config(cls, config, api: bool = False) -> "Renderer":
        """The renderer a LiveConfig asks for (api: see the class)."""
        return cls(config.colormap, config.alpha, config.cam_boxes, config.bars, api)

    def annotate(self, frame: np.ndarray, result: FrameResult, hud: bool = True,
                 notice: str | None = None) -> np.ndarray:
        """notice: a warning for the user (a recording key r could not start), drawn at the
        bottom left in white on dark red, with or without the HUD."""
        for layer in self.layers:
            layer.annotate(frame, result)
        if hud:
            self.hud_layer.annotate(frame, result)
        if notice:
            scale = self.hud_layer.scale
            (tw, th), base = self.hud_layer.text.size(notice, scale)
            bottom = frame.shape[0] - 4
            cv2.rectangle(frame, (4, bottom - th - base - 4), (8 + tw, bottom), DARK_RED, -1)
            self.hud_layer.text.put(frame, notice, (6, bottom - base - 2), scale, WHITE)
        return frame
