"""Inputs of `camface guided`: snapshot folders written by the live loop, and plain images.

A snapshot folder holds `frame.png` (full BGR frame), `face_NN.png` (each crop exactly as fed to
the CAM graph: grayscale PNG for GRAY graphs, BGR PNG for RGB/BGR graphs) and `snapshot.json`:

    {"camface_version", "source", "frame_index", "method", "labels": [...],
     "color_order": "GRAY" | "RGB" | "BGR",
     "model": {"path": ".../x.onnx", "sha256", "source_model": "<keras file name>", "source_sha256"},
     "faces": [{"crop": "face_00.png", "box": [x, y, w, h], "score", "probs": [...],
                "predicted": int, "explained": int}]}

Both readers return a `GuidedInput`: the crops in the graph's colour order plus everything
needed to rebuild the graph's input (the Keras model, its normalisation, the target layer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from camface.errors import ModelError, SourceError
from camface.hashing import sha256_file
from camface.outputs import check_model_file
from camface.realtime.snapshot import SNAPSHOT_JSON, read_crop, read_meta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    """How uint8 pixels become the model's input: x * scale + offset, per channel, in `color_order`."""

    color_order: str  # GRAY, RGB or BGR
    scale: tuple[float, ...]
    offset: tuple[float, ...]

    def apply(self, crops: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] in `color_order` -> float32 [N, H, W, C] model input."""
        return (crops.astype(np.float32) * np.asarray(self.scale, np.float32)
                + np.asarray(self.offset, np.float32))

    @classmethod
    def from_normalization(cls, color_order: str, normalization: dict) -> "Preprocessing":
        """From the CAM graph's metadata (`GraphInfo.normalization`, {"scale", "offset"})."""
        return cls(color_order, tuple(float(v) for v in normalization["scale"]),
                   tuple(float(v) for v in normalization["offset"]))


# The bundled emotion model (mini-Xception, FER2013): 64x64 gray, x / 127.5 - 1.
EMOTION_PREPROCESSING = Preprocessing("GRAY", (1 / 127.5,), (-1.0,))


@dataclass(frozen=True)
class FaceCrop:
    """One face as the graph saw it."""

    crop: np.ndarray  # uint8 [H, W, C] in the graph's colour order (C = 1 for GRAY)
    box: tuple[int, int, int, int]  # (x, y, w, h) in pixels of the full frame
    explained: int = -1  # class the live loop explained; -1 = the predicted class
    name: str = ""  # e.g. "face_00"
    # class the snapshot recorded as predicted (its graph's, smoothed where live smoothed: it may
    # differ from the Keras model's own argmax); -1 = none recorded (a plain image)
    predicted: int = -1


@dataclass(frozen=True)
class GuidedInput:
    """What `camface guided` explains: crops, the Keras model and how it reads pixels."""

    origin: Path  # the snapshot folder or the image file
    faces: tuple[FaceCrop, ...]
    keras_path: Path
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    target_layer: str = ""  # "" = the model's default (last 4-D layer before pooling)
    notes: tuple[str, ...] = field(default=())  # caveats to log (assumed preprocessing ...)


def read_graph_metadata(onnx_path: Path):
    """`GraphInfo` of an exported CAM graph (reads only the metadata, not the weights' use)."""
    import onnx

    from camface.graph_spec import GraphInfo

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
        return GraphInfo.from_metadata({p.key: p.value for p in proto.metadata_props})
    except Exception as exc:  # OSError, DecodeError for non-protobuf files, KeyError for keys
        raise ModelError(f"cannot read CAM graph metadata from {onnx_path}: {exc}") from exc


def source_mismatch(candidate: Path, expected: str) -> str:
    """"" when the file `candidate` has the sha256 `expected` (the `source_sha256` a snapshot or a
    CAM graph records of the model it was exported from), else why not ("sha256 ... != ...")."""
    actual = sha256_file(candidate)
    return "" if actual == expected else f"sha256 {actual[:12]}... != source_sha256 {expected[:12]}..."


def resolve_keras_model(model_entry: dict, override: Path | None, where: Path) -> Path:
    """The Keras file a snapshot's ONNX graph was exported from, its sha256 checked.

    Order: `override` (--model); `source_model` beside the ONNX file named in `model.path`;
    the bundled emotion model when its sha256 equals `source_sha256`. Raises ModelError naming
    what was tried, or the file whose sha256 differs from the snapshot's `source_sha256`.
    """
    from camface.models import EMOTION_KERAS

    expected = model_entry.get("source_sha256", "")
    tried: list[str] = []
    if override is not None:
        check_model_file(override)  # a folder was "model file not found"
        candidate = override
    else:
        candidate = None
        onnx_path = Path(model_entry.get("path", ""))
        source_name = model_entry.get("source_model", "")
        if source_name and str(onnx_path):
            beside = onnx_path.parent / Path(source_name).name
            tried.append(str(beside))
            if beside.is_file():
                candidate = beside
        if candidate is None and expected and EMOTION_KERAS.is_file():
            tried.append(f"bundled {EMOTION_KERAS.name}")
            if sha256_file(EMOTION_KERAS) == expected:
                candidate = EMOTION_KERAS
        if candidate is None:
            raise ModelError(f"cannot find the Keras model of snapshot {where} "
                             f"(source_model {source_name or '?'!r}; "
                             f"tried: {', '.join(tried) or 'nothing'}); pass it with --model")
    if expected:
        if why := source_mismatch(candidate, expected):
            raise ModelError(f"model {candidate} does not match snapshot {where}: {why} recorded in {SNAPSHOT_JSON}")
    else:
        log.warning("snapshot %s records no source_sha256: cannot check that %s is its model",
                    where, candidate)
    return candidate


