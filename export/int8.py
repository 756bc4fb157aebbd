"""float32 CAM graph -> int8 CAM graph: the FEATURES (every node the target-layer activations
depend on) quantized with ONNX Runtime's own static quantizer, the head, the in-graph gradient
and every heatmap left in float32.

How: `onnxruntime.quantization.quantize_static` on the whole CAM graph, QDQ format, per-channel
int8 weights reduced to 7 bits (`reduce_range`), uint8 activations (`REDUCED_WEIGHT_MAX`),
restricted with `nodes_to_quantize` to the features: the ancestors of the `activations` output.
The quantizer then puts QuantizeLinear/DequantizeLinear pairs on the features' tensors only;
the last pair sits on the target activations, so the head and the gradient read dequantized
float32 activations and the heatmaps are the float32 maths of the registry on them. Chosen
over cutting the features out, quantizing them and splicing them back: one call, no renaming
of tensors shared by the two halves, and the graph's inputs, outputs, dynamic batch and
metadata come through untouched (the splice would have to rebuild all four).

Calibration: static ranges from face crops cut as live (export/calibration.py), calibration
method `percentile` (the 99.999th percentile of each tensor's histogram) unless asked
otherwise: one outlier value does not stretch a whole tensor's range. Not the pixels: the cast
and the normalisation stay float32, and the normalised input the model reads gets its known
range (`pixel_ranges`), on a scale that puts no pixel value on a rounding tie (`untied`). `minmax` (ONNX Runtime's
default, the smallest and largest value seen) is much faster (ResNet50 on two cores: seconds
instead of minutes for the histograms), and cruder with outliers. Neither was compared on one
and the same trained model: the toy MobileNetV2 of tests/test_train.py (retrained per run) gave
minmax top-1 89% in one run, percentile a pass in another and 83% in a third.

After quantizing, `check_float_tail` proves the rest is float32 (no quantize/dequantize or
integer op, no int8/float16 initializer), and the agreement with the float32 graph on held-out
crops (export/agreement.py) decides whether the graph is written at all.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from camface import graph_spec
from camface.errors import ModelError
from camface.export.agreement import THRESHOLDS, Agreement, Thresholds, compare, nudge

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("percentile", "minmax", "entropy")
DEFAULT_CALIBRATION_METHOD = "percentile"
PERCENTILE = 99.999
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                 "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm"}
FLOAT_TAIL_DTYPES = {"FLOAT", "INT64", "INT32", "BOOL"}  # initializers the float32 tail may hold
BATCH = 8  # crops per calibration / comparison call
# crops x target channels of the Ablation-CAM / Score-CAM comparison with float32 (each crop
# reruns the head or the model once per channel): the bundled emotion graph's 64 held-out crops
# at 64 channels, 8 crops at 512, none at ResNet50's 2048 (3 x 8192 ResNet50 passes on a CPU)
RERUN_VARIANTS = 4096
LOWERED = 0.05  # a heatmap bar the noise floor lowers by more than this is warned about


@dataclass(frozen=True)
class Int8Result:
    """The int8 graph (onnx.ModelProto, metadata included) and how it was made and checked;
    floor: the float32 graph's own agreement under a one-grey-level nudge (agreement.py)."""

    model: object
    agreement: Agreement
    floor: Agreement
    report: dict  # what goes into the graph's `quantization` metadata


def _feature_indices(model) -> set[int]:
    """Positions in model.graph.node of the nodes the `activations` output depends on."""
    nodes = list(model.graph.node)
    producer = {out: index for index, node in enumerate(nodes) for out in node.output}
    if graph_spec.OUTPUT_ACTIVATIONS not in producer:
        raise ModelError(f"the CAM graph has no {graph_spec.OUTPUT_ACTIVATIONS!r} output to find its features by")
    seen, stack = set(), [graph_spec.OUTPUT_ACTIVATIONS]
    while stack:
        index = producer.get(stack.pop())
        if index is not None and index not in seen:
            seen.add(index)
            stack.extend(nodes[index].input)
    return seen


def feature_nodes(model) -> list:
    """The nodes (onnx.NodeProto) that the `activations` output depends on, in graph order."""
    features = _feature_indices(model)
    return [node for index, node in enumerate(model.graph.node) if index in features]


