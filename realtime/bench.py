"""`camface bench`: frames per second and per-stage latency of the live pipeline, headless,
against the baselines users would otherwise use, measured on the same frames in one run.

Rows (each on the same frames of `--source`, after `--warmup` frames that are not timed):
  camface live        the real live loop (`LiveLoop`: reader, detector(s), main and writer
                      threads), headless, recording when `--record`.
  ONNX, one thread    (with `--baseline keras`) the same stages one after the other in one
                      thread, with the CAM graph: separates what pipelining gains from what
                      the graph gains.
  Keras GradientTape  (with `--baseline keras`) the same loop, but each face's Grad-CAM
                      computed the Keras-example way (export/keras_baseline.py).
Stages: decode, detect, crop, classify+explain, render, encode; median and p95 milliseconds.
End-to-end fps counts frame completions: N completion times hold N-1 intervals.

`--compare-heads` times the CAM graph with and without its gradient outputs (the forward-only
graph is the same graph pruned to `probs` and `activations` with onnx.utils) at fixed batch
sizes, alternating the two so load on a shared machine hits both alike.

Top-level imports stay light; TensorFlow is never imported by this module: the Keras baseline
and the backbone builder live in camface.export and are loaded only when asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from camface.errors import ModelError, SourceError

log = logging.getLogger(__name__)

STAGE_LABELS = {"decode": "decode", "detect": "detect", "crop": "crop",
                "classify": "classify+explain", "render": "render", "encode": "encode"}
BACKBONES = {"resnet50": "resnet50_gap", "vgg16": "vgg16_conv_gap", "mobilenetv2": "mobilenetv2_gap"}
FORWARD_OUTPUTS = ("probs", "activations")
HUD_EVERY = 15  # frames between HUD stage-time refreshes, as in the live loop


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="sample",
                        help="video file, folder of images, or 'sample' (the bundled demo clip, 640x480): "
                             "every row runs on the same frames (a camera index or stream URL works too, "
                             "but then each row sees other frames)")
    parser.add_argument("--model", type=Path, default=None,
                        help="CAM graph (.onnx); default: the bundled emotion graph")
    parser.add_argument("--method", choices=("gradcam", "gradcampp", "cam", "none"), default="gradcam",
                        help="heatmap the live row computes and draws")
    parser.add_argument("--frames", type=int, default=300, help="frames timed per row")
    parser.add_argument("--warmup", type=int, default=30, help="frames run before timing each row")
    parser.add_argument("--record", action="store_true",
                        help="encode the annotated frames to an mp4 (in a temporary folder), as "
                             "`camface live --record` does; adds the encode stage")
    parser.add_argument("--baseline", choices=("keras", "none"), default="none",
                        help="keras: also run each face's Grad-CAM the Keras-example way (eager "
                             "GradientTape per face) on the same frames, and print the speedup")
    parser.add_argument("--keras-model", type=Path, default=None,
                        help="Keras model with the CAM graph's weights, for --baseline keras; default: "
                             "the bundled emotion model (bundled graph) or the --backbone's model")
    parser.add_argument("--compare-heads", action="store_true",
                        help="also time the graph with and without its gradient outputs (forward only)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], metavar="N",
                        help="batch sizes for --compare-heads")
    parser.add_argument("--repeats", type=int, default=50, help="graph runs per batch size for --compare-heads")
    parser.add_argument("--backbone", choices=tuple(BACKBONES), default=None,
                        help="bench a CAM graph of this backbone (GAP head, random weights, built with "
                             "camface.models.builders and exported once into --work-dir) instead of --model")
    parser.add_argument("--backbone-size", type=int, default=224, help="input size of the --backbone graph")
    parser.add_argument("--work-dir", type=Path, default=Path("~/.cache/camface/bench"),
                        help="cache folder for --backbone graphs")
    parser.add_argument("--detector", choices=("short", "full"), default="full", help="BlazeFace model")
    parser.add_argument("--max-faces", type=int, default=None,
                        help="faces classified per frame, largest first; default 8, or 1 with --backbone")
    parser.add_argument("--graph-threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads (1, as `camface live` uses: the detector has "
                             "the other core; 0 = ONNX Runtime's default, all cores)")
    parser.add_argument("--detect-workers", type=int, default=0,
                        help="face detectors side by side, as `camface live --detect-workers` (0 = auto)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "tensorrt"), default="auto",
                        help="ONNX Runtime provider; auto tries TensorRT, CUDA, then CPU")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json",
                        help="also write the numbers to this JSON file")


@dataclass(frozen=True)
class BenchConfig:
    """What `camface bench` was asked to measure (built from the command line)."""

    source: str = "sample"
    model: Path | None = None
    keras_model: Path | None = None
    method: str = "gradcam"
    frames: int = 300
    warmup: int = 30
    record: bool = False
    baseline: str = "none"
    compare_heads: bool = False
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 50
    backbone: str | None = None
    backbone_size: int = 224
    work_dir: Path = Path("~/.cache/camface/bench")
    detector: str = "full"
    max_faces: int = 8
    graph_threads: int = 1
    detect_workers: int = 0
    device: str = "auto"
    json: Path | None = None
    quiet_native: bool = True

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(f"--frames must be at least 2 (fps needs two frame completions), got {self.frames}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if not 1 <= self.max_faces <= 32:
            raise ValueError(f"--max-faces must be 1..32, got {self.max_faces}")
        if self.repeats < 1 or any(not 1 <= b <= 32 for b in self.batches):
            raise ValueError("--repeats must be >= 1 and --batches within 1..32")
        if self.backbone and self.model is not None:
            raise ValueError("--model and --backbone exclude each other")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchConfig":
        max_faces = args.max_faces if args.max_faces is not None else (1 if args.backbone else 8)
        return cls(source=args.source, model=args.model, keras_model=args.keras_model, method=args.method,
                   frames=args.frames, warmup=args.warmup, record=args.record, baseline=args.baseline,
                   compare_heads=args.compare_heads, batches=tuple(args.batches), repeats=args.repeats,
                   backbone=args.backbone, backbone_size=args.backbone_size, work_dir=args.work_dir,
                   detector=args.detector, max_faces=max_faces, graph_threads=args.graph_threads,
                   detect_workers=args.detect_workers, device=args.device, json=args.json,
                   quiet_native=not getattr(args, "debug", False))


@dataclass(frozen=True)
class Row:
    """One pipeline's figures over `frames` timed frames.

    fps: end-to-end frames per second from frame completion times ((frames - 1) / span_s).
    wall_s: from the first frame requested to the pipeline shut down (>= span_s).
    stages: stage name -> StageStats (milliseconds). peak_rss_mb: the process's peak resident
    memory after this row (cumulative: rows run in order, the live row first).
    cpu_ms_per_frame: CPU time of all threads per frame (less sensitive than wall time to other
    work on a shared machine; 1000 x cores / cpu_ms_per_frame bounds the fps of an idle machine);
    None when it cannot be separated from start-up.
    """

    name: str
    frames: int
    faces: int
    fps: float
    wall_s: float
    stages: dict = field(default_factory=dict)
    provider: str = ""
    peak_rss_mb: float = 0.0
    cpu_ms_per_frame: float | None = None

    @property
    def faces_per_frame(self) -> float:
        return self.faces / self.frames if self.frames else 0.0

    @property
    def ms_per_frame(self) -> float:
        return 1000.0 / self.fps if self.fps > 0 else float("inf")

    @property
    def span_s(self) -> float:
        return (self.frames - 1) / self.fps if self.fps > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "name": self.name, "frames": self.frames, "faces": self.faces,
            "faces_per_frame": self.faces_per_frame, "fps": self.fps, "ms_per_frame": self.ms_per_frame,
            "span_s": self.span_s, "wall_s": self.wall_s, "provider": self.provider,
            "peak_rss_mb": self.peak_rss_mb, "cpu_ms_per_frame": self.cpu_ms_per_frame,
            "stages": {name: {"median_ms": s.median_ms, "p95_ms": s.p95_ms, "mean_ms": s.mean_ms,
                              "count": s.count} for name, s in self.stages.items()},
        }


# ------------------------------------------------------------------------------ machine


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (getrusage)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return []


def machine_info() -> dict:
    """CPU model, cores, memory, GPUs, OS and library versions of this machine."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    memory_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "memory_gb": memory_gb,
        "gpus": _gpus(), "os": platform.platform(), "python": platform.python_version(),
        "onnxruntime": version("onnxruntime-gpu") or version("onnxruntime"),
        "mediapipe": version("mediapipe"), "opencv": version("opencv-contrib-python"),
        "numpy": version("numpy"),
    }


