"""What the in-graph gradients cost: ONNX Runtime CPU time of a ResNet50-GAP CAM graph with and
without the Grad-CAM outputs, plus the largest ONNX-vs-TensorFlow difference per output of the
bundled emotion graph.

    .venv/bin/python benchmarks/export_overhead.py [--size 224] [--batches 1 8] [--repeats 30]

Both ResNet50 graphs (weights=None, 5 classes) come from `camface export` with the internal
`--heads`: probs, activations and every gradient method for the one with gradients (Ablation-CAM
and Score-CAM re-run the model, seconds per call: benchmarks/gradient_free.py), `probs
activations` for the forward-only one. Runs alternate between the two graphs so that
load on a shared machine hits both alike. Prints medians and p95 in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np


def export_resnet(folder: Path, size: int) -> dict[str, Path]:
    from camface import graph_spec, methods
    from camface.cli import main as camface_main
    from camface.export import onnx_rerun
    from camface.models.builders import resnet50_gap

    model_path = folder / "resnet50_gap.keras"
    resnet50_gap(5, input_size=size, weights=None).save(model_path)
    graphs = {"with gradients": folder / "full.onnx", "forward only": folder / "forward.onnx"}
    common = ["export", str(model_path), "--preset", "imagenet-caffe"]
    reruns = onnx_rerun.rerun_names(methods.names())
    gradients = [name for name in methods.names() if name not in reruns]
    for name, path in graphs.items():
        # --no-rank: a graph without heatmaps cannot be ranked (export fails), the other needs no ranking
        extra = (["--heads", graph_spec.OUTPUT_PROBS, graph_spec.OUTPUT_ACTIVATIONS, "--no-verify", "--no-rank"]
                 if name == "forward only" else
                 ["--heads", graph_spec.OUTPUT_PROBS, graph_spec.OUTPUT_ACTIVATIONS, *gradients, "--no-rank"])
        started = time.perf_counter()
        assert camface_main([*common, "-o", str(path), *extra]) == 0
        print(f"exported {name}: {time.perf_counter() - started:.1f} s, "
              f"{path.stat().st_size / 1e6:.1f} MB")
    return graphs


def time_graphs(graphs: dict[str, Path], size: int, batches, repeats: int, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in graphs.items()}
    rng = np.random.default_rng(0)
    for batch in batches:
        feed = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                "class_index": np.full(batch, -1, np.int64)}
        samples = {name: [] for name in sessions}
        for session in sessions.values():
            session.run(None, feed)  # warm-up
        for _ in range(repeats):
            for name, session in sessions.items():
                started = time.perf_counter()
                session.run(None, feed)
                samples[name].append((time.perf_counter() - started) * 1e3)
        for name, values in samples.items():
            values.sort()
            p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
            print(f"batch {batch:>2}  {name:<15} median {statistics.median(values):8.1f} ms   "
                  f"p95 {p95:8.1f} ms   ({repeats} runs)")
        full, forward = (statistics.median(samples[k]) for k in ("with gradients", "forward only"))
        print(f"batch {batch:>2}  gradients add {full - forward:+.1f} ms "
              f"({(full / forward - 1) * 100:+.1f}%)")


def profile_gradient_nodes(graphs: dict[str, Path], size: int, batches, repeats: int = 10):
    """Load-independent view: ONNX Runtime's own per-node times inside the full graph, split
    into nodes that the forward-only graph also has and the rest (gradients, heatmaps, class
    selection). Medians over `repeats` runs."""
    import json

    import onnx
    import onnxruntime as ort

    forward_names = {n.name for n in onnx.load(str(graphs["forward only"])).graph.node}
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(graphs["forward only"].parent / "profile")
    session = ort.InferenceSession(str(graphs["with gradients"]), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for batch in batches:
        feed = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                "class_index": np.full(batch, -1, np.int64)}
        for _ in range(repeats + 1):
            session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())

    def is_forward(name: str) -> bool:  # ORT renames/fuses some forward nodes
        return (name in forward_names or ("functional" in name and "gradient_tape" not in name)
                or name.startswith(("Conv", "Reorder", "Transpose", "Pad", "Cast", "Softmax")))

    runs, current = [], {"forward": 0.0, "extra": 0.0}
    for event in events:
        if event.get("cat") == "Session" and event["name"] == "model_run":
            runs.append(current)
            current = {"forward": 0.0, "extra": 0.0}
        elif event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"][: -len("_kernel_time")]
            current["forward" if is_forward(name) else "extra"] += event["dur"] / 1e3
    for i, batch in enumerate(batches):
        chunk = runs[i * (repeats + 1) + 1: (i + 1) * (repeats + 1)]  # skip each warm-up
        forward = statistics.median(r["forward"] for r in chunk)
        extra = statistics.median(r["extra"] for r in chunk)
        print(f"batch {batch:>2}  profile: forward nodes {forward:.1f} ms, gradient/heatmap "
              f"nodes {extra:.2f} ms ({extra / forward * 100:.1f}% of forward)")


def emotion_differences(batch: int = 32) -> None:
    """Largest |ORT - TF| per output of the committed emotion graph vs the exporter's
    TensorFlow function, on the verification batch."""
    import onnx

    from camface.export import exporter, keras_model, verify
    from camface.models import EMOTION_KERAS, EMOTION_LABELS, EMOTION_ONNX, read_labels

    graph = onnx.load(str(EMOTION_ONNX))
    meta = {p.key: p.value for p in graph.metadata_props}
    model = keras_model.load_model(EMOTION_KERAS)
    function, info = exporter.build(model, exporter.ExportOptions(
        target_layer=meta["target_layer"], labels=tuple(read_labels(EMOTION_LABELS)),
        preset="emotion"))
    images, classes = verify.sample_batch(info.input_size, info.channels, len(info.labels), batch)
    reference = {k: v.numpy() for k, v in function(images, classes).items()}
    got = verify.run_onnx(graph.SerializeToString(), images, classes)
    print(f"bundled emotion graph ({meta['target_layer']}), batch {batch}:")
    for difference in verify.compare(got, reference):
        print(f"  {difference}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = default)")
    parser.add_argument("--skip-emotion", action="store_true")
    args = parser.parse_args()
    if not args.skip_emotion:
        emotion_differences()
    with tempfile.TemporaryDirectory() as folder:
        graphs = export_resnet(Path(folder), args.size)
        time_graphs(graphs, args.size, args.batches, args.repeats, args.threads)
        profile_gradient_nodes(graphs, args.size, args.batches)


if __name__ == "__main__":
    main()
