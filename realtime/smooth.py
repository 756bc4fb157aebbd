"""Temporal smoothing: keep faces' identities across frames by box overlap (IoU) and smooth
each face's probabilities and heatmap with an exponential moving average, so overlays do not
flicker from frame to frame.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from camface.realtime.results import Box, Face, FrameResult, Prediction, predicted_classes


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class _Track:
    box: Box
    prediction: Prediction
    missed: int = 0


class Smoother:
    """`update(result) -> result` with track ids set and predictions smoothed.

    factor: weight of the past in [0, 1); 0 turns smoothing off (ids are still assigned).
    Smoothed = factor * previous + (1 - factor) * current. A heatmap restarts from the current
    one when its method, explained class or shape changes. Tracks unseen for `max_missed`
    frames are forgotten, so memory stays bounded. `cut()` forgets every track: the next frame
    does not follow the one before (a new pass of a looped source, a reconnected stream).
    """

    def __init__(self, factor: float, min_iou: float = 0.3, max_missed: int = 5):
        if not 0.0 <= factor < 1.0:
            raise ValueError(f"smoothing factor must be in [0, 1), got {factor}")
        self.factor, self.min_iou, self.max_missed = factor, min_iou, max_missed
        self._tracks: dict[int, _Track] = {}
        self._next_id = 0

    def cut(self) -> None:
        """Start over: no average and no track carries into the next frame, whose faces get new
        ids (ids keep counting, so an id never names two faces of one stream)."""
        self._tracks.clear()

    def _match(self, faces: tuple[Face, ...]) -> list[int | None]:
        """Greedy matching by IoU, best pairs first; the track id per face or None."""
        pairs = sorted(((iou(face.box, track.box), face_i, track_id)
                        for face_i, face in enumerate(faces)
                        for track_id, track in self._tracks.items()), reverse=True)
        matched: list[int | None] = [None] * len(faces)
        used = set()
        for overlap, face_i, track_id in pairs:
            if overlap < self.min_iou:
                break
            if matched[face_i] is None and track_id not in used:
                matched[face_i] = track_id
                used.add(track_id)
        return matched

    def explain_classes(self, faces: tuple[Face, ...]) -> np.ndarray:
        """int64 [N]: the class to explain for each face when the user pinned none: its track's
        smoothed predicted class, or -1 (the frame's own prediction) for a face with no track.

        Explaining the smoothed class keeps the heatmap on the class the label shows, and keeps
        its average going while the raw top class flickers between two close classes."""
        return np.array([-1 if track_id is None else self._tracks[track_id].prediction.predicted
                         for track_id in self._match(faces)], np.int64)

    def _blend(self, old: Prediction, new: Prediction) -> Prediction:
        f = self.factor
        probs = (f * old.probs + (1.0 - f) * new.probs).astype(np.float32)
        same = (old.method == new.method and old.explained == new.explained
                and old.heatmap.shape == new.heatmap.shape)
        heatmap = (f * old.heatmap + (1.0 - f) * new.heatmap).astype(np.float32) if same else new.heatmap
        similarity = (f * old.similarity + (1.0 - f) * new.similarity).astype(np.float32) \
            if old.similarity.shape == new.similarity.shape else new.similarity
        return replace(new, probs=probs, heatmap=heatmap, predicted=int(predicted_classes(probs)), similarity=similarity)

    def update(self, result: FrameResult) -> FrameResult:
        matched = self._match(result.faces)
        faces, predictions, seen = [], [], set()
        for i, face in enumerate(result.faces):
            track_id = matched[i]
            prediction = result.predictions[i] if result.predictions else None
            if track_id is None:
                track_id, self._next_id = self._next_id, self._next_id + 1
            elif prediction is not None and self.factor > 0:
                prediction = self._blend(self._tracks[track_id].prediction, prediction)
            seen.add(track_id)
            if prediction is not None:
                self._tracks[track_id] = _Track(face.box, prediction)
                predictions.append(prediction)
            faces.append(replace(face, track_id=track_id))
        for track_id in list(self._tracks):
            if track_id not in seen:
                track = self._tracks[track_id]
                if track.missed + 1 > self.max_missed:
                    del self._tracks[track_id]
                else:
                    self._tracks[track_id] = replace(track, missed=track.missed + 1)
        return replace(result, faces=tuple(faces), predictions=tuple(predictions))