def tail_nodes(model) -> list:
    """Every node that is not a feature node: the head, the gradient and the heatmaps; not the
    clones of the whole model that Score-CAM runs (export/onnx_rerun.py), which copy the
    features, quantised in an int8 graph by design."""
    from camface.export.onnx_rerun import MODEL_CLONE

    features = _feature_indices(model)
    return [node for index, node in enumerate(model.graph.node)
            if index not in features and not node.name.startswith(MODEL_CLONE)]


def check_float_tail(model) -> None:
    """Raise ModelError unless every node after the features is a float32 op: no quantize /
    dequantize / integer node, no int8, uint8 or float16 initializer among their inputs."""
    from onnx import TensorProto

    initializers = {i.name: i for i in model.graph.initializer}
    for node in tail_nodes(model):
        if node.op_type in QUANTIZED_OPS:
            raise ModelError(f"int8 graph: {node.op_type} node {node.name!r} lies after the target activations "
                             "(the head, gradient and heatmaps must stay float32)")
        for name in node.input:
            if name in initializers:
                dtype = TensorProto.DataType.Name(initializers[name].data_type)
                if dtype not in FLOAT_TAIL_DTYPES:
                    raise ModelError(f"int8 graph: node {node.name!r} after the target reads a {dtype} constant "
                                     f"{name!r} (the head, gradient and heatmaps must stay float32)")


class _Crops:
    """onnxruntime.quantization.CalibrationDataReader over uint8 crops, BATCH at a time."""

    def __init__(self, crops: np.ndarray, with_class: bool = True):
        self._batches = [crops[i:i + BATCH] for i in range(0, len(crops), BATCH)]
        self._next, self._with_class = 0, with_class

    def get_next(self):
        if self._next >= len(self._batches):
            return None
        batch = self._batches[self._next]
        self._next += 1
        feed = {graph_spec.INPUT_IMAGE: np.ascontiguousarray(batch)}
        if self._with_class:
            feed[graph_spec.INPUT_CLASS] = np.full(len(batch), -1, np.int64)
        return feed

    def __len__(self):
        return len(self._batches)


# reduce_range: weights in [-64, 64], so that a pair of products u8 x s8 (255 x 64 x 2 = 32640)
# fits the 16-bit sums of the u8s8 kernels of x86 CPUs without VNNI (AVX2, AVX-512 before
# Cascade Lake / Zen 4). With 8-bit weights those sums saturate there (ONNX Runtime's
# quantization docs), and the agreement measured on the exporting CPU would not hold on
# another. On the bundled graph it costs 0.001-0.004 of Pearson r and 0.01-0.02 of top-20%
# overlap (the int8 export's own report, both settings).
REDUCED_WEIGHT_MAX = 64


