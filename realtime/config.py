"""The live options: one frozen dataclass, its checks, and the command-line flags built from it.

`LiveConfig` holds every option of the frame pipeline (detection, cropping, the graph, the
overlay, recording). Its field defaults are the only defaults: `add_arguments` reads them into
argparse, and `camface live`, `camface bench`, `camface train` (and later front ends) add the
flags they share with it by name. Checks live in `check` only, which `__post_init__` runs, so a
config built in code is checked as one built from the command line; a bad value raises UsageError
naming the option as its user spells it (`option`: the flag, or `camface.load`'s keyword).

Top-level imports stay light (no cv2, onnxruntime or mediapipe): `camface --help` imports this.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from camface import methods
from camface.errors import UsageError
from camface.outputs import input_path, output_file, output_path

MAX_DETECT_WORKERS = 8
# ONNX Runtime's intra-op threads: more than cores only compete, and past 2**31 - 1 its SessionOptions
# raised a TypeError traceback when the graph loaded
MAX_GRAPH_THREADS = 1024
MAX_FACES = 32  # the graph's batch range is 1..32
MAX_MARGIN = 2.0  # a crop 5 boxes wide: more shows the model mostly background
DEVICES = ("auto", "cpu", "cuda", "tensorrt")
DETECTORS = ("short", "full")
# how the BlazeFace model runs (camface.api.face_detector): the bundled .onnx on ONNX Runtime with
# MediaPipe's pre- and post-processing (camface.realtime.blazeface), or MediaPipe Tasks on the .tflite
DETECTOR_RUNTIMES = ("onnx", "mediapipe")
PACES = ("auto", "source", "none")  # see camface.realtime.pace
# recording codecs (camface.realtime.sinks): auto = H.264 (NVENC when it opens, else libx264) or
# else mp4v with one line saying so; h264 = H.264 or an error; mp4v = OpenCV's MPEG-4 Part 2
CODECS = ("auto", "h264", "mp4v")


def _detect_every(text: str) -> str | int:
    """`--detect-every` as given: "auto" or an integer (checked >= 1 by LiveConfig)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or auto, got {text!r}") from None


def every_nth_frame(every: int, read: int | None = None) -> str:
    """'every frame', 'every 2nd frame', 'every 3rd frame', 'every 4th frame', 'every 21st
    frame', ...: how often a detector or a scorer looks, in words. read: the frames there were,
    when known: 'only the first frame' when there were too few for a second look (a 3-frame
    clip was said to be scored at every 5th frame)."""
    if every == 1:
        return "every frame"
    if read is not None and 0 < read <= every:
        return "only the first frame"
    suffix = "th" if every % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(every % 10, "th")
    return f"every {every}{suffix} frame"


def method_choices() -> tuple[str, ...]:
    """`--method` choices: "auto" (the graph's top-ranked method, `graph_spec.auto_method`), the
    registry's displayable methods, then "none" (no heatmap)."""
    return ("auto", *methods.names(display_only=True), "none")


@dataclass(frozen=True)
class LiveConfig:
    """Everything one run of the frame pipeline was asked to do (see `FLAGS` for each meaning)."""

    source: str | None = None
    model: Path | None = None  # None: the bundled emotion graph
    method: str = "auto"  # resolved to a heatmap name once the graph is loaded (explainer.check_method)
    record: Path | None = None
    show: bool = False
    detector: str = "full"
    detector_runtime: str = "onnx"
    min_confidence: float = 0.5
    max_faces: int = 8
    margin: float = 0.1
    device: str = "auto"
    smooth: float = 0.0
    cam_boxes: bool = False
    bars: bool = False
    colormap: str = "jet"
    alpha: float = 0.45
    snapshot_every: int = 0
    snapshot_dir: Path = Path("snapshots")
    overwrite: bool = False
    max_frames: int | None = None
    progress: bool = False
    graph_threads: int = 1
    detect_workers: int = 0  # 0: auto (see loop.detect_workers_for)
    detect_every: str | int = "auto"  # "auto" or N >= 1 (see camface.realtime.carry)
    pace: str = "auto"
    image_seconds: float = 2.0
    loop: bool = False
    codec: str = "auto"
    quiet_native: bool = True

    def __post_init__(self) -> None:
        check({field.name: getattr(self, field.name) for field in dataclasses.fields(self)})

    def replace(self, **changes) -> "LiveConfig":
        return dataclasses.replace(self, **changes)


_NO_VALUE = object()