# ------------------------------------------------------------------------------ rows


def _detect_workers(config: BenchConfig, live: bool) -> int:
    from camface.realtime.loop import detect_workers_for

    return detect_workers_for(config.detect_workers, config.graph_threads, live)


def run_live(config: BenchConfig, model: Path, record_dir: Path | None) -> Row:
    """The real live loop on the first `config.frames` frames, after an untimed run on the
    first `config.warmup` frames (first-frame costs: codec set-up, caches, page faults)."""
    from camface.realtime.loop import LiveConfig, LiveLoop
    from camface.realtime.sources import make_source

    def loop_config(frames: int, record: Path | None) -> LiveConfig:
        return LiveConfig(source=config.source, model=model, method=config.method, record=record,
                          show=False, detector=config.detector, max_faces=config.max_faces,
                          device=config.device, overwrite=True, max_frames=frames, progress=False,
                          graph_threads=config.graph_threads, detect_workers=config.detect_workers,
                          quiet_native=config.quiet_native)

    def record(name: str) -> Path | None:
        return record_dir / f"{name}.mp4" if record_dir is not None else None

    warmup_cpu_s, warmup_frames = 0.0, 0
    if config.warmup:
        cpu_start = time.process_time()
        warmup_frames = LiveLoop(loop_config(config.warmup, record("live-warmup")),
                                 source=make_source(config.source, sample_frames=config.frames)).run().frames
        warmup_cpu_s = time.process_time() - cpu_start
    cpu_start = time.process_time()
    summary = LiveLoop(loop_config(config.frames, record("live")),
                       source=make_source(config.source, sample_frames=config.frames)).run()
    cpu_s = time.process_time() - cpu_start
    # Both runs pay the same start-up (graph session, detector, threads): their difference is
    # the CPU time of the extra frames alone.
    cpu_ms = None
    if warmup_frames and summary.frames > warmup_frames and cpu_s > warmup_cpu_s:
        cpu_ms = 1000 * (cpu_s - warmup_cpu_s) / (summary.frames - warmup_frames)
    return Row("camface live", summary.frames, summary.faces, summary.fps, summary.wall_s,
               dict(summary.stages), summary.provider, peak_rss_mb(), cpu_ms)


