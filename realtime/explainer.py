"""Explain one frame: crop -> classify + explain (one graph call) -> smooth -> FrameResult.

`FrameExplainer` is the one per-frame piece every front end calls (the live loop, the bench's
sequential rows, and the browser and batch front ends): none of them re-implements a stage.
It owns the graph, the crop settings and the optional smoother (whose tracks are the only
state kept between frames: one explainer per video stream). Detection and drawing stay outside:
detection runs in its own threads, and drawing is `Renderer.annotate(frame, result)`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from camface.errors import ModelError
from camface.graph_spec import AUTO, auto_method, ranked_by
from camface.realtime.crop import crop_faces
from camface.realtime.results import Face, FrameResult, Prediction, is_saturated, predicted_classes
from camface.realtime.controls import Controls

log = logging.getLogger(__name__)

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

    @classmethod
    def from_config(cls, config, graph, timer=None) -> "FrameExplainer":
        """The explainer a LiveConfig asks for; checks that the graph has `config.method` (front
        ends first resolve "auto" with `check_method`, and pass the name it returns)."""
        check_method(graph, config.method)
        return cls(graph, config.margin, config.max_faces, config.smooth, timer)

    def warm_up(self, method: str) -> None:
        """Run the graph once on a blank crop: the first ONNX Runtime run allocates."""
        info = self.graph.info
        method = auto_method(info)[0] if method == AUTO else method
        self.graph.run(np.zeros((1, *info.input_size, info.channels), np.uint8), np.array([-1], np.int64), method)

    def _class_index(self, faces: tuple[Face, ...], controls: Controls) -> np.ndarray:
        """int64 [N]: the class to explain per face; -1 = the graph's prediction."""
        if controls.explained_class is not None:
            return np.full(len(faces), controls.explained_class, np.int64)
        if self.smoother is not None:  # explain what the smoothed label will say
            return self.smoother.explain_classes(faces)
        return np.full(len(faces), -1, np.int64)

    def explain(self, frame: np.ndarray, faces: tuple[Face, ...], controls: Controls, index: int = 0,
                fps: float = 0.0, stage_ms: dict | None = None, pace_fps: float = 0.0,
                cut: bool = False) -> Explained:
        """frame: uint8 BGR [H, W, 3], not modified. faces: the detector's faces, largest first.
        index: the frame's index in its run. fps / stage_ms / pace_fps: the caller's rolling
        figures, carried in the result for the HUD (see FrameResult). cut: the frame does not
        follow the one before (a looped source's new pass, a stream's first frame after a
        reconnection: `passes` grew), so smoothing starts over from it, as detection does."""
        if cut and self.smoother is not None:
            self.smoother.cut()
        start = time.perf_counter()
        info = self.graph.info
        controls = concrete(controls, info)
        faces, crops, dropped = crop_for_graph(frame, faces, self.margin, self.max_faces, info)
        cropped = time.perf_counter()
        class_index = self._class_index(faces, controls) if faces else np.zeros(0, np.int64)
        probs, heatmaps, similarity = (run_scores(self.graph, crops, class_index, controls.method) if faces else
                                       _no_scores(info))
        if self.timer is not None:
            self.timer.add("crop", cropped - start)
            self.timer.add("classify", time.perf_counter() - cropped)
        result = frame_result(index, faces, probs, heatmaps, class_index, dropped, controls.method,
                              controls.explained_class, info.labels, self.graph.provider,
                              fps=fps, stage_ms=stage_ms, pace_fps=pace_fps, similarity=similarity,
                              threshold=info.threshold, saturated_below=info.saturated_below)
        if self.smoother is not None:
            result = self.smoother.update(result)
        return Explained(result, crops)


def check_method(graph, method: str, *, api: bool = False) -> str:
    """The heatmap `method` asks for on `graph`, for a front end to use from then on: "auto" is
    the graph's top-ranked displayable method (`graph_spec.auto_method`), or Grad-CAM with one
    warning saying why on a graph without a ranking; any other name is returned as it is: one of
    the graph's methods, "none", or a registry heatmap the graph holds but does not offer for
    display (the "random" baseline). ModelError naming the graph and what it offers when it has
    no such heatmap. api: the messages name the option as `camface.load`'s keyword
    (`method='auto'`), not as the flag (`--method auto`)."""
    from camface.methods import METHODS
    from camface.realtime.config import option

    if method == AUTO:
        method, why = auto_method(graph.info)
        if why:
            log.warning("camface: %s shows %s on %s: %s; %s ranks the methods, %s picks one",
                        option("method", AUTO, api=api), method, graph.path.name, why,
                        ranked_by(graph.info), option("method", "NAME", api=api))
        else:
            log.info("camface: %s shows %s, the most faithful method of %s (`camface info` "
                     "shows the ranking)", option("method", AUTO, api=api), method, graph.path.name)
    if method != "none" and method not in graph.methods and not (method in METHODS and method in graph.info.heatmaps):
        reason = f" ({graph.info.cam_unavailable_reason})" if method == "cam" and graph.info.cam_unavailable_reason else ""
        raise ModelError(f"{graph.path} has no {method!r} heatmap{reason}; "
                         f"it offers {', '.join(graph.methods) or 'none'}")
    return method


