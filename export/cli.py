"""`camface export MODEL -o OUT.onnx`: a Keras, ONNX or PyTorch (.pt2) classifier -> CAM graph.

Keras files go through TensorFlow and tf2onnx (`exporter`); .onnx and .pt2 files through the
ONNX engine (`onnx_export`), which differentiates the head inside the ONNX graph.

The graph takes uint8 crops [N, H, W, C] in the recorded colour order plus class indices and
returns probabilities, target-layer activations and heatmaps (see camface/graph_spec.py).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from pathlib import Path

from camface import graph_spec, methods
from camface.errors import UsageError
from camface.export import ranking
from camface.export.convert import DEFAULT_OPSET
from camface.export.preprocess import add_input_arguments
from camface.export.torch_model import DEFAULT_OPSET as TORCH_MIN_OPSET
from camface.outputs import input_spec, output_file

log = logging.getLogger(__name__)


MIN_OPSET, MAX_OPSET = 13, 18  # 13: the gradient ops' forms; 18: the newest tf2onnx converts


def check_graph_output(output: Path, *inputs: Path) -> None:
    """A CAM graph's -o: an .onnx name (the files written beside it are named after it) that is
    not one of the command's input files (which writing would destroy). UsageError naming it."""
    from camface.outputs import check_not_an_input, check_output_file

    check_output_file(output, overwrite=True)  # its folder, a directory in the way: said first
    if output.suffix.lower() != ".onnx":
        raise UsageError(f"-o {output}: a CAM graph is an .onnx file; give a name ending in .onnx")
    check_not_an_input(output, inputs, "-o")


def check_numbers(args: argparse.Namespace) -> None:
    """UsageError for option values that would make the export meaningless."""
    if getattr(args, "opset", None) is not None and not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise UsageError(f"--opset must be {MIN_OPSET}..{MAX_OPSET} (tf2onnx converts up to {MAX_OPSET}), "
                         f"got {args.opset}")
    if not getattr(args, "rank_seconds", 0) >= 0:  # NaN too
        raise UsageError(f"--rank-seconds must be >= 0 (0 = no limit), got {args.rank_seconds:g}")
    if getattr(args, "prefix_tokens", None) is not None and args.prefix_tokens < 0:
        raise UsageError(f"--prefix-tokens must be >= 0, got {args.prefix_tokens}")
    if getattr(args, "scale", None) and any(value == 0 for value in args.scale):
        raise UsageError(f"--scale {' '.join(f'{v:g}' for v in args.scale)}: a zero scale makes every image "
                         "the same input")