class OnnxExplainer:
    """The CAM graph as a sequential-loop explainer: `explain(crops, class_index)`."""

    def __init__(self, graph, method: str):
        self.graph, self.method = graph, method
        self.provider = graph.provider

    def explain(self, crops, class_index):
        return self.graph.run(crops, class_index, self.method)


def run_sequential(name: str, config: BenchConfig, info, explainer, method: str,
                   record_dir: Path | None) -> Row:
    """decode -> detect -> crop -> explain -> render -> encode, one frame after the other in
    this thread, on the same frames as `run_live`; `explainer.explain(crops uint8 [N, H, W, C],
    class_index int64 [N]) -> (probs [N, classes], heatmaps [N, h, w])`."""
    from camface.models import DETECTORS
    from camface.realtime.detect import FaceDetector
    from camface.realtime.render import Renderer
    from camface.realtime.timing import RateMeter, StageTimer

    renderer = Renderer()
    with FaceDetector(DETECTORS[config.detector], quiet=config.quiet_native) as detector:
        if config.warmup:
            _sequential_pass(config, info, detector, explainer, renderer, method, config.warmup,
                             record_dir / f"{name}-warmup.mp4" if record_dir else None,
                             StageTimer(), RateMeter())
        timer, rate = StageTimer(tuple(STAGE_LABELS)), RateMeter()
        started, cpu_start = time.perf_counter(), time.process_time()
        frames, faces = _sequential_pass(config, info, detector, explainer, renderer, method, config.frames,
                                         record_dir / f"{name}.mp4" if record_dir else None, timer, rate)
        wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_start
    return Row(name, frames, faces, rate.overall_fps, wall_s, timer.stats(), explainer.provider, peak_rss_mb(),
               1000 * cpu_s / frames if frames else None)


