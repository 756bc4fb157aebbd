"""Face recognition (`camface enroll`): (1) enrolling 100 photos, end to end and per stage;
(2) the similarity head's cost over the embedder's forward pass.

The embedder is ArcFace-shaped with random weights: 112x112 RGB in, a ResNet-18-like trunk
(tests: benchmarks/onnx_gradient_cost.py's), GAP -> Linear(512) out; exported forward-only by
torch.onnx. The photos are scikit-image's astronaut and camera and matplotlib's grace_hopper,
augmented (tests/gallery_helpers.py) into 4 people x 25 photos.

(1) `enroll()` as `camface enroll PEOPLE --model EMBEDDER --preset arcface --no-rank` runs it,
    wall seconds per run (median of --runs), and the stages timed alone: detect + crop
    (`enroll.face_crops`), embed (`gallery.embed`), build + self-check (`gallery.build`).
(2) ONNX Runtime on the embedder alone ([N, 512]) against the embedder with the head appended
    (`gallery.with_similarity_head`: L2 normalisation and a [512, identities] MatMul), at batch
    1 and 8 and 5 / 100 / 1000 identities: median ms per call over --repeats interleaved pairs,
    CPU time of the process (`time.process_time`: one ORT thread; on a shared machine it moves
    less than wall time) and wall time.

    .venv/bin/python benchmarks/enroll.py [--runs 3] [--repeats 40] [--threads 1] [--full-check]

--full-check: the enrolments alternate between the self-check as it is (Ablation-CAM's and
Score-CAM's numpy reference reruns one variant per chunk, onnx_rerun.SampledCalls) and the
reference rerunning every variant (as before: K = 512 forward passes for Score-CAM), in
interleaved pairs; each median is printed. --repeats 0 skips (2).

Measured 2026-12-03 on the shared 2-core development machine (--runs 3 --repeats 60): enrolling
100 photos median 5.98 s (detect + crop 0.77 s, embed 1.63 s, build + self-check 2.54 s); the head
+0.2% to +2.4% CPU time per call (batch 1 and 8, 5 to 1000 identities). With Score-CAM in every
graph and its self-check sampled (`--runs 7 --repeats 0 --full-check`): median 5.18 s wall, 7.25 s CPU
against 7.62 s, 10.83 s with the reference rerunning every variant. benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def arcface_like():
    import torch
    from onnx_gradient_cost import resnet18_like

    trunk = resnet18_like()
    trunk[-1] = torch.nn.Linear(512, 512)  # GAP -> Flatten -> Linear(512): the embedding
    return trunk.eval()


def people(root: Path, persons: int = 4, per_person: int = 25) -> Path:
    import cv2
    from gallery_helpers import augment, faces_bgr

    faces = list(faces_bgr().values())
    for k in range(persons):
        (root / f"person{k}").mkdir(parents=True)
        base = faces[k % len(faces)] if k < len(faces) else faces[k % len(faces)][:, ::-1].copy()
        for i, photo in enumerate(augment(base, per_person, seed=k)):
            cv2.imwrite(str(root / f"person{k}" / f"{i:03d}.jpg"), photo)
    return root


@contextlib.contextmanager
def every_variant_checked(full: bool):
    """Within it (full True), the self-check's numpy reference reruns every variant of
    Ablation-CAM / Score-CAM, as before onnx_rerun.SampledCalls sampled one per chunk."""
    from camface import methods
    from camface.export import onnx_rerun

    if not full:
        yield
        return
    sampled = onnx_rerun.SampledCalls._scores

    def every(self, logits_of, variants, count, chunk):
        scores = methods.Chunked._scores(self, logits_of, variants, count, chunk)
        self.sampled[self.method] = (np.asarray(self.graph_scores[self.method], np.float32), scores)
        return scores

    onnx_rerun.SampledCalls._scores = every
    try:
        yield
    finally:
        onnx_rerun.SampledCalls._scores = sampled


def session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="enrolments of the 100 photos")
    parser.add_argument("--repeats", type=int, default=40, help="interleaved pairs per head row")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--full-check", action="store_true",
                        help="interleave enrolments whose self-check reruns every variant (as before sampling)")
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from gallery_helpers import to_onnx

    from camface.export import enroll, gallery
    from camface.export.exporter import ExportOptions

    options = ExportOptions(preset="arcface")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = to_onnx(arcface_like(), tmp / "arcface_like.onnx", size=112)
        root = people(tmp / "people")
        print(f"embedder: {path.name} ({path.stat().st_size / 1e6:.1f} MB), 112x112 RGB -> 512; "
              f"{sum(1 for _ in root.rglob('*.jpg'))} photos, ORT threads {args.threads}")

        # (1) enrolment
        totals, full_totals, cpu, full_cpu = [], [], [], []
        for run in range(args.runs):
            for full in ((False, True) if run % 2 else (True, False)) if args.full_check else (False,):
                with every_variant_checked(full):
                    started, started_cpu = time.perf_counter(), time.process_time()
                    report = enroll.enroll(root, path, tmp / f"gallery{run}.onnx", options)
                    (full_totals if full else totals).append(time.perf_counter() - started)
                    (full_cpu if full else cpu).append(time.process_time() - started_cpu)
        if full_totals:
            print(f"\nenrol 100 photos, self-check rerunning every variant (before): median "
                  f"{statistics.median(full_totals):.2f} s wall, {statistics.median(full_cpu):.2f} s CPU over "
                  f"{args.runs} runs ({', '.join(f'{t:.2f}' for t in full_totals)} s wall)")
        used = sum(c["used"] for c in report["photos"].values())
        embedder = gallery.load(path, options)
        started = time.perf_counter()
        crops, targets, _, _ = enroll.face_crops(root, enroll.scan_people(root), (112, 112), "RGB")
        crop_s = time.perf_counter() - started
        started = time.perf_counter()
        embeddings = gallery.embed(embedder, crops)
        embed_s = time.perf_counter() - started
        started = time.perf_counter()
        gallery.build(embedder, gallery.identity_embeddings(embeddings, targets, 4), [f"p{k}" for k in range(4)],
                      options, {})
        build_s = time.perf_counter() - started
        print(f"\nenrol 100 photos ({used} used): median {statistics.median(totals):.2f} s wall, "
              f"{statistics.median(cpu):.2f} s CPU (all threads) over {args.runs} runs "
              f"({', '.join(f'{t:.2f}' for t in totals)}); stages: detect + crop {crop_s:.2f} s, "
              f"embed {embed_s:.2f} s, build + self-check {build_s:.2f} s")

        if args.repeats <= 0:
            return 0
        # (2) the head's cost
        forward = session(embedder.model, args.threads)
        rng = np.random.default_rng(0)
        print("\n| batch | identities | embedder CPU ms | + head CPU ms | overhead CPU | overhead wall |")
        print("|---|---|---|---|---|---|")
        for batch in (1, 8):
            x = rng.standard_normal((batch, 3, 112, 112)).astype(np.float32)
            for identities in (5, 100, 1000):
                rows = gallery.normalise(rng.standard_normal((identities, 512)))
                headed = session(gallery.with_similarity_head(embedder, rows), args.threads)
                plain_ms, head_ms, plain_wall, head_wall = [], [], [], []
                for _ in range(3):  # warm up both
                    forward.run(None, {embedder.input_name: x})
                    headed.run(None, {embedder.input_name: x})
                for i in range(args.repeats):  # interleaved pairs, the order alternating
                    pairs = ((forward, plain_ms, plain_wall), (headed, head_ms, head_wall))
                    for graph, cpu, wall in pairs[::(1 if i % 2 else -1)]:
                        started, started_cpu = time.perf_counter(), time.process_time()
                        graph.run(None, {embedder.input_name: x})
                        cpu.append((time.process_time() - started_cpu) * 1e3)
                        wall.append((time.perf_counter() - started) * 1e3)
                a, b = statistics.median(plain_ms), statistics.median(head_ms)
                wa, wb = statistics.median(plain_wall), statistics.median(head_wall)
                print(f"| {batch} | {identities} | {a:.2f} | {b:.2f} | {100 * (b - a) / a:+.1f}% | "
                      f"{100 * (wb - wa) / wa:+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
