"""Per-frame results of the live loop: frozen dataclasses, built once per frame, never mutated.

Coordinates are pixels in the frame the detector saw, (x, y, w, h) with (x, y) the top-left
corner; `w` and `h` are at least 1 and the box lies inside the frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

Box = tuple[int, int, int, int]  # x, y, w, h in pixels


@dataclass(frozen=True)
class Face:
    """One detected face.

    box: detector box clipped to the frame, pixels (x, y, w, h).
    crop_box: the square region that was cropped for the graph, pixels (x, y, side, side);
        it may extend past the frame edges (those parts were padded, not shifted).
    score: detector confidence in [0, 1].
    track_id: identity kept across frames by the smoother; -1 when not tracked.
    """

    box: Box
    score: float
    crop_box: Box = (0, 0, 0, 0)
    track_id: int = -1

    @property
    def area(self) -> int:
        return self.box[2] * self.box[3]


@dataclass(frozen=True)
class Prediction:
    """The CAM graph's answer for one face.

    probs: float32 [classes], softmax probabilities.
    heatmap: float32 [h, w] at the graph's feature resolution, unnormalised, of `method`
        for class `explained`; empty (0, 0) when the method is "none".
    predicted: argmax of probs.
    explained: class index the heatmap explains.
    """

    probs: np.ndarray
    heatmap: np.ndarray
    predicted: int
    explained: int
    method: str


@dataclass(frozen=True)
class FrameResult:
    """Everything the loop knows about one frame after classification.

    index: 0-based frame index in the source.
    faces / predictions: same length and order (largest faces first).
    dropped: faces found beyond --max-faces (not classified).
    method: heatmap method shown ("gradcam", "gradcampp", "cam" or "none").
    explained_class: class the user asked to explain, or None for each face's predicted class.
    labels: class names of the graph.
    fps / stage_ms: rolling figures for the HUD (loop-wide, not this frame alone): frames
        completed per second and each stage's processing milliseconds.
    provider: ONNX Runtime execution provider running the graph.
    pace_fps: the rate a window is held to (the source's own), 0 when not paced: then `fps`
        is the displayed rate and says nothing about how fast frames could be processed.
    """

    index: int
    faces: tuple[Face, ...] = ()
    predictions: tuple[Prediction, ...] = ()
    dropped: int = 0
    method: str = "gradcam"
    explained_class: int | None = None
    labels: tuple[str, ...] = ()
    fps: float = 0.0
    stage_ms: Mapping[str, float] = field(default_factory=dict)
    provider: str = ""
    pace_fps: float = 0.0

    def __post_init__(self) -> None:
        if self.predictions and len(self.predictions) != len(self.faces):
            raise ValueError(
                f"{len(self.faces)} faces but {len(self.predictions)} predictions in frame {self.index}")