def concrete(controls: Controls, info) -> Controls:
    """`controls` with method "auto" replaced by the graph's top-ranked method, silently (for
    callers of the Python API that pass "auto" per frame; front ends resolve it once with
    `check_method`, which says when it falls back)."""
    return replace(controls, method=auto_method(info)[0]) if controls.method == AUTO else controls


# ---------------------------------------------------------------- the steps, for batches across frames
# `FrameExplainer.explain` is three steps: `crop_for_graph`, the graph call and `frame_result`.
# `camface batch` runs them in separate Ray stages (cropping on the detection workers, the graph
# on crops of many frames in calls of up to 32 with `run_graph_across_frames`, the result per
# frame again), and `camface serve` through `explain_many` (one call for every client's frame).
# Without smoothing they give what `explain` gives. Smoothing keeps state from frame to frame and
# chooses the class to explain from it: `run_graph_smoothed` gets the same classes for a whole
# video in calls across frames (the class changes the heatmap, not the probabilities).


def largest_faces(faces, max_faces: int) -> tuple[tuple[Face, ...], int]:
    """(the first `max_faces` faces, how many are dropped): the detectors give faces largest
    first, so the largest are kept. Every front end that explains a frame's faces (live, serve,
    batch, guided on an image) keeps these."""
    kept = tuple(faces[:max_faces])
    return kept, len(faces) - len(kept)


def crop_for_graph(frame: np.ndarray, faces: tuple[Face, ...], margin: float, max_faces: int,
                   info) -> tuple[tuple[Face, ...], np.ndarray, int]:
    """`explain`'s crop step: (faces kept, crops uint8 [N, H, W, C] in the graph's colour
    order, faces dropped beyond `max_faces`). frame: uint8 BGR [H, W, 3], not modified.
    info: the graph's GraphInfo."""
    faces, dropped = largest_faces(faces, max_faces)
    if not faces:
        return (), np.zeros((0, *info.input_size, info.channels), np.uint8), dropped
    crops, faces = crop_faces(frame, faces, margin, info.input_size, info.color_order)
    return tuple(faces), crops, dropped


def run_scores(graph, crops: np.ndarray, class_index: np.ndarray, method: str):
    """(probs, heatmaps, similarity) of one graph call: `CamGraph.run_scores` on a gallery graph,
    else `run` with similarity float32 [N, 0] (so that graphs wrapped by a front end need `run` only).

    A crop asked for its predicted class (-1) whose highest probability several classes share
    (a saturated sigmoid: logits 20 and 30 both give 1.0 in float32) is explained again for the
    first of them, the class every result names as predicted: the graph explains the argmax of
    its logits, which may be another of the tied classes."""
    probs, heatmaps, similarity = _run_once(graph, crops, class_index, method)
    if method == "none" or not len(probs):
        return probs, heatmaps, similarity
    top = probs.max(axis=1, keepdims=True)
    tied = np.flatnonzero((class_index < 0) & ((probs == top).sum(axis=1) > 1))
    if len(tied):
        predicted = predicted_classes(probs[tied])
        heatmaps = heatmaps.copy()
        heatmaps[tied] = _run_once(graph, crops[tied], predicted, method)[1]
    return probs, heatmaps, similarity


def _run_once(graph, crops: np.ndarray, class_index: np.ndarray, method: str):
    if getattr(graph.info, "gallery", None):
        return graph.run_scores(crops, class_index, method)
    probs, heatmaps = graph.run(crops, class_index, method)
    return probs, heatmaps, np.zeros((len(crops), 0), np.float32)


def _no_scores(info) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.zeros((0, len(info.labels)), np.float32), np.zeros((0, 0, 0), np.float32),
            np.zeros((0, len(info.labels) if getattr(info, "gallery", None) else 0), np.float32))


