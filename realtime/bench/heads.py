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


def time_sessions(sessions: dict, pool, batch: int, repeats: int) -> dict:
    """StageStats per session name: `repeats` runs of each ONNX Runtime session on `batch` crops
    taken from `pool` (uint8 [n, H, W, C]), one run of each in turn so that load on a shared
    machine hits all alike, after one untimed run each (allocation)."""
    import numpy as np

    from camface.realtime.timing import StageTimer

    crops = np.ascontiguousarray(pool[np.arange(batch) % len(pool)])
    feed = {"image": crops, "class_index": np.full(batch, -1, np.int64)}
    feeds = {name: {i.name: feed[i.name] for i in session.get_inputs()} for name, session in sessions.items()}
    timer = StageTimer(tuple(sessions))
    for name, session in sessions.items():
        session.run(None, feeds[name])
    for _ in range(repeats):
        for name, session in sessions.items():
            with timer.stage(name):
                session.run(None, feeds[name])
    return timer.stats()


def compare_heads(config: BenchConfig, graph) -> dict:
    """Median and p95 ms of one call of `graph` (a loaded CamGraph) with every gradient method
    ("with gradients": the graph without its gradient-free methods), forward only, and per method (forward outputs + that heatmap), per batch
    size; runs alternate between the graphs. Every pruned graph runs on the graph's provider
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
    out = {"provider": graph.provider, "threads": pipeline.graph_threads, "repeats": config.repeats, "batches": {}}
    for batch in config.batches:
        stats = time_sessions(sessions, pool, batch, config.repeats)
        forward_ms = stats["forward only"].median_ms

        def cell(name):
            s = stats[name]
            return {"median_ms": s.median_ms, "p95_ms": s.p95_ms, "ms_per_crop": s.median_ms / batch,
                    "overhead_pct": 100.0 * (s.median_ms / forward_ms - 1.0) if forward_ms > 0 else None}

        whole = cell("with gradients")
        out["batches"][str(batch)] = {
            "with_gradients": whole, "forward_only": cell("forward only"),
            "overhead_pct": whole["overhead_pct"],
            "methods": {method: cell(method) for method in graph.info.heatmaps},
        }
    return out
