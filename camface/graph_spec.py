"""The CAM graph's contract: input and output names and its metadata keys.

The exporter (TensorFlow side) writes graphs that follow this contract; the live loop,
`camface info` and `camface guided` read them. This module imports nothing heavy so the
live loop can use it without TensorFlow.

Inputs
  image        uint8 [N, H, W, C]  face crops in `color_order` (C = 1 for GRAY, 3 for RGB/BGR);
                                   the graph casts and normalises them itself.
  class_index  int64 [N]           class to explain per crop; -1 means the predicted class.
Outputs (all float32, heatmaps at feature resolution, unnormalised)
  probs        [N, classes]
  activations  [N, h, w, K]        target-layer activations (a transformer's tokens [N, T, C]:
                                   its patches on their grid, metadata `token_grid`)
  <method>     [N, h, w]           one heatmap per method of the registry (camface.methods) that
                                   the graph holds, named as its entry (gradcam, gradcampp, cam,
                                   ...), of the pre-softmax logit; `cam` only when the head allows it
Optional output (gallery graphs of `camface enroll`, whose classes are enrolled identities)
  similarity   [N, identities]     cosine similarity of each crop's embedding to each identity's:
                                   the "logit" the heatmaps explain; probs = softmax(scale *
                                   similarity), scale and the unknown threshold in META_GALLERY
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from camface import methods as _methods
from camface.color_order import ColorOrder

log = logging.getLogger(__name__)

INPUT_IMAGE = "image"
INPUT_CLASS = "class_index"
OUTPUT_PROBS = "probs"
OUTPUT_ACTIVATIONS = "activations"
OUTPUT_SIMILARITY = "similarity"  # gallery graphs only
# A gallery graph's heatmap explains the projection e . g_c, not the cosine, where 1 - cosine_c is
# below this (the face is, nearly exactly, an enrolled photo): the cosine's gradient (norm
# sqrt(1 - cos^2) ~ 0.014 here) no longer stands far above float32 rounding (~1e-7), so a map of
# it would be rounding noise (export/gallery.py, `Prediction.saturated`, `camface compare`)
SATURATED = 1e-4
# and at least one heatmap: a graph whose head has no gradient holds only gradient-free ones
REQUIRED_OUTPUTS = (OUTPUT_PROBS, OUTPUT_ACTIVATIONS)

# metadata_props keys; values are strings, JSON where marked.
META_VERSION = "camface_version"
# the version of the heatmap methods' maths the graph's maps were built by (camface.methods.VERSION,
# an integer); absent (read as 0) in graphs exported before it was recorded
META_METHODS_VERSION = "methods_version"
META_LABELS = "labels"  # JSON list of class names
META_INPUT_SIZE = "input_size"  # JSON [H, W]
META_CHANNELS = "channels"  # "1" or "3"
META_COLOR_ORDER = "color_order"  # "GRAY", "RGB" or "BGR"
META_NORMALIZATION = "normalization"  # JSON {"scale": [...], "offset": [...]}: x * scale + offset
META_TARGET_LAYER = "target_layer"
META_TARGET_REASON = "target_reason"  # why that target: the user's flag, or which default and why
# JSON {"prefix": P, "height": h, "width": w} (and "suffix": S when tokens follow the patches): a
# transformer's token target [N, P + h * w + S, C] laid out on its patch grid (the activations and
# heatmaps are on [N, h, w]); absent for feature maps
META_TOKEN_GRID = "token_grid"
META_FEATURE_SIZE = "feature_size"  # JSON [h, w]
META_HEATMAPS = "heatmaps"  # JSON list of heatmap outputs present
META_CAM_UNAVAILABLE = "cam_unavailable_reason"  # why `cam` is absent ("" when present)
META_SOURCE_MODEL = "source_model"  # file name of the Keras model it was exported from
META_SOURCE_SHA256 = "source_sha256"
META_PRECISION = "precision"  # "fp32", "fp16" or "int8"
# JSON, int8 graphs only: how they were quantized and calibrated, and their agreement with the
# float32 graph on held-out crops (camface/export/int8.py, camface/export/agreement.py)
META_QUANTIZATION = "quantization"
# JSON: the heatmap methods ranked at export by their faithfulness scores (camface/export/ranking.py):
# {"rule", "ranking": [method, ...] best first, "scores": {method: {metric: mean}}, "settings": {...}},
# or {"skipped": why} when the export scored nothing; absent in graphs exported before it existed
META_RANKING = "method_ranking"
# JSON, gallery graphs only (camface/export/gallery.py): {"scale", "threshold", "threshold_rule",
# "embedding_dim", "photos": {identity: photos used}, "embedder", "embedder_sha256"}
META_GALLERY = "gallery"
AUTO = "auto"  # --method auto: the graph's top-ranked displayable method (`auto_method`)
FALLBACK_METHOD = "gradcam"  # what `auto` shows on a graph without a ranking


@dataclass(frozen=True)
class GraphInfo:
    """What the live loop needs to know about a CAM graph, read from its metadata."""

    labels: tuple[str, ...]
    input_size: tuple[int, int]  # (H, W) in pixels
    color_order: ColorOrder  # GRAY, RGB or BGR (its name is accepted, and checked)
    target_layer: str
    heatmaps: tuple[str, ...]
    feature_size: tuple[int, int] = (0, 0)
    normalization: dict = field(default_factory=dict)
    cam_unavailable_reason: str = ""
    source_model: str = ""
    source_sha256: str = ""
    precision: str = "fp32"
    version: str = ""
    quantization: dict = field(default_factory=dict)  # int8 graphs: see META_QUANTIZATION
    ranking: dict = field(default_factory=dict)  # see META_RANKING; {} when none was recorded
    gallery: dict = field(default_factory=dict)  # see META_GALLERY; {} for a classifier's graph
    target_reason: str = ""  # see META_TARGET_REASON; "" in graphs exported before it existed
    token_grid: dict = field(default_factory=dict)  # see META_TOKEN_GRID; {} for feature maps
    # see META_METHODS_VERSION: this camface's when a graph is built, 0 when its metadata lacks it
    methods_version: int = _methods.VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "color_order", ColorOrder.of(self.color_order))

    @property
    def channels(self) -> int:
        return self.color_order.channels

    @property
    def target_description(self) -> str:
        """The target in words: `blocks.11.norm1 (tokens: 1 + 14x14)` for a token grid
        (`1 + 14x14 + 4` with 4 tokens after the patches)."""
        grid = self.token_grid
        after = f" + {grid['suffix']}" if grid.get("suffix") else ""
        return f"{self.target_layer} (tokens: {grid['prefix']} + {grid['height']}x{grid['width']}{after})" \
            if grid else self.target_layer

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> "GraphInfo":
        """Build from ONNX `metadata_props` (a str -> str mapping); raises KeyError naming
        the first missing key."""
        missing = [k for k in (META_LABELS, META_INPUT_SIZE, META_COLOR_ORDER, META_TARGET_LAYER,
                               META_HEATMAPS) if k not in props]
        if missing:
            raise KeyError(", ".join(missing))
        return cls(
            labels=tuple(_json(props, META_LABELS, list, str)),
            input_size=_size(_json(props, META_INPUT_SIZE, list, int), META_INPUT_SIZE, 1),
            color_order=props[META_COLOR_ORDER],
            target_layer=props[META_TARGET_LAYER],
            heatmaps=tuple(_json(props, META_HEATMAPS, list, str)),
            feature_size=_size(_json(props, META_FEATURE_SIZE, list, int, "[0, 0]"), META_FEATURE_SIZE, 0),
            normalization=_json(props, META_NORMALIZATION, dict),
            cam_unavailable_reason=props.get(META_CAM_UNAVAILABLE, ""),
            source_model=props.get(META_SOURCE_MODEL, ""),
            source_sha256=props.get(META_SOURCE_SHA256, ""),
            precision=props.get(META_PRECISION, "fp32"),
            version=props.get(META_VERSION, ""),
            quantization=_json(props, META_QUANTIZATION, dict),
            ranking=_fields(_json(props, META_RANKING, dict), META_RANKING, ranking=(list, str), skipped=str),
            gallery=_fields(_json(props, META_GALLERY, dict), META_GALLERY, scale=float, threshold=float,
                            saturated_below=float),
            target_reason=props.get(META_TARGET_REASON, ""),
            token_grid=_token_grid(_json(props, META_TOKEN_GRID, dict)),
            methods_version=_count(props, META_METHODS_VERSION),
        )

    def to_metadata(self) -> dict[str, str]:
        return {
            META_VERSION: self.version,
            META_LABELS: _dumps(list(self.labels)),
            META_INPUT_SIZE: _dumps(list(self.input_size)),
            META_CHANNELS: str(self.channels),
            META_COLOR_ORDER: self.color_order.value,
            META_NORMALIZATION: _dumps(self.normalization),
            **({META_METHODS_VERSION: str(self.methods_version)} if self.methods_version else {}),
            META_TARGET_LAYER: self.target_layer,
            **({META_TARGET_REASON: self.target_reason} if self.target_reason else {}),
            **({META_TOKEN_GRID: _dumps(self.token_grid)} if self.token_grid else {}),
            META_FEATURE_SIZE: _dumps(list(self.feature_size)),
            META_HEATMAPS: _dumps(list(self.heatmaps)),
            META_CAM_UNAVAILABLE: self.cam_unavailable_reason,
            META_SOURCE_MODEL: self.source_model,
            META_SOURCE_SHA256: self.source_sha256,
            META_PRECISION: self.precision,
            **({META_QUANTIZATION: _dumps(self.quantization)} if self.quantization else {}),
            **({META_RANKING: _dumps(self.ranking)} if self.ranking else {}),
            **({META_GALLERY: _dumps(self.gallery)} if self.gallery else {}),
        }

    @property
    def saturated_below(self) -> float | None:
        """A gallery graph's SATURATED when it explains the projection where 1 - cosine is below
        it (`export/gallery.py`); None for a classifier's, and for a gallery enrolled before
        camface did (its maps of such faces explain the saturated cosine)."""
        value = self.gallery.get("saturated_below")
        return None if value is None else float(value)

    @property
    def threshold(self) -> float | None:
        """A gallery graph's unknown threshold on the best cosine similarity; None otherwise."""
        value = self.gallery.get("threshold")
        return None if value is None else float(value)


