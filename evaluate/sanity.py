"""`camface evaluate --sanity`: do a graph's maps depend on the model, and on the class?
(Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018, arXiv:1810.03292.)

- Model randomisation (sec. 3.1, cascading): the weights are re-drawn from the logits down
  (`camface.evaluate.randomize`), and each step's map of the originally predicted class is
  compared with the original map: Spearman rank correlation and SSIM of the absolute values
  (as the paper's fig. 2-4), the median over crops. A map that still looks like the original
  when every weight is random shows the input, not the model.
- Random logit (the paper's "data randomisation" idea at the output): the map of the predicted
  class against the map of another class drawn at random for the same face. A method that gives
  the same map whatever the class cannot say why the model chose one.

Pass criteria (chosen here; the paper reports curves, not thresholds):
- model randomisation passes when the median Spearman correlation is below SPEARMAN_PASS (0.5)
  both once the head (every layer between the target and the logits) is re-drawn and with every
  weight re-drawn: at most a quarter of the rank order's variance survives. The paper's failures
  are at the top: Guided Backprop's maps stay put while the layers that decide the class are
  random (0.90 on the bundled model after the logits layer), so the head step is where a map
  shows whether it explains the decision; the last step shows whether it explains the model at
  all. A map computed from the target's activations alone (Eigen-CAM) cannot pass the first.
- random logit passes when the median SSIM between the two classes' maps is below SSIM_SAME (0.9):
  above it, the maps differ by less than their rounding and smoothing; Eigen-CAM is near 1 (it is
  class-agnostic by design).

Maps are compared as the paper compares them, by their absolute values: |map| / max |map|,
upsampled to the crop size (bilinear, as the overlay; at most COMPARED pixels a side), so a
signed map's negative part counts as much as its positive part (the overlay of HiResCAM and CAM
shows only one side). A crop whose original map is 0 everywhere (nothing to compare) is left out
of the medians; a map that becomes constant correlates 0; another class's map that is 0 everywhere differs (SSIM about 0). Every
map, the original included, comes from the rebuilt graph (`camface.evaluate.randomize`), which is
checked once against the graph's own outputs: a graph whose maps differ from camface's rebuild
(exported by an older camface, say) gets a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np


log = logging.getLogger(__name__)

SPEARMAN_PASS = 0.5
SSIM_SAME = 0.9
BATCH = 32
SHOWN = 3  # crops drawn in the figure
COMPARED = 112  # largest side (pixels) at which maps are compared
SAME_SHOWN = 1e-3  # the graph's own map and the rebuild's, normalised, differ by at most this
ROUNDING = 1e-5  # ... or by float32 rounding: this fraction of the crop's largest magnitude


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two arrays (flattened; ties get their average rank); 0 when
    either is constant."""
    ra, rb = _ranks(np.ravel(a)), _ranks(np.ravel(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x))
    values, inverse = np.unique(x, return_inverse=True)
    if len(values) < len(x):  # average the ranks of ties
        ranks = (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]
    return ranks


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity (Wang et al., IEEE TIP 13:600, 2004, eq. 13) of two maps in
    [0, 1] (data range 1): 11x11 Gaussian windows of sigma 1.5, K1 = 0.01, K2 = 0.03, the mean
    over the positions whose window lies inside the image."""
    import cv2

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c1, c2 = 0.01 ** 2, 0.03 ** 2

    def blur(x):
        return cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    inner = index[5:-5, 5:-5] if min(index.shape) > 10 else index
    return float(inner.mean())


def compared_size(crop_size) -> tuple[int, int]:
    """Where maps are compared: the crop's size, scaled down to at most COMPARED pixels a side
    (memory: every crop's map is kept for every method)."""
    height, width = (int(d) for d in crop_size)
    scale = min(1.0, COMPARED / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def shown(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """|heatmap| / max |heatmap| (0 where it is 0 everywhere), bilinear to `size` (h, w): float32."""
    from camface.realtime.overlay import upsample

    magnitude = np.abs(np.asarray(heatmap, np.float32))
    peak = float(magnitude.max())
    return upsample(magnitude / peak if peak > 0 else magnitude, size)


@dataclass(frozen=True)
class MethodSanity:
    """One method's sanity figures: per cascade step the median Spearman / SSIM against the
    original map; the random-logit median SSIM; both verdicts."""

    method: str
    steps: tuple[str, ...]
    spearman: tuple[float | None, ...]
    ssim: tuple[float | None, ...]
    random_logit_ssim: float | None
    crops: int  # crops with a non-zero original map (the medians' sample)

    @property
    def head_step(self) -> int:
        """The step after which every layer between the target and the logits is re-drawn."""
        return max(i for i, name in enumerate(self.steps) if name in ("logits", "head"))

    @property
    def randomization_passed(self) -> bool:
        figures = (self.spearman[self.head_step], self.spearman[-1]) if self.spearman else (None,)
        return None not in figures and max(figures) < SPEARMAN_PASS

    @property
    def random_logit_passed(self) -> bool:
        return self.random_logit_ssim is not None and self.random_logit_ssim < SSIM_SAME

    def to_json(self) -> dict:
        return {"model_randomization": {"steps": list(self.steps), "spearman": list(self.spearman),
                                        "ssim": list(self.ssim), "passed": self.randomization_passed,
                                        "head_step": self.steps[self.head_step],
                                        "crops": self.crops},
                "random_logit": {"ssim": self.random_logit_ssim, "passed": self.random_logit_passed}}


def _run(session, crops: np.ndarray, classes: np.ndarray, names) -> dict[str, np.ndarray]:
    out = {name: [] for name in names}
    for start in range(0, len(crops), BATCH):
        values = session.run(list(names), {"image": crops[start:start + BATCH],
                                           "class_index": classes[start:start + BATCH]})
        for name, value in zip(names, values):
            out[name].append(value)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def _session(model_bytes: bytes, threads: int, outputs):
    """A CPU session of the graph pruned to `outputs`: ONNX Runtime runs every node of a graph
    whatever the outputs asked for, and a CAM graph's gradient-free methods (Score-CAM,
    Ablation-CAM) run the model again K times a crop, so the whole graph would cost ~100x the
    methods a sanity check scores."""
    import onnxruntime as ort

    from camface.realtime.graph import prune

    model_bytes = prune(model_bytes, ("probs", *outputs))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def check(randomizer, crops: np.ndarray, names: tuple[str, ...], threads: int = 0,
          progress: bool = False, guided=None) -> tuple[list[MethodSanity], dict]:
    """Both tests on the CAM graph of `randomizer` (a `camface.evaluate.randomize.Randomizer`, its
    seed fixing every draw) for crops uint8 [N, H, W, C] and heatmap `names`; with guided = (Keras model, Preprocessing, target layer), Guided Backprop and Guided
    Grad-CAM too (`camface.evaluate.sanity_guided`, TensorFlow). Returns the per-method figures and what the figure draws: {"crops": SHOWN crops
    spread over the input, "steps": names, "maps": {method: [steps + 1][SHOWN] shown maps}}. Raises
    ModelError for a graph whose weights cannot be re-drawn, or a method it lacks."""
    from tqdm import tqdm

    from camface.errors import ModelError

    cam, seed = randomizer.cam, randomizer.seed
    outputs = {o.name for o in cam.graph.output}
    absent = [name for name in names if name not in outputs]
    if absent:
        raise ModelError(f"the graph has no {', '.join(absent)} heatmap; it offers "
                         f"{', '.join(sorted(outputs - {'probs', 'activations'}))}")
    crops = np.ascontiguousarray(crops)
    size = compared_size(crops.shape[1:3])
    original = _session(randomizer.graph().SerializeToString(), threads, names)
    probs = _run(original, crops, -np.ones(len(crops), np.int64), ("probs",))["probs"]
    predicted = probs.argmax(axis=1)
    reference = _run(original, crops, predicted, names)
    _compare_with_the_graph(cam, crops[:BATCH], predicted[:BATCH], reference, names, threads)
    want = {name: [shown(m, size) for m in reference[name]] for name in names}
    drawn = sorted(set(np.linspace(0, len(crops) - 1, SHOWN).round().astype(int)))  # spread over the clip
    usable = {name: [i for i, m in enumerate(reference[name]) if np.abs(m).max() > 0] for name in names}
    spearmen = {name: [] for name in names}
    ssims = {name: [] for name in names}
    figure_maps = {name: [[want[name][i] for i in drawn]] for name in names}
    for step in tqdm(randomizer.steps, desc="sanity", unit="step", disable=not progress, leave=False):
        graph = randomizer.graph(step)
        missing = [name for name in names if name not in {o.name for o in graph.graph.output}]
        if missing:
            raise ModelError(f"the rebuilt graph has no {', '.join(missing)} heatmap")
        maps = _run(_session(graph.SerializeToString(), threads, names), crops, predicted, names)
        broken = [name for name in names if not np.isfinite(maps[name]).all()]
        if broken:
            raise ModelError(f"randomisation step {step.name!r} gives non-finite {', '.join(broken)} maps")
        for name in names:
            got = [shown(m, size) for m in maps[name]]
            spearmen[name].append(_median([spearman(got[i], want[name][i]) for i in usable[name]]))
            ssims[name].append(_median([ssim(got[i], want[name][i]) for i in usable[name]]))
            figure_maps[name].append([got[i] for i in drawn])
    other = _other_classes(predicted, probs.shape[1], seed)
    switched = _run(original, crops, other, names)
    results = []
    for name in names:
        logit = [ssim(shown(switched[name][i], size), want[name][i]) for i in usable[name]]
        results.append(MethodSanity(name, tuple(s.name for s in randomizer.steps), tuple(spearmen[name]),
                                    tuple(ssims[name]), _median(logit), len(usable[name])))
    if guided is not None:
        from camface.evaluate import sanity_guided

        model, preprocessing, layer = guided
        found, maps = sanity_guided.check(model, preprocessing, layer, crops, predicted, other, drawn,
                                          seed=seed, feature_steps=randomizer.feature_steps, progress=progress)
        results.extend(found)
        figure_maps.update(maps)
    return results, {"crops": crops[drawn], "steps": [s.name for s in randomizer.steps], "maps": figure_maps}


def _other_classes(predicted: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Per crop, a class other than its predicted one, uniformly at random (seeded)."""
    if num_classes < 2:
        from camface.errors import ModelError

        raise ModelError("the random-logit test needs at least 2 classes")
    rng = np.random.default_rng([seed, 1])
    shift = rng.integers(1, num_classes, len(predicted))
    return ((predicted + shift) % num_classes).astype(np.int64)


def _compare_with_the_graph(cam, crops, classes, rebuilt: dict, names, threads: int) -> None:
    """Warn when the graph's own maps differ from the rebuilt graph's as a user sees them: per
    crop, its two maps normalised (`camface.methods.normalize`, as the overlay) differ by more
    than SAME_SHOWN and by more than the rounding of that crop's own map (ROUNDING of its largest
    magnitude; rounding gives ~1e-7). Each crop by its own map: a crop whose maps are far smaller
    than the others' is judged as closely as they are."""
    from camface.methods import normalize

    own = _run(_session(cam.SerializeToString(), threads, names), crops, classes, names)
    differ = {}
    for name in names:
        found = []
        for index, (mine, theirs) in enumerate(zip(own[name], rebuilt[name][:len(crops)])):
            shown_apart = float(np.abs(normalize(mine, name) - normalize(theirs, name)).max())
            rounding = ROUNDING * float(np.abs(mine).max())
            if shown_apart > SAME_SHOWN and float(np.abs(mine - theirs).max()) > rounding:
                found.append((shown_apart, index))
        if found:
            worst, index = max(found)
            differ[name] = f"{len(found)} of {len(crops)} crops, crop {index} by {worst:.3g} of its normalised map"
    if differ:
        log.warning("the graph's own maps differ from camface's rebuild of its explanation (largest difference "
                    "%s): was it exported by another camface version? The sanity figures are those of the "
                    "rebuild; re-export the graph to show the same maps", differ)


def _median(values) -> float | None:
    """The median, rounded; None (JSON null) for no values."""
    return round(float(np.median(values)), 6) if len(values) else None
