"""`camface bench --compare-heads`: what the gradient outputs cost. The CAM graph is timed with
and without them (the forward-only graph is the same graph pruned to `probs` and `activations`
with onnx.utils) at fixed batch sizes, alternating the two so load on a shared machine hits
both alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

from camface.errors import ModelError

if TYPE_CHECKING:
    from camface.realtime.bench.config import BenchConfig

FORWARD_OUTPUTS = ("probs", "activations")


def forward_only(model_bytes: bytes) -> bytes:
    """The CAM graph pruned to its forward outputs (`probs`, `activations`): every node that
    only the gradient heatmaps need is gone (ONNX Runtime runs the whole graph whatever
    outputs are asked for, so asking for fewer outputs would not show the difference)."""
    try:
        import onnx
        import onnx.utils
    except ImportError as exc:
        raise ModelError("--compare-heads needs the `onnx` package (pip install 'camface[keras]')") from exc
    model = onnx.load_from_string(model_bytes)
    inputs = [i.name for i in model.graph.input]
    pruned = onnx.utils.Extractor(model).extract_model(inputs, list(FORWARD_OUTPUTS))
    del pruned.metadata_props[:]
    pruned.metadata_props.extend(model.metadata_props)
    return pruned.SerializeToString()


def sample_crops(config: BenchConfig, info, count: int = 8):
    """Up to `count` face crops (uint8 [n, H, W, C], graph colour order) from the first frames of
    the source; uniform random pixels when the source shows no face."""
    import numpy as np

    from camface.models import DETECTORS
    from camface.realtime.crop import crop_faces
    from camface.realtime.detect import FaceDetector
    from camface.realtime.sources import make_source

    crops = []
    pipeline = config.pipeline
    with make_source(pipeline.source, sample_frames=config.frames) as source, \
            FaceDetector(DETECTORS[pipeline.detector], pipeline.min_confidence, pipeline.quiet_native) as detector:
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


def compare_heads(config: BenchConfig, graph) -> dict:
    """Median and p95 ms of one call of `graph` (a loaded CamGraph) with and without its
    gradient outputs, per batch size, runs alternating between the two graphs. The forward-only
    graph runs on the same provider with the same threads (an error if it cannot)."""
    import numpy as np

    from camface.realtime.graph import PROVIDER_DEVICES, CamGraph
    from camface.realtime.timing import StageTimer

    pipeline = config.pipeline
    forward = CamGraph.from_bytes(forward_only(graph.model_bytes), graph.path, PROVIDER_DEVICES[graph.provider],
                                  pipeline.graph_threads, contract=False)
    if forward.provider != graph.provider:
        raise ModelError(f"--compare-heads: the forward-only graph runs on {forward.provider}, "
                         f"the full graph on {graph.provider}: the times would not compare")
    sessions = {"with gradients": graph.session, "forward only": forward.session}
    pool = sample_crops(config, graph.info, max(config.batches))
    out = {"provider": graph.provider, "threads": pipeline.graph_threads, "repeats": config.repeats, "batches": {}}
    for batch in config.batches:
        crops = np.ascontiguousarray(pool[np.arange(batch) % len(pool)])
        feed = {"image": crops, "class_index": np.full(batch, -1, np.int64)}
        timer = StageTimer(tuple(sessions))
        for session in sessions.values():
            session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})  # allocation
        for _ in range(config.repeats):
            for name, session in sessions.items():
                with timer.stage(name):
                    session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})
        stats = timer.stats()
        full_ms, forward_ms = stats["with gradients"].median_ms, stats["forward only"].median_ms
        out["batches"][str(batch)] = {
            **{name.replace(" ", "_"): {"median_ms": s.median_ms, "p95_ms": s.p95_ms} for name, s in stats.items()},
            "overhead_pct": 100.0 * (full_ms / forward_ms - 1.0) if forward_ms > 0 else None,
        }
    return out
