"""camface from Python: `camface.load()` opens the one pipeline every front end uses.

    import camface
    with camface.load() as cam:                      # bundled emotion graph, LiveConfig's defaults
        result = cam.explain(frame)                  # uint8 BGR [H, W, 3] -> FrameResult
        picture = cam.annotate(frame, result)        # a new uint8 BGR picture with the overlay
        for result, frame in cam.process_video("talk.mp4"): ...
        maps = cam.explain_crops(crops, method="hirescam")   # crops in the graph's input format

`load` builds a `LiveConfig` (any field a pipeline uses as a keyword; `camface live`'s own,
LIVE_ONLY, are refused), loads the CAM graph and the renderer; the face detector opens on the
first frame. The same function opens the pipeline of `camface live`, `bench`, `serve`, `batch`
and `evaluate`, so the default model
(`model_path`), the detector (`face_detector`) and the renderer are each chosen here once.

Top-level imports stay light (numpy and camface's own light modules): heavy ones (onnxruntime,
mediapipe, cv2) load when a pipeline is opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from camface.errors import UsageError
from camface.realtime.config import LiveConfig, check, option
from camface.realtime.frames import check_frame, refuse_masked
from camface.realtime.results import FrameResult, Prediction, is_saturated, predicted_classes

if TYPE_CHECKING:
    from camface.realtime.blazeface import OnnxFaceDetector
    from camface.realtime.detect import FaceDetector
    from camface.realtime.explainer import FrameExplainer
    from camface.realtime.graph import CamGraph
    from camface.realtime.render import Renderer

__all__ = ["Picture", "Pipeline", "face_detector", "load", "model_path"]

# LiveConfig fields that only `camface live` reads (its source, window, recording, snapshots and
# pacing): a pipeline never uses them, so `load` refuses them as keywords rather than ignore them
LIVE_ONLY = ("source", "record", "show", "snapshot_every", "snapshot_dir", "overwrite", "progress", "pace",
             "image_seconds", "loop", "codec")


def model_path(config: LiveConfig) -> Path:
    """The CAM graph a config asks for: `config.model`, or the bundled emotion graph."""
    from camface.models import EMOTION_ONNX

    return Path(config.model) if config.model is not None else EMOTION_ONNX


def face_detector(config: LiveConfig) -> FaceDetector | OnnxFaceDetector:
    """The face detector a config asks for (BlazeFace `config.detector` on
    `config.detector_runtime`, `min_confidence`), not yet opened: use it as a context manager.
    Both runtimes give the same boxes (tests/test_blazeface.py)."""
    if config.detector_runtime == "onnx":
        from camface.models import DETECTORS_ONNX
        from camface.realtime.blazeface import OnnxFaceDetector

        return OnnxFaceDetector(DETECTORS_ONNX[config.detector], config.min_confidence, config.quiet_native)
    from camface.models import DETECTORS
    from camface.realtime.detect import FaceDetector

    return FaceDetector(DETECTORS[config.detector], config.min_confidence, config.quiet_native)


class Picture(np.ndarray):
    """A uint8 BGR image [H, W, 3] (an ordinary numpy array) that Jupyter shows as a PNG.
    What is computed from it (`picture.max()`, `picture.mean(axis=2)`) is a plain array or
    number, and only a uint8 [H, W, 3] picture shows as one."""

    def __array_wrap__(self, array, context=None, return_scalar=False):
        if array.shape != self.shape or array.dtype != self.dtype:  # a reduction or a new dtype: numbers
            array = array.view(np.ndarray)
            return array[()] if return_scalar else array
        if return_scalar:  # numpy 2 only; numpy 1.26's __array_wrap__ takes two arguments
            return super().__array_wrap__(array, context, return_scalar)
        return super().__array_wrap__(array, context)

    def _repr_png_(self) -> bytes | None:
        import cv2

        if self.dtype != np.uint8 or self.ndim != 3 or self.shape[2] != 3 or not self.size:
            return None  # Jupyter shows its text instead (a float view, one channel, a pixel)
        ok, data = cv2.imencode(".png", np.asarray(self))
        if not ok:
            raise ValueError(f"cannot encode an image of shape {self.shape} as PNG")
        return data.tobytes()


def load(model: str | os.PathLike[str] | None = None, *, config: LiveConfig | None = None, timer: Any = None,
         cli: bool = False, **options: Any) -> Pipeline:
    """Open a pipeline: the CAM graph `model` (default: `config.model`, else the bundled emotion
    graph) with `config` (default: `LiveConfig()`) changed by `options`, any LiveConfig field a
    pipeline uses: method, device ("auto", "cpu", "cuda", "tensorrt"), detector, min_confidence,
    max_faces, margin, smooth, colormap, alpha, graph_threads, max_frames, detect_every, ...
    (not `camface live`'s own, LIVE_ONLY: UsageError; nor a `config` with one of them changed
    from its default, which the pipeline would ignore, unless `cli`). A numpy scalar is taken as the Python
    value it holds (`max_faces=np.int64(3)` is 3, `cam_boxes=np.True_` is True).

    timer: a StageTimer that gets the `crop` and `classify` stages (front ends that time them).
    cli: messages name options as the command line's flags (`--method auto`), for camface's own
    front ends; by default as this function's keywords (`method='auto'`).
    Raises UsageError for an unknown option or a bad value, ModelError for a missing or broken
    graph, or a method the graph does not offer. Use the pipeline as a context manager (or call
    `close()`): it holds a MediaPipe detector and ONNX Runtime sessions.
    """
    if model is not None:
        if not isinstance(model, (str, os.PathLike)):
            raise UsageError(f"model must be a path (str or os.PathLike), got {type(model).__name__}")
        if os.fspath(model) == "":  # Path("") is ".": "'.' is a folder, not a CAM graph"
            raise UsageError("model is empty; give the path of a CAM graph (.onnx), or None for the bundled one")
        options["model"] = Path(model)
    if config is not None and not isinstance(config, LiveConfig):
        raise UsageError(f"config must be a LiveConfig (or None; options go as keywords), got {type(config).__name__}")
    if timer is not None and not (callable(getattr(timer, "add", None)) and callable(getattr(timer, "stage", None))):
        raise UsageError(f"timer must be a camface.realtime.timing.StageTimer (or None), got {type(timer).__name__}")
    # numpy scalars (np.int64(2), np.True_ from a comparison) as the Python numbers they hold:
    # detect_every=np.int64(2) and cam_boxes=np.True_ were refused, and accepted ones stayed numpy
    options = {name: value.item() if isinstance(value, np.generic) else value for name, value in options.items()}
    fields = {f.name for f in dataclasses.fields(LiveConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UsageError(f"unknown option {', '.join(unknown)}; LiveConfig has {', '.join(sorted(fields))}")
    unused = [f"option {name}" for name in LIVE_ONLY if name in options]
    if config is not None and not cli:  # the front ends' configs hold live's own fields: they read them
        default = LiveConfig()
        unused += [f"config's {option(name, getattr(config, name), api=True)}" for name in LIVE_ONLY
                   if name not in options and getattr(config, name) != getattr(default, name)]
    if unused:
        raise UsageError(f"{', '.join(unused)} is `camface live`'s (its source, window, recording, snapshots, "
                         "pacing): a pipeline does not use it; give process_video the source, and write "
                         "`annotate`'s pictures yourself (cv2.VideoWriter, cv2.imwrite)")
    config = config or LiveConfig()
    # LiveConfig's checks, naming the option as the caller spelled it (`replace` would name the flag)
    check({**{f: getattr(config, f) for f in fields}, **options}, api=not cli)
    return Pipeline(config.replace(**options), timer, api=not cli)


class Pipeline:
    """Detect faces -> crop -> ONE CAM-graph call -> FrameResult, and the live overlay.

    Attributes: config (LiveConfig), model_path, graph (CamGraph: `info`, `methods`, `provider`),
    explainer (FrameExplainer: its smoother's tracks are this pipeline's stream), renderer.
    Build it with `camface.load()`. Successive `explain` calls are one stream (frame index,
    smoothing tracks): calls from several threads are taken one at a time (a lock), so they still
    make one stream, each frame with its own index; threads that should explain frames side by
    side, or as separate streams, each load their own.
    """

    def __init__(self, config: LiveConfig, timer: Any = None, api: bool = True):
        from camface.errors import ModelError
        from camface.graph_spec import one_class
        from camface.realtime.explainer import FrameExplainer
        from camface.realtime.graph import CamGraph
        from camface.realtime.render import Renderer

        self.model_path = model_path(config)
        self._stack = contextlib.ExitStack()
        # a pipeline dropped or left open at exit closes its detector too (not left to module
        # teardown, where MediaPipe's own __del__ printed a TypeError traceback)
        self._release = weakref.finalize(self, self._stack.close)
        self._detector: FaceDetector | OnnxFaceDetector | None = None
        self._closed = False
        self._index = 0
        self._lock = threading.Lock()  # explain: the frame index, the smoother and the detector
        self._api = api  # messages name options as `load`'s keywords (else as flags)
        self._graph: CamGraph | None = CamGraph(self.model_path, config.device, threads=config.graph_threads)
        if (why := one_class(len(self._graph.info.labels), bool(self._graph.info.gallery))) is not None:
            raise ModelError(f"{self.model_path}: {why}")  # made by an older camface export
        # "auto" -> the graph's top-ranked method (said once), here for every front end
        self._auto: str | None = None  # what "auto" resolved to, kept so that it is said once per model
        self.config = config = config.replace(method=self._resolve(config.method))
        self._explainer: FrameExplainer | None = FrameExplainer.from_config(config, self._graph, timer)
        self._explainer.warm_up(config.method)
        self.renderer: Renderer = Renderer.from_config(config, api)

    # ---------------------------------------------------------------- resources

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle and copy refuse: a pickled pipeline was ONNX Runtime's 'cannot pickle
        InferenceSession', and a copy shared the original's detector, so closing the copy closed
        it under the original (a RuntimeError traceback at its next frame)."""
        raise TypeError("a camface Pipeline cannot be pickled or copied (it holds ONNX Runtime sessions and a "
                        "face detector): call camface.load() in each process or thread that needs one")

    def close(self) -> None:
        """Close the face detector and release the graph's sessions (idempotent); waits for an
        `explain` running in another thread (its detector was closed under it). A detector
        whose close raises: the graph is released all the same, then CamfaceError naming the
        detector (from the error)."""
        from camface.errors import CamfaceError

        with self._lock:
            self._closed = True
            try:
                self._release()  # the ExitStack's close, once
            except Exception as exc:
                raise CamfaceError(f"closing the camface pipeline's face detector ({self.config.detector}) failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
            finally:
                self._detector = self._graph = self._explainer = None

    @property
    def graph(self) -> CamGraph:
        if self._graph is None:
            raise UsageError("this camface pipeline is closed")
        return self._graph

    @property
    def explainer(self) -> FrameExplainer:
        if self._explainer is None:
            raise UsageError("this camface pipeline is closed")
        return self._explainer

    @property
    def labels(self) -> tuple[str, ...]:
        """The graph's class names."""
        return self.graph.info.labels

    @property
    def methods(self) -> tuple[str, ...]:
        """The heatmap methods the graph offers."""
        return self.graph.methods

    def face_detector(self) -> FaceDetector | OnnxFaceDetector:
        """A new face detector as the config asks (not yet opened; one per stream of frames)."""
        self._check_open()
        return face_detector(self.config)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this camface pipeline is closed")

    def _detect(self, frame: np.ndarray) -> tuple:
        self._check_open()
        if self._detector is None:
            detector = self.face_detector()
            self._stack.enter_context(detector)  # either runtime's __enter__ returns the detector itself
            self._detector = detector
        return self._detector.detect(frame)

    def _heatmap(self, method: Any) -> str:
        """A call's `method` (None: the config's) as the heatmap to run (`_resolve`)."""
        return self._resolve(_method(method, self.config.method))

    def _resolve(self, method: str) -> str:
        """`check_method`, with "auto" resolved and its choice logged once per pipeline (a call
        per frame with method="auto" said it every time)."""
        from camface.realtime.explainer import AUTO, check_method

        if method != AUTO:
            return check_method(self.graph, method, api=self._api)
        if self._auto is None:
            self._auto = check_method(self.graph, AUTO, api=self._api)
        return self._auto

    # ---------------------------------------------------------------- the verbs

    def explain(self, frame: np.ndarray, *, method: str | None = None,
                explained_class: int | np.integer | None = None) -> FrameResult:
        """Faces, probabilities and heatmaps of one frame, as `camface live` computes them.

        frame: uint8 BGR [H, W, 3] (as OpenCV reads it), not modified; faces are detected in every
        frame given (`process_video` carries them between key frames, as live). method: heatmap to
        compute (default: the config's): one of `methods`, "auto", "none", or "random" (the
        faithfulness baseline, which exported graphs hold but do not offer for display).
        explained_class: class every heatmap explains (default: each face's predicted class).
        Successive calls are one stream (frame index, smoothing tracks), from any thread (see
        `Pipeline`). Raises UsageError for a bad frame, ModelError for an absent method.
        """
        from camface.realtime.controls import Controls

        frame = check_frame(frame)
        if explained_class is not None:
            explained_class = int(_class_indices(explained_class, None, len(self.labels), "explained_class")[0])
        controls = Controls(method=self._heatmap(method),
                            explained_class=explained_class)
        with self._lock:  # one stream: two threads read the same index and raced the smoother's tracks
            result = self.explainer.explain(frame, self._detect(frame), controls, self._index).result
            self._index += 1
        return result

    def annotate(self, frame: np.ndarray, result: FrameResult, *, hud: bool = False) -> Picture:
        """A NEW uint8 BGR picture: `frame` with the live overlay of `result` (heatmaps over the
        face boxes, boxes and labels; the HUD with `hud`). `frame` is not modified; it must be the
        frame `result` was explained from (UsageError when a face box lies outside it)."""
        self._check_open()
        if not isinstance(result, FrameResult):
            raise UsageError(f"result must be the FrameResult of `explain` or `process_video`, got {type(result).__name__}")
        if not isinstance(hud, (bool, np.bool_)):  # hud="no" drew the HUD (a non-empty string is true)
            raise UsageError(f"hud must be True or False, got {hud!r}")
        picture = check_frame(frame).copy()
        height, width = picture.shape[:2]
        for i, face in enumerate(result.faces):
            if (why := _unfit(face, result.predictions[i] if result.predictions else None)) is not None:
                raise UsageError(f"result's face {i} cannot be drawn: {why}")  # a FrameResult built by hand
        outside = [face.box for face in result.faces if face.box[0] < 0 or face.box[1] < 0
                   or face.box[0] + face.box[2] > width or face.box[1] + face.box[3] > height]
        if outside:  # a result of another frame: its overlay was drawn cut off, or not at all
            raise UsageError(f"result's face box {outside[0]} (x, y, w, h) lies outside this {width}x{height} "
                             "frame: annotate the frame the result was explained from")
        self.renderer.annotate(picture, result, hud)
        return picture.view(Picture)

    def process_video(self, source: str | int | os.PathLike[str] | Any,
                      max_frames: int | None = None) -> Iterator[tuple[FrameResult, np.ndarray]]:
        """(result, frame) for each frame of `source`: a video file, a folder of images, a
        camera index, a stream URL, "sample" (a Path is a file or folder, Path("sample") too), or an
        un-entered camface source object. frame:
        uint8 BGR [H, W, 3] as the source gave it (not annotated). A stream of its own: frame
        indices from 0, fresh smoothing tracks, its own detector carrying boxes between key frames
        as `camface live` does (`detect_every`), so the results are live's. The source is closed
        when the loop ends or breaks. max_frames: at most this many frames (default: the
        pipeline's `max_frames`, as `load(max_frames=N)` set it; None there: every frame). A bad
        `source` type or `max_frames`, or a closed pipeline,
        is a UsageError at once, as a path that does not exist is a SourceError; a file that
        will not open (or a camera, a stream) fails at the first frame, a source object's frame that
        is not uint8 BGR [H, W, 3] when it comes; closing the pipeline while iterating ends the
        iteration with one.
        """
        import numbers

        from camface.realtime.sources import is_camera_index, make_source

        self._check_open()
        if max_frames is not None and (not isinstance(max_frames, numbers.Integral)  # np.int64 too, as load's
                                       or isinstance(max_frames, bool) or max_frames < 1):
            raise UsageError(f"max_frames must be an integer >= 1 (or None), got {max_frames!r}")
        if max_frames is None:
            max_frames = self.config.max_frames  # LiveConfig's --max-frames, as live stops there
        opened: Any  # a camface Source, or the caller's source object
        if isinstance(source, os.PathLike):
            spec = os.fspath(source)
            # a path, never the bundled clip or a camera (Path("./0") is "0", as `--source 0`)
            opened = make_source(os.path.join(os.curdir, spec) if spec == "sample" or is_camera_index(spec) else spec,
                                 api=self._api)
        elif isinstance(source, str):
            opened = make_source(source, api=self._api)
        elif isinstance(source, numbers.Integral) and not isinstance(source, (bool, np.bool_)):  # np.int64 too
            opened = make_source(str(int(source)), api=self._api)
        elif all(callable(getattr(source, name, None)) for name in ("__enter__", "__exit__", "__iter__")):
            opened = source
        else:
            raise UsageError(f"source must be a video file, a folder of images, a camera index, a stream URL, "
                             f"'sample' or a camface source object; got {type(source).__name__}")
        return self._frames_of(opened, max_frames)

    def _frames_of(self, opened, max_frames: int | None) -> Iterator[tuple[FrameResult, np.ndarray]]:
        import itertools
        import sys

        from camface.realtime.carry import BoxCarrier, every_for
        from camface.realtime.controls import Controls
        from camface.realtime.explainer import FrameExplainer

        explainer = FrameExplainer.from_config(self.config, self.graph)
        controls = Controls(method=self.config.method)
        with opened, self.face_detector() as detector:
            still = bool(getattr(getattr(opened, "info", None), "still", False))  # a user's object may have no info
            carrier = BoxCarrier(detector, every_for(self.config.detect_every, still, self.config.detect_workers))
            passes = getattr(opened, "passes", 0)  # a LoopingSource's passes, a LiveSource's reconnections
            # beyond sys.maxsize (more than any source holds): every frame; islice raised a ValueError
            stop = None if max_frames is None or max_frames > sys.maxsize else int(max_frames)
            for index, frame in enumerate(itertools.islice(opened, stop)):  # no frame read beyond
                self._check_open()  # closed while the caller iterates
                frame = check_frame(frame, f"frame {index} of {type(opened).__name__}")  # a user's source object
                now = getattr(opened, "passes", 0)
                cut, passes = now != passes, now  # a new pass or reconnection: detected and smoothed afresh, as live does
                yield explainer.explain(frame, carrier.detect(frame, index, cut), controls, index, cut=cut).result, frame

    def explain_crops(self, crops: np.ndarray, *, method: str | None = None,
                      class_index: int | np.integer | Sequence[int] | np.ndarray | None = None
                      ) -> tuple[Prediction, ...]:
        """Probabilities and heatmaps of face crops, no detection: crops uint8 [N, H, W, C] in
        the graph's input format (`graph.info`: input_size, color_order; C = 1 for GRAY).
        method: as `explain`'s. class_index: class to explain, one for all or N of them (a list
        or int [N]); default each crop's predicted class. Any N >= 0 (the graph is called on at
        most 32 at a time). On a gallery graph each Prediction carries its `similarity`; name it with
        `prediction.label(pipeline.labels, pipeline.graph.info.threshold)` (`unknown (best: ...)`)."""
        from camface.realtime.explainer import run_graph_scores

        info = self.graph.info
        expected = (*info.input_size, info.channels)
        if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8 or crops.ndim != 4 \
                or crops.shape[1:] != expected:
            got = (f"{crops.dtype} {crops.shape}" if isinstance(crops, np.ndarray) else  # not 'list None'
                   f"{type(crops).__name__} (a numpy array: np.stack(crops))" if isinstance(crops, (list, tuple))
                   else type(crops).__name__)
            raise UsageError(f"crops must be uint8 [N, {expected[0]}, {expected[1]}, {expected[2]}] "
                             f"({info.color_order}), got {got}")
        refuse_masked(crops, "crops")  # its mask was dropped without a word, as a frame's
        method = self._heatmap(method)
        wanted = (np.full(len(crops), -1, np.int64) if class_index is None else
                  _class_indices(class_index, len(crops), len(info.labels), "class_index", allow_predicted=True))
        probs, heatmaps, similarity, _ = run_graph_scores(self.graph, np.ascontiguousarray(crops),
                                                          np.ascontiguousarray(wanted), method)
        predicted = predicted_classes(probs)
        explained = [int(predicted[i] if wanted[i] < 0 else wanted[i]) for i in range(len(crops))]
        return tuple(Prediction(probs=probs[i], heatmap=heatmaps[i], predicted=int(predicted[i]),
                                explained=explained[i], method=method, similarity=similarity[i],
                                saturated=bool(heatmaps[i].size)
                                and is_saturated(similarity[i], explained[i], info.saturated_below))
                     for i in range(len(crops)))


def _unfit(face: Any, prediction: Any) -> str | None:
    """What keeps the renderer from drawing a hand-built face and its prediction (None: a face
    without one), as a phrase (it raised an IndexError, a numpy ValueError or TypeError), or None: box and crop_box 4 integers, a
    heatmap (when there is one) that spans a crop square holding the box, probs finite [classes]
    and predicted / explained classes among them. `explain`'s results always fit."""
    import numbers

    boxes = (face.box, face.crop_box)
    if not all(isinstance(box, (tuple, list)) and len(box) == 4 and all(isinstance(v, numbers.Integral) for v in box)
               for box in boxes):
        return f"box {face.box} and crop_box {face.crop_box} must be 4 integers (x, y, w, h)"
    if face.box[2] < 1 or face.box[3] < 1:
        return f"box {face.box} is empty"
    if prediction is None:  # a face with no prediction: only its box is drawn
        return None
    heatmap, probs = prediction.heatmap, prediction.probs
    if not isinstance(heatmap, np.ndarray) or heatmap.ndim != 2:
        return f"heatmap must be a 2-D numpy array, got {type(heatmap).__name__} {np.shape(heatmap)}"
    (x, y, w, h), (cx, cy, side, _) = boxes
    if heatmap.size and not (side >= 1 and cx <= x and cy <= y and x + w <= cx + side and y + h <= cy + side):
        return f"its heatmap spans crop_box {face.crop_box}, which must be a square holding box {face.box}"
    if not isinstance(probs, np.ndarray) or probs.ndim != 1 or not np.isfinite(probs).all():
        return f"probs must be finite numbers, one per class, got {np.shape(probs)}"
    for name in ("predicted", "explained"):
        value = getattr(prediction, name)
        if not isinstance(value, numbers.Integral) or not 0 <= int(value) < len(probs):
            return f"{name} {value!r} is not a class index 0..{len(probs) - 1}"
    return None


def _method(method: Any, default: str) -> str:
    """A call's `method` argument: None for the config's, else a heatmap name (or "auto", "none")."""
    if method is None:
        return default
    if not isinstance(method, str) or not method:
        raise UsageError(f"method must be a heatmap name (str), got {method!r}")
    return method


def _class_indices(value: Any, count: int | None, classes: int, name: str, allow_predicted: bool = False) -> np.ndarray:
    """int64 [count]: one class index for all, or one per item; count None: int64 [1], of one
    integer only (`explain`'s class for every face: a list [3] was taken as 3). UsageError
    naming `name` for a non-integer, a wrong length or a class outside 0..classes-1 (-1 also,
    the predicted class, with `allow_predicted`)."""
    import numbers

    size = 1 if count is None else count
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        indices = np.full(size, int(value) if -2 ** 62 < int(value) < 2 ** 62 else classes, np.int64)
    else:
        try:
            array = np.asarray(value)
        except (ValueError, TypeError):  # a ragged list: numpy's "inhomogeneous shape" traceback
            array = np.asarray(None)
        if array.shape == (0,) and array.dtype.kind == "f":  # [] or (): numpy makes them float64
            array = array.astype(np.int64)
        if array.dtype.kind not in "iu" or array.ndim > (0 if count is None else 1) \
                or (array.ndim == 1 and len(array) != count):
            what = ("an integer" if count is None else "an integer or a list of one" if count == 1
                    else f"an integer or {count} integers")  # not "1 integers"
            how = (f" (a class index: pipeline.labels.index({value!r}))"  # a name; "1" is said as it is
                   if isinstance(value, str) and not value.strip().lstrip("+-").isdigit() else
                   " (one class for every face; explain_crops takes one per crop)" if count is None and array.ndim
                   else "")
            raise UsageError(f"{name} must be {what}, got {value!r}{how}")
        # out of range beyond int64 (uint64) becomes `classes`, not a wrapped (maybe -1) index
        indices = np.broadcast_to(np.where(array >= classes, classes, array).astype(np.int64), (size,))
    lowest = -1 if allow_predicted else 0
    if ((indices < lowest) | (indices >= classes)).any():
        predicted = " or -1 (the predicted class)" if allow_predicted else ""
        raise UsageError(f"{name} {value!r} out of range 0..{classes - 1}{predicted}")
    return indices
