"""Which of a CAM graph's maps to show first: at export, its heatmap methods are scored for
faithfulness exactly as `camface evaluate` scores them (camface.evaluate: faces detected and
cropped as live, deletion / insertion AUC after RISE, arXiv:1806.07421 sec. 4.1, and Average Drop /
Increase in Confidence after Grad-CAM++, arXiv:1710.11063 sec. 5.1, each crop's predicted class
explained), and the ranking is written into the graph's metadata (graph_spec.META_RANKING), where
`--method auto` finds it (graph_spec.auto_method) and `camface info` shows it.

Crops: those `camface evaluate --source SRC` scores with its defaults: every EVERY-th of the first
FRAMES frames of a clip or the sample (every image of a folder), at most MAX_CROPS of them, evenly
spaced. Steps and baseline: evaluate's defaults (16 steps, the crop blurred).

Time budget: scoring costs about crops x (2 steps - 1) x methods classifications. A batch is
timed first; when the estimate exceeds `seconds` the crops are thinned (evenly) to fit, down to
MIN_CROPS, and below that nothing is scored: the metadata then says why, and `--method auto`
falls back to Grad-CAM. `make models` ranks the bundled graph without a budget (all 117 of the
sample's crops, whatever the machine's speed); benchmarks/export_ranking.py measures the cost.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from camface import graph_spec, methods

log = logging.getLogger(__name__)

FRAMES, EVERY, STEPS, BASELINE = 300, 5, 16, "blur"  # `camface evaluate`'s defaults
MAX_CROPS, MIN_CROPS = 128, 16
SECONDS = 30.0  # default scoring budget (estimated before scoring); 0 = no limit
# ONNX Runtime threads: one. The perturbed crops are many small runs; a second thread saves little
# wall time on an idle machine and costs twice the CPU time when other work shares the cores.
THREADS = 1


@contextlib.contextmanager
def quiet_graph_log(debug: bool = False):
    """The commands that rank (export, enroll, train) load the graph they write several times,
    each load logging "CAM graph NAME on CPUExecutionProvider" (always CPU here): shown under
    --debug only; the log's level is as it was afterwards."""
    logger = logging.getLogger("camface.realtime.graph")
    level = logger.level
    if not debug:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def rank_crops(graph, crops: np.ndarray, settings: dict, seconds: float = SECONDS) -> dict:
    """The ranking to record (graph_spec.META_RANKING) of `graph` (a CamGraph) on `crops` (uint8
    [N, H, W, C] in its colour order; more than MAX_CROPS are thinned evenly): {"rule",
    "ranking", "scores", "settings"}, or {"skipped": why} when there are too few crops or too
    few fit the budget (`seconds`, 0: none). `settings` (source, frames_read, every) is
    recorded beside the scoring's own."""
    from camface.evaluate.cli import resolve_methods
    from camface.evaluate.report import METRICS, RANDOM, RANKED_BY, rank, ranking
    from camface.evaluate.scores import Scorer
    from camface.export.calibration import evenly

    names = resolve_methods("all", tuple(graph.info.heatmaps))
    if len(crops) < MIN_CROPS:
        return {"skipped": f"{len(crops)} face crops in {settings['source']}, fewer than the {MIN_CROPS} "
                           "a ranking needs"}
    found = len(crops)
    crops = evenly(crops, MAX_CROPS)
    scorer = Scorer(graph, steps=STEPS, baseline=BASELINE, device="cpu", threads=THREADS)
    left_out = _too_costly(graph, scorer, crops, names, seconds) if seconds > 0 else {}
    names = tuple(name for name in names if name not in left_out)
    estimate = _estimate(scorer, crops, len(names)) if seconds > 0 else 0.0
    log.info("ranking %d methods on %d crops (%s)", len(names), len(crops),
             f"estimated {estimate:.0f} s" if seconds > 0 else "no time budget")
    started = time.perf_counter()
    if seconds > 0 and estimate > seconds:
        fit = int(len(crops) * seconds / estimate)
        if fit < MIN_CROPS:
            return {"skipped": f"scoring {len(names)} methods on {MIN_CROPS} crops would take about "
                               f"{estimate * MIN_CROPS / len(crops):.0f} s here, over the {seconds:g} s budget "
                               "(--rank-seconds)"}
        log.info("ranking on %d of %d crops to stay within %g s", fit, len(crops), seconds)
        crops = evenly(crops, fit)
    _, _, scores = scorer.score(crops, names)
    log.info("ranked in %.1f s", time.perf_counter() - started)
    by_method = {s.method: s.to_json() for s in scores}
    shown = set(methods.names(display_only=True))
    keys = [key for key, _, _ in METRICS.values()]
    return {
        "rule": f"{METRICS[RANKED_BY][0]} ({'higher' if METRICS[RANKED_BY][2] else 'lower'} is better)",
        "ranking": [name for name in ranking(rank(by_method)) if name in shown],
        # an undefined mean (Average Drop of a gallery graph whose crops all score <= 0: NaN) is
        # stored as null, never as NaN (not JSON; a strict reader of the metadata fails on it)
        "scores": {name: {key: _rounded(m[key]) for key in keys} for name, m in by_method.items()},
        **({"left_out": left_out} if left_out else {}),
        "settings": {**settings, "crops": int(len(crops)), **({"crops_found": found} if found > len(crops) else {}),
                     "steps": STEPS, "baseline": BASELINE,
                     "explained_class": "predicted", "baseline_method": RANDOM if RANDOM in by_method else None,
                     "provider": graph.provider},
    }