def option(field: str, value: object = _NO_VALUE, *, api: bool = False) -> str:
    """How a user names LiveConfig's `field` (with `value` when given), for messages: on the
    command line `--max-faces`, `--method auto`; api: as a keyword of `camface.load`,
    `max_faces`, `method='auto'`."""
    if api:
        return field if value is _NO_VALUE else f"{field}={str(value) if isinstance(value, Path) else value!r}"
    flag = FLAGS.get(field, (f"--{field.replace('_', '-')}",))[0]
    return flag if value is _NO_VALUE else f"{flag} {value}"


def check(values: dict, *, api: bool = False) -> None:
    """UsageError for the first bad value of `values` (LiveConfig field -> value, every field),
    naming the option as `option(field, api=api)` does: the command line's flag, or with `api`
    the keyword of `camface.load`. LiveConfig runs it on every config built; `camface.load`
    runs it first with `api` on what its caller asked for."""
    from camface.realtime.sources import is_camera_index

    _check_types(values, api)
    v = argparse.Namespace(**values)

    def name(field: str, value: object = _NO_VALUE) -> str:
        return option(field, value, api=api)

    checks = (
        (v.method in method_choices() or v.method in methods.METHODS,
         f"{name('method')} {v.method!r} unknown; choose from {', '.join(method_choices())}"),
        (v.detector in DETECTORS, f"{name('detector')} must be one of {', '.join(DETECTORS)}, got {v.detector!r}"),
        (v.detector_runtime in DETECTOR_RUNTIMES,
         f"{name('detector_runtime')} must be one of {', '.join(DETECTOR_RUNTIMES)}, got {v.detector_runtime!r}"),
        (v.device in DEVICES, f"{name('device')} must be one of {', '.join(DEVICES)}, got {v.device!r}"),
        (1 <= v.max_faces <= MAX_FACES,
         f"{name('max_faces')} must be 1..{MAX_FACES} (the graph's batch range), got {v.max_faces}"),
        (0 <= v.margin <= MAX_MARGIN, f"{name('margin')} must be in [0, {MAX_MARGIN:g}], got {v.margin}"),
        (0.0 <= v.min_confidence <= 1.0, f"{name('min_confidence')} must be in [0, 1], got {v.min_confidence}"),
        (v.max_frames is None or v.max_frames >= 1, f"{name('max_frames')} must be >= 1, got {v.max_frames}"),
        (v.snapshot_every >= 0, f"{name('snapshot_every')} must be >= 0, got {v.snapshot_every}"),
        (0 <= v.detect_workers <= MAX_DETECT_WORKERS,
         f"{name('detect_workers')} must be 0 (auto) .. {MAX_DETECT_WORKERS}, got {v.detect_workers}"),
        (v.detect_every == "auto" or (not isinstance(v.detect_every, str) and v.detect_every >= 1),  # np.int64 too
         f"{name('detect_every')} must be auto or an integer >= 1, got {v.detect_every!r}"),
        (v.detect_every in ("auto", 1) or v.detect_workers <= 1,
         f"{name('detect_workers')} above 1 needs {name('detect_every', 1)} (carried boxes follow the frames "
         "in order, in one thread)"),
        (0 <= v.graph_threads <= MAX_GRAPH_THREADS,
         f"{name('graph_threads')} must be 0 (all cores) .. {MAX_GRAPH_THREADS}, got {v.graph_threads}"),
        (0.0 <= v.smooth < 1.0, f"{name('smooth')} must be in [0, 1), got {v.smooth}"),
        (0.0 <= v.alpha <= 1.0, f"{name('alpha')} must be in [0, 1], got {v.alpha}"),
        (v.pace in PACES, f"{name('pace')} must be one of {', '.join(PACES)}, got {v.pace!r}"),
        (0 < v.image_seconds < float("inf"), f"{name('image_seconds')} must be > 0 and finite, got {v.image_seconds}"),
        (v.record != "", f"{name('record')} is empty; give a file name ending in .mp4"),
        (v.model != "", f"{name('model')} is empty; give a CAM graph (.onnx), or leave it out for the bundled one"),
        (v.snapshot_dir != "", f"{name('snapshot_dir')} is empty; give a folder"),
        (v.record is None or Path(v.record).suffix.lower() == ".mp4" and not str(v.record).endswith(("/", os.sep)),
         f"{name('record', v.record)}: recordings are MP4 files; give a name ending in .mp4"),
        # (the recording ran until the first snapshot: "cannot write snapshot in X: [Errno 17] File exists")
        (v.record is None or Path(v.record).absolute() != Path(v.snapshot_dir).absolute(),
         f"{name('record', v.record)} and {name('snapshot_dir', v.snapshot_dir)} name the same path; give each "
         "its own"),
        (v.codec in CODECS, f"{name('codec')} must be one of {', '.join(CODECS)}, got {v.codec!r}"),
        # before any model loads; a stream is known to be one only once it opens (LoopingSource)
        (not (v.loop and is_camera_index(v.source)),
         f"{name('loop')} plays files, folders and the sample again; {name('source', v.source)} is a camera "
         f"(leave out {name('loop')})"),
    )
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    from camface.realtime.overlay import COLORMAPS  # cv2: only when a config is built

    if v.colormap not in COLORMAPS:
        raise UsageError(f"{name('colormap')} {v.colormap!r} unknown; choose from {', '.join(sorted(COLORMAPS))}")