def unused_flags(args: argparse.Namespace) -> list[str]:
    """One sentence per option given while nothing reads it: --calibration-method without
    --int8; --calibration with --no-rank and no --int8; --rank-seconds with --no-rank."""
    out = []
    if args.calibration_method != "percentile" and not args.int8:
        out.append(f"--calibration-method {args.calibration_method} is for --int8; ignored")
    if args.no_rank and not args.int8 and args.calibration != "sample":
        out.append(f"--calibration {args.calibration}: --no-rank and no --int8 leave nothing to use it; ignored")
    if args.no_rank and args.rank_seconds != ranking.SECONDS:
        out.append(f"--rank-seconds {args.rank_seconds:g} with --no-rank; ignored")
    return out


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """--token-grid, --prefix-tokens and --input-size: what the errors of an .onnx / .pt2 model's
    token grid and dynamic size ask for (export, enroll and compare take them)."""
    parser.add_argument("--token-grid", metavar="HxW", default=None, type=_grid,
                        help=".onnx/.pt2 transformers: the patch grid of a token target [N, T, C] (default: "
                             "the input size over the patch embedding's stride)")
    parser.add_argument("--prefix-tokens", metavar="N", default=None, type=int,
                        help=".onnx/.pt2 transformers: class/distillation/register tokens before the patches "
                             "(default: as the model's Concat of them and the patches says, else T - h * w)")
    parser.add_argument("--input-size", metavar="HxW", default=None, type=_grid,
                        help=".onnx/.pt2 whose height and width are dynamic: the crop size the CAM graph "
                             "takes (the size the model was trained on)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=input_spec, metavar="MODEL",
                        help="Keras model (.keras, .h5, .hdf5), forward ONNX classifier (.onnx) "
                             "or PyTorch program saved with torch.export.save (.pt2)")
    parser.add_argument("-o", "--output", type=output_file, required=True, metavar="OUT.onnx",
                        help="where to write the CAM graph")
    parser.add_argument("--target-layer", metavar="NAME", default=None,
                        help="layer whose activations the heatmaps use (Keras: nested outer/inner;"
                             " .onnx/.pt2: a tensor, node or PyTorch module name such as layer4); "
                             "default: the last spatial feature map (N, C, h, w on the image grid) before "
                             "global pooling")
    add_shape_arguments(parser)
    parser.add_argument("--class-output", metavar="NAME", default=None,
                        help=".onnx/.pt2 with several outputs (logits and an embedding, say): the output "
                             "holding the class scores (logits, or a Softmax / Sigmoid of them); the others "
                             "are left out (default: the model's one output)")
    parser.add_argument("--labels", type=input_spec, metavar="FILE", default=None,
                        help="class names, one per line (default: class_0, class_1, ...)")
    add_input_arguments(parser, "input normalisation and colour order the model expects (required "
                                "for .onnx/.pt2 unless --scale/--offset are given; Keras default: "
                                "none): "
                                "emotion = GRAY x/127.5-1; tf = RGB x/127.5-1 (MobileNetV2); "
                                "torch = RGB (x/255-mean)/std; imagenet-caffe = BGR x-mean "
                                "(ResNet50, VGG16); arcface = RGB (x-127.5)/127.5 (ArcFace, InsightFace); "
                                "facenet = RGB (x-127.5)/128; unit = RGB x/255; none = RGB x")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true",
                           help="float16 weights and internals (for GPUs); inputs/outputs keep types")
    precision.add_argument("--int8", action="store_true",
                           help="int8 features (for CPUs with VNNI): everything before the target layer "
                                "quantized by ONNX Runtime; head, gradient and heatmaps stay float32; fails "
                                "when it no longer agrees with float32 on held-out crops")
    parser.add_argument("--calibration", type=input_spec, metavar="SRC", default="sample",
                        help="folder of photos, a clip or 'sample' (the bundled clip): its faces, detected and "
                             "cropped as live, rank the graph's methods by faithfulness as `camface evaluate "
                             "--source SRC` does (recorded in the graph; `--method auto` shows the first); with "
                             "--int8 they also calibrate the int8 ranges, the last quarter held out for the "
                             "agreement")
    parser.add_argument("--rank-seconds", type=float, default=ranking.SECONDS, metavar="S",
                        help="time budget of the ranking, estimated before it starts: fewer crops when it "
                             f"would take longer (at least {ranking.MIN_CROPS}, else no ranking); 0 = no limit")
    parser.add_argument("--no-rank", action="store_true",
                        help="record no ranking (`--method auto` then shows Grad-CAM and says why)")
    parser.add_argument("--calibration-method", choices=("percentile", "minmax", "entropy"),
                        default="percentile", help="with --int8: how ONNX Runtime turns the calibration crops "
                                                   "into ranges (minmax: faster, less robust to outliers)")
    parser.add_argument("--opset", type=int, default=None, metavar="N",
                        help=f"ONNX opset of a Keras or .pt2 model's conversion, {MIN_OPSET}..{MAX_OPSET} "
                             f"(default {DEFAULT_OPSET}; .pt2 at least {TORCH_MIN_OPSET}); an .onnx model keeps its own")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="turn Keras safe mode off to load a model with Lambda layers: this "
                             "RUNS PYTHON CODE FROM THE MODEL FILE; use only with files you trust")
    heads = (graph_spec.OUTPUT_PROBS, graph_spec.OUTPUT_ACTIVATIONS, *methods.names())
    parser.add_argument("--heads", nargs="+", choices=heads, default=None,
                        help=argparse.SUPPRESS)  # benchmarks: forward-only graphs; default: every method that fits
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the self-check (Keras: ONNX Runtime vs TensorFlow; .onnx/.pt2: "
                             "forward vs the model, gradient vs finite differences)")