def _json(props: Mapping[str, str], key: str, kind: type, item: type | None = None, default: str = "{}"):
    """The JSON metadata value `key` (`default` when absent) as a `kind` (list or dict) whose
    items are `item`s; ValueError naming the key otherwise (a bare string was read as a list of
    its letters, a list where an object belongs failed later on `.get`)."""
    try:
        value = json.loads(props.get(key, default))
    except ValueError as exc:  # said only "Expecting property name enclosed in double quotes: ..."
        raise ValueError(f"{key} is not JSON ({exc}): {props.get(key, default)[:200]}") from exc
    if not isinstance(value, kind) or (item is not None and not all(
            isinstance(v, item) and not isinstance(v, bool) for v in value)):
        what = f"a JSON list of {item.__name__}" if kind is list else "a JSON object"
        raise ValueError(f"{key} must be {what}, got {props.get(key, default)[:200]}")
    return value


def _count(props: Mapping[str, str], key: str) -> int:
    """The integer metadata value `key` (0 when absent); ValueError naming the key otherwise."""
    value = props.get(key, "0")
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"{key} must be a whole number, got {value[:200]}")
    return int(value)


def _fields(value: dict, key: str, **kinds) -> dict:
    """`value` (a JSON object of the metadata `key`) when each of its fields named in `kinds` is
    absent, null or of its kind: str, float (any JSON number), or (list, str) for a list of
    strings; ValueError naming the key and field otherwise (a ranking of 5 failed `--method
    auto` with "'int' object is not iterable", a threshold "high" every frame of a gallery)."""
    for name, kind in kinds.items():
        got = value.get(name)
        if kind == (list, str):
            ok = isinstance(got, list) and all(isinstance(item, str) for item in got)
            what = "a list of strings"
        elif kind is float:
            ok = isinstance(got, (int, float)) and not isinstance(got, bool)
            what = "a number"
        else:
            ok, what = isinstance(got, kind), "a string"
        if got is not None and not ok:
            raise ValueError(f"{key}'s {name!r} must be {what}, got {json.dumps(got)[:200]}")
    return value


