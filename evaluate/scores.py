"""Scores of every heatmap method of a CAM graph on a set of crops, through ONNX Runtime only:
one graph call per 32 crops for the maps, then the perturbed crops (camface.evaluate.metrics)
classified in batches of 32 by the graph pruned to `probs` (the whole graph when the `onnx`
package is absent: slower, same numbers)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from camface import graph_spec, methods
from camface.evaluate import metrics

log = logging.getLogger(__name__)

BATCH = 32  # the graph's batch range is 1..32
# perturbed crops held at once (a multiple of BATCH): 256 x 224 x 224 x 3 bytes is 39 MB, whatever --steps
CHUNK = 256
# what the curves score, by the graph output read: words for the plot's axis and the table
SCORED = {graph_spec.OUTPUT_PROBS: "probability of the explained class",
          graph_spec.OUTPUT_SIMILARITY: "cosine similarity to the explained identity"}


def scored_output(info) -> str:
    """The output the curves score: a gallery graph's `similarity` (what its maps explain),
    else `probs`."""
    return graph_spec.OUTPUT_SIMILARITY if info.gallery else graph_spec.OUTPUT_PROBS


@dataclass(frozen=True)
class MethodScores:
    """One method's scores over N crops (means, and per crop). Curves: mean probability of the
    explained class at steps 0..K (fraction t / K of the pixels removed or revealed)."""

    method: str
    deletion_auc: float
    insertion_auc: float
    average_drop: float  # %
    increase_in_confidence: float  # %
    deletion_curve: tuple[float, ...]
    insertion_curve: tuple[float, ...]
    seconds: float  # perturbing and classifying, this method's share
    per_crop: dict = field(default_factory=dict)  # deletion_auc, insertion_auc, masked_prob: lists

    @property
    def crops_per_second(self) -> float:
        count = len(self.per_crop.get("deletion_auc", ()))
        return count / self.seconds if self.seconds > 0 else float("nan")

    def to_json(self) -> dict:
        return {"method": self.method, "deletion_auc": self.deletion_auc, "insertion_auc": self.insertion_auc,
                "average_drop_pct": self.average_drop, "increase_in_confidence_pct": self.increase_in_confidence,
                "deletion_curve": list(self.deletion_curve), "insertion_curve": list(self.insertion_curve),
                "seconds": self.seconds, "crops_per_second": self.crops_per_second, "per_crop": self.per_crop}


class Scorer:
    """`score(crops, method_names) -> (predicted, probability, [MethodScores])` for one graph.

    graph: a CamGraph loaded from its file. steps: K of the deletion / insertion curves.
    baseline: "blur" or "mean" (metrics.BASELINES). device, threads: as the graph's (for the
    pruned copy). progress: show a tqdm bar. chunk: the most perturbed crops made and held at
    once (CHUNK)."""

    def __init__(self, graph, steps: int = 16, baseline: str = "blur", device: str = "auto", threads: int = 0,
                 progress: bool = False, chunk: int = CHUNK):
        if steps < 2:
            raise ValueError(f"--steps must be at least 2, got {steps}")
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        if baseline not in metrics.BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose from {', '.join(metrics.BASELINES)}")
        self.graph, self.steps, self.baseline, self.progress, self.chunk = graph, steps, baseline, progress, chunk
        self.output = scored_output(graph.info)
        self._probs_session = _probability_session(graph, device, threads, (self.output,))
        self._device, self._threads, self._heatmap_sessions = device, threads, {}

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (a gallery graph's similarities) float32 [M, classes] of uint8 crops
        [M, H, W, C], BATCH per call."""
        session = self._probs_session
        wanted = {i.name for i in session.get_inputs()}
        out = []
        for start in range(0, len(images), BATCH):
            chunk = np.ascontiguousarray(images[start:start + BATCH])
            feed = {graph_spec.INPUT_IMAGE: chunk, graph_spec.INPUT_CLASS: np.full(len(chunk), -1, np.int64)}
            out.append(session.run([self.output], {k: v for k, v in feed.items() if k in wanted})[0])
        return np.concatenate(out) if out else np.zeros((0, len(self.graph.info.labels)), np.float32)

    def heatmaps(self, crops: np.ndarray, names) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(probs [N, classes] (a gallery graph's similarities), {method: [N, h, w]}) of the
        predicted class (`predicted_classes`: the first of tied top probabilities, as live names
        and explains it; the graph explains the argmax of its logits, which a saturated sigmoid
        may make another of the tied classes), BATCH crops per call."""
        from camface.realtime.results import predicted_classes

        names = tuple(names)
        if names not in self._heatmap_sessions:
            self._heatmap_sessions[names] = _probability_session(self.graph, self._device, self._threads,
                                                                 (self.output, *names))
        probs, maps = self._run_heatmaps(self._heatmap_sessions[names], crops, np.full(len(crops), -1, np.int64),
                                         names)
        top = probs.max(axis=1, keepdims=True) if len(probs) else probs
        tied = np.flatnonzero((probs == top).sum(axis=1) > 1)
        if len(tied):  # explained again for the class scored (`score`: the first of the tied)
            _, again = self._run_heatmaps(self._heatmap_sessions[names], crops[tied],
                                          predicted_classes(probs[tied]), names)
            for name in names:
                maps[name][tied] = again[name]
        return probs, maps

    def _run_heatmaps(self, session, crops, class_index, names):
        probs, maps = [], {name: [] for name in names}
        for start in range(0, len(crops), BATCH):
            chunk = np.ascontiguousarray(crops[start:start + BATCH])
            values = session.run([self.output, *names], {
                graph_spec.INPUT_IMAGE: chunk, graph_spec.INPUT_CLASS: class_index[start:start + BATCH]})
            probs.append(values[0])
            for name, value in zip(names, values[1:]):
                maps[name].append(value)
        return np.concatenate(probs), {name: np.concatenate(v) for name, v in maps.items()}

    def score(self, crops: np.ndarray, names) -> tuple[np.ndarray, np.ndarray, list[MethodScores]]:
        """Every method of `names` on `crops` (uint8 [N, H, W, C]): (predicted class [N],
        its probability [N], scores in the order of `names`)."""
        from tqdm import tqdm

        names = list(names)
        from camface.realtime.results import predicted_classes

        probs, maps = self.heatmaps(crops, names)
        predicted = predicted_classes(probs)
        full = probs[np.arange(len(crops)), predicted].astype(np.float64)
        baselines = np.stack([metrics.BASELINES[self.baseline](crop) for crop in crops])
        empty = self.classify(baselines)[np.arange(len(crops)), predicted].astype(np.float64)
        inner = self.steps - 1
        per_crop = 2 * inner + 1  # K - 1 deletion crops, K - 1 insertion crops, the masked crop
        results = []
        with tqdm(total=len(names) * len(crops), desc="evaluate", unit="crop", disable=not self.progress,
                  leave=False) as bar:
            for name in names:
                started = time.perf_counter()
                chosen = np.empty(len(crops) * per_crop, np.float64)  # the predicted class's, in stream order
                done = 0
                for images in _bounded(self._perturbed(crops, baselines, maps[name], name), self.chunk):
                    p = self.classify(images)
                    owners = np.arange(done, done + len(images)) // per_crop
                    chosen[done:done + len(images)] = p[np.arange(len(images)), predicted[owners]]
                    bar.update((done + len(images)) // per_crop - done // per_crop)
                    done += len(images)
                chosen = chosen.reshape(len(crops), per_crop)
                deletion = [metrics.curve(full[i], chosen[i, :inner], empty[i], insert=False)
                            for i in range(len(crops))]
                insertion = [metrics.curve(full[i], chosen[i, inner:2 * inner], empty[i], insert=True)
                             for i in range(len(crops))]
                masked = [float(v) for v in chosen[:, -1]]
                seconds = time.perf_counter() - started
                deletion, insertion = np.array(deletion), np.array(insertion)
                results.append(MethodScores(
                    method=name,
                    deletion_auc=float(np.mean([metrics.auc(c) for c in deletion])),
                    insertion_auc=float(np.mean([metrics.auc(c) for c in insertion])),
                    average_drop=metrics.average_drop(full, masked),
                    increase_in_confidence=metrics.increase_in_confidence(full, masked),
                    deletion_curve=tuple(float(v) for v in deletion.mean(axis=0)),
                    insertion_curve=tuple(float(v) for v in insertion.mean(axis=0)),
                    seconds=seconds,
                    per_crop={"deletion_auc": [round(metrics.auc(c), 6) for c in deletion],
                              "insertion_auc": [round(metrics.auc(c), 6) for c in insertion],
                              "masked_prob": [round(v, 6) for v in masked]},
                ))
        return predicted, full, results

    def _perturbed(self, crops, baselines, heatmaps, name):
        """The perturbed crops of one method, crop by crop: its K - 1 deletion crops, K - 1
        insertion crops, then its masked crop; uint8 pieces [<= self.chunk, H, W, C]."""
        size = crops.shape[1:3]
        for crop, baseline, heatmap in zip(crops, baselines, heatmaps):
            ranks = metrics.pixel_ranks(metrics.upsample(heatmap, size))
            for insert in (False, True):
                for first in range(1, self.steps, self.chunk):
                    stop = min(first + self.chunk, self.steps)
                    yield metrics.perturbation_series(crop, baseline, ranks, self.steps, insert, first, stop)
            shown = metrics.upsample(methods.normalize(heatmap, name), size)
            yield metrics.masked_crop(crop, shown)[None]


def _bounded(pieces, chunk: int):
    """The pieces (arrays of at most `chunk` rows) joined into arrays of at most `chunk` rows,
    in order: what is held at once stays bounded whatever the number of steps."""
    held, count = [], 0
    for piece in pieces:
        if held and count + len(piece) > chunk:
            yield np.concatenate(held)
            held, count = [], 0
        held.append(piece)
        count += len(piece)
    if held:
        yield np.concatenate(held)


def _probability_session(graph, device: str, threads: int, outputs: tuple[str, ...]):
    """An ONNX Runtime session of the graph pruned to `outputs` (the scored output, and the
    heatmaps asked for: ORT runs every node of a graph whatever is asked for, the perturbed crops
    need no heatmaps and the heatmaps asked for need no Score-CAM), or the graph's own session
    when the `onnx` package is not installed."""
    try:
        from camface.realtime.bench.heads import prune
        from camface.realtime.graph import CamGraph

        pruned = prune(graph.model_bytes, outputs)
    except Exception as exc:  # onnx missing (ModelError) or a graph onnx cannot prune
        log.info("camface evaluate: running the whole graph (%s)", exc)
        return graph.session
    return CamGraph.from_bytes(pruned, graph.path, device, threads, contract=False).session