def _check_types(values: dict, api: bool) -> None:
    """UsageError naming the option for a value of the wrong type (a LiveConfig built in
    code, e.g. `camface.load(max_faces="3")`): the value checks that follow compare numbers."""
    import numbers

    for field in dataclasses.fields(LiveConfig):
        value, kind = values[field.name], _field_kinds(field)
        if value is None and "None" in kind:
            continue
        ok = (("bool" in kind and isinstance(value, bool))
              or ("int" in kind and isinstance(value, numbers.Integral) and not isinstance(value, bool))
              or ("float" in kind and isinstance(value, numbers.Real) and not isinstance(value, bool))
              or ("str" in kind and isinstance(value, str))
              or ("Path" in kind and isinstance(value, (str, Path))))
        if not ok:
            raise UsageError(f"{option(field.name, api=api)} must be {_describe(kind)}, got {value!r} "
                             f"({type(value).__name__})")


_KIND_WORDS = {"bool": "True or False", "int": "an integer", "float": "a number", "str": "a string",
               "Path": "a path", "None": "None"}


def _field_kinds(field) -> frozenset[str]:
    """The type names of a LiveConfig field's annotation ("str | None" -> {"str", "None"})."""
    return frozenset(part.strip() for part in str(field.type).split("|"))


def _describe(kind: frozenset[str]) -> str:
    return " or ".join(_KIND_WORDS[name] for name in ("bool", "int", "float", "str", "Path", "None") if name in kind)