def _token_grid(value: dict) -> dict:
    """META_TOKEN_GRID's object ({} for feature maps), or ValueError naming the field: prefix and
    suffix (optional) integers >= 0, height and width integers >= 1 (a grid without them failed
    `camface info` with KeyError: 'height')."""
    if not value:
        return value
    for name, lowest in (("prefix", 0), ("height", 1), ("width", 1), ("suffix", 0)):
        got = value.get(name, 0 if name == "suffix" else None)
        if not isinstance(got, int) or isinstance(got, bool) or got < lowest:
            raise ValueError(f"{META_TOKEN_GRID} must be {{\"prefix\": P, \"height\": h, \"width\": w}} "
                             f"(integers, h and w >= 1; \"suffix\": S optional), got {json.dumps(value)[:200]}")
    return value


def _size(values: list, key: str, lowest: int) -> tuple[int, int]:
    """[H, W] of the metadata as a tuple; ValueError naming `key` unless two ints >= lowest."""
    if len(values) != 2 or min(values) < lowest:
        raise ValueError(f"{key} must be [height, width], integers >= {lowest}, got {values}")
    return values[0], values[1]


def _dumps(value) -> str:
    """A metadata value as strict JSON: NaN or infinity is refused (ModelError), never written as
    the `NaN` / `Infinity` that strict JSON readers (browsers, other languages) fail on."""
    from camface.errors import ModelError

    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        raise ModelError(f"graph metadata {str(value)[:200]} holds NaN or infinity (camface bug: an undefined "
                         "number is recorded as null)") from None


