"""Keras classifier file -> verified ONNX CAM graph with camface metadata (the `export` job)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from camface import __version__, graph_spec, methods
from camface.errors import ModelError
from camface.export.preprocess import Preprocessing
from camface.hashing import sha256_file
from camface.outputs import check_output_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """What to export. `preprocessing` None means: resolve preset/colour/scale/offset below
    against the model's channel count."""

    target_layer: str | None = None
    labels: tuple[str, ...] | None = None
    preset: str | None = "none"  # None: not given (Keras: raw pixels assumed, with a warning)
    color_order: str | None = None
    scale: tuple[float, ...] | None = None
    offset: tuple[float, ...] | None = None
    fp16: bool = False
    opset: int = 17
    heads: tuple[str, ...] | None = None  # None: probs, activations and every registry method
    verify: bool = True
    safe_mode: bool = True
    labels_source: str = ""  # where `labels` came from (a file path), for error messages
    int8: bool = False  # quantize the features after the float32 self-check (export/int8.py)
    calibration: str = "sample"  # int8: face crops from this folder / clip / 'sample'
    calibration_method: str = "percentile"  # int8: export/int8.py CALIBRATION_METHODS
    token_grid: tuple[int, int] | None = None  # .onnx/.pt2 transformers: the patch grid (h, w) of the tokens
    prefix_tokens: int | None = None  # .onnx/.pt2 transformers: class / distillation / register tokens
    input_size: tuple[int, int] | None = None  # .onnx/.pt2 with a dynamic height and width: (H, W) to fix
    class_output: str | None = None  # .onnx/.pt2 with several outputs: the one holding the class scores


@dataclass(frozen=True)
class ExportResult:
    path: Path
    info: graph_spec.GraphInfo
    differences: tuple = field(default_factory=tuple)  # verify.Difference per output
    seconds: float = 0.0
    int8: object = None  # int8.Int8Result when options.int8


