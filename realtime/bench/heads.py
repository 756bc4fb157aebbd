"""`camface bench --compare-heads`: what the heatmaps cost. The CAM graph is timed with every
gradient method (pruned to them: what the in-graph backward pass costs; the gradient-free
methods, K passes each, only on their own rows), forward only (pruned to
`probs` and `activations` with onnx.utils) and once per method (pruned to the forward outputs and
that method's heatmap), at fixed batch sizes, the graphs alternating run by run so load on a
shared machine hits all alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

from camface.errors import ModelError

if TYPE_CHECKING:
    from camface.realtime.bench.config import BenchConfig

FORWARD_OUTPUTS = ("probs", "activations")


def forward_only(model_bytes: bytes) -> bytes:
    """The CAM graph pruned to its forward outputs (`probs`, `activations`): every node that
    only the heatmaps need is gone (ONNX Runtime runs the whole graph whatever outputs are
    asked for, so asking for fewer outputs would not show the difference)."""
    return prune(model_bytes, FORWARD_OUTPUTS)


def prune(model_bytes: bytes, outputs) -> bytes:
    """The CAM graph pruned to `outputs` (names), metadata kept (camface.realtime.graph.prune)."""
    from camface.realtime.graph import prune as prune_graph

    try:
        return prune_graph(model_bytes, outputs)
    except ImportError as exc:
        raise ModelError("--compare-heads needs the `onnx` package (pip install 'camface[keras]')") from exc


def sample_crops(config: BenchConfig, info, count: int = 8):
    """Up to `count` face crops (uint8 [n, H, W, C], graph colour order) from the first frames of
    the source; uniform random pixels when the source shows no face."""
    import numpy as np

    from camface.api import face_detector
    from camface.realtime.crop import crop_faces
    from camface.realtime.sources import make_source

    crops = []
    pipeline = config.pipeline
    with make_source(pipeline.source, sample_frames=config.frames) as source, \
            face_detector(pipeline) as detector:
        for index, frame in enumerate(source):
            faces = detector.detect(frame)
            if faces:
                crops.extend(crop_faces(frame, faces, pipeline.margin, info.input_size, info.color_order)[0])
            if len(crops) >= count or index >= 60:
                break
    if not crops:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (count, *info.input_size, info.channels), dtype=np.uint8)
    return np.stack(crops[:count])


# A graph whose untimed first run takes longer is timed by one run, at the first batch size only:
# Score-CAM on ResNet-50 is about 100 s a crop on one thread, so 50 repeats at batches 1 and 8
# would take half a day.
SLOW_RUN_S = 1.0


def time_sessions(sessions: dict, pool, batch: int, repeats: int,
                  slow_s: float | None = None) -> tuple[dict, dict]:
    """(StageStats per session name, {name: seconds of its first run} for the slow ones):
    `repeats` runs of each ONNX Runtime session on `batch` crops taken from `pool` (uint8
    [n, H, W, C]), one run of each in turn so that load on a shared machine hits all alike,
    after one untimed run each (allocation). A session whose untimed run took over `slow_s`
    seconds is run once more, timed, and no more."""
    import time

    import numpy as np

    from camface.realtime.timing import StageTimer

    crops = np.ascontiguousarray(pool[np.arange(batch) % len(pool)])
    feed = {"image": crops, "class_index": np.full(batch, -1, np.int64)}
    feeds = {name: {i.name: feed[i.name] for i in session.get_inputs()} for name, session in sessions.items()}
    timer = StageTimer(tuple(sessions))
    slow = {}
    for name, session in sessions.items():
        started = time.perf_counter()
        session.run(None, feeds[name])
        if slow_s is not None and time.perf_counter() - started > slow_s:
            slow[name] = time.perf_counter() - started
    for run in range(repeats):
        for name, session in sessions.items():
            if run and name in slow:
                continue
            with timer.stage(name):
                session.run(None, feeds[name])
    return timer.stats(), slow


def compare_heads(config: BenchConfig, graph) -> dict:
    """Median and p95 ms of one call of `graph` (a loaded CamGraph) with every gradient method
    ("with gradients": the graph without its gradient-free methods), forward only, and per method (forward outputs + that heatmap), per batch
    size; runs alternate between the graphs; a graph whose first run takes over SLOW_RUN_S is
    timed by one run at the first batch size only ("slow"). Every pruned graph runs on the graph's provider
    with the same threads (an error if it cannot). ms_per_crop = median / batch; overhead_pct:
    against forward only."""
    from camface.realtime.graph import PROVIDER_DEVICES, CamGraph

    pipeline = config.pipeline

    def load(model_bytes: bytes):
        pruned = CamGraph.from_bytes(model_bytes, graph.path, PROVIDER_DEVICES[graph.provider],
                                     pipeline.graph_threads, contract=False)
        if pruned.provider != graph.provider:
            raise ModelError(f"--compare-heads: a pruned graph runs on {pruned.provider}, "
                             f"the full graph on {graph.provider}: the times would not compare")
        return pruned.session

    full = graph.model_bytes
    # "with gradients": every gradient method of the graph together, what the in-graph backward
    # pass costs; the gradient-free methods (each K passes of the head or model: on ResNet-50
    # Score-CAM alone is about a minute a crop) are timed on their own rows only
    from camface.methods import METHODS

    gradient = tuple(m for m in graph.info.heatmaps if not (m in METHODS and METHODS[m].reruns))
    sessions = {"with gradients": load(prune(full, FORWARD_OUTPUTS + gradient)), "forward only": load(forward_only(full))}
    for method in graph.info.heatmaps:
        sessions[method] = load(prune(full, FORWARD_OUTPUTS + (method,)))
    pool = sample_crops(config, graph.info, max(config.batches))
    out = {"provider": graph.provider, "threads": pipeline.graph_threads, "repeats": config.repeats, "batches": {},
           "slow": {}}
    for index, batch in enumerate(config.batches):
        # the slow graphs of the first batch size (one timed run there) are not run at the others
        active = {name: session for name, session in sessions.items() if name not in out["slow"]}
        stats, slow = time_sessions(active, pool, batch, config.repeats, SLOW_RUN_S if index == 0 else None)
        out["slow"].update({name: {"batch": batch, "first_run_s": round(seconds, 3)} for name, seconds in slow.items()})
        forward_ms = stats["forward only"].median_ms if "forward only" in stats else 0.0

        def cell(name):
            s = stats.get(name)
            if s is None:  # slow: timed at the first batch size only
                return None
            return {"median_ms": s.median_ms, "p95_ms": s.p95_ms, "ms_per_crop": s.median_ms / batch, "runs": s.count,
                    "overhead_pct": 100.0 * (s.median_ms / forward_ms - 1.0) if forward_ms > 0 else None}

        whole = cell("with gradients")
        out["batches"][str(batch)] = {
            "with_gradients": whole, "forward_only": cell("forward only"),
            "overhead_pct": None if whole is None else whole["overhead_pct"],
            "methods": {method: cell(method) for method in graph.info.heatmaps},
        }
    return out