def source_crops(source: str, graph) -> tuple[np.ndarray, dict]:
    """(crops uint8 [N, H, W, C], settings) of `source` as `camface evaluate --source SOURCE`
    cuts them for `graph` (a CamGraph): every EVERY-th of the first FRAMES frames of a clip or
    the sample, every image of a folder (`--every 1`). No face: zero crops. SourceError when
    the source does not open."""
    from camface.evaluate.cli import default_every, default_frames
    from camface.evaluate.crops import NoFaces, from_source
    from camface.realtime.config import LiveConfig

    every = default_every(source)
    try:
        crops, read = from_source(LiveConfig(source=source), graph, default_frames(source), every)
    except NoFaces as exc:
        info = graph.info
        crops, read = np.zeros((0, *info.input_size, info.channels), np.uint8), exc.frames
    return crops, {"source": source, "frames_read": read, "every": every}


def record(result, source: str | None, seconds: float = SECONDS, crops: np.ndarray | None = None,
           settings: dict | None = None, name: str | Path | None = None):
    """Score the methods of the graph `result` (an ExportResult) wrote, record the ranking in
    its metadata, write it again; the ExportResult with `info.ranking` set and the seconds
    added. Crops from `source` (see `source_crops`), or `crops` (uint8 [N, H, W, C] in the
    graph's colour order) described by `settings` ({"source": ...}); `source` None and no
    crops: record that the export was asked not to rank. name: the graph's path in messages
    (the path asked for, where `result.path` is a temporary file written beside it)."""
    import onnx

    from camface.export import convert
    from camface.realtime.graph import CamGraph

    started = time.perf_counter()
    model = onnx.load(str(result.path))
    if crops is None and source is None:
        ranked = {"skipped": f"{'enrolled' if result.info.gallery else 'exported'} with --no-rank"}
    elif not result.info.heatmaps:  # --heads without a heatmap (a forward-only graph for timing)
        ranked = {"skipped": "no heatmap exported (--heads): nothing to rank"}
    else:
        graph = CamGraph.from_bytes(model.SerializeToString(), name or result.path, "cpu", threads=THREADS)
        if crops is None:
            crops, settings = source_crops(source, graph)
        ranked = rank_crops(graph, crops, settings or {"source": "given crops"}, seconds)
    info = replace(result.info, ranking=ranked)
    convert.set_metadata(model, info.to_metadata())
    convert.save(model, result.path)
    return replace(result, info=info, seconds=result.seconds + time.perf_counter() - started)