def read_labels_file(path: str | Path) -> tuple[str, ...]:
    """Class names, one per non-empty line, from a UTF-8 text file. Raises ModelError naming
    the path when it is missing, unreadable or holds no names."""
    from camface.models import read_labels

    path = Path(path)
    if path.is_dir():
        raise ModelError(f"labels file {path} is a folder; give a text file, one class name per line")
    if not path.is_file():
        raise ModelError(f"labels file not found: {path}")
    try:
        labels = tuple(read_labels(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read labels file {path}: {exc}") from exc
    if not labels:
        raise ModelError(f"labels file {path} holds no labels (one class name per line)")
    # two classes of one name were exported: the overlay could not tell them apart, and a class
    # given by name (`camface guided --class`) was always the first
    repeated = sorted({label for label in labels if labels.count(label) > 1}, key=labels.index)
    if repeated:
        where = "; ".join(f"{label!r} names classes {', '.join(str(i) for i, x in enumerate(labels) if x == label)}"
                          for label in repeated[:3])
        raise ModelError(f"labels file {path}: {where}; each class needs a name of its own")
    return labels


def build(model, options: ExportOptions):
    """(tf.function, GraphInfo without source fields) for an in-memory Keras model: what tf2onnx
    converts. The methods that run the model again (Ablation-CAM, Score-CAM) are left out of
    both: `onnx_rerun.attach` writes them into the converted graph (a converted TensorFlow clone
    would carry a frozen copy of the weights per clone)."""
    from camface.export import graph, onnx_rerun

    parts, heads, info = prepare(model, options)
    reruns = onnx_rerun.rerun_names(heads)
    return (graph.build_function(parts, tuple(h for h in heads if h not in reruns)),
            replace(info, heatmaps=tuple(h for h in info.heatmaps if h not in reruns)))


def prepare(model, options: ExportOptions):
    """(graph.GraphParts, heads, GraphInfo without source fields) for an in-memory Keras model:
    the pieces `graph.build_function` / `graph.build_heatmap_function` take."""
    import numpy as np

    from camface.export import graph, keras_model

    model = keras_model.in_float32(model)
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or None in shape[1:]:
        raise ModelError(f"model {model.name!r} input has shape {shape}; camface needs a fixed "
                         "(N, H, W, C) image input")
    _, height, width, channels = shape
    num_classes = int(model.outputs[0].shape[-1])
    if num_classes < 1:
        raise ModelError(f"model {model.name!r}: its output has {num_classes} classes; a classifier needs at least one")
    if (why := graph_spec.one_class(num_classes)) is not None:
        raise ModelError(f"model {model.name!r}: {why}")
    labels = options.labels or tuple(f"class_{i}" for i in range(num_classes))
    if len(labels) != num_classes:
        where = f"labels file {options.labels_source}" if options.labels_source else "labels"
        raise ModelError(f"{where}: {len(labels)} labels, but model {model.name!r} has "
                         f"{num_classes} classes (one label per line, in class order)")
    if options.preset is None and options.scale is None and options.offset is None:
        _warn_assumed_raw_pixels(model)
    preprocessing = Preprocessing.resolve(channels, options.preset or "none", options.color_order,
                                          options.scale, options.offset)
    target = keras_model.resolve_target(model, options.target_layer)
    split = keras_model.split_model(model, target)
    probe = split.features(np.zeros((1, height, width, channels), np.float32))
    if len(probe.shape) != 4:
        raise ModelError(f"target layer {split.target_layer!r} output is not 4-D")
    feature_size = (int(probe.shape[1]), int(probe.shape[2]))
    weights, why_no_cam = keras_model.cam_weights(split, num_classes, int(probe.shape[3]))
    heads = tuple(options.heads) if options.heads is not None else graph.FULL_HEADS
    needs_weights = [h for h in heads if h in methods.METHODS and methods.CLASS_WEIGHTS in methods.get(h).needs]
    if needs_weights and weights is None:
        heads = tuple(h for h in heads if h not in needs_weights)
    elif "cam" not in heads:
        why_no_cam = why_no_cam or "not exported (heads)"
    parts = graph.GraphParts(split, (height, width), channels, num_classes,
                             preprocessing.scale, preprocessing.offset, weights)
    info = graph_spec.GraphInfo(
        labels=tuple(labels),
        input_size=(height, width),
        color_order=preprocessing.color_order,
        target_layer=split.target_layer,
        heatmaps=tuple(h for h in graph_spec.heatmap_outputs() if h in heads),
        feature_size=feature_size,
        normalization=preprocessing.to_metadata(),
        cam_unavailable_reason=why_no_cam if weights is None or "cam" not in heads else "",
        precision="fp16" if options.fp16 else "fp32",
        version=__version__,
        target_reason=f"--target-layer {options.target_layer} (a Keras layer name)"
        if options.target_layer else keras_model.default_target_reason(model),
    )
    return parts, heads, info


# layers that normalise the pixels inside a Keras model (keras.applications' EfficientNet and
# ConvNeXt have both): a model with one takes raw 0..255 pixels
NORMALISING_LAYERS = ("Rescaling", "Normalization")


def _warn_assumed_raw_pixels(model) -> None:
    """Warn that no normalisation was given for `model` and none is inside it, so it is assumed
    to take raw 0..255 pixels (MobileNetV2 wants x/127.5-1, ResNet50 BGR minus the mean: raw
    pixels would give wrong classes and maps without an error)."""
    from camface.export import keras_model

    inside = [layer for _, layer in keras_model.iter_layers(model) if type(layer).__name__ in NORMALISING_LAYERS]
    if inside:
        return
    log.warning("model %r has no Rescaling or Normalization layer and no --preset was given: assumed it "
                "takes raw 0..255 RGB pixels (--preset none). If it was trained on normalised pixels, "
                "pass --preset (tf = x/127.5-1 as MobileNetV2, imagenet-caffe = BGR x-mean as ResNet50, "
                "torch, unit, ...) or --scale/--offset; pass --preset none to say raw pixels are right",
                model.name)


def export(model_path: str | Path, output: str | Path, options: ExportOptions,
           source_name: str | None = None) -> ExportResult:
    """Load, build, convert, verify and write. Raises ModelError / OutputError. `source_name`:
    the Keras file's name the graph records (`model_path`'s by default; a caller exporting a
    model written beside its final name gives that name, which evaluate and guided look for)."""
    import time

    from camface.export import convert, graph, keras_model, onnx_rerun, verify

    started = time.perf_counter()
    model_path, output = Path(model_path), Path(output)
    if options.int8 and options.fp16:
        raise ModelError("--int8 and --fp16 exclude each other (int8 for CPUs, float16 for GPUs)")
    check_output_file(output, overwrite=True)
    model = keras_model.load_model(model_path, safe_mode=options.safe_mode)
    parts, heads, info = prepare(model, options)
    reruns = onnx_rerun.rerun_names(heads)
    if options.fp16 and reruns:
        log.info("%s left out: a float16 graph has no float32 model to run again", ", ".join(reruns))
        reruns = ()
    # tf2onnx converts the rest (see `build`); the methods that run the model again are written
    # into the ONNX graph after the self-check
    function = graph.build_function(parts, tuple(h for h in heads if h not in onnx_rerun.rerun_names(heads)))
    info = replace(info, source_model=source_name or model_path.name, source_sha256=sha256_file(model_path),
                   heatmaps=tuple(h for h in info.heatmaps if h not in onnx_rerun.rerun_names(heads)))
    log.info("exporting %s at target layer %s (feature map %dx%d), heatmaps %s",
             info.source_model, info.target_layer, *info.feature_size, ", ".join(info.heatmaps + reruns))
    if info.cam_unavailable_reason:
        log.info("no CAM: %s", info.cam_unavailable_reason)
    onnx_model = convert.to_onnx(function, opset=options.opset, layers=keras_model.layer_names(model))
    convert.name_batch_dimension(onnx_model)
    if options.fp16:
        onnx_model = convert.to_float16(onnx_model)
    convert.set_metadata(onnx_model, info.to_metadata(),
                         doc=f"camface CAM graph of {info.source_model}, see camface/graph_spec.py")
    differences = ()
    if options.verify:
        # tolerances widen by the outputs' sensitivity: to float16 activations (float16), to
        # rounding inside the model (float32)
        heatmap_function = graph.build_heatmap_function(parts, heads) if options.fp16 else None
        variables = () if options.fp16 else tuple(function.get_concrete_function().variables)
        differences = tuple(verify.verify(onnx_model.SerializeToString(), function,
                                          info.input_size, info.channels, len(info.labels),
                                          info.precision, heatmap_function=heatmap_function,
                                          variables=variables))
        _warn_ill_conditioned(differences, info.target_layer)
    onnx_model, info, rerun_differences = onnx_rerun.attach(onnx_model, info, reruns, options.verify,
                                                            required=onnx_rerun.asked(options.heads))
    differences += rerun_differences
    convert.set_metadata(onnx_model, info.to_metadata())
    quantized = None
    if options.int8:  # on the verified float32 graph; raises ModelError when it disagrees
        from camface.export.int8 import export_int8

        onnx_model, info, quantized = export_int8(onnx_model, info, options)
        convert.set_metadata(onnx_model, info.to_metadata())
    convert.save(onnx_model, output)
    return ExportResult(output, info, differences, time.perf_counter() - started, quantized)


def _warn_ill_conditioned(differences, target_layer: str) -> None:
    """One warning per output whose measured sensitivity (to float16 activations, or to
    rounding inside a float32 model) exceeds its stated tolerance (the self-check then bounds
    it only loosely)."""
    from camface.export.verify import SENSITIVITY_FACTOR

    for difference in differences:
        if difference.sensitivity <= difference.allowed - difference.sensitivity:
            continue
        moved = difference.sensitivity / SENSITIVITY_FACTOR
        if difference.cause == "float16 activations":
            log.warning("float16 %s at %s is ill-conditioned: float16 activations alone move it "
                        "by %.3g (its maximum is %.3g); a float32 export computes it as TensorFlow "
                        "does", difference.output, target_layer, moved, difference.reference_max)
        else:
            log.warning("%s at %s is ill-conditioned: rounding inside the model alone (%s) moves "
                        "it by %.3g (its maximum is %.3g), so ONNX Runtime and TensorFlow may differ "
                        "by that much", difference.output, target_layer, difference.cause, moved,
                        difference.reference_max)
