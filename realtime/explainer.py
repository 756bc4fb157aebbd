"""Explain one frame: crop -> classify + explain (one graph call) -> smooth -> FrameResult.

`FrameExplainer` is the one per-frame piece every front end calls (the live loop, the bench's
sequential rows, and the browser and batch front ends): none of them re-implements a stage.
It owns the graph, the crop settings and the optional smoother (whose tracks are the only
state kept between frames: one explainer per video stream). Detection and drawing stay outside:
detection runs in its own threads, and drawing is `Renderer.annotate(frame, result)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from camface.errors import ModelError
from camface.realtime.crop import crop_faces
from camface.realtime.results import Face, FrameResult, Prediction
from camface.realtime.window import Controls


@dataclass(frozen=True)
class Explained:
    """One frame explained. crops: uint8 [N, H, W, C], the graph's input, in its colour order,
    one per face of `result` (N = 0 without faces)."""

    result: FrameResult
    crops: np.ndarray


class FrameExplainer:
    """`explain(frame, faces, controls) -> Explained` for one stream of frames.

    graph: a loaded CamGraph. margin: crop margin (fraction of the face box's longer side).
    max_faces: faces classified per frame, the first (largest) ones; the rest are counted as
    dropped. smooth: temporal smoothing weight in [0, 1) (0: none). timer: a StageTimer that
    gets the `crop` and `classify` stages, or None.
    """

    def __init__(self, graph, margin: float = 0.1, max_faces: int = 8, smooth: float = 0.0, timer=None):
        from camface.realtime.smooth import Smoother

        self.graph, self.margin, self.max_faces, self.timer = graph, margin, max_faces, timer
        self.smoother = Smoother(smooth) if smooth > 0 else None
        info = graph.info
        self._empty = np.zeros((0, *info.input_size, info.channels), np.uint8)

    @classmethod
    def from_config(cls, config, graph, timer=None) -> "FrameExplainer":
        """The explainer a LiveConfig asks for; checks that the graph has `config.method`."""
        check_method(graph, config.method)
        return cls(graph, config.margin, config.max_faces, config.smooth, timer)

    def warm_up(self, method: str) -> None:
        """Run the graph once on a blank crop: the first ONNX Runtime run allocates."""
        info = self.graph.info
        self.graph.run(np.zeros((1, *info.input_size, info.channels), np.uint8), np.array([-1], np.int64), method)

    def _class_index(self, faces: tuple[Face, ...], controls: Controls) -> np.ndarray:
        """int64 [N]: the class to explain per face; -1 = the graph's prediction."""
        if controls.explained_class is not None:
            return np.full(len(faces), controls.explained_class, np.int64)
        if self.smoother is not None:  # explain what the smoothed label will say
            return self.smoother.explain_classes(faces)
        return np.full(len(faces), -1, np.int64)

    def explain(self, frame: np.ndarray, faces: tuple[Face, ...], controls: Controls, index: int = 0,
                fps: float = 0.0, stage_ms: dict | None = None) -> Explained:
        """frame: uint8 BGR [H, W, 3], not modified. faces: the detector's faces, largest first.
        index: the frame's index in its source. fps / stage_ms: the caller's rolling figures,
        carried in the result for the HUD."""
        start = time.perf_counter()
        dropped = max(0, len(faces) - self.max_faces)
        faces = tuple(faces[: self.max_faces])
        info = self.graph.info
        crops, faces = (crop_faces(frame, faces, self.margin, info.input_size, info.color_order)
                        if faces else (self._empty, ()))
        cropped = time.perf_counter()
        predictions: tuple[Prediction, ...] = ()
        if faces:
            class_index = self._class_index(faces, controls)
            probs, heatmaps = self.graph.run(crops, class_index, controls.method)
            predicted = probs.argmax(axis=1)
            predictions = tuple(
                Prediction(probs=probs[i], heatmap=heatmaps[i], predicted=int(predicted[i]),
                           explained=int(predicted[i]) if class_index[i] < 0 else int(class_index[i]),
                           method=controls.method)
                for i in range(len(faces)))
        result = FrameResult(index=index, faces=faces, predictions=predictions, dropped=dropped,
                             method=controls.method, explained_class=controls.explained_class,
                             labels=info.labels, fps=fps, stage_ms=stage_ms or {}, provider=self.graph.provider)
        if self.smoother is not None:
            result = self.smoother.update(result)
        if self.timer is not None:
            self.timer.add("crop", cropped - start)
            self.timer.add("classify", time.perf_counter() - cropped)
        return Explained(result, crops)


def check_method(graph, method: str) -> None:
    """ModelError naming the graph and what it offers when it has no `method` heatmap."""
    if method != "none" and method not in graph.methods:
        reason = f" ({graph.info.cam_unavailable_reason})" if graph.info.cam_unavailable_reason else ""
        raise ModelError(f"{graph.path} has no {method!r} heatmap{reason}; "
                         f"it offers {', '.join(graph.methods) or 'none'}")


def explain_many(items) -> list[Explained]:
    """Explain several frames, each of its own stream, with ONE graph call per method in use
    for the crops of all of them (the browser server's batch: one call for every client's
    current frame). Each result equals `explainer.explain(frame, faces, controls, index, fps,
    stage_ms)` for its item; `explain` itself is unchanged.

    items: sequence of (explainer, frame, faces, controls, index, fps, stage_ms), the arguments
    of `explain` after its explainer; each explainer keeps its own smoother. Crops beyond the
    graph's batch range (32) go in further calls of at most 32. The explainers' timers, if
    any, get their `crop` and `classify` stages (the shared call's time, for each).
    """
    from camface.realtime.graph import MAX_BATCH

    start = time.perf_counter()
    prepared = []  # (crops, faces, class_index, dropped) per item
    for explainer, frame, faces, controls, *_ in items:
        dropped = max(0, len(faces) - explainer.max_faces)
        faces = tuple(faces[: explainer.max_faces])
        info = explainer.graph.info
        crops, faces = (crop_faces(frame, faces, explainer.margin, info.input_size, info.color_order)
                        if faces else (explainer._empty, ()))
        class_index = explainer._class_index(faces, controls) if faces else np.zeros(0, np.int64)
        prepared.append((crops, faces, class_index, dropped))
    cropped = time.perf_counter()
    outputs: list = [None] * len(prepared)  # (probs, heatmaps) per item with faces
    by_method: dict[tuple[int, str], list[int]] = {}  # one call per (graph, method)
    for i, (explainer, _, _, controls, *_) in enumerate(items):
        if prepared[i][1]:
            by_method.setdefault((id(explainer.graph), controls.method), []).append(i)
    for (_, method), members in by_method.items():
        graph = items[members[0]][0].graph
        sizes = [len(prepared[i][1]) for i in members]
        crops = np.concatenate([prepared[i][0] for i in members])
        class_index = np.concatenate([prepared[i][2] for i in members])
        parts = [graph.run(crops[s:s + MAX_BATCH], class_index[s:s + MAX_BATCH], method)
                 for s in range(0, len(crops), MAX_BATCH)]
        probs = np.concatenate([p for p, _ in parts])
        heatmaps = np.concatenate([h for _, h in parts])
        offsets = np.cumsum([0, *sizes])
        for i, a, b in zip(members, offsets[:-1], offsets[1:]):
            outputs[i] = (probs[a:b], heatmaps[a:b])
    classified = time.perf_counter()
    explained = []
    for (explainer, _, _, controls, index, fps, stage_ms), (crops, faces, class_index, dropped), output in zip(
            items, prepared, outputs):
        predictions: tuple[Prediction, ...] = ()
        if output is not None:
            probs, heatmaps = output
            predicted = probs.argmax(axis=1)
            predictions = tuple(
                Prediction(probs=probs[i], heatmap=heatmaps[i], predicted=int(predicted[i]),
                           explained=int(predicted[i]) if class_index[i] < 0 else int(class_index[i]),
                           method=controls.method)
                for i in range(len(faces)))
        info = explainer.graph.info
        result = FrameResult(index=index, faces=faces, predictions=predictions, dropped=dropped,
                             method=controls.method, explained_class=controls.explained_class,
                             labels=info.labels, fps=fps, stage_ms=stage_ms or {},
                             provider=explainer.graph.provider)
        if explainer.smoother is not None:
            result = explainer.smoother.update(result)
        if explainer.timer is not None:
            explainer.timer.add("crop", (cropped - start) / len(items))
            explainer.timer.add("classify", classified - cropped)
        explained.append(Explained(result, crops))
    return explained