# field -> (flag, argparse keywords without the default). Help texts are the options' documentation.
FLAGS: dict[str, tuple[str, dict]] = {
    "source": ("--source", dict(help="camera index (0), video file, folder of images, stream URL (rtsp/http) "
                                     "or 'sample' (a bundled demo clip); default: camera 0 if it opens, else sample")),
    "model": ("--model", dict(type=input_path, help="CAM graph (.onnx) made by `camface export`; default: the "
                                              "bundled emotion graph")),
    "method": ("--method", dict(choices=method_choices,
                                help="heatmap to overlay (key m cycles it in live's window and serve's page); auto = the graph's most "
                                     "faithful method as ranked at export (`camface info` shows the ranking; "
                                     "Grad-CAM on a graph without one)")),
    "record": ("--record", dict(type=output_file, metavar="OUT.mp4",
                                help="write the annotated frames to this mp4, at the source's frame rate")),
    "detector": ("--detector", dict(choices=DETECTORS, help="BlazeFace model: full-range (faces up to ~5 m) or "
                                                            "short-range (faster, faces within ~2 m)")),
    "detector_runtime": ("--detector-runtime", dict(choices=DETECTOR_RUNTIMES,
                                                    help="how the BlazeFace model runs: onnx = its ONNX conversion on "
                                                         "ONNX Runtime (one thread) with MediaPipe's anchors, "
                                                         "decoding and weighted NMS (same boxes, less CPU); "
                                                         "mediapipe = MediaPipe Tasks' FaceDetector on the .tflite")),
    "min_confidence": ("--min-confidence", dict(type=float, help="face detector score threshold")),
    "max_faces": ("--max-faces", dict(type=int, help=f"classify at most this many faces per frame, the largest "
                                                     f"(1-{MAX_FACES})")),
    "margin": ("--margin", dict(type=float, help="crop margin around each face box, as a fraction of the box's "
                                                 "longer side")),
    "device": ("--device", dict(choices=DEVICES, help="ONNX Runtime provider; auto tries TensorRT, CUDA, then CPU")),
    "smooth": ("--smooth", dict(type=float, help="temporal smoothing of heatmaps and probabilities, weight of "
                                                 "the past in [0, 1)")),
    "cam_boxes": ("--cam-boxes", dict(action="store_true", help="draw the CAM paper's localisation box: bounding "
                                                                "box of the largest region above 20%% of the "
                                                                "heatmap's maximum")),
    "bars": ("--top3", dict(action="store_true", help="draw each face's three most probable classes as bars")),
    "colormap": ("--colormap", dict(help="OpenCV colormap for heatmaps (jet, turbo, inferno, ...)")),
    "alpha": ("--alpha", dict(type=float, help="heatmap opacity in [0, 1]")),
    "snapshot_every": ("--snapshot-every", dict(type=int, metavar="N",
                                                help="save a snapshot every N frames (0: only with key s)")),
    "snapshot_dir": ("--snapshot-dir", dict(type=output_path, help="folder for snapshots (one sub-folder per snapshot; "
                                                            "read by `camface guided`)")),
    "codec": ("--codec", dict(choices=CODECS, help="recording codec: auto = H.264 in fragmented MP4 (plays in "
                                                   "browsers, survives a hard kill; NVENC on NVIDIA GPUs, else "
                                                   "libx264 ultrafast), mp4v when PyAV has no H.264 (one line says "
                                                   "so); h264 = H.264 or an error; mp4v = MPEG-4 Part 2")),
    "overwrite": ("--overwrite", dict(action="store_true", help="replace an existing --record file")),
    "max_frames": ("--max-frames", dict(type=int, metavar="N", help="stop after N frames")),
    "graph_threads": ("--graph-threads", dict(type=int, metavar="N",
                                              help="ONNX Runtime intra-op threads on CPU: 1 leaves the other core "
                                                   "to the detector; 0 = all cores (faster for large graphs such "
                                                   "as ResNet50)")),
    "detect_workers": ("--detect-workers", dict(type=int, metavar="N",
                                                help="face detectors running side by side on consecutive frames "
                                                     "(each one detector on one core): more frames per "
                                                     "second, not less latency; 0 = one per core, at most 2, for "
                                                     "files, folders and sample; 1 for cameras and streams and "
                                                     "with --graph-threads 0; above 1 needs --detect-every 1, "
                                                     "which auto then is (carrying boxes takes one thread)")),
    "detect_every": ("--detect-every", dict(type=_detect_every,
                                            metavar="N|auto",
                                            help="run the face detector on every N-th frame (frames 0, N, 2N, ... "
                                                 "of the video or stream) and carry the boxes by optical flow in "
                                                 "between, detecting again at once when a box's content changes a "
                                                 "lot; a face that enters is boxed within N-1 frames. 1 = detect "
                                                 "every frame; auto = 4 for videos, cameras, streams and the "
                                                 "sample, 1 for folders of images")),
    "pace": ("--pace", dict(choices=PACES, help="play files, folders and the sample at their own speed: auto = "
                                                "when shown in a window (headless runs and recordings go as fast "
                                                "as possible), source = always, none = never; cameras and "
                                                "streams are never held back")),
    "image_seconds": ("--image-seconds", dict(type=float, metavar="S",
                                              help="how long a paced window shows each image of a folder")),
    "loop": ("--loop", dict(action="store_true", help="start files, folders and the sample again at their end "
                                                      "until you quit (--max-frames still bounds the run; frame "
                                                      "indices keep counting across passes)")),
}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(LiveConfig)}


def add_arguments(parser: argparse.ArgumentParser, *names: str, **defaults) -> None:
    """Add the flags of LiveConfig fields `names` to `parser`, defaults from the dataclass
    (or `defaults`, for a command whose own default differs, e.g. evaluate's graph threads)."""
    for name in names:
        flag, keywords = FLAGS[name]
        keywords = dict(keywords)
        if callable(keywords.get("choices")):
            keywords["choices"] = keywords["choices"]()  # read the registry when the parser is built
        default = defaults.get(name, DEFAULTS[name])
        if keywords.get("action") != "store_true":
            keywords["default"] = default
        parser.add_argument(flag, dest=name, **keywords)


def from_args(args: argparse.Namespace, names, **overrides) -> LiveConfig:
    """A LiveConfig from the parsed flags of fields `names` (the ones the command added with
    `add_arguments`; others keep their defaults), then `overrides`. Raises UsageError naming
    the flag."""
    values = {name: getattr(args, name) for name in names}
    values["quiet_native"] = not getattr(args, "debug", False)
    values.update(overrides)
    return LiveConfig(**values)
