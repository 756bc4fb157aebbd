"""Does a quantized CAM graph still explain what its float32 graph explains? Pure numpy.

Compared on held-out face crops (not used for calibration), per crop, then averaged:
- top-1 agreement: the fraction of crops whose most probable class is the same;
- probability difference: max over classes of |p_int8 - p_fp32| (mean and worst crop);
- per heatmap method, both maps explaining the float32 graph's predicted class, normalised for
  display as the method's registry entry says (`camface.methods.normalize`) and upsampled
  bilinearly to the crop, as the overlay draws them (`camface.realtime.overlay.upsample`):
  * Pearson correlation r of the two upsampled maps (1 = the same picture up to brightness);
  * overlap of their top-20% regions, as intersection over union (IoU). The top-20% region is
    where the eye reads "the model looks here"; two unrelated maps overlap by
    0.2 / (2 - 0.2) = 0.11 on average (chance), identical maps by 1.
  * the crops whose map holds NaN or inf where the float32 one is finite (the display shows such a
    map as zeros, so Pearson r can miss it: a zero float32 map against a NaN one reads r = 1).
    Any such crop fails the export.

THRESHOLDS fail an export. Top-1 agreement >= 90% and a mean probability difference <= 0.05:
a sound int8 graph changes probabilities by ~1e-3 on the bundled emotion model; a badly
calibrated one (all-black calibration crops) flipped ~95% of predictions while the pixels' own
range was calibrated too (export/int8.py pixel_ranges), and now fails on its maps. Per heatmap method,
mean Pearson r >= 0.90 and top-20% overlap >= 0.60 (5x chance) -- or, for a map that is
ill-conditioned at its target layer, what the float32 graph itself achieves when every pixel
of the crops is nudged by one grey level (camera noise is larger), less MARGIN: the noise
floor. Grad-CAM++ at the emotion graph's add_3 (no ReLU there, its denominator nears zero)
once moved as much under that nudge (r ~0.74) as under int8 (r ~0.77); since camface/methods.py
conditions its denominator every method there holds r >= 0.99 under both (`camface export
--int8` prints them), and a bar is then lowered by less than 0.01. The floor rejects only a
graph that moves a map more than noise does (all-black calibration: Grad-CAM r 0.52).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

TOP_FRACTION = 0.2  # the "top-20%" region of a heatmap
MARGIN = 0.1  # below the noise floor's Pearson r and overlap that a heatmap may fall
NUDGE = 1  # grey levels of uniform integer noise for the noise floor


@dataclass(frozen=True)
class Thresholds:
    """Limits an int8 graph must meet on the held-out crops (means over crops)."""

    top1_agreement: float = 0.90  # at most 1 crop in 10 may change its predicted class
    mean_prob_difference: float = 0.05  # mean over crops of max_c |p_int8 - p_fp32|
    heatmap_pearson: float = 0.90  # per method, mean Pearson r of the upsampled maps
    heatmap_overlap: float = 0.60  # per method, mean IoU of the top-20% regions (chance 0.11)


THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class MethodAgreement:
    """One heatmap method's agreement: means over crops (and the worst crop's Pearson r)."""

    pearson: float
    overlap: float
    worst_pearson: float
    crops: int = 0  # crops compared (0: all of the Agreement's)
    nonfinite: int = 0  # crops whose map holds NaN or inf where the reference's is finite


@dataclass(frozen=True)
class Agreement:
    """int8 vs float32 on `crops` held-out crops; `methods`: method name -> MethodAgreement."""

    crops: int
    top1_agreement: float
    mean_prob_difference: float
    max_prob_difference: float
    methods: dict = field(default_factory=dict)
    not_compared: dict = field(default_factory=dict)  # method -> why it was not compared

    def bars(self, thresholds: Thresholds = THRESHOLDS, floor: "Agreement | None" = None) -> dict:
        """method -> (Pearson bar, overlap bar): the fixed thresholds, lowered to the noise
        floor less MARGIN for a method whose floor lies below them."""
        out = {}
        for name in self.methods:
            pearson_bar, overlap_bar = thresholds.heatmap_pearson, thresholds.heatmap_overlap
            if floor is not None and name in floor.methods:
                pearson_bar = min(pearson_bar, floor.methods[name].pearson - MARGIN)
                overlap_bar = min(overlap_bar, floor.methods[name].overlap - MARGIN)
            out[name] = (pearson_bar, overlap_bar)
        return out

    def failures(self, thresholds: Thresholds = THRESHOLDS, floor: "Agreement | None" = None) -> list[str]:
        """One line per threshold this agreement misses (empty when it meets them all);
        `floor`: the float32 graph's agreement with itself under NUDGE (see the module)."""
        out = []
        if self.top1_agreement < thresholds.top1_agreement:
            out.append(f"top-1 agreement {self.top1_agreement:.1%} < {thresholds.top1_agreement:.0%}")
        if not self.mean_prob_difference <= thresholds.mean_prob_difference:
            out.append(f"mean probability difference {self.mean_prob_difference:.3f} > "
                       f"{thresholds.mean_prob_difference:.3f}")
        for name, (pearson_bar, overlap_bar) in self.bars(thresholds, floor).items():
            m = self.methods[name]
            if m.nonfinite:  # normalize() shows a NaN map as zeros: Pearson r alone can miss it
                out.append(f"{name} heatmap not finite (NaN or inf) on {m.nonfinite} of {m.crops or self.crops} "
                           "crops where the reference's is finite")
            if not m.pearson >= pearson_bar:  # NaN fails too
                out.append(f"{name} heatmap Pearson r {m.pearson:.3f} < {pearson_bar:.3f}")
            if not m.overlap >= overlap_bar:
                out.append(f"{name} top-20% overlap {m.overlap:.3f} < {overlap_bar:.3f}")
        return out

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Agreement":
        methods = {name: MethodAgreement(**m) for name, m in data.get("methods", {}).items()}
        return cls(**{**data, "methods": methods})

    def lines(self) -> list[str]:
        """Human-readable summary, one line for the classes and one per method."""
        out = [f"top-1 agreement {self.top1_agreement:.1%} on {self.crops} held-out crops; probability "
               f"difference mean {self.mean_prob_difference:.4f}, max {self.max_prob_difference:.4f}"]
        for name, m in self.methods.items():
            on = f" on {m.crops} crops" if m.crops and m.crops != self.crops else ""
            out.append(f"{name}: Pearson r {m.pearson:.3f} (worst crop {m.worst_pearson:.3f}), "
                       f"top-20% overlap {m.overlap:.3f}{on}"
                       + (f", NOT FINITE on {m.nonfinite} crops" if m.nonfinite else ""))
        out += [f"{name}: not compared ({why})" for name, why in self.not_compared.items()]
        return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps of one shape; 1.0 when both are constant (nothing to
    tell apart), 0.0 when only one is."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    na, nb = float(np.sqrt(a @ a)), float(np.sqrt(b @ b))
    if na < 1e-12 or nb < 1e-12:
        return 1.0 if na < 1e-12 and nb < 1e-12 else 0.0
    return float(a @ b / (na * nb))


