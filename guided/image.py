"""Plain images as input of `camface guided`: faces found and cropped with the live loop's code.

Detection is `camface.realtime.detect.FaceDetector` (MediaPipe BlazeFace, bundled models) and
cropping is `camface.realtime.crop.crop_faces` (square, margin, padded at the edges), so a crop
here is the crop the live loop would feed the CAM graph for the same frame.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from camface.errors import ModelError, SourceError
from camface.guided.snapshot import (EMOTION_PREPROCESSING, FaceCrop, GuidedInput, Preprocessing,
                                     read_graph_metadata)
from camface.hashing import sha256_file
from camface.outputs import check_model_file

log = logging.getLogger(__name__)


def image_model(model_override: str | Path | None) -> tuple[Path, Preprocessing | None,
                                                              tuple[str, ...], str]:
    """Keras model, preprocessing, labels and target layer for a plain image.

    Default: the bundled emotion model. Preprocessing, labels and target layer come from an
    exported CAM graph made from that exact file (same sha256): `MODEL.onnx` beside it, or the
    bundled graph; so the figure explains the layer the live loop shows. Without such a graph:
    the bundled model's known preprocessing (gray, x/127.5-1) for the bundled model, else None
    (the caller decides from the model's channel count).
    """
    from camface.models import EMOTION_KERAS, EMOTION_LABELS, EMOTION_ONNX, read_labels

    path = Path(model_override) if model_override is not None else EMOTION_KERAS
    check_model_file(path)  # a folder was "model file not found"
    digest = sha256_file(path)
    for graph in dict.fromkeys((path.with_suffix(".onnx"), EMOTION_ONNX)):
        if graph.is_file():
            try:
                info = read_graph_metadata(graph)
            except ModelError as exc:  # MODEL.onnx beside it is the model itself, no CAM graph of it
                log.info("%s is not a CAM graph made from %s (%s)", graph, path, exc)
                continue
            if info.source_sha256 == digest and info.normalization:
                return (path, Preprocessing.from_normalization(info.color_order, info.normalization),
                        info.labels, info.target_layer)
    if EMOTION_KERAS.is_file() and digest == sha256_file(EMOTION_KERAS):
        return path, EMOTION_PREPROCESSING, tuple(read_labels(EMOTION_LABELS)), ""
    return path, None, (), ""


KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")  # as `camface export` loads Keras models


def graph_beside(path: Path, model, load_keras) -> tuple[tuple[Preprocessing, tuple[str, ...], str] | None, str]:
    """The CAM graph MODEL.onnx beside the Keras model `path` (loaded: `model`) when `image_model`
    found none made from that file (no sha256 matched) but the graph was exported from the same
    model saved in the other Keras format: m.onnx, exported from m.keras, for `--model m.h5` (or
    the reverse; both look for m.onnx). That holds when the graph's `source_model` is beside it,
    has the sha256 the graph records, and, loaded with `load_keras`, has `model`'s layers (class
    and config), input and output shapes and weights, bit for bit, in the same order. Returns
    ((preprocessing, labels, target layer), "") then; else (None, why the graph beside was passed
    over, in words that follow "MODEL.onnx beside it": "" when there is no CAM graph there)."""
    graph = path.with_suffix(".onnx")
    if not graph.is_file():
        return None, ""
    try:
        info = read_graph_metadata(graph)
    except ModelError:  # no CAM graph (the model itself converted): image_model passed it over too
        return None, ""
    if not info.normalization:
        return None, ""
    source = graph.parent / Path(info.source_model).name
    if source == path:
        return None, f"was exported from an earlier {path.name} (sha256 differs)"
    made_from = f"is the CAM graph of {info.source_model or 'another model'}, not of {path.name} (sha256 differs)"
    if not info.source_model or source.suffix.lower() not in KERAS_SUFFIXES:
        return None, made_from
    if not source.is_file():
        return None, f"{made_from}, and {source} is not there to compare weights with"
    if info.source_sha256 and sha256_file(source) != info.source_sha256:
        return None, f"{made_from}, and {source} changed since it was exported"
    try:
        other = load_keras(source)
    except ModelError as exc:
        return None, f"{made_from}, and {source} does not load to compare weights with ({exc})"
    if (differ := _what_differs(model, other)):
        return None, f"is the CAM graph of {source.name}, whose {differ} differ from {path.name}'s (--model {source} " \
                     "explains that model)"
    log.info("%s: using %s, the CAM graph of %s (the same weights)", path, graph, source.name)
    return (Preprocessing.from_normalization(info.color_order, info.normalization), info.labels,
            info.target_layer), ""


def _what_differs(model, other) -> str:
    """"" when two Keras models are one model (saved as .keras and as .h5): the same layers, each
    of the same class and config but its name, in the same order (a Rescaling layer holds no
    weight, and the graph's pixels are those of the model with it), taking and giving the same
    shapes and holding the same weights, bit for bit, in the same order; else "layers" or "weights"."""
    def config(layer) -> tuple:
        try:
            settings = layer.get_config()
        except NotImplementedError:  # a custom layer that does not say its config: its class does
            settings = {}
        return type(layer).__name__, _plain({k: v for k, v in settings.items() if k != "name"})

    if (model.input_shape, model.output_shape) != (other.input_shape, other.output_shape) or \
            [config(a) for a in model.layers] != [config(b) for b in other.layers]:
        return "layers"
    mine, theirs = model.get_weights(), other.get_weights()
    same = len(mine) == len(theirs) and all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(mine, theirs))
    return "" if same else "weights"


def _plain(value):
    """A layer's config with its tuples as lists and arrays as lists: a nested model's config
    holds a shape as a list when loaded from .keras and as a tuple from .h5 (its build_config's
    input_shape), which == took for other layers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return _plain(value.tolist()) if isinstance(value, np.ndarray) else value


def read_image(path: str | Path, keras_path: Path, preprocessing: Preprocessing,
               input_size: tuple[int, int], labels: tuple[str, ...], *, detector: str = "full",
               margin: float = 0.1, min_confidence: float = 0.5, max_faces: int = 8,
               target_layer: str = "") -> GuidedInput:
    """Detect and crop the faces of an image file (any format OpenCV reads): the largest
    `max_faces` of them, as the live loop explains them.

    input_size: the model's (H, W) in pixels. Raises SourceError for an unreadable image or
    one with no faces.
    """
    import cv2

    from camface.api import face_detector
    from camface.realtime.config import LiveConfig
    from camface.realtime.crop import crop_faces
    from camface.realtime.explainer import largest_faces
    from camface.realtime.sources import cut_short, imread

    path = Path(path)
    frame, why = imread(path, cv2.IMREAD_COLOR)
    if frame is None:
        raise SourceError(f"cannot read image {path}: {why}")
    if (why := cut_short(path)) is not None:
        log.warning("%s: %s", path, why)
    # LiveConfig checks detector, confidence and margin as `camface live` does (UsageError)
    with face_detector(LiveConfig(detector=detector, min_confidence=min_confidence, margin=margin,
                                  max_faces=max_faces)) as opened:
        faces = opened.detect(frame)
    if not faces:
        raise SourceError(f"no faces found in {path} (detector {detector!r}, "
                          f"min confidence {min_confidence})")
    faces, dropped = largest_faces(faces, max_faces)
    crops, placed = crop_faces(frame, faces, margin, input_size, preprocessing.color_order)
    log.info("%s: %d face(s) found%s", path, len(placed) + dropped,
             f"; the largest {len(placed)} explained (--max-faces)" if dropped else "")
    return GuidedInput(
        origin=path,
        faces=tuple(FaceCrop(np.ascontiguousarray(crop), face.box, -1, f"face {i}")
                    for i, (crop, face) in enumerate(zip(crops, placed))),
        keras_path=keras_path, labels=labels, preprocessing=preprocessing,
        target_layer=target_layer)