def quantize_features(model, calibration: np.ndarray, method: str = DEFAULT_CALIBRATION_METHOD):
    """A new onnx.ModelProto: `model` (a float32 CAM graph, ModelProto) with its feature nodes
    quantized (QDQ, per-channel int8 weights, uint8 activations) from ranges measured on
    `calibration` (uint8 crops [N, H, W, C]), weights in 7 bits (REDUCED_WEIGHT_MAX). Metadata
    is copied; precision is not touched."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r} unknown; expected one of {', '.join(CALIBRATION_METHODS)}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for index, node in enumerate(model.graph.node):  # nodes_to_quantize goes by name
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    pixels = {node.name for node in pixel_chain(model)}  # float32; their last output is quantised once
    features = [node.name for node in feature_nodes(model) if node.name not in pixels]
    calibrate = {"percentile": CalibrationMethod.Percentile, "minmax": CalibrationMethod.MinMax,
                 "entropy": CalibrationMethod.Entropy}[method]
    with tempfile.TemporaryDirectory(prefix="camface-int8-") as tmp, _quiet_quantizer():
        ranges = Path(tmp) / "ranges.json"
        _calibrate_features(model, calibration, calibrate, Path(tmp), ranges)
        out = Path(tmp) / "int8.onnx"
        quantize_static(model, out, None, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=features, calibrate_method=calibrate, calibration_cache_path=ranges)
        quantized = onnx.load(str(out))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)
    quantized.doc_string = model.doc_string
    return quantized


def _calibrate_features(model, calibration: np.ndarray, calibrate, folder: Path, ranges: Path) -> None:
    """Activation ranges of the feature tensors, written to `ranges` (quantize_static's
    calibration cache). Measured on the features cut out of the CAM graph (image ->
    activations: the gradient's tensors are neither needed nor computed), one batch at a time
    (histograms merge batch by batch; quantize_static's own loop keeps every tensor of every
    batch in memory: over 20 GB for ResNet50's CAM graph)."""
    import onnx
    import onnx.utils
    from onnxruntime.quantization.calibrate import (CalibrationMethod, TensorData, create_calibrator,
                                                    save_tensors_data)

    features = onnx.utils.Extractor(model).extract_model([graph_spec.INPUT_IMAGE], [graph_spec.OUTPUT_ACTIVATIONS])
    path = folder / "features.onnx"
    onnx.save(features, str(path))
    options = {"symmetric": False}  # quantize_static's default for activations (ActivationSymmetric)
    if calibrate == CalibrationMethod.Percentile:
        options["percentile"] = PERCENTILE
    calibrator = create_calibrator(path, None, augmented_model_path=str(folder / "augmented.onnx"),
                                   calibrate_method=calibrate, providers=["CPUExecutionProvider"],
                                   extra_options=options)
    for start in range(0, len(calibration), BATCH):
        calibrator.collect_data(_Crops(calibration[start:start + BATCH], with_class=False))
    measured = calibrator.compute_data()
    for name, (lowest, highest) in pixel_ranges(features, calibration.shape[1:]).items():
        if name in measured:
            measured.data[name] = TensorData(lowest=np.float32(lowest), highest=np.float32(highest))
    save_tensors_data(measured, ranges)


PIXEL_OPS = ("Cast", "Mul", "Add", "Sub", "Div", "Transpose", "Identity")  # elementwise by constants, layout


def pixel_chain(model) -> list:
    """The nodes (onnx.NodeProto) from the uint8 `image` to the model's first layer: the cast, the
    normalisation by constants and layout transposes (PIXEL_OPS), each the only reader of the one
    before. They stay float32 (`quantize_features`): quantised one after the other, each rounding
    the last one's rounding, they moved pixels by up to a step of the normalised input."""
    from camface.export.onnx_model import constants

    values = constants(model)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    chain, tensor = [], graph_spec.INPUT_IMAGE
    while len(consumers.get(tensor, [])) == 1:
        node = consumers[tensor][0]
        if node.op_type not in PIXEL_OPS or any(x != tensor and x and x not in values for x in node.input):
            break
        chain.append(node)
        tensor = node.output[0]
    return chain


def pixel_ranges(model, shape: tuple[int, ...]) -> dict[str, tuple[float, float]]:
    """tensor -> (lowest, highest) of its quantisation range, in `model` (the features, or a whole
    CAM graph) for crops of `shape` ([H, W, C]), for the tensors between the uint8 `image` and
    the first layer of the model: the cast and the normalisation by constants (and layout
    transposes), each the only reader of the one before. Their values are known, not measured:
    pixels 0..255 through an affine map per channel, computed here on crops holding every value.
    Calibrated instead (the 99.999th percentile of the calibration crops), the brightest pixels
    of the live frames were clipped to the calibration's brightest (246 on the sample clip; a
    dim calibration clip clipped far more), which the held-out crops, lit as the calibration
    ones, could not show. The range is widened by a fraction of a step where needed (`untied`)
    so that no pixel value lies on a rounding tie."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    chain = [node.output[0] for node in pixel_chain(model)]
    if not chain:
        return {}
    probe = onnx.ModelProto()  # the graph itself, the chain as outputs (onnx.utils' extractor needs
    probe.CopyFrom(model)  # their shapes, which tf2onnx's graphs do not state)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in chain if name not in present)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    height, width, channels = shape
    count = -(-256 // (height * width))  # crops enough for every pixel value in every channel
    ramp = (np.arange(count * height * width) % 256).astype(np.uint8).reshape(count, height, width, 1)
    feed = {graph_spec.INPUT_IMAGE: np.ascontiguousarray(np.repeat(ramp, channels, axis=3))}
    if any(i.name == graph_spec.INPUT_CLASS for i in session.get_inputs()):  # a whole CAM graph
        feed[graph_spec.INPUT_CLASS] = np.full(count, -1, np.int64)
    return {name: untied(value) for name, value in zip(chain, session.run(chain, feed))}


TIE_MARGIN = 1e-3  # steps: a value nearer than this to half a step rounds as the CPU's rounding says
WIDENINGS = (0.0, 0.5, 0.25, 0.75, 0.125, 0.375, 1.0, 1.5)  # steps added at each end, in this order


def untied(values: np.ndarray) -> tuple[float, float]:
    """(lowest, highest) of a uint8 quantisation range holding every one of `values` (float32:
    a tensor's values for all pixel values), such that none of them divided by the scale lies
    within TIE_MARGIN of a half step. The exact range, or the first of it widened by WIDENINGS
    steps at both ends that is so: x / 127.5 - 1 (the emotion and tf presets) over its exact
    range [-1, 1] is p - 127.5 steps, every pixel on a tie, each rounded up or down by the last
    bit of the float sums (another CPU, or the masked copies Score-CAM feeds, round otherwise).
    The scale and the zero point are ONNX Runtime's (`compute_scale_zp`: the range holds 0)."""
    values = np.unique(np.asarray(values, np.float32)).astype(np.float64)
    lowest, highest = min(float(values[0]), 0.0), max(float(values[-1]), 0.0)
    best = None
    for widen in WIDENINGS:
        step = (highest - lowest) / 255
        low, high = np.float32(lowest - widen * step), np.float32(highest + widen * step)
        scale = float(np.float32((np.float64(high) - np.float64(low)) / 255))
        if scale <= 0:
            return float(low), float(high)
        steps = values / scale
        margin = float(np.abs(np.abs(steps - np.floor(steps)) - 0.5).min())
        if best is None or margin > best[0]:
            best = (margin, float(low), float(high))
        if margin >= TIE_MARGIN:
            break
    return best[1], best[2]


@contextlib.contextmanager
def _quiet_quantizer():
    """The quantizer prints its progress and logs advice on the root logger (pre-processing,
    rescaled biases of all-zero weight channels): kept at debug level here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            yield
    finally:
        root.setLevel(level)
    log.debug("quantize_static: %s", printed.getvalue().strip())


def run_graph(model_bytes: bytes, crops: np.ndarray, class_index: np.ndarray, methods: tuple[str, ...]):
    """(probs [N, classes], {method: heatmap [N, h, w]}) of a CAM graph on ONNX Runtime's CPU
    provider, BATCH crops per call."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [graph_spec.OUTPUT_PROBS, *methods]
    parts = [session.run(names, {graph_spec.INPUT_IMAGE: np.ascontiguousarray(crops[i:i + BATCH]),
                                 graph_spec.INPUT_CLASS: class_index[i:i + BATCH]})
             for i in range(0, len(crops), BATCH)]
    probs = np.concatenate([p[0] for p in parts])
    return probs, {m: np.concatenate([p[1 + j] for p in parts]) for j, m in enumerate(methods)}


def agreements(reference: bytes, quantized: bytes, crops: np.ndarray, info: graph_spec.GraphInfo,
               methods: tuple[str, ...] | None = None, nudged_too: bool = True) -> tuple[Agreement, Agreement | None]:
    """(`quantized` against the float32 `reference` on `crops`, the float32 graph against itself
    on the crops nudged by one grey level (agreement.nudge): the noise floor, how much its maps move
    under less than camera noise; None without `nudged_too`), for the heatmaps `methods` (default:
    every one of `info`). Both graphs' heatmaps explain the class the float32 graph predicts, so
    they answer the same question and a changed prediction shows in the top-1 agreement alone;
    the float32 graph runs once for both."""
    methods = tuple(info.heatmaps) if methods is None else methods
    side = max(info.input_size)
    probs_ref, maps_ref = run_graph(reference, crops, np.full(len(crops), -1, np.int64), methods)
    explained = probs_ref.argmax(1).astype(np.int64)
    probs, maps = run_graph(quantized, crops, explained, methods)
    result = compare(probs_ref, probs, maps_ref, maps, side=side)
    if not nudged_too:
        return result, None
    probs_n, maps_n = run_graph(reference, nudge(crops), explained, methods)
    return result, compare(probs_ref, probs_n, maps_ref, maps_n, side=side)


def rerun_crops(crops: np.ndarray, channels: int) -> np.ndarray:
    """The held-out crops Ablation-CAM and Score-CAM are compared on: each crop runs the head or
    the model once per channel of the target, so at most RERUN_VARIANTS // channels of them,
    spread over the held-out crops (the middle of each of as many equal stretches); none when
    that is fewer than calibration.MIN_HELD_OUT. Not the first ones: a clip's first held-out
    crops are the frames right after the last calibration crops (near-copies of them), and
    train's held-out crops come class by class (the first ones, all of one class)."""
    from camface.export.calibration import MIN_HELD_OUT

    count = min(len(crops), RERUN_VARIANTS // max(channels, 1))
    if count < MIN_HELD_OUT:
        return crops[:0]
    return crops[(np.arange(count) * 2 + 1) * len(crops) // (2 * count)]


def _merge(first: Agreement, second: Agreement | None, not_compared: dict) -> Agreement:
    methods = {**first.methods, **(second.methods if second is not None else {})}
    return replace(first, methods=methods, not_compared={**first.not_compared, **not_compared})


def to_int8(model, calibration: str = "sample", method: str = DEFAULT_CALIBRATION_METHOD, crops=None,
            thresholds: Thresholds = THRESHOLDS, enforce: bool = True) -> Int8Result:
    """The int8 version of a float32 CAM graph (onnx.ModelProto or its bytes), checked.

    calibration: source of face crops (folder of photos, clip, 'sample'); `crops` (a
    calibration.CropSets) replaces it when given. Raises ModelError when the graph is not
    float32, when the tail is not float32 after quantizing, or (`enforce`) when the agreement
    with the float32 graph on the held-out crops misses `thresholds`; the message lists each miss.

    The methods that run the model again (Ablation-CAM, Score-CAM: export/onnx_rerun.py) are
    taken out first and written again into the int8 graph, so they run its int8 features; they
    are checked against the numpy reference on that graph's own head and model (`onnx_rerun.attach`)
    and, like every other heatmap, against the float32 graph's maps: on held-out crops spread over them
    (`rerun_crops`: each crop reruns the model once per channel), or, for a target with too many
    channels for that, not (the report says so, and a warning).
    """
    import onnx
    import onnxruntime

    from camface.export import calibration as calibration_crops
    from camface.export import onnx_rerun

    if isinstance(model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model))
    info = graph_spec.GraphInfo.from_metadata({p.key: p.value for p in model.metadata_props})
    if info.precision != "fp32":
        raise ModelError(f"int8 quantizes a float32 CAM graph; this one is {info.precision}")
    original = model.SerializeToString()  # with Ablation-CAM / Score-CAM, the reference for them
    model, info, reruns = onnx_rerun.without(model, info)
    crops = crops or calibration_crops.crop_sets(calibration, info.input_size, info.color_order)
    log.info("int8: calibrating on %d face crops from %s (%s), %d held out",
             len(crops.calibration), crops.source, method, len(crops.held_out))
    quantized = quantize_features(model, crops.calibration, method)
    check_float_tail(quantized)
    reference = model.SerializeToString()
    result, floor = agreements(reference, quantized.SerializeToString(), crops.held_out, info)

    def refuse(failures):
        raise ModelError(f"int8 graph calibrated on {crops.source} no longer explains what the float32 graph "
                         f"explains on {result.crops} held-out crops: {'; '.join(failures)} (try another "
                         "--calibration source with more, varied faces, or keep float32)")

    failures = result.failures(thresholds, floor)
    if failures and enforce:  # before the reruns are written back and checked: a bad graph fails fast
        refuse(failures)
    quantized, info, _ = onnx_rerun.attach(quantized, replace(info, precision="int8"), reruns, required=reruns)
    added = tuple(name for name in reruns if name in info.heatmaps)
    if added:
        channels = _target_channels(quantized, crops.held_out[:1])
        some = rerun_crops(crops.held_out, channels)
        if len(some):
            more, more_floor = agreements(original, quantized.SerializeToString(), some, info, added)
            result, floor = _merge(result, more, {}), _merge(floor, more_floor, {})
        else:
            why = (f"{channels} target channels: over {RERUN_VARIANTS} reruns for {calibration_crops.MIN_HELD_OUT} "
                   "crops")
            log.warning("int8: %s not compared with float32 (%s)", ", ".join(added), why)
            result = _merge(result, None, dict.fromkeys(added, why))
        failures = result.failures(thresholds, floor)
        if failures and enforce:
            refuse(failures)
    for line in lowered_bars(result, floor, thresholds):
        log.warning("int8: %s", line)
    report = {
        "scheme": "ONNX Runtime quantize_static, QDQ, int8 per-channel weights in 7 bits, uint8 activations; features "
                  f"(before {info.target_layer}) only, head, gradient and heatmaps float32",
        "onnxruntime": onnxruntime.__version__,
        "quantized_nodes": len(feature_nodes(model)) - len(pixel_chain(model)),
        "calibration": {"source": str(crops.source), "crops": len(crops.calibration),
                        "method": f"{method} {PERCENTILE}" if method == "percentile" else method},
        "agreement": result.to_json(),
        "noise_floor": floor.to_json(),
        "thresholds": {**{k: getattr(thresholds, k) for k in thresholds.__dataclass_fields__},
                       "heatmaps": {name: {"pearson": p, "overlap": o}
                                    for name, (p, o) in result.bars(thresholds, floor).items()}},
        "passed": not failures,
    }
    props = {p.key: p.value for p in quantized.metadata_props}
    props[graph_spec.META_HEATMAPS] = json.dumps(list(info.heatmaps))
    props[graph_spec.META_PRECISION] = "int8"
    props[graph_spec.META_QUANTIZATION] = json.dumps(report)
    del quantized.metadata_props[:]
    onnx.helper.set_model_props(quantized, props)
    return Int8Result(quantized, result, floor, report)


def lowered_bars(result: Agreement, floor: Agreement, thresholds: Thresholds = THRESHOLDS) -> list[str]:
    """One sentence per heatmap whose bars the noise floor lowered by more than LOWERED: the
    float32 map itself moves that much under a one-grey-level nudge, so the int8 graph passed a
    weaker check there (agreement.py), and the map is fragile in either precision."""
    out = []
    for name, (pearson_bar, overlap_bar) in result.bars(thresholds, floor).items():
        if pearson_bar < thresholds.heatmap_pearson - LOWERED or overlap_bar < thresholds.heatmap_overlap - LOWERED:
            moved = floor.methods[name]
            out.append(f"{name}: the float32 map itself moves under a one-grey-level nudge (Pearson r "
                       f"{moved.pearson:.3f}, top-20% overlap {moved.overlap:.3f}), so int8 was held to r >= "
                       f"{pearson_bar:.2f} and overlap >= {overlap_bar:.2f} only (not {thresholds.heatmap_pearson:.2f} "
                       f"and {thresholds.heatmap_overlap:.2f}): the map is fragile at this target in either precision")
    return out


def _target_channels(model, crop: np.ndarray) -> int:
    """Channels of the graph's `activations` output (NHWC: the last dimension), run on `crop`
    (uint8 [1, H, W, C]) where the graph does not state it."""
    import onnxruntime as ort

    output = next(o for o in model.graph.output if o.name == graph_spec.OUTPUT_ACTIVATIONS)
    stated = output.type.tensor_type.shape.dim[-1].dim_value if output.type.tensor_type.shape.dim else 0
    if stated > 0:
        return int(stated)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (activations,) = session.run([graph_spec.OUTPUT_ACTIVATIONS], {graph_spec.INPUT_IMAGE: crop,
                                                                   graph_spec.INPUT_CLASS: np.full(1, -1, np.int64)})
    return int(activations.shape[-1])


def export_int8(model, info: graph_spec.GraphInfo, options) -> tuple[object, graph_spec.GraphInfo, Int8Result]:
    """`camface export --int8`, every engine: the verified float32 CAM graph `model` (metadata
    set) quantized from `options.calibration` by `options.calibration_method` and checked
    (`to_int8`); returns the int8 graph, `info` with precision and quantization, and the result.
    Ablation-CAM and Score-CAM (onnx_rerun) are taken out first and added back to the int8 graph,
    so they run its int8 features (`to_int8`)."""
    result = to_int8(model, options.calibration, options.calibration_method)
    return result.model, replace(info, precision="int8", quantization=result.report), result


def summary_lines(report: dict) -> list[str]:
    """The `quantization` metadata of an int8 graph as text: scheme, calibration, agreement
    against the bars it had to meet (`camface export --int8` and `camface info` print it)."""
    calibration, agreement_ = report["calibration"], Agreement.from_json(report["agreement"])
    bars = report["thresholds"]
    lines = [report["scheme"],
             f"calibration: {calibration['crops']} face crops from {calibration['source']}, "
             f"{calibration['method']}; {report['quantized_nodes']} feature nodes quantized",
             f"agreement with float32 ({'passed' if report['passed'] else 'FAILED'}; bars: top-1 >= "
             f"{bars['top1_agreement']:.0%}, mean probability difference <= {bars['mean_prob_difference']}):"]
    lines += [f"  {line}" for line in agreement_.lines()]
    for name, bar in bars.get("heatmaps", {}).items():
        floor = report.get("noise_floor", {}).get("methods", {}).get(name, {})
        lines.append(f"  {name} bars: Pearson r >= {bar['pearson']:.2f}, overlap >= {bar['overlap']:.2f}"
                     + (f" (float32 under a one-grey-level nudge: r {floor['pearson']:.3f}, overlap "
                        f"{floor['overlap']:.3f})" if floor else ""))
    return lines
