"""`camface bench`: frames per second and per-stage latency of the live pipeline, headless,
against the baselines users would otherwise use, measured on the same frames in one run.

Rows (each on the same frames of `--source`, after `--warmup` frames that are not timed):
  camface live        the real live loop (`LiveLoop`: reader, detector(s), main and writer
                      threads), headless, recording when `--record`.
  ONNX, one thread    (with `--baseline keras`) the same stages one after the other in one
                      thread, with the CAM graph: separates what pipelining gains from what
                      the graph gains.
  Keras GradientTape  (with `--baseline keras`) the same loop, but each face's Grad-CAM
                      computed the Keras-example way (export/keras_baseline.py); every row
                      then shows Grad-CAM, so the speed-ups compare the same heatmap.
Stages: decode, detect, crop, classify+explain, render, encode; median and p95 milliseconds.
`--compare-heads` adds the gradient outputs' cost (camface.realtime.bench.heads).
`--compare-int8` adds the int8 graph: a live row and float32 vs int8 graph calls (bench.precision).

The pieces: config (flags and BenchConfig), rows (the pipelines timed), heads, machine, report.
Top-level imports stay light; TensorFlow is never imported by this module: the Keras baseline
and the backbone builder live in camface.export and are loaded only when asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from camface.errors import ModelError, OutputError, SourceError, UsageError
from camface.realtime.bench.config import BACKBONES, BenchConfig, configure, unused_flags  # noqa: F401 (configure: the CLI)

if TYPE_CHECKING:
    from camface.realtime.bench.rows import Row

log = logging.getLogger(__name__)


def _resolve_models(config: BenchConfig) -> tuple[Path, Path | None]:
    """(CAM graph, Keras model or None) for the run."""
    from camface.api import model_path
    from camface.models import EMOTION_KERAS

    if config.backbone:
        from camface.export.bench_graphs import backbone_graph  # TensorFlow, on first use only

        graph, keras_model = backbone_graph(BACKBONES[config.backbone], config.backbone_size, config.work_dir)
        return graph, config.keras_model or keras_model
    graph = model_path(config.pipeline)
    keras_model = config.keras_model
    if keras_model is None and config.pipeline.model is None:
        keras_model = EMOTION_KERAS
    if config.baseline == "keras" and keras_model is None:
        raise ModelError(f"--baseline keras needs the Keras model of {graph} (--keras-model FILE)")
    return graph, keras_model


def check_keras_baseline(graph_path: Path, info, keras_path: Path) -> None:
    """ModelError when the Keras baseline cannot explain what the graph `graph_path` (GraphInfo
    `info`) explains with `keras_path`: a gallery graph (its source model is the embedder, its
    classes the identities), a target inside a nested model (the Keras example's recipe takes a
    flat layer), or another model than the graph's source (its sha256 against the graph's
    `source_sha256`: another checkpoint would time other maps, another input shape failed the
    Keras row with a traceback after the live rows had run). Reads the file, not TensorFlow."""
    from camface.hashing import sha256_file

    if info.gallery:
        raise ModelError(f"--baseline keras: {graph_path} is a gallery graph; the Keras baseline explains a "
                         "classifier's classes, not a similarity to enrolled identities")
    if "/" in info.target_layer:
        raise ModelError(f"the Keras baseline needs a flat target layer; {info.target_layer!r} of {graph_path} is "
                         f"inside a nested model of {keras_path.name}")
    if not info.source_sha256:  # an older graph: KerasGradCam still checks the input shape and classes
        log.warning("camface bench: %s records no source_sha256: cannot check that %s is its model",
                    graph_path, keras_path)
    elif (actual := sha256_file(keras_path)) != info.source_sha256:
        raise ModelError(f"--keras-model {keras_path}: not the model {graph_path} was exported from "
                         f"({info.source_model or 'its source model'}): sha256 {actual[:12]}... != source_sha256 "
                         f"{info.source_sha256[:12]}... recorded in the graph")


def run(config: BenchConfig) -> tuple[dict, list[Row]]:
    """Measure everything `config` asks for; returns the report (JSON-ready) and the rows."""
    from camface.realtime.bench.heads import compare_heads
    from camface.realtime.bench.machine import machine_info
    from camface.realtime.bench.rows import ExplainerGraph, compare_detect_every, run_live, run_sequential
    from camface.realtime.carry import every_for
    from camface.api import load
    from camface.realtime.loop import detect_workers_for
    from camface.realtime.sources import make_source

    pipeline = config.pipeline
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with make_source(pipeline.source, sample_frames=config.frames) as source:  # fails fast, names the source
        source_info = source.info
        frames = iter(source)
        first = next(frames, None)
        second = next(frames, None) if first is not None else None
    if source_info.live:
        log.warning("camface bench: %s is a live source: each row sees different frames", source_info.name)
    if first is None:
        raise SourceError(f"no frame could be read from {source_info.name}")
    if second is None:  # one frame completion holds no interval: no fps, no speed-up to print
        raise SourceError(f"{source_info.name} gave one frame; camface bench times at least 2 (fps needs two "
                          "frame completions): give a clip or a folder of several images")
    from camface.realtime.detect import import_mediapipe_vision

    import_mediapipe_vision()  # once, before any row: the live row's CPU time must not include it
    graph_path, keras_path = _resolve_models(config)
    if config.baseline == "keras":  # every row explains what the Keras baseline does: the speed-ups compare like with like
        pipeline = pipeline.replace(method="gradcam")
    # the graph of the rows run here (sequential, heads) and "auto" resolved, once; its detector is
    # never opened (each row opens its own), so closing it at once leaves the graph in use
    with load(graph_path, config=pipeline, cli=True) as opened:
        # load names the graph it opened in its config; a --backbone run keeps its model unset (the
        # rows are given graph_path), or the config refused it: "--model and --backbone exclude each other"
        graph, pipeline = opened.graph, opened.config.replace(model=config.pipeline.model)
    config = dataclasses.replace(config, pipeline=pipeline)
    info = graph.info
    if config.baseline == "keras":  # before the live rows, not minutes after (as --compare-int8 below)
        check_keras_baseline(graph_path, info, keras_path)
    if config.compare_int8 and info.precision != "fp32":  # before the live rows, not minutes after
        raise UsageError(f"--compare-int8 quantizes a float32 CAM graph; {graph_path} is {info.precision}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="camface-bench-") as tmp:
        record_dir = Path(tmp) if config.record else None
        every = every_for(pipeline.detect_every, bool(getattr(source_info, "still", False)), pipeline.detect_workers)
        if config.warmup:
            # The first loop of a process pays one-time costs (library and codec set-up): an
            # untimed loop first, so that the rows compared below start alike (each row's CPU
            # per frame is timed between two frames of its timed run, or, for runs too short
            # for that, less its own warm-up run's CPU).
            run_live(dataclasses.replace(config, frames=max(2, config.warmup), warmup=0), graph_path, record_dir,
                     name="priming")
        rows.append(run_live(config, graph_path, record_dir))
        carried = None
        if every > 1:  # the same frames with the detector on every frame, for the comparison
            rows.append(run_live(dataclasses.replace(config, pipeline=pipeline.replace(detect_every=1)), graph_path,
                                 record_dir, name="live, every frame"))
            carried = compare_detect_every(every, rows[0], rows[-1])
        speedup = None
        if config.baseline == "keras":
            import importlib

            baseline = importlib.import_module("camface.export.keras_baseline")
            method = "gradcam"  # what the Keras example computes
            rows.append(run_sequential("ONNX, one thread", config, graph, method, record_dir, every))
            norm = info.normalization or {"scale": [1.0], "offset": [0.0]}
            keras = baseline.KerasGradCam(keras_path, info.target_layer, norm["scale"], norm["offset"],
                                          input_shape=(*info.input_size, info.channels), classes=len(info.labels))
            rows.append(run_sequential("Keras GradientTape", config, ExplainerGraph(keras, info, method), method,
                                       record_dir, every))
            live, onnx_seq, keras_row = rows[0], rows[-2], rows[-1]
            speedup = {"end_to_end": live.fps / keras_row.fps if keras_row.fps else None,
                       "same_loop": onnx_seq.fps / keras_row.fps if keras_row.fps else None,
                       "classify": (keras_row.stages["classify"].mean_ms / live.stages["classify"].mean_ms
                                    if live.stages.get("classify") and live.stages["classify"].mean_ms else None),
                       "cpu_time": (keras_row.cpu_ms_per_frame / live.cpu_ms_per_frame
                                    if keras_row.cpu_ms_per_frame and live.cpu_ms_per_frame else None)}
        int8 = None
        if config.compare_int8:
            from camface.realtime.bench.precision import compare_int8, quantize

            int8_path, quantized = quantize(config, graph_path, Path(tmp))
            rows.append(run_live(config, int8_path, record_dir, name="camface live int8"))
            int8 = compare_int8(config, graph_path, int8_path, info, graph.provider, quantized)
    heads = compare_heads(config, graph) if config.compare_heads else None
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
            "target_layer": info.target_layer, "token_grid": info.token_grid or None,
            "method": pipeline.method, "frames": config.frames,
            "warmup": config.warmup, "record": config.record, "detector": pipeline.detector,
            "detector_runtime": pipeline.detector_runtime,
            "max_faces": pipeline.max_faces, "graph_threads": pipeline.graph_threads,
            "detect_workers": 1 if every > 1 else detect_workers_for(pipeline.detect_workers, pipeline.graph_threads,
                                                                    source_info.live),
            "detect_every": every,
            "device": pipeline.device,
            "provider": graph.provider, "baseline": config.baseline,
        },
        "runs": [row.to_json() for row in rows],
        "speedup": speedup,
        "detect_every": carried,
        "heads": heads,
        "int8": int8,
    }
    return report, rows


def _make_work_dir(folder: Path) -> None:
    """Create `folder` (--work-dir, the --backbone graphs' cache) and its parents, or raise
    OutputError naming the flag: a file there, or a folder that cannot be made."""
    folder = folder.expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--work-dir {folder}: it is a file; give a folder for the --backbone graphs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--work-dir {folder}: cannot create the folder ({exc.strerror or exc})") from exc


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    if args.baseline == "keras":  # before anything imports TensorFlow (see export/keras_baseline.py)
        from camface.export.keras_baseline import check_onednn_off, prepare_environment

        prepare_environment()
        check_onednn_off()  # a TensorFlow this process loaded earlier: refused before any row, not a crash after
    from camface.export.ranking import quiet_graph_log

    with quiet_graph_log(getattr(args, "debug", False)):  # the table names the provider; a line per session is noise
        return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    config = BenchConfig.from_args(args)
    for sentence in unused_flags(args):
        log.warning("camface bench: %s", sentence)
    if config.json is not None:
        from camface.api import model_path
        from camface.models import EMOTION_KERAS
        from camface.outputs import check_not_an_input, check_output_file

        check_output_file(config.json, overwrite=True)  # fail before minutes of measuring
        # the report replaces an existing file: never one the run reads (the clip, a model; without
        # --model the bundled graph, and for --baseline keras its Keras model, as _resolve_models)
        keras = config.keras_model
        if keras is None and config.baseline == "keras" and config.pipeline.model is None and not config.backbone:
            keras = EMOTION_KERAS
        check_not_an_input(config.json, [config.pipeline.source, None if config.backbone else model_path(config.pipeline),
                                         keras, config.calibration if config.compare_int8 else None], "--json")
    # the files the last rows read: now, not after the live rows have run
    if config.baseline == "keras" and config.keras_model is not None and not config.keras_model.is_file():
        raise ModelError(f"--keras-model: model file not found: {config.keras_model}")
    from camface.realtime.sources import check_source

    if config.pipeline.source is not None:  # run() opens it first too, but its error did not name the flag
        check_source(config.pipeline.source, "--source")
    if config.compare_int8:
        check_source(config.calibration, "--calibration", no_camera="calibration")
    if config.backbone:  # was a FileExistsError traceback (a file) once the source had opened
        _make_work_dir(config.work_dir)
    report, rows = run(config)
    from camface.realtime.bench.report import format_report

    print(format_report(report, rows))
    if config.json is not None:
        from camface.outputs import replace_whole

        text = json.dumps(report, indent=2) + "\n"
        replace_whole(config.json, lambda partial: partial.write_text(text))  # a full disk keeps the earlier file
        print(f"wrote {config.json}", file=sys.stderr)
    return 0