def one_class(classes: int, gallery: bool = False) -> str | None:
    """Why a classifier with `classes` outputs cannot name faces, or None. With ONE output (a
    binary classifier's single sigmoid or logit unit, "is X") the predicted class, the argmax,
    is that class for every face, whatever its probability, and a softmax of one logit is 1
    (a gallery of one person is fine: its similarity and threshold decide, not the argmax). The
    exporters refuse such a model and the per-frame front ends such a graph (`camface.load`)."""
    if classes != 1 or gallery:
        return None
    return ("its output has 1 class (a binary classifier's single sigmoid or logit unit?): every face would "
            "be named that class whatever its probability. Give the model two outputs, not-X and X (a "
            "Dense(2, softmax) head with kernel [-w/2, w/2] and bias [-b/2, b/2], w and b the single unit's, "
            "gives the same probability of X) and label both")


def heatmap_outputs() -> tuple[str, ...]:
    """Every heatmap output a graph may hold, in menu order (the method registry's)."""
    return tuple(_methods.METHODS)


def methods_of(info: GraphInfo, display_only: bool = True) -> tuple[str, ...]:
    """The heatmap methods `info`'s graph holds, in menu order; without the ones not meant for
    display (baselines) unless `display_only` is False."""
    return tuple(name for name in _methods.names(display_only) if name in info.heatmaps)


