"""The table `camface bench` prints: stages down, rows across, then the speed-ups and the
gradient-cost comparison."""

from __future__ import annotations

from pathlib import Path

from camface.realtime.bench.rows import Row
from camface.realtime.config import every_nth_frame

STAGE_LABELS = {"decode": "decode", "detect": "detect", "crop": "crop",
                "classify": "classify+explain", "render": "render", "encode": "encode"}


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
        f"{setup['detector']} ({setup.get('detector_runtime', 'mediapipe')}) on {every_nth_frame(setup.get('detect_every', 1))}, "
        f"max {setup['max_faces']} faces, recording {'on' if setup['record'] else 'off'}",
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
    carried = report.get("detect_every")
    if carried:
        lines += ["", format_detect_every(carried)]
    heads = report.get("heads")
    if heads:
        lines += ["", *format_heads(heads)]
    if report.get("int8"):
        from camface.realtime.bench.precision import format_int8

        lines += format_int8(report["int8"])
    return "\n".join(lines)


def format_detect_every(carried: dict) -> str:
    """The line comparing the live row with the detector on every `every`-th frame against every
    frame (rows.compare_detect_every): CPU time per frame, less or more, and the fps ratio."""
    ratio = carried["cpu_ratio"]
    if not ratio:
        cpu = "CPU time per frame not separable from start-up (more --frames)"
    else:  # a short or loaded run can cost more CPU per frame with fewer detections: say so
        cpu = (f"{carried['cpu_ms_per_frame']:.2f} CPU ms per frame against "
               f"{carried['every_frame_cpu_ms_per_frame']:.2f} with detection on every frame, "
               + (f"{ratio:.2f}x less" if ratio >= 1 else f"{1 / ratio:.2f}x more"))
    fps = "fps not measured" if carried["fps_ratio"] is None else f"{carried['fps_ratio']:.2f}x the fps"
    return f"detector on {every_nth_frame(carried['every'])} (boxes carried between): {cpu}; {fps} (this run)"


def format_heads(heads: dict) -> list[str]:
    """--compare-heads: ms per crop (median) of the gradient methods together, forward only and each method,
    per batch size, with the cost over forward only."""
    batches = heads["batches"]
    lines = [f"heatmap cost vs forward only ({heads['provider'].replace('ExecutionProvider', '')}, "
             f"{heads['threads']} thread(s), {heads['repeats']} runs each; ms per crop, median):"]
    lines.append(f"  {'graph':<26}" + "".join(f"{'batch ' + b:>22}" for b in batches))
    first = next(iter(batches.values()))
    rows = [("forward only", lambda b: b["forward_only"]),
            ("gradient methods, all", lambda b: b["with_gradients"])]
    rows += [(m, lambda b, m=m: b["methods"][m]) for m in first.get("methods", {})]
    from camface.realtime.bench.heads import SLOW_RUN_S

    names = {"forward only": "forward only", "with gradients": "gradient methods, all"}
    slow = {names.get(name, name): how for name, how in heads.get("slow", {}).items()}
    for label, pick in rows:
        cells = []
        for b in batches.values():
            c = pick(b)
            if c is None:
                cells.append("-")
                continue
            extra = ("" if label == "forward only" or c["overhead_pct"] is None
                     else f" ({c['overhead_pct']:+.1f}%)")
            cells.append(f"{c['ms_per_crop']:.3f}{extra}{'*' if label in slow else ''}")
        lines.append(f"  {label:<26}" + "".join(f"{cell:>22}" for cell in cells))
    whole = ", ".join(f"batch {b}: {v['overhead_pct']:+.1f}%" for b, v in batches.items()
                      if v["overhead_pct"] is not None)
    if whole:
        lines.append(f"  the in-graph gradient and its heatmaps add {whole}")
    for label, how in slow.items():
        lines.append(f"  * {label}: one timed run at batch {how['batch']} (its first run took "
                     f"{how['first_run_s']:.1f} s, over {SLOW_RUN_S:g} s); not run at the other batch sizes")
    return lines