def _sequential_pass(config, info, detector, explainer, renderer, method, limit, record, timer, rate):
    import numpy as np

    from camface.realtime.crop import crop_faces
    from camface.realtime.results import FrameResult, Prediction
    from camface.realtime.sinks import VideoSink
    from camface.realtime.sources import make_source

    empty = np.zeros((0, *info.input_size, info.channels), np.uint8)
    hud_ms: dict[str, float] = {}
    frames = faces_total = 0
    with make_source(config.source, sample_frames=config.frames) as source, contextlib.ExitStack() as stack:
        sink = stack.enter_context(VideoSink(record, source.info.fps, overwrite=True)) if record else None
        stream = iter(source)
        while frames < limit:
            start = time.perf_counter()
            frame = next(stream, None)
            if frame is None:
                break
            decoded = time.perf_counter()
            timer.add("decode", decoded - start)
            faces = detector.detect(frame)
            detected = time.perf_counter()
            timer.add("detect", detected - decoded)
            dropped = max(0, len(faces) - config.max_faces)
            faces = faces[: config.max_faces]
            crops, faces = (crop_faces(frame, faces, 0.1, info.input_size, info.color_order)
                            if faces else (empty, ()))
            cropped = time.perf_counter()
            timer.add("crop", cropped - detected)
            predictions = ()
            if faces:
                probs, heatmaps = explainer.explain(crops, np.full(len(faces), -1, np.int64))
                predicted = probs.argmax(axis=1)
                predictions = tuple(Prediction(probs=probs[i], heatmap=heatmaps[i], predicted=int(predicted[i]),
                                               explained=int(predicted[i]), method=method)
                                    for i in range(len(faces)))
            classified = time.perf_counter()
            timer.add("classify", classified - cropped)
            if frames % HUD_EVERY == 0:
                hud_ms = {s: m for s, m in timer.medians_ms().items() if s in ("detect", "classify", "render")}
            result = FrameResult(index=frames, faces=faces, predictions=predictions, dropped=dropped,
                                 method=method, labels=info.labels, fps=rate.rolling_fps, stage_ms=hud_ms,
                                 provider=explainer.provider)
            renderer.annotate(frame, result)
            rendered = time.perf_counter()
            timer.add("render", rendered - classified)
            if sink is not None:
                sink.write(frame)
                timer.add("encode", time.perf_counter() - rendered)
            rate.tick()
            frames += 1
            faces_total += len(faces)
    return frames, faces_total


# ------------------------------------------------------------------------------ heads


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
    with make_source(config.source, sample_frames=config.frames) as source, \
            FaceDetector(DETECTORS[config.detector], quiet=config.quiet_native) as detector:
        for index, frame in enumerate(source):
            faces = detector.detect(frame)
            if faces:
                crops.extend(crop_faces(frame, faces, 0.1, info.input_size, info.color_order)[0])
            if len(crops) >= count or index >= 60:
                break
    if not crops:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (count, *info.input_size, info.channels), dtype=np.uint8)
    return np.stack(crops[:count])


def compare_heads(config: BenchConfig, model: Path, info, provider: str) -> dict:
    """Median and p95 ms of one graph call with and without the gradient outputs, per batch
    size, runs alternating between the two graphs. Same provider and threads as the loop."""
    import numpy as np
    import onnxruntime as ort

    from camface.realtime.timing import StageTimer

    full = model.read_bytes()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if config.graph_threads:
        options.intra_op_num_threads = config.graph_threads
        options.inter_op_num_threads = 1
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    sessions = {"with gradients": ort.InferenceSession(full, options, providers=providers),
                "forward only": ort.InferenceSession(forward_only(full), options, providers=providers)}
    pool = sample_crops(config, info, max(config.batches))
    out = {"provider": provider, "threads": config.graph_threads, "repeats": config.repeats, "batches": {}}
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


# ------------------------------------------------------------------------------ report