def ranked_by(info: GraphInfo) -> str:
    """The command that ranks the methods of `info`'s graph: `camface enroll` a gallery's (on the
    enrolled faces), `camface export` a classifier's."""
    return "`camface enroll`" if info.gallery else "`camface export`"


def auto_method(info: GraphInfo) -> tuple[str, str]:
    """(method, why_fallback) that `--method auto` shows on `info`'s graph: the first method of
    its recorded ranking that the graph holds and that is meant for display, with why_fallback
    ""; else FALLBACK_METHOD and one sentence saying why there was no ranking to follow."""
    offered = methods_of(info)
    ranked = [name for name in info.ranking.get("ranking", ()) if name in offered]
    if ranked:
        return ranked[0], ""
    if not info.ranking:
        why = f"it records no method ranking (made by an older camface, or not by {ranked_by(info)})"
    elif info.ranking.get("skipped"):
        why = f"its {'enrolment' if info.gallery else 'export'} ranked no methods: {info.ranking['skipped']}"
    else:
        why = "its method ranking names none of the heatmaps it holds"
    # a graph without gradients (int8 or a head without gradient rules) may lack Grad-CAM
    return (FALLBACK_METHOD if FALLBACK_METHOD in offered or not offered else offered[0]), why


def _is_face_detector(inputs: Mapping[str, Sequence], outputs: Mapping[str, Sequence]) -> bool:
    """Whether a model's signature is BlazeFace's (the bundled models/detectors/*.onnx, whose
    tensor names differ): one image input [1, S, S, 3], S = 128 or 192 (camface.realtime.blazeface's
    ANCHORS), and two outputs, boxes [1, N, 16] and scores [1, N, 1]."""
    shapes = [list(shape or []) for shape in inputs.values()]
    widths = sorted(list(shape or [0])[-1] for shape in outputs.values())
    return (len(shapes) == 1 and len(shapes[0]) == 4 and shapes[0][1] == shapes[0][2] in (128, 192)
            and shapes[0][3] == 3 and widths == [1, 16])


