"""The table `camface bench` prints: stages down, rows across, then the speed-ups and the
gradient-cost comparison."""

from __future__ import annotations

from pathlib import Path

from camface.realtime.bench.rows import Row

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
    if report.get("int8"):
        from camface.realtime.bench.precision import format_int8

        lines += format_int8(report["int8"])
    return "\n".join(lines)