def _stage_cell(row: Row, stage: str) -> str:
    s = row.stages.get(stage)
    return f"{s.median_ms:.2f} / {s.p95_ms:.2f}" if s is not None else "-"


def format_report(report: dict, rows: list[Row]) -> str:
    """The table printed on stdout: stages down, rows across."""
    machine, setup = report["machine"], report["settings"]
    gpus = ", ".join(machine["gpus"]) or "no GPU"
    lines = [
        f"camface bench {report['date']}: {setup['source']} ({setup['source_size']}, {rows[0].frames} frames "
        f"+ {setup['warmup']} warm-up), {Path(setup['model']).name} ({setup['method']}), detector "
        f"{setup['detector']}, max {setup['max_faces']} faces, recording {'on' if setup['record'] else 'off'}",
        f"machine: {machine['cpu']}, {machine['usable_cores']} cores, {gpus}; ONNX Runtime "
        f"{machine['onnxruntime']}, {setup['graph_threads']} graph thread(s), {setup['detect_workers']} "
        f"detector(s); load average "
        f"{report['load_average']['before']:.2f} -> {report['load_average']['after']:.2f}",
        "",
    ]
    width = max(22, *(len(r.name) + 2 for r in rows))
    header = f"{'ms per frame: median / p95':<28}" + "".join(f"{r.name:>{width}}" for r in rows)
    lines.append(header)
    for stage, label in STAGE_LABELS.items():
        if any(stage in r.stages for r in rows):
            lines.append(f"{label:<28}" + "".join(f"{_stage_cell(r, stage):>{width}}" for r in rows))
    for label, cell in (("end to end (fps)", lambda r: f"{r.fps:.1f}"),
                        ("end to end (ms per frame)", lambda r: f"{r.ms_per_frame:.2f}"),
                        ("faces per frame", lambda r: f"{r.faces_per_frame:.2f}"),
                        ("CPU ms per frame", lambda r: "-" if r.cpu_ms_per_frame is None
                         else f"{r.cpu_ms_per_frame:.2f}"),
                        ("peak RSS (MB)", lambda r: f"{r.peak_rss_mb:.0f}"),
                        ("runs on", lambda r: r.provider.replace("ExecutionProvider", ""))):
        lines.append(f"{label:<28}" + "".join(f"{cell(r)[:width - 2]:>{width}}" for r in rows))
    speedup = report.get("speedup")
    if speedup:
        lines += ["", f"speedup over the Keras baseline, this run: {speedup['end_to_end']:.1f}x end to end "
                      f"(camface live vs Keras); {speedup['same_loop']:.1f}x with the same one-thread loop; "
                      f"{speedup['classify']:.1f}x in classify+explain (mean ms per frame)"
                      + (f"; {speedup['cpu_time']:.1f}x in CPU time per frame" if speedup["cpu_time"] else "")]
    heads = report.get("heads")
    if heads:
        lines += ["", f"gradient outputs vs forward only ({heads['provider'].replace('ExecutionProvider', '')}, "
                      f"{heads['threads']} thread(s), {heads['repeats']} runs each, median / p95 ms per call):"]
        for batch, b in heads["batches"].items():
            lines.append(f"  batch {batch:>2}: with gradients {b['with_gradients']['median_ms']:.2f} / "
                         f"{b['with_gradients']['p95_ms']:.2f}, forward only {b['forward_only']['median_ms']:.2f} / "
                         f"{b['forward_only']['p95_ms']:.2f}: gradients add {b['overhead_pct']:+.1f}%")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command


def _resolve_models(config: BenchConfig) -> tuple[Path, Path | None]:
    """(CAM graph, Keras model or None) for the run."""
    from camface.models import EMOTION_KERAS, EMOTION_ONNX

    if config.backbone:
        from camface.export.bench_graphs import backbone_graph  # TensorFlow, on first use only

        graph, keras_model = backbone_graph(BACKBONES[config.backbone], config.backbone_size, config.work_dir)
        return graph, config.keras_model or keras_model
    graph = config.model or EMOTION_ONNX
    keras_model = config.keras_model
    if keras_model is None and config.model is None:
        keras_model = EMOTION_KERAS
    if config.baseline == "keras" and keras_model is None:
        raise ModelError(f"--baseline keras needs the Keras model of {graph} (--keras-model FILE)")
    return graph, keras_model


