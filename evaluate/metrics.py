"""Faithfulness metrics of a saliency map, in pure numpy: which perturbed crops to classify, and
the scores from the probabilities the classifier gives them.

- Average Drop and Increase in Confidence (Chattopadhay et al., arXiv:1710.11063, sec. 5.1):
  the crop multiplied pixel-wise by its map (upsampled, normalised to [0, 1] as displayed) is
  classified again; Average Drop = mean_i max(0, Y_i - O_i) / Y_i x 100, Increase in Confidence
  = mean_i [Y_i < O_i] x 100, with Y_i the explained class's probability on crop i and O_i on
  the masked crop (O_i above Y_i by more than float32 rounding, ROUNDING: the two come from
  different graph calls, whose kernels may round differently). Lower drop / higher increase is
  better.
- Deletion and Insertion (Petsiuk et al., RISE, arXiv:1806.07421, sec. 4.1): the crop's pixels
  are removed (deletion) or revealed (insertion) in order of the map's value, highest first, in
  K equal steps; the explained class's probability after each step, against the fraction of
  pixels changed, is a curve whose area (trapezoids over [0, 1]) is the score. Lower deletion /
  higher insertion AUC is better. Removed pixels take the value of a `baseline` image: by
  default the crop blurred (RISE's insertion canvas; a Gaussian of sigma = crop side / 8), so
  that deletion does not paint black shapes the classifier may react to; `mean_baseline` is the
  crop's mean colour instead.

Images are uint8 [H, W, C] crops in the graph's colour order; maps float [h, w] at any
resolution (upsampled bilinearly here). Nothing here modifies its inputs.
"""

from __future__ import annotations

import cv2
import numpy as np


def upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float [h, w] -> float32 [H, W] (size = (H, W)), bilinear, as the overlay draws it."""
    height, width = size
    return cv2.resize(np.asarray(heatmap, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def blur_baseline(crop: np.ndarray) -> np.ndarray:
    """The crop blurred with a Gaussian of sigma = side / 8: uint8, same shape."""
    sigma = max(crop.shape[:2]) / 8.0
    blurred = cv2.GaussianBlur(crop, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return blurred.reshape(crop.shape)


def mean_baseline(crop: np.ndarray) -> np.ndarray:
    """The crop's mean colour everywhere: uint8, same shape."""
    mean = crop.reshape(-1, crop.shape[-1]).mean(axis=0)
    return np.broadcast_to(np.round(mean).astype(np.uint8), crop.shape).copy()


BASELINES = {"blur": blur_baseline, "mean": mean_baseline}


def pixel_ranks(saliency: np.ndarray, seed: int = 0) -> np.ndarray:
    """int [H, W]: each pixel's position in the order of decreasing `saliency` (0 = most salient).
    Ties (flat regions, a ReLU's zeros) are broken by a fixed random order, the same for every
    map of that size, so no method gains from scanning ties top-left first."""
    flat = np.asarray(saliency, np.float64).ravel()
    tie_break = np.random.default_rng(seed).permutation(flat.size)
    order = np.lexsort((tie_break, -flat))
    ranks = np.empty(flat.size, np.int64)
    ranks[order] = np.arange(flat.size)
    return ranks.reshape(saliency.shape)


def step_counts(pixels: int, steps: int) -> np.ndarray:
    """Pixels changed after each step 0..K: round(t * pixels / K), int [K + 1]."""
    return np.round(np.arange(steps + 1) * pixels / steps).astype(np.int64)


def perturbation_series(crop: np.ndarray, baseline: np.ndarray, ranks: np.ndarray, steps: int,
                        insert: bool, first: int = 1, stop: int | None = None) -> np.ndarray:
    """The crops of the inner steps 1..K-1 of one deletion (insert=False: the most salient
    pixels take the baseline's value) or insertion (insert=True: the baseline with the most
    salient pixels of the crop) curve: uint8 [K - 1, H, W, C]. Steps 0 and K are the crop and
    the baseline themselves, the same for every map (`curve` adds them). first, stop: only the
    steps first..stop-1 (stop None: K), uint8 [stop - first, H, W, C], to bound the memory."""
    stop = steps if stop is None else stop
    if not 1 <= first <= stop <= steps:
        raise ValueError(f"steps {first}..{stop - 1} are not inner steps of 1..{steps - 1}")
    counts = step_counts(ranks.size, steps)[first:stop]
    changed = (ranks[None] < counts[:, None, None])[..., None]  # [K-1, H, W, 1]
    if insert:
        return np.where(changed, crop[None], baseline[None])
    return np.where(changed, baseline[None], crop[None])


def masked_crop(crop: np.ndarray, normalized_map: np.ndarray) -> np.ndarray:
    """Average Drop's explanation image: crop x map (map in [0, 1] at the crop's size), uint8."""
    return np.round(crop.astype(np.float32) * normalized_map[..., None]).astype(np.uint8)


def curve(full: float, inner: np.ndarray, empty: float, insert: bool) -> np.ndarray:
    """Probabilities at steps 0..K of a deletion curve (full crop first, baseline last) or an
    insertion curve (baseline first): float [K + 1]."""
    ends = (empty, full) if insert else (full, empty)
    return np.concatenate([[ends[0]], np.asarray(inner, np.float64), [ends[1]]])


def auc(values: np.ndarray) -> float:
    """Area under probabilities sampled at equal fractions 0, 1/K, ..., 1 (trapezoids)."""
    values = np.asarray(values, np.float64)
    return float((values[1:] + values[:-1]).sum() / (2 * (len(values) - 1)))


def average_drop(full: np.ndarray, masked: np.ndarray) -> float:
    """Average Drop in %: mean of max(0, Y - O) / Y over crops (Y: full-crop probabilities)
    with Y > 0. A probability always is; a gallery graph's cosine similarity, which its curves
    score, may be <= 0 (an unknown face), where a drop relative to Y means nothing: such crops
    are left out, and with none left the drop is NaN."""
    full, masked = np.asarray(full, np.float64), np.asarray(masked, np.float64)
    kept = full > 0
    if not kept.any():
        return float("nan")
    return float(100.0 * np.mean(np.maximum(0.0, full[kept] - masked[kept]) / full[kept]))


# relative: one crop's probability from two graph calls (a graph pruned otherwise, another batch)
# differs by a few float32 ulps (2^-24 = 6e-8 relative each); a masked crop that is the crop must
# not count as an increase on one CPU and not on another
ROUNDING = 1e-5


def increase_in_confidence(full: np.ndarray, masked: np.ndarray) -> float:
    """Increase in Confidence in %: share of crops whose probability rose on the masked crop (by
    more than ROUNDING of its magnitude)."""
    full, masked = np.asarray(full, np.float64), np.asarray(masked, np.float64)
    return float(100.0 * np.mean(masked - full > ROUNDING * np.maximum(np.abs(full), np.abs(masked))))
