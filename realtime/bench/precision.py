"""`camface bench --compare-int8`: the same model in float32 and int8, in one run.

The bench's float32 graph is quantized here as `camface export --int8` does
(camface.export.int8, calibrated on `--calibration`'s faces; the agreement is reported, not
enforced: a `--backbone` graph has random weights). Then, per graph-thread count and batch
size, one graph call is timed for: float32, int8, and int8 pruned to its forward outputs
(heads.forward_only), runs alternating between the three so load on a shared machine hits
all alike. The int8 graph also gets its own live row (see cli.run).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from camface.errors import ModelError

if TYPE_CHECKING:
    from camface.realtime.bench.config import BenchConfig

GRAPHS = ("fp32", "int8", "int8 forward only")


def quantize(config: BenchConfig, model: Path, folder: Path):
    """(int8 graph path in `folder`, int8.Int8Result) of the float32 CAM graph `model`."""
    try:
        from camface.export.int8 import to_int8
    except ImportError as exc:
        raise ModelError("--compare-int8 needs the `onnx` package (pip install 'camface[keras]')") from exc
    # minmax: speed does not depend on the ranges, and it takes seconds where percentile's
    # histograms take minutes for ResNet50; its agreement is reported for what it is
    result = to_int8(model.read_bytes(), config.calibration, "minmax", enforce=False)
    path = folder / f"{model.stem}.int8.onnx"
    path.write_bytes(result.model.SerializeToString())
    return path, result


def compare_int8(config: BenchConfig, fp32: Path, int8: Path, info, provider: str, quantized) -> dict:
    """Median and p95 ms per graph call of GRAPHS at each of config.int8_threads x
    config.batches (CPU provider unless --device says otherwise), and the agreement."""
    from camface.realtime.bench.heads import forward_only, sample_crops, time_sessions
    from camface.realtime.graph import CamGraph

    pipeline = config.pipeline
    int8_bytes = int8.read_bytes()
    sources = {"fp32": (fp32.read_bytes(), True), "int8": (int8_bytes, True),
               "int8 forward only": (forward_only(int8_bytes), False)}
    pool = sample_crops(config, info, max(config.batches))
    out = {"provider": provider, "repeats": config.repeats, "threads": {},
           "agreement": quantized.report["agreement"], "noise_floor": quantized.report["noise_floor"],
           "calibration": quantized.report["calibration"], "passed": quantized.report["passed"]}
    for threads in config.int8_threads:
        sessions = {name: CamGraph.from_bytes(data, fp32, pipeline.device, threads, contract=contract).session
                    for name, (data, contract) in sources.items()}
        per_batch = {}
        for batch in config.batches:
            stats, _ = time_sessions(sessions, pool, batch, config.repeats)
            ms = {name: stats[name].median_ms for name in GRAPHS}
            per_batch[str(batch)] = {
                **{name.replace(" ", "_"): {"median_ms": s.median_ms, "p95_ms": s.p95_ms} for name, s in stats.items()},
                "speedup": ms["fp32"] / ms["int8"] if ms["int8"] > 0 else None,
                "gradient_overhead_pct": (100.0 * (ms["int8"] / ms["int8 forward only"] - 1.0)
                                          if ms["int8 forward only"] > 0 else None),
            }
        out["threads"][str(threads)] = per_batch
    return out


def format_int8(int8: dict) -> list[str]:
    """The --compare-int8 table and the agreement, as lines."""
    from camface.export.agreement import Agreement

    lines = ["", f"float32 vs int8 ({int8['provider'].replace('ExecutionProvider', '')}, {int8['repeats']} runs "
                 f"each, median / p95 ms per graph call; int8 calibrated on {int8['calibration']['crops']} crops, "
                 f"{int8['calibration']['method']}):"]
    for threads, batches in int8["threads"].items():
        for batch, b in batches.items():
            lines.append(f"  {threads} thread(s), batch {batch:>2}: fp32 {b['fp32']['median_ms']:.2f} / "
                         f"{b['fp32']['p95_ms']:.2f}, int8 {b['int8']['median_ms']:.2f} / {b['int8']['p95_ms']:.2f} "
                         f"({b['speedup']:.2f}x), int8 forward only {b['int8_forward_only']['median_ms']:.2f}: "
                         f"gradients add {b['gradient_overhead_pct']:+.1f}%")
    lines.append(f"  agreement ({'within' if int8['passed'] else 'OUTSIDE'} the export's bars):")
    lines += [f"    {line}" for line in Agreement.from_json(int8["agreement"]).lines()]
    return lines
