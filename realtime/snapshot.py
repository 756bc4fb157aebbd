"""Snapshots: one folder per saved frame, written here and read back here (by `camface guided`
and `camface evaluate`).

Folder contents:
  frame.png       the full frame as the source delivered it (uint8 BGR, no overlays)
  face_NN.png     each crop exactly as fed to the graph: single-channel PNG for GRAY graphs,
                  an ordinary colour PNG (stored BGR by OpenCV, so it looks right) for RGB/BGR
  snapshot.json   {camface_version, source, frame_index, method, labels, color_order,
                   input_size, model: {path, sha256, source_model, source_sha256},
                   faces: [{crop, box [x, y, w, h] pixels, crop_box, score, probs, predicted,
                            predicted_label, explained, explained_label, track_id}]}
Folder names are `frame_NNNNNN` (frame index) with `-2`, `-3` ... added when taken, created
atomically with mkdir so two runs writing to the same folder never collide.
"""

from __future__ import annotations

import json
import os
import shutil
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from camface import __version__
from camface.color_order import ColorOrder
from camface.errors import OutputError, SourceError
from camface.graph_spec import GraphInfo
from camface.hashing import sha256_file
from camface.native import opencv_path
from camface.outputs import replace_whole
from camface.realtime.results import FrameResult

SNAPSHOT_JSON = "snapshot.json"


def unique_folder(parent: Path, name: str) -> Path:
    """Create and return parent/name, or parent/name-2, -3 ... if taken (atomic mkdir)."""
    for attempt in range(1, 10_000):
        folder = parent / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise OutputError(f"cannot find a free snapshot folder name for {parent / name}")


class SnapshotWriter:
    """`save(frame, crops, result) -> folder`. `folder` is created on the first save; fails at
    construction when it could not be (its parent missing, or not writable)."""

    def __init__(self, folder: str | Path, source: str, model_path: str | Path, info: GraphInfo):
        self.folder = Path(folder)
        self.check_folder(self.folder)
        self.source, self.model_path, self.info = source, Path(model_path).resolve(), info
        self.count = 0
        self.last: Path | None = None

    @staticmethod
    def check_folder(folder: str | Path) -> None:
        """OutputError naming `folder` when snapshots cannot be written there (a file, its parent
        missing or not writable): the live loop asks before it loads the model too."""
        folder = Path(folder)
        existing = folder if folder.is_dir() else folder.parent
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"cannot write snapshots to {folder}: it is a file")
        if not existing.is_dir():
            raise OutputError(f"cannot write snapshots to {folder}: folder {existing} does not exist")
        if not os.access(existing, os.W_OK):
            raise OutputError(f"cannot write snapshots to {folder}: folder {existing} is not writable")

    @cached_property
    def model_sha256(self) -> str:
        return sha256_file(self.model_path)

    def save(self, frame: np.ndarray, crops: np.ndarray, result: FrameResult) -> Path:
        """Write one snapshot. frame: uint8 BGR [H, W, 3] without overlays; crops: uint8
        [N, H, W, C] as fed to the graph (in the graph's colour order)."""
        folder = None
        try:
            self.folder.mkdir(exist_ok=True)
            folder = unique_folder(self.folder, f"frame_{result.index:06d}")
            self._write_image(folder / "frame.png", frame)
            faces = []
            labels = result.labels
            for i, (face, prediction) in enumerate(zip(result.faces, result.predictions)):
                crop = ColorOrder.of(self.info.color_order).to_opencv(crops[i])
                name = f"face_{i:02d}.png"
                self._write_image(folder / name, crop)
                faces.append({
                    "crop": name,
                    "box": [int(v) for v in face.box],
                    "crop_box": [int(v) for v in face.crop_box],
                    "score": round(float(face.score), 6),
                    "probs": [round(float(p), 6) for p in prediction.probs],
                    "predicted": int(prediction.predicted),
                    "predicted_label": prediction.label(labels, result.threshold),
                    "explained": int(prediction.explained),
                    "explained_label": labels[prediction.explained] if prediction.explained < len(labels) else "",
                    "track_id": int(face.track_id),
                    **({"similarity": [round(float(v), 6) for v in prediction.similarity]}
                       if prediction.similarity.size else {}),
                })
            meta = {
                "camface_version": __version__,
                "source": self.source,
                "frame_index": int(result.index),
                "method": result.method,
                "labels": list(labels),
                "color_order": self.info.color_order,
                "input_size": list(self.info.input_size),
                "model": {"path": str(self.model_path), "sha256": self.model_sha256,
                          "source_model": self.info.source_model, "source_sha256": self.info.source_sha256},
                "faces": faces,
            }
            text = json.dumps(meta, indent=2)
            # last, and whole or not at all: a folder holding snapshot.json is a snapshot to its readers
            replace_whole(folder / SNAPSHOT_JSON, lambda partial: partial.write_text(text))
        except BaseException as exc:
            if folder is not None:  # no half snapshot (a frame without its crops or its json) is left
                shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot write snapshot in {self.folder}: {exc}") from exc
            raise
        self.count, self.last = self.count + 1, folder
        return folder

    @staticmethod
    def _write_image(path: Path, image: np.ndarray) -> None:
        if not cv2.imwrite(opencv_path(path), image):
            raise OutputError(f"cannot write {path}")