def summary_lines(ranked: dict, fallback: str = graph_spec.FALLBACK_METHOD,
                  ranked_by: str = "`camface export`") -> list[str]:
    """The ranking as text: what it was measured on, then one line per method, best first, and
    the random baseline's scores (`camface export` and `camface info` print these). fallback:
    what `--method auto` shows without a ranking (`graph_spec.auto_method`: Grad-CAM, or the
    first method of a graph that has none). ranked_by: the command that ranks this graph's
    methods (`graph_spec.ranked_by`)."""
    if not ranked:
        return [f"none recorded (made by an older camface, or not by {ranked_by}): --method auto shows "
                f"{fallback}"]
    if "skipped" in ranked:
        return [f"none: {ranked['skipped']}; --method auto shows {fallback}"]
    from camface.evaluate.report import METRICS
    from camface.realtime.config import every_nth_frame

    s = ranked["settings"]
    frames = "" if "every" not in s else (
        f" ({every_nth_frame(s['every'], s['frames_read'])} of {s['frames_read']})" if s["every"] > 1 else f" ({s['frames_read']} images)")
    crops = f"{s['crops']} (evenly spaced) of {s['crops_found']}" if "crops_found" in s else f"{s['crops']}"
    again = ("" if "every" not in s or "crops_found" in s else
             f"; `camface evaluate --source {s['source']}{' --every 1' if s['every'] == 1 else ''}` reproduces it")
    lines = [f"by {ranked['rule']} on {crops} face crops of {s['source']}{frames}"
             + f", {s['steps']} steps, removed pixels -> {s['baseline']}{again}",
             f"{'':4}{'method':<20}" + "".join(f"{label:>16}" for _, label, _ in METRICS.values())]
    scores = ranked["scores"]
    rows = [(str(i + 1), name) for i, name in enumerate(ranked["ranking"])]
    rows += [("-", name) for name in scores if name not in ranked["ranking"]]
    for place, name in rows:
        lines.append(f"{place:<4}{name:<20}" + "".join(
            f"{'n/a':>16}" if not _finite(scores[name].get(key)) else
            f"{scores[name][key]:>16.3f}" if "auc" in key else f"{scores[name][key]:>16.1f}"
            for key, _, _ in METRICS.values()))
    lines += [f"    {name:<20}not ranked: {why}" for name, why in ranked.get("left_out", {}).items()]
    return lines


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _rounded(value) -> float | None:
    """A mean score as recorded: 4 decimals, or None when it is undefined (NaN, infinite)."""
    return round(float(value), 4) if _finite(value) else None


def _too_costly(graph, scorer, crops: np.ndarray, names, seconds: float) -> dict[str, str]:
    """{method: why} for the methods that run the model again (Ablation-CAM, Score-CAM) whose
    maps alone would take longer than `seconds` on `crops`: a FORWARD method is estimated as K
    classifications per crop (without running it: 2048 ResNet-50 passes take minutes), a HEAD
    method is timed on one crop. They are left out of the ranking, not the graph."""
    left_out = {}
    channels = next(o.shape[-1] for o in graph.session.get_outputs() if o.name == graph_spec.OUTPUT_ACTIVATIONS)
    per_image = None
    for name in names:
        method = methods.get(name)
        if not method.reruns:
            continue
        if methods.FORWARD in method.needs:
            if per_image is None:
                batch = np.ascontiguousarray(np.repeat(crops[:1], 8, axis=0))
                scorer.classify(batch)
                started = time.perf_counter()
                scorer.classify(batch)
                per_image = (time.perf_counter() - started) / len(batch)
            cost = per_image * channels * len(crops)
        else:
            graph.run(crops[:1], np.array([-1], np.int64), name)  # allocation
            started = time.perf_counter()
            graph.run(crops[:1], np.array([-1], np.int64), name)
            cost = (time.perf_counter() - started) * len(crops)
        if cost > seconds:
            left_out[name] = (f"{method.passes(channels)}: about {cost:.0f} s for {len(crops)} crops here, "
                              f"over the {seconds:g} s budget (--rank-seconds)")
            log.info("ranking without %s (%s)", name, left_out[name])
    return left_out


def _estimate(scorer, crops: np.ndarray, methods_count: int) -> float:
    """Seconds that scoring `crops` with `methods_count` methods should take: a batch of 32
    crops classified (2 warming runs, then the median of 5 timed ones: one run is ~10 ms, which
    a busy machine's scheduling can double) and scaled to crops x (2 K - 1) x methods."""
    import statistics

    batch = np.ascontiguousarray(np.repeat(crops[:1], 32, axis=0))
    times = []
    for run in range(7):
        started = time.perf_counter()
        scorer.classify(batch)
        if run >= 2:
            times.append(time.perf_counter() - started)
    per_image = statistics.median(times) / len(batch)
    return per_image * len(crops) * (2 * STEPS - 1) * methods_count
