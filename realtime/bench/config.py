"""What `camface bench` was asked to measure: its own options, plus the frame pipeline's
(`LiveConfig`, shared with `camface live`: same flags, same defaults, same checks)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from camface.errors import UsageError
from camface.models.builders import BACKBONES, backbone_name
from camface.outputs import input_path, input_spec, output_file, output_path
from camface.realtime.config import MAX_GRAPH_THREADS, LiveConfig, add_arguments, from_args

PIPELINE_OPTIONS = ("source", "model", "method", "detector", "detector_runtime", "graph_threads", "detect_workers", "detect_every",
                    "device", "codec")
MIN_BACKBONE_SIZE = 32  # keras.applications' smallest input side


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="sample",
                        help="video file, folder of images, or 'sample' (the bundled demo clip, 640x480): "
                             "every row runs on the same frames (a camera index or stream URL works too, "
                             "but then each row sees other frames)")
    add_arguments(parser, "model", "method")  # the pipeline's own flags: PIPELINE_OPTIONS
    parser.add_argument("--frames", type=int, default=300, help="frames timed per row")
    parser.add_argument("--warmup", type=int, default=30, help="frames run before timing each row")
    parser.add_argument("--record", action="store_true",
                        help="encode the annotated frames to an mp4 (in a temporary folder), as "
                             "`camface live --record` does; adds the encode stage")
    parser.add_argument("--baseline", choices=("keras", "none"), default="none",
                        help="keras: also run each face's Grad-CAM the Keras-example way (eager "
                             "GradientTape per face) on the same frames, and print the speedup (every "
                             "row then shows Grad-CAM)")
    parser.add_argument("--keras-model", type=input_path, default=None,
                        help="Keras model with the CAM graph's weights, for --baseline keras; default: "
                             "the bundled emotion model (bundled graph) or the --backbone's model")
    parser.add_argument("--compare-heads", action="store_true",
                        help="also time the graph forward only, whole and per method (ms per crop; the "
                             "gradient-free methods include their K head or forward passes)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], metavar="N",
                        help="batch sizes for --compare-heads")
    parser.add_argument("--repeats", type=int, default=50,
                        help="graph runs per batch size for --compare-heads and --compare-int8")
    parser.add_argument("--compare-int8", action="store_true",
                        help="also quantize the graph as `camface export --int8` does (calibrated on --calibration) and "
                             "time float32 vs int8: a live row, and graph calls at --batches x --int8-threads")
    parser.add_argument("--calibration", type=input_spec, metavar="SRC", default="sample",
                        help="with --compare-int8: folder of photos or clip whose faces calibrate the int8 graph")
    parser.add_argument("--int8-threads", type=int, nargs="+", default=[1, 2], metavar="N",
                        help="graph threads for the --compare-int8 table")
    parser.add_argument("--backbone", type=backbone_name, choices=tuple(BACKBONES), default=None,
                        help="bench a CAM graph of this backbone (GAP head, random weights, built with "
                             "camface.models.builders and exported once into --work-dir) instead of --model")
    parser.add_argument("--backbone-size", type=int, default=224, help="input size of the --backbone graph")
    parser.add_argument("--work-dir", type=output_path, default=Path("~/.cache/camface/bench"),
                        help="cache folder for --backbone graphs")
    add_arguments(parser, "detector", "detector_runtime")
    parser.add_argument("--max-faces", type=int, default=None,
                        help="faces classified per frame, largest first; default 8, or 1 with --backbone")
    add_arguments(parser, "graph_threads", "detect_workers", "detect_every", "device", "codec")
    parser.add_argument("--json", type=output_file, default=None, metavar="OUT.json",
                        help="also write the numbers to this JSON file")


# flag -> (its argparse dest, the flags that use it): a flag given without any of them changes nothing
DEPENDENT_FLAGS = {
    "--keras-model": ("keras_model", ("--baseline keras",)),
    "--batches": ("batches", ("--compare-heads", "--compare-int8")),
    "--repeats": ("repeats", ("--compare-heads", "--compare-int8")),
    "--calibration": ("calibration", ("--compare-int8",)),
    "--int8-threads": ("int8_threads", ("--compare-int8",)),
    "--backbone-size": ("backbone_size", ("--backbone",)),
    "--work-dir": ("work_dir", ("--backbone",)),
}


def unused_flags(args: argparse.Namespace) -> list[str]:
    """One sentence per flag given a value other than its default while none of the options
    that read it is on (`camface bench` warns instead of ignoring it in silence)."""
    parser = argparse.ArgumentParser()
    configure(parser)
    used = {"--baseline keras": args.baseline == "keras", "--compare-heads": args.compare_heads,
            "--compare-int8": args.compare_int8, "--backbone": args.backbone is not None}
    out = []
    for flag, (dest, needs) in DEPENDENT_FLAGS.items():
        if getattr(args, dest) != parser.get_default(dest) and not any(used[n] for n in needs):
            out.append(f"{flag} is used only with {' or '.join(needs)}; ignored")
    return out


@dataclass(frozen=True)
class BenchConfig:
    """What `camface bench` was asked to measure. pipeline: the frame pipeline every row runs
    (source, model, method, detector, faces, threads, device), as `camface live` would."""

    pipeline: LiveConfig = field(default_factory=lambda: LiveConfig(source="sample"))
    keras_model: Path | None = None
    frames: int = 300
    warmup: int = 30
    record: bool = False
    baseline: str = "none"
    compare_heads: bool = False
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 50
    compare_int8: bool = False
    int8_threads: tuple[int, ...] = (1, 2)
    calibration: str = "sample"
    backbone: str | None = None
    backbone_size: int = 224
    work_dir: Path = Path("~/.cache/camface/bench")
    json: Path | None = None

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise UsageError(f"--frames must be at least 2 (fps needs two frame completions), got {self.frames}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {self.warmup}")
        if self.repeats < 1:  # each flag named, with its value
            raise UsageError(f"--repeats must be >= 1, got {self.repeats}")
        if any(not 1 <= b <= 32 for b in self.batches):
            raise UsageError(f"--batches must be 1..32 (the graph's batch range), got {list(self.batches)}")
        if any(not 1 <= t <= MAX_GRAPH_THREADS for t in self.int8_threads):
            raise UsageError(f"--int8-threads must be 1..{MAX_GRAPH_THREADS}, got {list(self.int8_threads)}")
        if self.backbone_size < MIN_BACKBONE_SIZE:  # Keras said so in a traceback, after TensorFlow loaded
            raise UsageError(f"--backbone-size must be at least {MIN_BACKBONE_SIZE} (the Keras backbones' "
                             f"smallest input), got {self.backbone_size}")
        if self.backbone and self.pipeline.model is not None:
            raise UsageError("--model and --backbone exclude each other")
        if self.baseline == "keras" and self.pipeline.method not in ("auto", "gradcam"):
            raise UsageError(f"--baseline keras computes Grad-CAM, the Keras example's heatmap; --method "
                             f"{self.pipeline.method} would time another heatmap against it (leave --method out, "
                             "or give gradcam)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchConfig":
        max_faces = args.max_faces if args.max_faces is not None else (1 if args.backbone else 8)
        return cls(pipeline=from_args(args, PIPELINE_OPTIONS, max_faces=max_faces), keras_model=args.keras_model,
                   frames=args.frames, warmup=args.warmup, record=args.record, baseline=args.baseline,
                   compare_heads=args.compare_heads, batches=tuple(args.batches), repeats=args.repeats,
                   compare_int8=args.compare_int8, int8_threads=tuple(args.int8_threads),
                   calibration=args.calibration,
                   backbone=args.backbone, backbone_size=args.backbone_size, work_dir=args.work_dir,
                   json=args.json)