# ---------------------------------------------------------------- reading them back


def find_snapshots(folders) -> list[Path]:
    """The snapshot folders among `folders`: each one holding snapshot.json, or a folder of such
    folders (its snapshots in name order), or a snapshot.json (its folder); each once however
    often it is named (`camface evaluate snaps snaps/frame_1` scored frame_1's crops twice).
    SourceError names a folder that is neither."""
    found: dict[Path, Path] = {}  # resolved -> as named first
    for folder in map(Path, folders):
        if folder.name == SNAPSHOT_JSON and folder.is_file():  # its own file names it, as for `camface guided`
            folder = folder.parent
        inside = sorted(folder.glob(f"*/{SNAPSHOT_JSON}")) if folder.is_dir() else []
        if (folder / SNAPSHOT_JSON).is_file():
            found.setdefault(folder.resolve(), folder)
        elif inside:
            for path in inside:
                found.setdefault(path.parent.resolve(), path.parent)
        elif not folder.exists():  # (it said "not a camface snapshot folder", as of a folder of other files)
            raise SourceError(f"snapshot folder not found: {folder}")
        else:
            raise SourceError(f"{folder} is not a camface snapshot folder (no {SNAPSHOT_JSON} in it or "
                              "its sub-folders)")
    return list(found.values())


def read_meta(folder: str | Path) -> dict:
    """The snapshot.json of `folder` (see the module's docstring); SourceError when it is missing,
    unreadable, not a JSON object, lists no "faces" or has "labels" that are not a list of strings."""
    path = Path(folder) / SNAPSHOT_JSON
    if not path.is_file():
        inside = sorted(Path(folder).glob(f"*/{SNAPSHOT_JSON}")) if Path(folder).is_dir() else []
        if inside:  # `camface guided snaps`, the --snapshot-dir `camface live` wrote them to
            raise SourceError(f"{folder} holds {len(inside)} camface snapshot(s) but is none: give one of them, "
                              f"such as {inside[0].parent}")
        raise SourceError(f"{folder} is not a camface snapshot: {SNAPSHOT_JSON} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc
    # a hand-edited file: "list indices must be integers", "'faces'", or a TypeError traceback
    # where the labels were read
    if not isinstance(meta, dict):
        raise SourceError(f"cannot read {path}: not a JSON object but {json.dumps(meta)[:100]}")
    if not isinstance(meta.get("faces"), list):
        raise SourceError(f"cannot read {path}: faces is not a list"
                          + (f" ({json.dumps(meta['faces'])[:100]})" if "faces" in meta else " (it has none)"))
    labels = meta.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(label, str) for label in labels)):
        raise SourceError(f"cannot read {path}: labels is not a list of strings ({json.dumps(labels)[:100]})")
    return meta


def read_crop(path: str | Path, color_order: str) -> np.ndarray:
    """A face crop as `SnapshotWriter` saved it, back as it was fed to the graph: uint8 [H, W, C]
    in `color_order` (C = 1 for GRAY). SourceError when it cannot be read."""
    if not Path(path).is_file():  # said only "cannot read", after OpenCV's own warning line
        raise SourceError(f"cannot read face crop {path}: "
                          + ("it is a folder" if Path(path).is_dir() else "it is missing"))
    image = cv2.imread(opencv_path(path), cv2.IMREAD_GRAYSCALE if color_order == "GRAY" else cv2.IMREAD_COLOR)
    if image is None:
        raise SourceError(f"cannot read face crop {path}")
    return ColorOrder.of(color_order).from_opencv(image)
