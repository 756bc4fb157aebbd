"""Gradient cost of the ONNX engine: a ResNet-18-shaped PyTorch net (random weights, 224x224,
GAP -> Linear(7)) exported forward-only by torch.onnx, then through `camface export`'s ONNX
engine; the CAM graph (probs, activations and every gradient method's heatmap; not Ablation-CAM
and Score-CAM, which re-run the model: benchmarks/gradient_free.py) against the same graph pruned
to probs + activations (onnx.utils.Extractor: ONNX Runtime runs every node whatever
outputs are asked for). Median ms per call, interleaved, at batch 1 and 8.

    .venv/bin/python benchmarks/onnx_gradient_cost.py --repeats 30 [--target-layer 6]

Measured 2026-12-01 on the 2-core development machine (shared, load 8-18; --threads 1, median
CPU time per call, which moves less than wall time there): target = the GAP input (head: GAP ->
Linear): batch 1 43.5 -> 44.6 ms (+2.4%), batch 8 296.0 -> 304.0 ms (+2.7%). Target 6 (the
last stage, two residual blocks, in the head): batch 1 +48.8%, batch 8 +40.5% (the backward
pass of a stage costs about twice its forward pass).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

def resnet18_like():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                      nn.BatchNorm2d(cout), nn.ReLU(),
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(cout))
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout)) if stride != 1 or cin != cout
                         else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.down(x))

    def layer(cin, cout, stride):
        return nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1))

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), layer(64, 64, 1), layer(64, 128, 2),
                         layer(128, 256, 2), layer(256, 512, 2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(512, 7)).eval()

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: all)")
    parser.add_argument("--target-layer", default=None,
                        help="module to explain (default: the input of the global pooling, "
                             "module 7 = the last stage; 6 puts the last stage in the head)")
    args = parser.parse_args(argv)
    import onnx
    import onnxruntime as ort
    from onnx_helpers import save_program

    from camface import graph_spec, methods
    from camface.export import onnx_export, onnx_rerun, torch_model
    from camface.export.exporter import ExportOptions

    with tempfile.TemporaryDirectory() as folder:
        path = save_program(resnet18_like(), Path(folder) / "r18.pt2", size=224)
        forward = torch_model.to_onnx(path)
    reruns = onnx_rerun.rerun_names(methods.names())  # seconds per call: not a gradient's cost
    heads = (graph_spec.OUTPUT_PROBS, graph_spec.OUTPUT_ACTIVATIONS,
             *(name for name in methods.names() if name not in reruns))
    cam_graph, info, _ = onnx_export.build(forward, ExportOptions(preset="torch", target_layer=args.target_layer,
                                                                 heads=heads))
    full = cam_graph.SerializeToString()
    pruned = onnx.utils.Extractor(cam_graph).extract_model(
        ["image", "class_index"], ["probs", "activations"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {name: ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
                for name, blob in (("forward", pruned.SerializeToString()), ("cam", full))}
    print(f"target {info.target_layer} {info.feature_size}, heatmaps {info.heatmaps}, "
          f"{len(cam_graph.graph.node)} nodes (forward-only {len(pruned.graph.node)})")
    for batch in (1, 8):
        images = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
        feeds = {"image": images, "class_index": np.full(batch, -1, np.int64)}
        times = {name: [] for name in sessions}
        cpu = {name: [] for name in sessions}  # process CPU time: steadier on a shared machine
        for name, session in sessions.items():  # warm-up
            session.run(None, feeds if name == "cam" else feeds)
        for _ in range(args.repeats):
            for name, session in sessions.items():
                started, cpu_started = time.perf_counter(), time.process_time()
                session.run(None, feeds)
                times[name].append((time.perf_counter() - started) * 1e3)
                cpu[name].append((time.process_time() - cpu_started) * 1e3)
        fwd, cam = (statistics.median(times[n]) for n in ("forward", "cam"))
        print(f"batch {batch}: forward-only {fwd:.1f} ms, CAM graph {cam:.1f} ms "
              f"(median of {args.repeats}, interleaved): gradient + heatmaps "
              f"{100 * (cam / fwd - 1):+.1f}%; CPU time {statistics.median(cpu['forward']):.1f} vs "
              f"{statistics.median(cpu['cam']):.1f} ms: "
              f"{100 * (statistics.median(cpu['cam']) / statistics.median(cpu['forward']) - 1):+.1f}%")
    return 0

if __name__ == "__main__":
    sys.exit(main())