def top_region(heatmap: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """bool mask of the pixels at or above the map's (1 - fraction) quantile that are > 0 (a
    normalised map that is zero there holds no evidence to point at)."""
    heatmap = np.asarray(heatmap, np.float32)
    return (heatmap >= np.quantile(heatmap, 1.0 - fraction)) & (heatmap > 0)


def region_overlap(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """Intersection over union of the top-`fraction` regions of two maps; 1.0 when both are empty."""
    ra, rb = top_region(a, fraction), top_region(b, fraction)
    union = int(np.count_nonzero(ra | rb))
    return 1.0 if union == 0 else int(np.count_nonzero(ra & rb)) / union


def nudge(crops: np.ndarray, levels: int = NUDGE, seed: int = 0) -> np.ndarray:
    """uint8 crops plus seeded uniform integer noise in [-levels, levels], clipped to 0..255."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-levels, levels + 1, crops.shape)
    return np.clip(crops.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def compare(probs_ref: np.ndarray, probs: np.ndarray, heatmaps_ref: dict, heatmaps: dict,
            side: int) -> Agreement:
    """Agreement of a graph's outputs with the reference (float32) graph's on the same crops.

    probs_*: float32 [N, classes]. heatmaps_*: method -> float32 [N, h, w] (unnormalised, both
    explaining the same class per crop). side: crop size in pixels the maps are upsampled to.
    """
    from camface.methods import normalize
    from camface.realtime.overlay import upsample

    probs_ref, probs = np.asarray(probs_ref, np.float32), np.asarray(probs, np.float32)
    if probs_ref.shape != probs.shape or not len(probs):
        raise ValueError(f"probabilities of different shapes: {probs_ref.shape} vs {probs.shape}")
    difference = np.abs(probs - probs_ref).max(axis=1)
    methods = {}
    for name in heatmaps_ref:
        rs, overlaps, nonfinite = [], [], 0
        for ref, got in zip(heatmaps_ref[name], heatmaps[name]):
            nonfinite += int(bool(np.isfinite(ref).all() and not np.isfinite(got).all()))
            ref_up, got_up = upsample(normalize(ref, name), side), upsample(normalize(got, name), side)
            rs.append(pearson(ref_up, got_up))
            overlaps.append(region_overlap(ref_up, got_up))
        methods[name] = MethodAgreement(float(np.mean(rs)), float(np.mean(overlaps)), float(np.min(rs)),
                                        len(rs), nonfinite)
    return Agreement(
        crops=len(probs),
        top1_agreement=float(np.mean(probs.argmax(1) == probs_ref.argmax(1))),
        mean_prob_difference=float(difference.mean()),
        max_prob_difference=float(difference.max()),
        methods=methods,
    )