def _refuse_gallery(folder: Path, model_entry: dict, labels) -> None:
    """ModelError for a snapshot of a gallery graph (`camface enroll`): its maps explain the
    cosine similarity to an identity, and its source model is the embedder, whose outputs are
    not those identities: explaining the embedder's output `explained` would be another map
    under the identity's name."""
    raise ModelError(f"snapshot {folder} was taken with the gallery graph {model_entry.get('path') or '?'} "
                     f"(identities {', '.join(map(str, labels)) or '?'}): camface guided explains a "
                     f"classifier's classes, and {model_entry.get('source_model') or 'its source model'} is "
                     "the embedder; `camface compare A.jpg B.jpg --model EMBEDDER` (or --embedding-from CLASSIFIER) "
                     "shows why two faces match")


def read_snapshot(folder: str | Path, model_override: str | Path | None = None) -> GuidedInput:
    """Read a snapshot folder; raises SourceError (missing/invalid files) or ModelError."""
    folder = Path(folder)
    meta = read_meta(folder)
    faces_meta, model_entry = meta["faces"], meta.get("model") or {}
    if not faces_meta:
        raise SourceError(f"snapshot {folder} holds no faces")
    where = folder / SNAPSHOT_JSON
    if not isinstance(model_entry, dict):
        raise SourceError(f"cannot read {where}: \"model\" is {model_entry!r}, not an object")
    if not all(isinstance(face, dict) for face in faces_meta):
        raise SourceError(f"cannot read {where}: every entry of \"faces\" must be an object")
    if any(isinstance(face, dict) and "similarity" in face for face in faces_meta):
        _refuse_gallery(folder, model_entry, meta.get("labels") or ())

    notes = []
    keras_path = resolve_keras_model(model_entry, Path(model_override) if model_override else None,
                                     folder)
    onnx_path = Path(model_entry.get("path", ""))
    color_order = meta.get("color_order", "GRAY")
    if color_order not in ("GRAY", "RGB", "BGR"):
        raise SourceError(f"cannot read {where}: unknown color_order {color_order!r} (GRAY, RGB or BGR)")
    target_layer = ""
    emotion_like = Preprocessing(color_order, EMOTION_PREPROCESSING.scale,
                                 EMOTION_PREPROCESSING.offset)
    if model_entry.get("path") and onnx_path.is_file():
        info = read_graph_metadata(onnx_path)
        if info.gallery:
            _refuse_gallery(folder, model_entry, info.labels)
        if model_entry.get("sha256") and sha256_file(onnx_path) != model_entry["sha256"]:
            notes.append(f"{onnx_path} changed since the snapshot was taken (sha256 differs): "
                         "using its metadata anyway")
        color_order = info.color_order
        target_layer = info.target_layer
        if info.normalization:
            preprocessing = Preprocessing.from_normalization(color_order, info.normalization)
        else:
            preprocessing = Preprocessing(color_order, emotion_like.scale, emotion_like.offset)
            notes.append(f"{onnx_path} records no normalization: assuming x/127.5-1")
        labels = tuple(meta.get("labels") or info.labels)
    else:
        preprocessing = emotion_like
        notes.append(f"CAM graph {model_entry.get('path') or '?'} not found: assuming the emotion "
                     "model's preprocessing (x/127.5-1) and the default target layer")
        labels = tuple(meta.get("labels") or ())

    faces = []
    for index, face in enumerate(faces_meta):
        try:
            crop_name = str(face.get("crop", f"face_{index:02d}.png"))
            box = tuple(int(v) for v in face.get("box", (0, 0, 0, 0)))
            explained = int(face.get("explained", -1))
            predicted = int(face.get("predicted", -1))
            if len(box) != 4:
                raise ValueError(f"box {box} is not [x, y, w, h]")
        except (TypeError, ValueError) as exc:
            raise SourceError(f"cannot read {where}: face {index}: {exc}") from exc
        crop = read_crop(folder / crop_name, color_order)
        if faces and crop.shape != faces[0].crop.shape:
            raise SourceError(f"face crop {folder / crop_name} is {crop.shape[1]}x{crop.shape[0]} but "
                              f"face 0's is {faces[0].crop.shape[1]}x{faces[0].crop.shape[0]}: every crop of a "
                              "snapshot is the graph's input size")
        faces.append(FaceCrop(crop, box, explained, f"face {index}", predicted))
    return GuidedInput(folder, tuple(faces), keras_path, labels, preprocessing, target_layer,
                       tuple(notes))