def run(config: BenchConfig) -> tuple[dict, list[Row]]:
    """Measure everything `config` asks for; returns the report (JSON-ready) and the rows."""
    from camface.realtime.graph import CamGraph
    from camface.realtime.sources import make_source

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with make_source(config.source, sample_frames=config.frames) as source:  # fails fast, names the source
        source_info = source.info
        first = next(iter(source), None)
    if source_info.live:
        log.warning("camface bench: %s is a live source: each row sees different frames", source_info.name)
    if first is None:
        raise SourceError(f"no frame could be read from {config.source}")
    from camface.realtime.detect import import_mediapipe_vision

    import_mediapipe_vision()  # once, before any row: the live row's CPU time must not include it
    graph_path, keras_path = _resolve_models(config)
    graph = CamGraph(graph_path, config.device, threads=config.graph_threads)
    if config.method != "none" and config.method not in graph.methods:
        raise ModelError(f"{graph_path} has no {config.method!r} heatmap; it offers {', '.join(graph.methods)}")
    info = graph.info
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="camface-bench-") as tmp:
        record_dir = Path(tmp) if config.record else None
        rows.append(run_live(config, graph_path, record_dir))
        speedup = None
        if config.baseline == "keras":
            import importlib

            baseline = importlib.import_module("camface.export.keras_baseline")
            method = "gradcam"  # what the Keras example computes
            rows.append(run_sequential("ONNX, one thread", config, info, OnnxExplainer(graph, method), method,
                                       record_dir))
            norm = info.normalization or {"scale": [1.0], "offset": [0.0]}
            keras = baseline.KerasGradCam(keras_path, info.target_layer, norm["scale"], norm["offset"])
            rows.append(run_sequential("Keras GradientTape", config, info, keras, method, record_dir))
            live, onnx_seq, keras_row = rows
            speedup = {"end_to_end": live.fps / keras_row.fps if keras_row.fps else None,
                       "same_loop": onnx_seq.fps / keras_row.fps if keras_row.fps else None,
                       "classify": (keras_row.stages["classify"].mean_ms / live.stages["classify"].mean_ms
                                    if live.stages.get("classify") and live.stages["classify"].mean_ms else None),
                       "cpu_time": (keras_row.cpu_ms_per_frame / live.cpu_ms_per_frame
                                    if keras_row.cpu_ms_per_frame and live.cpu_ms_per_frame else None)}
    heads = compare_heads(config, graph_path, info, graph.provider) if config.compare_heads else None
    report = {
        "camface_bench": 1,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average": {"before": load_before,
                         "after": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")},
        "settings": {
            "source": source_info.name, "source_size": f"{first.shape[1]}x{first.shape[0]}",
            "source_fps": source_info.fps, "model": str(graph_path),
            "keras_model": str(keras_path) if keras_path else None, "backbone": config.backbone,
            "input_size": list(info.input_size), "color_order": info.color_order,
            "target_layer": info.target_layer, "method": config.method, "frames": config.frames,
            "warmup": config.warmup, "record": config.record, "detector": config.detector,
            "max_faces": config.max_faces, "graph_threads": config.graph_threads,
            "detect_workers": _detect_workers(config, source_info.live), "device": config.device,
            "provider": graph.provider, "baseline": config.baseline,
        },
        "runs": [row.to_json() for row in rows],
        "speedup": speedup,
        "heads": heads,
    }
    return report, rows


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    if args.baseline == "keras":  # before anything imports TensorFlow (see export/keras_baseline.py)
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not getattr(args, "debug", False):  # the table names the provider; one line per session is noise
        logging.getLogger("camface.realtime.graph").setLevel(logging.WARNING)
    try:
        config = BenchConfig.from_args(args)
    except ValueError as exc:
        print(f"camface bench: error: {exc}", file=sys.stderr)
        return 2
    if config.json is not None:
        from camface.outputs import check_output_file

        check_output_file(config.json, overwrite=True)  # fail before minutes of measuring
    report, rows = run(config)
    print(format_report(report, rows))
    if config.json is not None:
        config.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {config.json}", file=sys.stderr)
    return 0