def validate(where: object, inputs: Iterable[str] | Mapping[str, Sequence], outputs: Mapping[str, Sequence],
             metadata: Mapping[str, str], types: Mapping[str, str] | None = None) -> GraphInfo:
    """Check that a loaded ONNX model is a CAM graph and read its metadata.

    where: the file (named in messages). inputs: input names, or input name -> shape (then the
    image input's static dimensions are checked against the metadata's input_size and colour
    order). outputs: output name -> shape (ints, or str/None/0 for dynamic dims). metadata:
    `metadata_props` as str -> str. types: input name -> element type ("uint8", or ONNX Runtime's
    "tensor(uint8)"), when known: the image must be uint8 and class_index int64.
    Raises `camface.errors.ModelError` with one line naming the file and what is wrong (missing
    inputs/outputs listed); used by `camface info` and the live loop's graph loader.
    """
    from camface.errors import ModelError

    shapes = dict(inputs) if isinstance(inputs, Mapping) else {}
    inputs, outputs = list(inputs), dict(outputs)
    missing = [n for n in (INPUT_IMAGE, INPUT_CLASS) if n not in inputs]
    missing += [n for n in REQUIRED_OUTPUTS if n not in outputs]
    if not any(name in outputs for name in _methods.METHODS):
        missing.append("a heatmap output")
    if missing and _is_face_detector(shapes, outputs):  # was "a classifier becomes one with `camface export`"
        (name, shape), = shapes.items()
        boxes, scores = sorted((list(s) for s in outputs.values()), key=lambda s: -s[-1])
        raise ModelError(f"{where} is a face detector model (BlazeFace: input {name!r} {list(shape)}, outputs boxes "
                         f"{boxes} and scores {scores}), not a CAM graph: camface runs "
                         "its own (detector='short' or 'full', --detector); the CAM graph is a face classifier's, "
                         "made by `camface export`")
    if missing:
        # none of the CAM graph's own names: a forward-only model (a classifier's .onnx), which export turns into one;
        # an .onnx says nothing of its input's normalisation, so export refuses it without --preset
        plain = INPUT_CLASS not in inputs and OUTPUT_ACTIVATIONS not in outputs and "a heatmap output" in missing
        raise ModelError(f"{where} is not a camface CAM graph: missing {', '.join(missing)} "
                         f"(it has inputs {sorted(inputs)} and outputs {sorted(outputs)})"
                         + (f"; a classifier becomes one with `camface export {where} -o cam.onnx --preset PRESET`"
                            if plain else ""))
    for name, want in ((INPUT_IMAGE, "uint8"), (INPUT_CLASS, "int64")):  # else every call failed inside
        got = (types or {}).get(name, want).removeprefix("tensor(").removesuffix(")")  # ONNX Runtime
        if got != want:
            raise ModelError(f"{where}: its {name!r} input is {got}, not {want} (a CAM graph takes {want}; "
                             "export the model with `camface export`)")
    try:
        info = GraphInfo.from_metadata(dict(metadata))
    except KeyError as exc:
        raise ModelError(f"{where} lacks CAM graph metadata: {exc.args[0]}") from exc
    except (ValueError, TypeError) as exc:  # malformed JSON in a metadata value
        raise ModelError(f"{where} has malformed CAM graph metadata: {exc}") from exc
    shape = list(outputs[OUTPUT_PROBS] or [])
    classes = shape[-1] if shape else None
    if isinstance(classes, int) and classes > 0 and classes != len(info.labels):
        raise ModelError(f"{where}: {len(info.labels)} labels in the metadata but the graph "
                         f"returns {classes} class probabilities")
    if info.gallery and OUTPUT_SIMILARITY not in outputs:
        raise ModelError(f"{where}: its metadata describes a gallery but it has no "
                         f"{OUTPUT_SIMILARITY!r} output")
    if not any(h in _methods.METHODS for h in info.heatmaps):
        raise ModelError(f"{where}: its metadata lists no heatmap this camface knows "
                         f"({', '.join(info.heatmaps) or 'none'}; it knows {', '.join(_methods.METHODS)})")
    if info.methods_version > _methods.VERSION:  # still runs: the graph computes its own maps
        log.warning("%s: its heatmaps were built by version %d of camface's methods, newer than this "
                    "camface's %d (camface %s exported it): its maps may not be what this camface's "
                    "method descriptions and references say; upgrade camface to read it as made",
                    where, info.methods_version, _methods.VERSION, info.version or "of unknown version")
    absent = [h for h in info.heatmaps if h not in outputs]
    if absent:
        raise ModelError(f"{where}: metadata lists heatmaps {', '.join(absent)} "
                         "that are not outputs")
    image = list(shapes.get(INPUT_IMAGE) or [])  # [] for an input of unknown rank: nothing to check
    if image:  # else every crop fails inside ONNX Runtime with "invalid dimensions"
        expected = (None, *info.input_size, info.channels)
        if len(image) != 4 or any(isinstance(got, int) and got > 0 and want is not None and got != want
                                  for got, want in zip(image, expected)):
            raise ModelError(f"{where}: its {INPUT_IMAGE!r} input is {_shape_text(image)} but its metadata says "
                             f"[N, {info.input_size[0]}, {info.input_size[1]}, {info.channels}] "
                             f"(input_size {list(info.input_size)}, color_order {info.color_order.value})")
        if isinstance(image[0], int) and image[0] > 0:  # else a frame of two faces fails inside ONNX Runtime
            raise ModelError(f"{where}: its {INPUT_IMAGE!r} input has a fixed batch of {image[0]}; a CAM graph "
                             "takes any batch of 1..32 crops (export it with a dynamic batch dimension)")
    return info


def _shape_text(shape: Sequence) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "N" if i == 0 else "?"
                           for i, d in enumerate(shape)) + "]"