def run_graph_scores(graph, crops: np.ndarray, class_index: np.ndarray, method: str,
                     max_batch: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The graph on crops of many frames: uint8 [N, H, W, C] (any N >= 0), class_index int64
    [N] (-1: the predicted class), in calls of at most `max_batch` crops (the contract's batch
    range is 1..32). Returns probs float32 [N, classes], heatmaps float32 [N, h, w] ([N, 0, 0]
    for method "none"), similarity float32 [N, identities] of a gallery graph ([N, 0] otherwise)
    and the number of graph calls made."""
    probs, heatmaps, similarity, calls = [], [], [], 0
    for start in range(0, len(crops), max_batch):
        p, h, s = run_scores(graph, crops[start:start + max_batch], class_index[start:start + max_batch], method)
        probs.append(p)
        heatmaps.append(h)
        similarity.append(s)
        calls += 1
    if not calls:
        return (*_no_scores(graph.info), 0)
    return np.concatenate(probs), np.concatenate(heatmaps), np.concatenate(similarity), calls


def run_graph_across_frames(graph, crops: np.ndarray, class_index: np.ndarray, method: str,
                            max_batch: int = 32) -> tuple[np.ndarray, np.ndarray, int]:
    """`run_graph_scores` without the similarities: (probs, heatmaps, graph calls)."""
    probs, heatmaps, _, calls = run_graph_scores(graph, crops, class_index, method, max_batch)
    return probs, heatmaps, calls


def run_graph_smoothed(graph, crops: np.ndarray, faces_per_frame, method: str, smooth: float,
                       max_batch: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The graph on a whole video's crops, giving what `FrameExplainer(smooth=smooth)` gives
    frame by frame: with smoothing, the class explained for a face is its track's smoothed
    class (`Smoother.explain_classes`), known only after the frames before it. The class does
    not change the probabilities (the forward pass), so: (1) every crop with its predicted
    class, in calls across frames; (2) the smoother run over the frames' probabilities gives
    each face's class, exactly as live; (3) the faces whose class is not their predicted one
    again, with that class. crops: uint8 [N, H, W, C], the crops of `faces_per_frame` (a
    sequence of face tuples, one per frame, in order). Returns (probs, heatmaps, class_index,
    graph calls) as `run_graph_across_frames`; run `Smoother(smooth).update` over the frames'
    `frame_result`s to get the live results. Returns (probs, heatmaps, similarity, class_index,
    graph calls), the similarities as `run_graph_scores`."""
    from camface.realtime.smooth import Smoother

    class_index = np.full(len(crops), -1, np.int64)
    probs, heatmaps, similarity, calls = run_graph_scores(graph, crops, class_index, method, max_batch)
    if not len(crops):
        return probs, heatmaps, similarity, class_index, calls
    smoother, start = Smoother(smooth), 0
    for index, faces in enumerate(faces_per_frame):
        stop = start + len(faces)
        if faces:
            class_index[start:stop] = smoother.explain_classes(tuple(faces))
        smoother.update(frame_result(index, tuple(faces), probs[start:stop], heatmaps[start:stop],
                                     class_index[start:stop], 0, method, None, graph.info.labels, "",
                                     similarity=similarity[start:stop]))
        start = stop
    redo = np.flatnonzero((class_index >= 0) & (class_index != predicted_classes(probs)))
    if len(redo) and method != "none":  # "none": no heatmap to redo, only the classes to say
        _, again, more = run_graph_across_frames(graph, crops[redo], class_index[redo], method, max_batch)
        heatmaps[redo] = again
        calls += more
    return probs, heatmaps, similarity, class_index, calls


def frame_result(index: int, faces: tuple[Face, ...], probs: np.ndarray, heatmaps: np.ndarray,
                 class_index: np.ndarray, dropped: int, method: str, explained_class: int | None,
                 labels: tuple[str, ...], provider: str, *, fps: float = 0.0, stage_ms: dict | None = None,
                 pace_fps: float = 0.0, similarity: np.ndarray | None = None,
                 threshold: float | None = None, saturated_below: float | None = None) -> FrameResult:
    """`explain`'s result step for one frame: probs float32 [N, classes] and heatmaps float32
    [N, h, w] of its N faces (rows of `run_graph_across_frames`), class_index int64 [N] as
    given to the graph; fps / stage_ms / pace_fps: the caller's HUD figures (see FrameResult);
    similarity float32 [N, identities], threshold and saturated_below: a gallery graph's
    (`run_graph_scores`, `GraphInfo.threshold`, `GraphInfo.saturated_below`), None for a
    classifier's."""
    predicted = predicted_classes(probs) if len(faces) else np.zeros(0, np.int64)
    empty = np.zeros(0, np.float32)
    explained = [int(predicted[i]) if class_index[i] < 0 else int(class_index[i]) for i in range(len(faces))]
    similarities = [empty if similarity is None or not similarity.size else similarity[i] for i in range(len(faces))]
    predictions = tuple(
        Prediction(probs=probs[i], heatmap=heatmaps[i], predicted=int(predicted[i]), explained=explained[i],
                   method=method, similarity=similarities[i],
                   saturated=bool(heatmaps[i].size) and is_saturated(similarities[i], explained[i], saturated_below))
        for i in range(len(faces)))
    return FrameResult(index=index, faces=faces, predictions=predictions, dropped=dropped, method=method,
                       explained_class=explained_class, labels=labels, fps=fps, stage_ms=stage_ms or {},
                       provider=provider, pace_fps=pace_fps, threshold=threshold)


def explain_many(items, *, item_errors: bool = False) -> list:
    """Explain several frames, each of its own stream, with ONE graph call per method in use
    for the crops of all of them (`camface serve`'s batch: one call for every client's current
    frame). Each result equals `explainer.explain(frame, faces, controls, index, fps, stage_ms)`
    for its item, smoothing included (each explainer keeps its own smoother, which chooses its
    class to explain before the call); built from the three steps above.

    items: sequence of (explainer, frame, faces, controls, index, fps, stage_ms), the arguments
    of `explain` after its explainer. Crops beyond the graph's batch range go in further calls
    of at most 32. The explainers' timers, if any, get `crop` and `classify` (the shared call's
    time, for each).

    Every step shared by the items (cropping, the graph calls) runs before any smoother is
    updated: when one raises, no stream's smoothing has seen the frame and the items can be
    retried (e.g. one by one). item_errors: an item whose own last steps (its result, its
    smoother's update) raise gets that exception in place of its Explained, and the items after
    it go on (without it, the exception is raised, after the items before it were smoothed).
    """
    start = time.perf_counter()
    items = [(explainer, frame, faces, concrete(controls, explainer.graph.info), *rest)
             for explainer, frame, faces, controls, *rest in items]
    prepared = []  # (faces kept, crops, dropped, class_index) per item
    for explainer, frame, faces, controls, *_ in items:
        kept, crops, dropped = crop_for_graph(frame, faces, explainer.margin, explainer.max_faces,
                                              explainer.graph.info)
        class_index = explainer._class_index(kept, controls) if kept else np.zeros(0, np.int64)
        prepared.append((kept, crops, dropped, class_index))
    cropped = time.perf_counter()
    rows: list = [None] * len(items)  # (probs, heatmaps, similarity) per item with faces
    groups: dict[tuple[int, str], list[int]] = {}  # one call per (graph, method)
    for i, (explainer, _, _, controls, *_) in enumerate(items):
        if prepared[i][0]:
            groups.setdefault((id(explainer.graph), controls.method), []).append(i)
    for (_, method), members in groups.items():
        probs, heatmaps, similarity, _ = run_graph_scores(items[members[0]][0].graph,
                                                          np.concatenate([prepared[i][1] for i in members]),
                                                          np.concatenate([prepared[i][3] for i in members]), method)
        offsets = np.cumsum([0, *(len(prepared[i][0]) for i in members)])
        for i, a, b in zip(members, offsets[:-1], offsets[1:]):
            rows[i] = (probs[a:b], heatmaps[a:b], similarity[a:b])
    classified = time.perf_counter()
    explained = []
    for (explainer, _, _, controls, index, fps, stage_ms), (kept, crops, dropped, class_index), row in zip(
            items, prepared, rows):
        graph = explainer.graph
        try:
            probs, heatmaps, similarity = row if row is not None else _no_scores(graph.info)
            result = frame_result(index, kept, probs, heatmaps, class_index, dropped, controls.method,
                                  controls.explained_class, graph.info.labels, graph.provider, fps=fps,
                                  stage_ms=stage_ms, similarity=similarity, threshold=graph.info.threshold,
                                  saturated_below=graph.info.saturated_below)
            if explainer.timer is not None:
                explainer.timer.add("crop", (cropped - start) / len(items))
                explainer.timer.add("classify", classified - cropped)
            if explainer.smoother is not None:
                result = explainer.smoother.update(result)
        except Exception as exc:
            if not item_errors:
                raise
            explained.append(exc)
            continue
        explained.append(Explained(result, crops))
    return explained
