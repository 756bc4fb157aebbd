"""What a file given where a CAM graph is expected is, when it is not one: one line naming
the kind of file and the command that makes a CAM graph of it. `camface.load` (every front
end: live, bench, evaluate, serve, batch) and `camface info` both say it with `not_a_graph`;
`camface export` says what a file it cannot read is with `not_a_classifier`.

The kind is read from the file's first bytes (a model renamed .onnx is named for what it is),
then from its suffix: TFLite flatbuffers carry "TFL3" at byte 4, Keras .h5 files the HDF5
signature, and .keras, .pt2, torch.save and TorchScript files are zip archives told apart by
their entries. Imports nothing heavy (the live loop uses it).
"""

from __future__ import annotations

import contextlib
import zipfile
from pathlib import Path

from camface.errors import ModelError

# a video given as the model (`camface.load("talk.mp4")`) was read whole into memory before
# ONNX Runtime refused it: gigabytes for a long one
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts"})
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
TFLITE_TAG = b"TFL3"  # the flatbuffer file identifier, bytes 4..8
# strings MediaPipe's face detectors hold (their TFLite metadata and Keras source names:
# "Short Range Face Detection", "facedetector-front.hdf5", "facedetector_back_centernet_...")
FACE_DETECTOR_MARKS = (b"facedetector", b"Face Detection")
MAX_SNIFF = 64 << 20  # a TFLite face detector is under 1 MB; larger files are not searched
TORCH_EXPORT = "camface export model.pt2 -o cam.onnx --preset torch"
EXPORT_GRAPH = "a CAM graph is the .onnx that `camface export` writes"


def check_not_a_video(path: Path) -> None:
    """ModelError when `path` is named as a video: said by its name, before any of it is read."""
    if path.suffix.lower() in VIDEO_SUFFIXES:
        raise ModelError(f"{path} is a video, not a CAM graph (.onnx): a video is a source "
                         "(`process_video`, --source)")


def not_a_graph(path: Path, reason: str = "") -> str:
    """The message for `path`, given as a CAM graph, that is no ONNX model (its bytes do not
    parse as one, or hold no graph): what it is when its content or suffix says (a face
    detector, a TFLite, Keras or PyTorch model) and how to make a CAM graph; else that it is
    not an ONNX model, with the parser's `reason` (its first line) when the file is named .onnx:
    meant to be one, it is damaged or cut short, and the parser's words say how. One line."""
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:  # ONNX Runtime's word for it: 'No graph was found in the protobuf'
            return f"{path} is empty (0 bytes), not a CAM graph"
    kind = _kind(path)
    if kind == "face detector":
        return (f"{path} is a face-detector TFLite model (MediaPipe BlazeFace), not a CAM graph: camface runs "
                "its own (detector='short' or 'full', --detector); the CAM graph is a face classifier's, made "
                "by `camface export CLASSIFIER -o cam.onnx` from a Keras, ONNX or .pt2 classifier (no model given: "
                "the bundled emotion graph)")
    if kind == "tflite":
        return (f"{path} is a TFLite model, not a CAM graph, and camface does not read TFLite: convert it to ONNX "
                f"(`python -m tf2onnx.convert --tflite {path} --output model.onnx`) and make a CAM graph of "
                "that with `camface export model.onnx -o cam.onnx --preset PRESET`, or export the Keras model it came from")
    if kind in ("keras", "keras zip", "pt2"):
        suffix = {"keras": ".h5", "keras zip": ".keras", "pt2": ".pt2"}[kind]
        # export picks its reader by the suffix: a model renamed .onnx is named back first (and a .pt2
        # or .keras zip named .hdf5, which export reads as HDF5)
        source, renamed = ((path, "") if path.suffix.lower() in {suffix, ".hdf5" if kind == "keras" else suffix} else
                           (path.with_suffix(suffix), f" (renamed {suffix}: export reads a model by its suffix)"))
        what, preset = ("a PyTorch exported program (.pt2)", " --preset torch") if kind == "pt2" else ("a Keras model", "")
        return f"{path} is {what}, not a CAM graph: make one with `camface export {source} -o cam.onnx{preset}`{renamed}"
    if kind in ("pickle", "torchscript"):
        what = "a TorchScript archive (torch.jit.save)" if kind == "torchscript" else "a PyTorch pickle (torch.save)"
        return (f"{path} is {what}, not a CAM graph, and camface does not load pickles (unpickling runs code): "
                f"save the model with torch.export.save as a .pt2, then `{TORCH_EXPORT}`")
    why = reason.strip().splitlines()[0] if reason.strip() and path.suffix.lower() == ".onnx" else ""
    return f"{path} is not an ONNX model{f' ({why})' if why else ''}: {EXPORT_GRAPH}"


def onnx_runtime_reason(exc: BaseException) -> str:
    """ONNX Runtime's words for a file it cannot parse, for `not_a_graph`, less its status code
    ("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Failed to load model because protobuf parsing
    failed." -> "ONNX Runtime: Failed to load model because protobuf parsing failed")."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"ONNX Runtime: {first.rsplit(' : ', 1)[-1].rstrip('.')}"


def not_a_classifier(path: Path) -> str | None:
    """The message for `path`, given as a classifier to export (or as the embedder of enroll and
    compare, the Keras baseline's model), when it is a TFLite model: a face detector, or another, with what to do. None
    otherwise. One line."""
    kind = _kind(path)
    if kind == "face detector":
        return (f"{path} is a face-detector TFLite model (MediaPipe BlazeFace), not a face classifier or "
                "recognition model: camface runs its own (detector='short' or 'full', --detector); give the "
                "model whose maps you want (Keras, ONNX or .pt2)")
    if kind == "tflite":
        return (f"{path} is a TFLite model, which camface does not read: convert it to ONNX "
                f"(`python -m tf2onnx.convert --tflite {path} --output model.onnx`), then "
                "`camface export model.onnx -o cam.onnx --preset PRESET`, or give the Keras model it came from")
    return None


def _kind(path: Path) -> str | None:
    """face detector, tflite, keras (HDF5), keras zip, pt2, pickle, torchscript or None, by content then
    suffix."""
    try:
        with path.open("rb") as file:
            head = file.read(16)
            if head[4:8] == TFLITE_TAG:
                data = head + file.read(MAX_SNIFF)
                return "face detector" if any(mark in data for mark in FACE_DETECTOR_MARKS) else "tflite"
        if head.startswith(HDF5_SIGNATURE):
            return "keras"
        if head.startswith(b"PK\x03\x04"):
            with zipfile.ZipFile(path) as archive:
                found = _zip_kind(archive.namelist())
            if found:
                return found
    # zipfile's words for a broken archive besides BadZipFile: UnicodeDecodeError (a ValueError) for an
    # entry flagged UTF-8 that is not, NotImplementedError for an entry's "zip file version 12.1"
    except (OSError, zipfile.BadZipFile, ValueError, NotImplementedError, EOFError):
        pass  # unreadable or a broken zip: the suffix says
    return {".tflite": "tflite", ".h5": "keras", ".hdf5": "keras", ".keras": "keras zip", ".pt2": "pt2",
            ".pt": "pickle", ".pth": "pickle"}.get(path.suffix.lower())


def _zip_kind(names: list[str]) -> str | None:
    """The kind of a zip archive by its entries (torch writes them under one folder)."""
    if {"config.json", "metadata.json"} <= set(names):
        return "keras zip"
    if any(n.endswith("/archive_format") or n.endswith("/models/model.json") for n in names):
        return "pt2"
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") for n in names):
        return "pickle"
    return None
