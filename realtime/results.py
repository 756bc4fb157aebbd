"""Per-frame results of the live loop: frozen dataclasses, built once per frame, never mutated.

Coordinates are pixels in the frame the detector saw, (x, y, w, h) with (x, y) the top-left
corner; `w` and `h` are at least 1 and the box lies inside the frame.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: box and crop_box [x, y, w, h] pixels, score, track_id."""
        return {"box": [int(v) for v in self.box], "crop_box": [int(v) for v in self.crop_box],
                "score": float(self.score), "track_id": int(self.track_id)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Face":
        return cls(box=_box(data["box"]), score=float(data["score"]), crop_box=_box(data["crop_box"]),
                   track_id=int(data["track_id"]))


def predicted_classes(probs: np.ndarray) -> np.ndarray:
    """The class every result names as predicted, int64 [N], of probs float32 [N, classes]: the
    FIRST class among tied top probabilities. A saturated sigmoid ties (logits 20 and 30 both
    give 1.0 in float32), and the argmax of the logits may be another of the tied classes; live,
    serve, batch, the API and `camface guided` name this class and explain it for class -1."""
    return np.asarray(probs).argmax(axis=-1).astype(np.int64)  # numpy's argmax: the first maximum


def is_saturated(similarity: np.ndarray, explained: int, below: float | None) -> bool:
    """`Prediction.saturated` of a face: its gallery graph (`below`: `GraphInfo.saturated_below`,
    None for a classifier's or an older gallery's) explains the projection for it."""
    return below is not None and similarity.size > 0 and 1.0 - float(similarity[explained]) < below


@dataclass(frozen=True)
class Prediction:
    """The CAM graph's answer for one face.

    Its arrays are read-only (copy one to change it: `prediction.heatmap.copy()`).

    probs: float32 [classes], softmax probabilities.
    heatmap: float32 [h, w] at the graph's feature resolution, unnormalised, of `method`
        for class `explained`; empty (0, 0) when the method is "none". It spans its Face's
        `crop_box` (row 0 at its top edge), not `box`: upsample it to the crop's side in pixels
        (`camface.methods.normalize` for display) and place it at the crop's (x, y).
    predicted: `predicted_classes` of probs (the first of tied top probabilities).
    explained: class index the heatmap explains.
    similarity: float32 [identities], a gallery graph's cosine similarities (the heatmap explains
        similarity[explained]); empty [0] for a classifier's graph.
    saturated: the heatmap explains the projection of the face's embedding on the explained
        identity's direction, not its cosine similarity, which is saturated (1 - cosine <
        `GraphInfo.saturated_below`: the face is, nearly exactly, an enrolled photo) and whose
        gradient vanishes there (export/gallery.py); see `is_saturated`.
    """

    probs: np.ndarray
    heatmap: np.ndarray
    predicted: int
    explained: int
    method: str
    similarity: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    saturated: bool = False

    def __post_init__(self) -> None:
        # Frozen means the arrays too: read-only views (the arrays given stay writeable). A caller
        # that normalised `heatmap` in place changed the smoother's track, and so the next frame.
        for name in ("probs", "heatmap", "similarity"):
            value = getattr(self, name)
            if isinstance(value, np.ndarray) and value.flags.writeable:
                value = value.view()
                value.flags.writeable = False
                object.__setattr__(self, name, value)

    def __reduce__(self):
        """Pickle and copy.deepcopy rebuild through __init__, so the copy's arrays are read-only
        too (the default restored the fields' state as it was pickled: writeable arrays)."""
        return type(self), tuple(getattr(self, f.name) for f in fields(self))

    def __eq__(self, other: object) -> bool:
        """Equal fields, the arrays by shape and values (the generated `==` asked numpy arrays for
        one truth value and raised ValueError, so that FrameResults could not be compared)."""
        if not isinstance(other, Prediction):
            return NotImplemented
        return (self.predicted, self.explained, self.method, self.saturated) == \
            (other.predicted, other.explained, other.method, other.saturated) \
            and all(np.array_equal(a, b) for a, b in ((self.probs, other.probs), (self.heatmap, other.heatmap),
                                                       (self.similarity, other.similarity)))

    def is_unknown(self, threshold: float | None) -> bool:
        """A gallery graph's face whose best similarity is below `threshold` (None: never)."""
        return threshold is not None and self.similarity.size > 0 and \
            float(self.similarity[self.predicted]) < threshold

    def label(self, labels, threshold: float | None = None) -> str:
        """The one place a face's name is made (live, serve, batch rows, snapshots): the
        predicted label, or `unknown (best: NAME 0.31)` when `is_unknown(threshold)`."""
        name = _label_of(labels, self.predicted)
        if self.is_unknown(threshold):
            return f"{UNKNOWN} (best: {name} {float(self.similarity[self.predicted]):.2f})"
        return name

    def caption(self, labels, threshold: float | None = None) -> str:
        """The text drawn on the face box: `label` with its score (the cosine similarity on a
        gallery graph, else the probability; an unknown face's label holds it already) and
        `(why NAME?)` when the explained class is not the predicted one; `(map: projection)` when
        the heatmap explains the projection, not the saturated cosine (`saturated`)."""
        text = self.label(labels, threshold)
        if not self.is_unknown(threshold):
            score = self.similarity[self.predicted] if self.similarity.size else self.probs[self.predicted]
            text += f" {float(score):.2f}"
        if self.explained != self.predicted:
            text += f" (why {_label_of(labels, self.explained)}?)"
        if self.saturated and self.heatmap.size:
            text += " (map: projection)"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: probs (list of floats), predicted, explained, method, heatmap (rows of
        floats, [] for method "none"), and similarity (gallery graphs only; saturated: true where
        the heatmap explains the projection, read back from the similarity). float32 values
        survive JSON exactly."""
        return {"probs": [float(p) for p in self.probs], "predicted": int(self.predicted),
                "explained": int(self.explained), "method": self.method,
                "heatmap": np.asarray(self.heatmap, np.float32).tolist() if self.heatmap.size else [],
                **({"similarity": [float(s) for s in self.similarity]} if self.similarity.size else {}),
                **({"saturated": True} if self.saturated else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Prediction":
        heatmap = np.asarray(data["heatmap"], np.float32)
        return cls(probs=np.asarray(data["probs"], np.float32),
                   heatmap=heatmap if heatmap.size else np.zeros((0, 0), np.float32),
                   predicted=int(data["predicted"]), explained=int(data["explained"]), method=data["method"],
                   similarity=np.asarray(data.get("similarity", []), np.float32),
                   saturated=bool(data.get("saturated", False)))


@dataclass(frozen=True)
class FrameResult:
    """Everything the loop knows about one frame after classification.

    index: 0-based frame index in the source.
    faces / predictions: same length and order (largest faces first).
    dropped: faces found beyond --max-faces (not classified).
    method: heatmap method shown (a name of `camface.methods`, e.g. "gradcam", or "none").
    explained_class: class the user asked to explain, or None for each face's predicted class.
    labels: class names of the graph.
    fps / stage_ms: rolling figures for the HUD (loop-wide, not this frame alone): frames
        completed per second and each stage's processing milliseconds.
    provider: ONNX Runtime execution provider running the graph.
    pace_fps: the rate a window is held to (the source's own), 0 when not paced: then `fps`
        is the displayed rate and says nothing about how fast frames could be processed.
    threshold: a gallery graph's unknown threshold on the best cosine similarity; None otherwise.
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
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.predictions and len(self.predictions) != len(self.faces):
            raise ValueError(
                f"{len(self.faces)} faces but {len(self.predictions)} predictions in frame {self.index}")

    def label(self, k: int) -> str:
        """Class name of index k (the index itself when the graph has no such label)."""
        return _label_of(self.labels, k)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, the fields `camface serve` sends and `camface batch` writes: index, method,
        explained_class, labels, dropped, provider, fps, stage_ms, and per face (largest first)
        its Face and Prediction fields with predicted_label and explained_label."""
        faces = []
        for i, face in enumerate(self.faces):
            entry = face.to_dict()
            if i < len(self.predictions):
                prediction = self.predictions[i]
                entry.update(prediction.to_dict(), predicted_label=prediction.label(self.labels, self.threshold),
                             explained_label=self.label(prediction.explained))
            faces.append(entry)
        return {"index": int(self.index), "method": self.method, "explained_class": self.explained_class,
                "labels": list(self.labels), "dropped": int(self.dropped), "provider": self.provider,
                "fps": float(self.fps), "pace_fps": float(self.pace_fps),
                "stage_ms": {k: float(v) for k, v in self.stage_ms.items()}, "faces": faces,
                **({"threshold": self.threshold} if self.threshold is not None else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FrameResult":
        """The FrameResult `to_dict` was made from (arrays back as float32)."""
        faces = data["faces"]
        return cls(index=int(data["index"]), faces=tuple(Face.from_dict(f) for f in faces),
                   predictions=tuple(Prediction.from_dict(f) for f in faces if "probs" in f),
                   dropped=int(data["dropped"]), method=data["method"], explained_class=data["explained_class"],
                   labels=tuple(data["labels"]), fps=float(data["fps"]), stage_ms=dict(data["stage_ms"]),
                   provider=data["provider"], pace_fps=float(data["pace_fps"]), threshold=data.get("threshold"))

    def _repr_html_(self) -> str:
        """Jupyter: one row per face, its label (`Prediction.label`), its box and a bar per class
        probability."""
        rows = []
        for i, (face, prediction) in enumerate(zip(self.faces, self.predictions)):
            bars = "".join(
                f'<div style="white-space:nowrap"><span style="display:inline-block;width:6em">'
                f'{html.escape(self.label(k))}</span><span style="display:inline-block;width:{100 * p:.0f}px;'
                f'height:0.8em;background:{"#2a2" if k == prediction.predicted else "#999"}"></span> {p:.2f}</div>'
                for k, p in enumerate(float(v) for v in prediction.probs))
            rows.append(f"<tr><td>face {i}: {html.escape(prediction.label(self.labels, self.threshold))}<br>box {list(face.box)}<br>score {face.score:.2f}</td>"
                        f"<td>{bars}</td></tr>")
        head = (f"<b>frame {self.index}</b>: {len(self.faces)} face(s), heatmap {html.escape(self.method)}"
                + (f", {self.dropped} more not classified" if self.dropped else ""))
        return f"<div>{head}<table>{''.join(rows)}</table></div>"


UNKNOWN = "unknown"


def _label_of(labels, k: int) -> str:
    return labels[k] if 0 <= k < len(labels) else str(k)


def _box(values) -> Box:
    x, y, w, h = (int(v) for v in values)
    return x, y, w, h