def main(args: argparse.Namespace) -> int:
    from camface.export import ranking

    with ranking.quiet_graph_log(getattr(args, "debug", False)):
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from camface.export.exporter import ExportOptions, export, read_labels_file
    from camface.export.onnx_export import SUFFIXES
    from camface.outputs import written_beside
    from camface.export.torch_model import PICKLE_SUFFIXES

    suffix = Path(args.model).suffix.lower()
    onnx_engine = suffix in SUFFIXES + PICKLE_SUFFIXES
    check_graph_output(Path(args.output), Path(args.model))
    check_numbers(args)
    if args.opset is not None and suffix == ".onnx":
        log.warning("camface: --opset is for converting Keras and .pt2 models; %s keeps its own opset",
                    Path(args.model).name)
    elif args.opset is not None and suffix == ".pt2" and args.opset < TORCH_MIN_OPSET:
        log.warning("camface: --opset %d: %s is converted at opset %d, the lowest camface converts .pt2 "
                    "models at", args.opset, Path(args.model).name, TORCH_MIN_OPSET)
    for sentence in unused_flags(args):
        log.warning("camface export: %s", sentence)
    if args.int8 or not args.no_rank:  # before the build: a bad source must not cost minutes, or leave a graph
        from camface.realtime.sources import check_source

        check_source(args.calibration, "--calibration", no_camera="calibration")
    labels = read_labels_file(args.labels) if args.labels else None
    options = ExportOptions(
        target_layer=args.target_layer,
        token_grid=args.token_grid,
        prefix_tokens=args.prefix_tokens,
        class_output=args.class_output,
        input_size=args.input_size,
        labels=labels,
        preset=args.preset,  # None: ONNX engine, refused; Keras, raw pixels assumed with a warning
        color_order=args.color_order,
        scale=tuple(args.scale) if args.scale else None,
        offset=tuple(args.offset) if args.offset else None,
        fp16=args.fp16,
        opset=args.opset or DEFAULT_OPSET,
        heads=tuple(args.heads) if args.heads else None,
        verify=not args.no_verify,
        safe_mode=not args.unsafe_load,
        labels_source=args.labels or "",
        int8=args.int8,
        calibration=args.calibration,
        calibration_method=args.calibration_method,
    )
    if not onnx_engine and (args.token_grid or args.prefix_tokens is not None):
        raise UsageError("--token-grid and --prefix-tokens are for .onnx / .pt2 transformers")
    if not onnx_engine and args.class_output is not None:
        raise UsageError("--class-output is for .onnx / .pt2 models with several outputs")
    if not onnx_engine and args.input_size is not None:
        raise UsageError("--input-size is for .onnx / .pt2 models with a dynamic height and width")
    # the graph is written, then ranked and written again: both go to a file beside -o, renamed
    # over it only when done, so a failed ranking (or Ctrl-C) never leaves an unranked graph in
    # place of the previous one
    output = Path(args.output)
    with written_beside(output, tag="unranked") as (staging,):
        if onnx_engine:
            from camface.export import onnx_export

            result = onnx_export.export(args.model, staging, options)
        else:
            result = export(args.model, staging, options)
        result = ranking.record(result, None if args.no_rank else args.calibration, args.rank_seconds,
                                name=output)
    result = replace(result, path=output)
    info = result.info
    print(f"wrote {result.path} ({result.path.stat().st_size / 1e6:.2f} MB, {result.seconds:.1f} s): "
          f"target layer {info.target_description} {info.feature_size[0]}x{info.feature_size[1]}, "
          f"heatmaps {', '.join(info.heatmaps)}, {info.color_order} {info.input_size[0]}x"
          f"{info.input_size[1]}, {len(info.labels)} classes, {info.precision}")
    if info.target_reason:
        print(f"  target: {info.target_reason}")
    for difference in result.differences:
        print(f"  verify {difference}")
    if result.int8 is not None:
        from camface.export.int8 import summary_lines

        for line in summary_lines(result.int8.report):
            print(f"  int8 {line}")
    for line in ranking.summary_lines(info.ranking, graph_spec.auto_method(info)[0]):
        print(f"  ranking {line}")
    return 0


def _grid(text: str) -> tuple[int, int]:
    """'14x14' -> (14, 14), for --token-grid and --input-size (argparse names the flag)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes HxW, such as 14x14, not {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"{text}: both sides must be >= 1")
    return height, width
