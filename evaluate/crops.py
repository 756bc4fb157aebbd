"""The crops `camface evaluate` scores: faces detected and cropped exactly as `camface live` does
(the frame explainer), or the crops saved in snapshot folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from camface.errors import SourceError


class NoFaces(SourceError):
    """A source that opened but showed no face; `frames`: how many frames were read."""

    def __init__(self, message: str, frames: int):
        super().__init__(message)
        self.frames = frames


def from_source(config, graph, frames: int, every: int, progress: bool = False) -> tuple[np.ndarray, int]:
    """(crops uint8 [N, H, W, C] in the graph's colour order, frames read): every `every`-th of the
    first `frames` frames of `config.source`, faces detected with `config.detector` and cropped by
    `FrameExplainer` with `config.margin` and `config.max_faces`. Raises SourceError when no
    face is found."""
    from camface.api import face_detector
    from camface.realtime.config import every_nth_frame
    from camface.realtime.explainer import FrameExplainer
    from camface.realtime.sources import make_source
    from camface.realtime.controls import Controls

    explainer = FrameExplainer.from_config(config.replace(method="none", smooth=0.0), graph)
    controls = Controls(method="none")
    crops, read = [], 0
    with make_source(config.source, sample_frames=frames) as source, \
            face_detector(config) as detector:
        bar = _bar(source.info.frames and min(frames, source.info.frames) or frames, progress, "detect")
        for index, frame in enumerate(source):
            if index >= frames:
                break
            read += 1
            bar.update(1)
            if index % every:
                continue
            faces = detector.detect(frame)
            if faces:
                crops.append(explainer.explain(frame, faces, controls, index).crops)
        bar.close()
    if not crops:
        raise NoFaces(f"no faces found in {read} frames of {source.info.name} ({every_nth_frame(every, read)} "
                      f"looked at, detector {config.detector}, min confidence {config.min_confidence})", read)
    return np.concatenate(crops), read


def snapshot_graph(folders) -> Path | None:
    """The CAM graph the snapshots in `folders` were taken with (their snapshot.json's model
    path and sha256), when it is not the bundled graph `camface evaluate` scores with by
    default; None when they record the bundled one (by sha256 or by its path, an earlier export
    of it included) or none. A graph changed since is used with a warning, as `camface guided`
    reads one. UsageError naming them when they record several graphs, or one that is gone: the
    crops would otherwise be scored by the bundled graph without a word (a gallery's crops are
    the bundled graph's size and colour)."""
    import os

    from camface.errors import UsageError
    from camface.hashing import sha256_file
    from camface.api import model_path
    from camface.realtime.config import LiveConfig
    from camface.realtime.snapshot import find_snapshots, read_meta

    bundled_graph = model_path(LiveConfig())  # what --model's default loads
    default = sha256_file(bundled_graph) if bundled_graph.is_file() else ""

    def bundled(path: str, digest: str) -> bool:
        if digest == default:
            return True
        try:
            return bool(path) and os.path.samefile(path, bundled_graph)
        except OSError:
            return False

    recorded: dict[str, tuple[Path, str]] = {}  # graph path -> (a snapshot taken with it, its sha256)
    for folder in find_snapshots(folders):
        model = read_meta(folder).get("model")
        if isinstance(model, dict) and isinstance(model.get("sha256"), str) and model["sha256"]:
            path = str(model.get("path") or "")
            if not bundled(path, model["sha256"]):
                recorded.setdefault(path, (folder, model["sha256"]))
            else:
                recorded.setdefault(str(bundled_graph), (folder, default))
    if not set(recorded) - {str(bundled_graph)}:
        return None
    if len(recorded) > 1:
        raise UsageError(f"the snapshots were taken with {len(recorded)} CAM graphs "
                         f"({', '.join(sorted(p or '?' for p in recorded))}); score them with one: pass it with --model")
    path, (folder, digest) = next(iter(recorded.items()))
    graph = Path(path)
    if not path or not graph.is_file():
        raise UsageError(f"snapshot {folder} was taken with the CAM graph {path or '?'}, which is gone; pass the "
                         "graph to score its crops with --model")
    if sha256_file(graph) != digest:
        import sys

        print(f"camface evaluate: {graph} changed since snapshot {folder} was taken (sha256 differs): scoring with "
              "it anyway (--model picks another)", file=sys.stderr)
    return graph


def from_snapshots(folders, info) -> np.ndarray:
    """Crops uint8 [N, H, W, C] saved by `camface live` snapshots (folders holding snapshot.json,
    or folders of such folders), checked against the graph's input size and colour order."""
    from camface.realtime.snapshot import SNAPSHOT_JSON, find_snapshots, read_crop, read_meta

    found = find_snapshots(folders)
    crops = []
    for folder in found:
        meta = read_meta(folder)
        faces, order, size = meta["faces"], meta.get("color_order"), meta.get("input_size")
        # a hand-edited file: an input_size of one number was an IndexError traceback, a missing
        # key said only "'color_order'"
        if order not in ("GRAY", "RGB", "BGR"):
            raise SourceError(f"cannot read {folder / SNAPSHOT_JSON}: color_order is {json.dumps(order)}, "
                              "not GRAY, RGB or BGR")
        if not (isinstance(size, list) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise SourceError(f"cannot read {folder / SNAPSHOT_JSON}: input_size is {json.dumps(size)[:100]}, "
                              "not [height, width]")
        size = tuple(size)
        if order != info.color_order or size != tuple(info.input_size):
            raise SourceError(f"snapshot {folder} holds {order} {size[0]}x{size[1]} crops; the graph takes "
                              f"{info.color_order} {info.input_size[0]}x{info.input_size[1]}")
        for number, face in enumerate(faces):
            if not isinstance(face, dict) or not isinstance(face.get("crop"), str):
                raise SourceError(f"cannot read {folder / SNAPSHOT_JSON}: face {number} names no crop file")
            crop = read_crop(folder / face["crop"], order)
            if crop.shape[:2] != size or crop.size != size[0] * size[1] * info.channels:
                raise SourceError(f"{folder / face['crop']} is {crop.shape[1]}x{crop.shape[0]}, not the "
                                  f"{size[1]}x{size[0]} crop its snapshot.json says")
            crops.append(crop.reshape(*size, info.channels))
    if not crops:
        raise SourceError(f"no faces found in the snapshots {', '.join(str(f) for f in found)}")
    return np.stack(crops)


def _bar(total, enabled: bool, what: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="frame", disable=not enabled, leave=False)
