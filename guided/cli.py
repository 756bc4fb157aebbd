"""`camface guided INPUT`: Guided Backprop / Guided Grad-CAM figures from snapshots or images.

    camface guided SNAPSHOT_DIR                      -> SNAPSHOT_DIR/guided.png
    camface guided photo.jpg -o fig.png --class happy sad
    camface guided SNAPSHOT_DIR --layers all -o layers.gif

Top-level imports stay light (no TensorFlow): `camface --help` imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from camface.errors import ModelError, OutputError, SourceError, UsageError
from camface.outputs import check_not_an_input, check_output_file, input_spec, output_path
from camface.realtime.config import DETECTORS, LiveConfig

log = logging.getLogger(__name__)

FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg")


@dataclass(frozen=True)
class GuidedConfig:
    """Everything `camface guided` was asked to do, built once from the command line."""

    input: Path
    output: Path | None
    model: Path | None
    layer: str | None
    classes: tuple[str, ...]
    all_layers: bool
    cam_boxes: bool | None  # None: not given (boxes drawn on the figure)
    detector: str
    margin: float
    min_confidence: float
    max_faces: int

    def __post_init__(self) -> None:
        # live's checks of the crop options (UsageError naming the flag), as `camface train` does:
        # here, before TensorFlow loads the model, not when the image's faces are detected
        LiveConfig(detector=self.detector, margin=self.margin, min_confidence=self.min_confidence,
                   max_faces=self.max_faces)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "GuidedConfig":
        return cls(Path(args.input), Path(args.output) if args.output else None,
                   Path(args.model) if args.model else None, args.layer,
                   tuple(args.classes or ()), args.layers == "all", args.cam_boxes,
                   args.detector, args.margin, args.min_confidence, args.max_faces)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=input_spec, metavar="INPUT",
                        help="a snapshot folder saved by `camface live` (key s or `--snapshot-every`), "
                             "or an image file (faces are detected and cropped as in the live loop)")
    parser.add_argument("--model", type=input_spec, metavar="MODEL.keras|.h5", default=None,
                        help="Keras model to explain with; default: the snapshot's (found beside its "
                             "ONNX graph, or the bundled one when its sha256 matches), or the bundled "
                             "emotion model for images")
    parser.add_argument("--layer", metavar="NAME", default=None,
                        help="layer for CAM / Grad-CAM / Grad-CAM++; default: the snapshot graph's "
                             "target layer, else the last 4-D layer before the head's global pooling "
                             "(the last 4-D layer when it has none)")
    parser.add_argument("--class", dest="classes", nargs="+", metavar="NAME|INDEX", default=None,
                        help="class(es) to explain; several give one row per face and class; "
                             "default: the class the snapshot explained, or the predicted class")
    parser.add_argument("-o", "--output", type=output_path, metavar="OUT", default=None,
                        help="figure file (.png, .pdf, .svg), or OUT.gif with --layers all; default: "
                             "guided.png / guided_layers.gif in the snapshot folder, or "
                             "IMAGE_guided.png / IMAGE_guided_layers.gif beside the image")
    parser.add_argument("--layers", choices=["all"], default=None,
                        help="animate Grad-CAM over every convolutional layer, first to last (GIF)")
    parser.add_argument("--cam-boxes", action=argparse.BooleanOptionalAction, default=None,
                        help="draw the study's localisation box (largest region above 20%% of the "
                             "map's maximum) on the figure's overlays (default: drawn; not for "
                             "--layers all)")
    # image inputs are detected and cropped as live does: its defaults, from its config
    parser.add_argument("--detector", choices=DETECTORS, default=LiveConfig.detector,
                        help="face detector for image inputs (as `camface live --detector`)")
    parser.add_argument("--margin", type=float, default=LiveConfig.margin,
                        help="crop margin around each face for image inputs, fraction of the box's "
                             "longer side (as `camface live --margin`)")
    parser.add_argument("--min-confidence", type=float, default=LiveConfig.min_confidence,
                        help="detector confidence threshold for image inputs (as `camface live "
                             "--min-confidence`)")
    parser.add_argument("--max-faces", type=int, default=LiveConfig.max_faces,
                        help="explain at most this many faces of an image input, the largest (as "
                             "`camface live --max-faces`)")


def _output_path(config: GuidedConfig) -> Path:
    """The output file, checked before any work: right suffix, writable folder."""
    suffix = ".gif" if config.all_layers else ".png"
    if config.input.is_dir():
        default = config.input / ("guided_layers.gif" if config.all_layers else "guided.png")
    else:
        default = config.input.with_name(config.input.stem + ("_guided_layers" if config.all_layers
                                                               else "_guided") + suffix)
    out = config.output if config.output is not None else default
    if config.all_layers and out.suffix.lower() != ".gif":
        raise OutputError(f"--layers all writes an animated GIF: use -o OUT.gif, not {out}")
    if not config.all_layers and out.suffix.lower() not in FIGURE_SUFFIXES:
        raise OutputError(f"cannot write a figure to {out}: use one of "
                          f"{', '.join(FIGURE_SUFFIXES)} (or --layers all with .gif)")
    check_output_file(out, overwrite=True)  # its folder, a folder in its place, permissions: before any work
    # the default names are guided's own files beside the input (-o naming one of them too: it
    # writes there again, as without -o)
    if config.output is not None and out.absolute() != default.absolute():
        check_not_an_input(out, [config.input], "-o")
    return out


def _class_indices(names: tuple[str, ...], labels: tuple[str, ...], classes: int) -> list[int]:
    """--class values (names, case-insensitive, or indices) -> class indices."""
    lowered = [label.lower() for label in labels]
    indices = []
    for name in names:
        if name.lstrip("-").isdigit():
            index = int(name)
        elif name.lower() in lowered:
            index = lowered.index(name.lower())
        else:
            raise ModelError(f"unknown class {name!r}: the model's classes are "
                             f"{', '.join(labels) or f'0..{classes - 1}'}")
        if not 0 <= index < classes:
            raise ModelError(f"class index {index} is out of range: the model has {classes} classes")
        if index in indices:  # (two identical rows of the figure)
            raise UsageError(f"--class {name} names class {labels[index] if index < len(labels) else index} "
                             "twice: give each class once")
        indices.append(index)
    return indices


def _load_keras(path: Path):
    import zipfile

    import keras

    from camface.graph_spec import one_class
    from camface.guided.image import KERAS_SUFFIXES

    if path.suffix.lower() not in KERAS_SUFFIXES:  # a graph exported from .pt2 / .onnx names that file
        raise ModelError(f"{path} is not a Keras model ({', '.join(KERAS_SUFFIXES)}): camface guided "
                         "explains Keras models in TensorFlow; a graph exported from a PyTorch or ONNX "
                         "model shows its maps in `camface live` / `camface batch` only")
    if path.suffix.lower() == ".keras" and not zipfile.is_zipfile(path):  # Keras says "File not found"
        raise ModelError(f"cannot load Keras model {path}: not a .keras file (those are zip archives)")

    try:
        model = keras.models.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for files that are not models
        raise ModelError(f"cannot load Keras model {path}: {' '.join(str(exc).split())}") from exc
    # as export and camface.load refuse it: every face would be named its one class
    if (why := one_class(int(model.output_shape[-1]))) is not None:
        raise ModelError(f"{path}: {why}")
    return model


def _refuse_a_snapshot_crop(path: Path) -> None:
    """UsageError when `path` is a face crop a snapshot saved (face_00.png beside its
    snapshot.json): read as a photo, its face was detected again in the tight crop, where the
    detector found none ("no faces found in face_00.png")."""
    from camface.realtime.snapshot import SNAPSHOT_JSON, read_meta

    if not (path.is_file() and (path.parent / SNAPSHOT_JSON).is_file()):
        return
    try:
        crops = {face.get("crop") for face in read_meta(path.parent)["faces"]
                 if isinstance(face, dict) and isinstance(face.get("crop"), str)}  # (a list: unhashable)
    except SourceError:
        return  # a broken snapshot.json: the photo is read as a photo
    if path.name in crops:
        raise UsageError(f"{path} is a face crop of the snapshot {path.parent}: give the snapshot folder "
                         f"(camface guided {path.parent}) to explain its faces")


def _read_input(config: GuidedConfig):
    """(GuidedInput, keras model) for a snapshot folder or an image file."""
    from camface.guided import snapshot
    from camface.guided.image import graph_beside, image_model, read_image

    if config.model is not None and config.model.suffix.lower() == ".onnx":  # what `live --model` takes
        raise ModelError(f"{config.model} is an ONNX graph: camface guided runs the Keras model it was "
                         "exported from (.keras, .h5); pass that with --model")
    if config.input.is_dir():
        source = snapshot.read_snapshot(config.input, config.model)
        return source, _load_keras(source.keras_path)
    if not config.input.is_file():
        raise SourceError(f"input not found: {config.input} (a snapshot folder or an image file)")
    keras_path, preprocessing, labels, layer = image_model(config.model)
    model = _load_keras(keras_path)
    channels = int(model.input_shape[-1])
    passed_over = ""
    if preprocessing is None:  # m.onnx exported from m.keras, for m.h5 (the same model): its sha256 is m.keras'
        found, passed_over = graph_beside(keras_path, model, _load_keras)
        if found is not None:
            preprocessing, labels, layer = found
    if preprocessing is None:
        graph = keras_path.with_suffix(".onnx")
        if channels != 1 and passed_over:  # exporting to that name replaces the other model's graph
            raise ModelError(f"cannot tell how {keras_path} expects its pixels: {graph} beside it {passed_over}; "
                             f"to explain {keras_path.name}, export it (camface export {keras_path} -o {graph}, "
                             "which replaces that graph)")
        if channels != 1:
            raise ModelError(f"cannot tell how {keras_path} expects its pixels: export it first "
                             f"(camface export {keras_path} -o {graph}) "
                             "or explain a snapshot made with its graph")
        if passed_over:
            log.warning("%s beside %s %s", graph, keras_path, passed_over)
        log.warning("%s: assuming grayscale input scaled as x/127.5-1 (the emotion model's)",
                    keras_path)
        preprocessing = snapshot.EMOTION_PREPROCESSING
    if None in model.input_shape[1:3]:  # the crop size faces are cut to
        raise ModelError(f"model {keras_path} takes images of any size {tuple(model.input_shape[1:])}: camface "
                         "guided crops faces to the model's fixed input size; give it one, or explain a snapshot")
    size = tuple(int(v) for v in model.input_shape[1:3])
    return read_image(config.input, keras_path, preprocessing, size, labels,
                      detector=config.detector, margin=config.margin,
                      min_confidence=config.min_confidence, max_faces=config.max_faces,
                      target_layer=layer), model


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from camface.guided import gradcam
    from camface.realtime.snapshot import SNAPSHOT_JSON

    config = GuidedConfig.from_args(args)
    if config.input.name == SNAPSHOT_JSON:  # the snapshot's own file names its folder
        config = dataclasses.replace(config, input=config.input.parent)
    _refuse_a_snapshot_crop(config.input)
    if config.layer is not None and not config.layer.strip():  # an unset shell variable: the default layer,
        # without a word
        raise UsageError("--layer is empty; give a layer name, or leave it out for the default")
    if config.all_layers and config.layer is not None:  # the GIF's frames are every layer
        raise UsageError(f"--layer {config.layer} and --layers all exclude each other: the GIF shows "
                         "Grad-CAM at every convolutional layer")
    if config.all_layers and config.cam_boxes is not None:  # it would be ignored without a word
        flag = "--cam-boxes" if config.cam_boxes else "--no-cam-boxes"
        raise UsageError(f"{flag} is for the figure: --layers all writes a GIF of each layer's Grad-CAM, "
                         "which draws no boxes")
    out = _output_path(config)
    started = time.perf_counter()
    source, model = _read_input(config)
    for note in source.notes:
        log.warning("%s", note)
    channels, crop_channels = int(model.input_shape[-1]), source.faces[0].crop.shape[-1]
    if channels != crop_channels:
        raise ModelError(f"model {source.keras_path} takes {channels} channel(s) but the crops of "
                         f"{source.origin} have {crop_channels} ({source.preprocessing.color_order})")
    size, crop_size = tuple(model.input_shape[1:3]), source.faces[0].crop.shape[:2]
    if None not in size and size != crop_size:
        raise ModelError(f"model {source.keras_path} takes {size[0]}x{size[1]} inputs but the crops "
                         f"of {source.origin} are {crop_size[0]}x{crop_size[1]}")
    classes = int(model.output_shape[-1])
    labels = source.labels if len(source.labels) == classes else tuple(
        f"class {i}" for i in range(classes))

    requested = _class_indices(config.classes, labels, classes) if config.classes else None
    crops, class_index, names, recorded = [], [], [], []
    for face in source.faces:
        if requested is None and face.explained >= classes:
            raise ModelError(f"{face.name} of {source.origin} explains class {face.explained} but "
                             f"model {source.keras_path} has {classes} classes")
        if face.predicted >= classes:
            raise ModelError(f"{face.name} of {source.origin} records class {face.predicted} as predicted but "
                             f"model {source.keras_path} has {classes} classes")
        # -1: the snapshot explained the class it recorded as predicted (not the Keras argmax)
        explained = face.predicted if face.explained < 0 else face.explained
        for index in requested if requested is not None else [explained]:
            crops.append(face.crop)
            class_index.append(index)
            names.append(face.name)
            recorded.append(face.predicted)
    crops = np.stack(crops)
    class_index = np.asarray(class_index, np.int64)
    recorded = np.asarray(recorded, np.int64)

    if config.all_layers:
        return _write_layers_gif(model, crops, class_index, names, labels, source, out, started)

    layer = config.layer or source.target_layer or None
    try:
        layer = gradcam.resolve_layer(model, layer)
    except ModelError:
        if config.layer:
            raise
        default = gradcam.resolve_layer(model, None)
        log.warning("target layer %r of the CAM graph is not in %s: using %r",
                    source.target_layer, source.keras_path.name, default)
        layer = default
    return _write_figure(model, layer, crops, class_index, names, labels, source, config, out,
                         started, recorded)


def _write_figure(model, layer, crops, class_index, names, labels, source, config, out,
                  started, recorded=None) -> int:
    from camface.guided.explain import Explainer
    from camface.guided.figure import comparison_figure, save_figure

    explainer = Explainer(model, layer, source.preprocessing)
    items = explainer.explain(crops, class_index, tuple(names), recorded)
    if explainer.cam_reason:
        log.info("CAM not shown: %s", explainer.cam_reason)
    fig = comparison_figure(items, labels, boxes=config.cam_boxes is not False,
                            color_order=source.preprocessing.color_order,
                            gradient_label=explainer.gradient_label,
                            cam_note=explainer.cam_reason)
    try:
        save_figure(fig, out)
    except OSError as exc:
        raise OutputError(f"cannot write figure {out}: {exc}") from exc
    log.info("wrote %s: %d row(s), layer %r, %s, %.1f s", out, len(items), layer,
             explainer.gradient_label, time.perf_counter() - started)
    return 0


def _write_layers_gif(model, crops, class_index, names, labels, source, out, started) -> int:
    from camface.guided import gradcam
    from camface.guided.explain import layer_sweep, to_rgb
    from camface.guided.figure import layer_frames, save_gif

    layers = gradcam.conv_layers(model)
    if not layers:
        raise ModelError(f"model {source.keras_path} has no convolutional layer")
    sweep = layer_sweep(model, layers, crops, class_index, source.preprocessing)
    crops_rgb = [to_rgb(crop, source.preprocessing.color_order) for crop in crops]
    frames = layer_frames(sweep, crops_rgb, labels, names)
    try:
        save_gif(frames, out)
    except OSError as exc:
        raise OutputError(f"cannot write animation {out}: {exc}") from exc
    log.info("wrote %s: %d frames (one per conv layer, %s .. %s), %.1f s", out, len(frames),
             layers[0], layers[-1], time.perf_counter() - started)
    return 0
