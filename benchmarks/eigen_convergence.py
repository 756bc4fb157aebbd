"""How close Eigen-CAM's in-graph power method (camface.methods.first_component) comes to numpy's
SVD, per number of Gram-matrix squarings (2^s power-iteration steps).

    .venv/bin/python benchmarks/eigen_convergence.py [--resnet50 GRAPH.onnx] [--frames 300]

Activations: the bundled graph's (add_3, 8x8x64) on the face crops of the sample clip; optionally
a ResNet50-GAP graph with random weights (conv5_block3_out, 7x7x2048; `camface bench --backbone
resnet50` caches one); and i.i.d. Gaussian matrices (8x8x64: no structure, the smallest gaps).
Prints, per source and squarings s, the largest |difference| after min-max normalisation (median,
p95 and max over crops) and the ratio s_2 / s_1 of the two largest singular values.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from camface import methods  # noqa: E402


def svd_projection(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(X v1 with the largest-magnitude entry positive [N, h, w], s2 / s1 [N]) in float64."""
    n, h, w, k = x.shape
    maps, ratios = [], []
    for crop in x.reshape(n, h * w, k).astype(np.float64):
        crop = crop - crop.mean(axis=0)
        _, s, vt = np.linalg.svd(crop, full_matrices=False)
        p = crop @ vt[0]
        maps.append((p if p[np.abs(p).argmax()] >= 0 else -p).reshape(h, w))
        ratios.append(s[1] / s[0])
    return np.array(maps), np.array(ratios)


def face_activations(graph_path, frames: int) -> np.ndarray:
    import onnxruntime as ort

    from camface.models import DETECTORS
    from camface.realtime.crop import crop_faces
    from camface.realtime.detect import FaceDetector
    from camface.realtime.sources import make_source

    session = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    size, order = tuple(json.loads(meta["input_size"])), meta["color_order"]
    crops = []
    with make_source("sample", sample_frames=frames) as source, FaceDetector(DETECTORS["full"], 0.5) as detector:
        for index, frame in enumerate(source):
            faces = detector.detect(frame) if index % 5 == 0 else ()
            if faces:
                crops.extend(crop_faces(frame, faces, 0.1, size, order)[0])
    out = []
    for start in range(0, len(crops), 16):
        batch = np.stack(crops[start:start + 16])
        out.append(session.run(["activations"], {"image": batch, "class_index": np.full(len(batch), -1)})[0])
    return np.concatenate(out)


def table(name: str, x: np.ndarray, squarings=range(0, 9)) -> list[str]:
    want, ratios = svd_projection(x)
    normalized = np.array([methods.normalize(m, "eigencam") for m in want])
    lines = [f"{name}: {len(x)} crops {x.shape[1]}x{x.shape[2]}x{x.shape[3]}, s2/s1 median {np.median(ratios):.3f}, "
             f"max {ratios.max():.3f}",
             f"  {'squarings':>9} {'steps':>6} {'median':>10} {'p95':>10} {'max':>10}"]
    for s in squarings:
        got = methods.first_component(methods.NUMPY, x, x.shape[1:], squarings=s)
        diff = np.array([np.abs(methods.normalize(g, "eigencam") - w).max() for g, w in zip(got, normalized)])
        mark = "  <- EIGEN_SQUARINGS" if s == methods.EIGEN_SQUARINGS else ""
        lines.append(f"  {s:>9} {2 ** s:>6} {np.median(diff):>10.2e} {np.percentile(diff, 95):>10.2e} "
                     f"{diff.max():>10.2e}{mark}")
    return lines


def main() -> None:
    from camface.models import EMOTION_ONNX

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resnet50", default=None, help="a ResNet50-GAP CAM graph (random weights)")
    parser.add_argument("--frames", type=int, default=300)
    args = parser.parse_args()
    sources = {"bundled emotion graph, add_3": face_activations(EMOTION_ONNX, args.frames)}
    if args.resnet50:
        sources["ResNet50-GAP random weights, conv5_block3_out"] = face_activations(args.resnet50, args.frames)
    sources["i.i.d. Gaussian"] = np.random.default_rng(0).normal(size=(64, 8, 8, 64)).astype(np.float32)
    for name, x in sources.items():
        print("\n".join(table(name, x)), end="\n\n")


if __name__ == "__main__":
    main()
