"""Leave-one-out scores of a gallery and the unknown-face threshold chosen from them (numpy only).

Leave-one-out: each photo i of identity k is matched against the gallery rebuilt without it
(identity k = the L2-normalised mean of k's other photos' L2-normalised embeddings; the other
identities as enrolled). Its cosine similarity to k^-i is a *genuine* score, those to the other
identities are *impostor* scores, and its best match is its leave-one-out identification. A photo
whose identity has no other photo gives no genuine score and is not identified.

Threshold: the equal-error point of those scores, the T that minimises max(FRR(T), FAR(T)) with
FRR = the fraction of genuine scores below T (enrolled faces called unknown) and FAR = the
fraction of impostor scores at or above T (a face taken for someone else when it is nobody
enrolled); of the interval of such T, its middle. A face whose best similarity is below T is
`unknown`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT = 0.3  # without genuine or impostor scores (one photo each, or one identity)


@dataclass(frozen=True)
class LeaveOneOut:
    """genuine: float [G], impostor: float [I] cosine similarities; predicted: int [M] best
    match per photo (-1: not identified, its identity has one photo); targets: int [M]."""

    genuine: np.ndarray
    impostor: np.ndarray
    predicted: np.ndarray
    targets: np.ndarray

    @property
    def accuracy(self) -> float | None:
        """Leave-one-out identification accuracy over the photos that could be identified."""
        counted = self.predicted >= 0
        return float((self.predicted[counted] == self.targets[counted]).mean()) if counted.any() else None


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.sqrt((rows * rows).sum(axis=-1, keepdims=True) + 1e-12)


def leave_one_out(embeddings: np.ndarray, targets: np.ndarray, identities: int, chunk: int = 1024) -> LeaveOneOut:
    """embeddings float [M, D] (any norm), targets int [M] into 0..identities-1. Photos are
    matched `chunk` at a time, and the M x (identities - 1) impostor scores kept as float32
    (a list of Python floats took 1 GB for 2000 people x 5 photos)."""
    units = _unit(np.asarray(embeddings, np.float64))
    targets = np.asarray(targets, np.int64)
    sums = np.stack([units[targets == k].sum(axis=0) for k in range(identities)])
    counts = np.bincount(targets, minlength=identities)
    gallery = _unit(sums)
    rows = np.arange(len(units))
    # its own identity rebuilt without the photo: the L2-normalised sum of the others
    own = np.einsum("md,md->m", _unit(sums[targets] - units), units)
    impostor = np.empty((len(units), max(identities - 1, 0)), np.float32)
    predicted = np.full(len(units), -1, np.int64)
    others = np.ones((len(units), identities), bool)
    others[rows, targets] = False
    for start in range(0, len(units), chunk):
        part = slice(start, start + chunk)
        scores = units[part] @ gallery.T  # [chunk, identities]
        impostor[part] = scores[others[part]].reshape(len(scores), -1)
        scores[np.arange(len(scores)), targets[part]] = own[part]
        predicted[part] = scores.argmax(axis=1)
    known = counts[targets] >= 2  # a photo whose identity has no other photo gives no genuine score
    predicted[~known] = -1
    return LeaveOneOut(own[known], impostor.ravel(), predicted, targets)


def equal_error_threshold(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, str]:
    """(threshold, how it was chosen): see the module docstring; DEFAULT when either side is empty."""
    genuine, impostor = np.asarray(genuine, np.float64), np.asarray(impostor, np.float64)
    if not len(genuine) or not len(impostor):
        missing = "genuine (no identity has 2 photos)" if not len(genuine) else "impostor (one identity)"
        return DEFAULT, f"default {DEFAULT}: no leave-one-out {missing} scores"
    values = np.unique(np.concatenate([genuine, impostor]))
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    # counts by binary search: O((G + I) log) time and memory (a [candidates, scores] comparison
    # took 2.5 GB for 100 people x 5 photos and could not run for 1000)
    frr = np.searchsorted(np.sort(genuine), candidates, side="left") / len(genuine)
    far = (len(impostor) - np.searchsorted(np.sort(impostor), candidates, side="left")) / len(impostor)
    cost = np.maximum(frr, far)
    best = np.flatnonzero(cost == cost.min())
    # the best candidates form one interval (frr rises, far falls): its middle
    threshold = float((candidates[best[0]] + candidates[best[-1]]) / 2)
    return threshold, (f"equal error rate of leave-one-out scores ({len(genuine)} genuine, {len(impostor)} "
                       f"impostor): FRR {frr[best[0]]:.3f}, FAR {far[best[-1]]:.3f}")
