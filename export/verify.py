"""An exported graph checks itself: ONNX Runtime and TensorFlow on the same batch, largest
absolute difference per output, failure above a stated tolerance.

float16 graphs: the features (image -> target-layer activations) run in float16 and the rest in
float32 (`convert.to_float16`), so a heatmap inherits the float16 error of the activations it is
computed from. A heatmap may be ill-conditioned in them (a map whose positive part is a small
difference of large channel sums; the papers' Grad-CAM++ and XGrad-CAM denominators were, before
camface/methods.py conditioned them). No float16 graph can do better than the maths allows, so
each heatmap's tolerance is widened by twice the sensitivity measured in TensorFlow itself:
max |TF(activations) - TF(graph's activations)|, the same TensorFlow heatmap maths run once on
its own float32 activations and once on the activations the float16 graph returned.
Well-conditioned heatmaps get almost nothing added; the printed line shows the part added.

float32 graphs: ONNX Runtime and TensorFlow sum in other orders, so they differ by rounding, and
a model can amplify rounding far beyond the stated tolerance (a network trained from scratch on
a few photos: BatchNorm statistics of a handful of crops; a difference of two nearly equal
channel sums). A rounded sum is the exact sum of weights moved by a few ulps (backward error),
so each output's tolerance is widened by twice TensorFlow's own change when every weight of the
model moves by about two ulps (`rounding_sensitivity`); well-conditioned outputs get almost
nothing added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from camface.errors import ModelError
from camface import methods

# |onnx - tf| <= ATOL * min(1, max|tf|) + RTOL * max|tf| (+ the sensitivity above), per output. float32
# graphs differ from TF by rounding (about 1e-6 of the output's range on the bundled model);
# float16 graphs by far more.
# int8: the features round their inputs to quantisation steps, so inputs one float rounding
# apart (Score-CAM's masked images, computed by two runtimes) can land a step apart.
TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 5e-2), "int8": (2e-2, 5e-2)}
SENSITIVITY_FACTOR = 2.0  # tolerance += this * TF's change on the graph's activations (float16)
# or on weights moved by ROUNDING_STEP (float32)
ROUNDING_STEP = 2.0 ** -22  # relative move of each float32 weight: about two ulps, random signs


@dataclass(frozen=True)
class Difference:
    output: str
    max_abs: float  # largest |onnx - tf|
    reference_max: float  # largest |tf|, the scale the relative tolerance applies to
    allowed: float  # stated tolerance, `sensitivity` part included
    sensitivity: float = 0.0  # the part of `allowed` from the measured sensitivity (see above)
    cause: str = "float16 activations"  # what the sensitivity was measured against

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.allowed

    def __str__(self) -> str:
        mark = "ok" if self.ok else "FAIL"
        widened = f" incl. {self.sensitivity:.2e} for {self.cause}" if self.sensitivity else ""
        return (f"{self.output:<18} max |onnx - tf| = {self.max_abs:.2e}  (allowed "
                f"{self.allowed:.2e}{widened}, max |tf| = {self.reference_max:.3g})  {mark}")


def sample_batch(input_size: tuple[int, int], channels: int, num_classes: int, batch: int = 3,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random uint8 images [batch, H, W, C] and class indices (-1, 0, last, ...)."""
    rng = np.random.default_rng(seed)
    height, width = input_size
    coarse = rng.integers(0, 256, (batch, 8, 8, channels)).astype(np.float32)
    ys = np.linspace(0, 7, height).round().astype(int)
    xs = np.linspace(0, 7, width).round().astype(int)
    noise = rng.integers(-20, 21, (batch, height, width, channels))
    images = np.clip(coarse[:, ys][:, :, xs] + noise, 0, 255).astype(np.uint8)
    choices = [-1, 0, num_classes - 1]
    classes = np.array([choices[i % 3] for i in range(batch)], dtype=np.int64)
    return images, classes


def tolerance_floor(output: str) -> float:
    """The least tolerance of `output`: a difference no one sees. A map within it of an all-zero
    one normalises to zeros as that one does (`methods.normalize` shows a peak <= FLAT_PEAK as
    zeros): FLAT_PEAK for a POSITIVE map (its ReLU'd peak), half of it for a MINMAX map (its
    range, max - min, stays within FLAT_PEAK) and for the other outputs."""
    method = methods.METHODS.get(output)
    positive = method is not None and method.normalization == methods.POSITIVE
    return methods.FLAT_PEAK if positive else methods.FLAT_PEAK / 2


def compare(onnx_outputs: dict[str, np.ndarray], tf_outputs: dict[str, np.ndarray],
            precision: str = "fp32", sensitivity: dict[str, float] | None = None,
            cause: str = "float16 activations") -> list[Difference]:
    """Per-output differences, in the order of `tf_outputs`. sensitivity: output name ->
    absolute amount added to its tolerance (see the module docstring), measured against
    `cause`."""
    sensitivity = sensitivity or {}
    result = []
    for name, reference in tf_outputs.items():
        atol, rtol = TOLERANCE[precision]
        reference = np.asarray(reference, dtype=np.float64)
        got = np.asarray(onnx_outputs[name], dtype=np.float64)
        if got.shape != reference.shape:
            raise ModelError(f"exported output {name!r} has shape {got.shape}, "
                             f"TensorFlow gives {reference.shape}")
        scale = float(np.abs(reference).max()) if reference.size else 0.0
        extra = float(sensitivity.get(name, 0.0))
        # The absolute part shrinks with an output smaller than 1: a heatmap is seen normalised,
        # so a map whose values are all below ATOL would otherwise pass whatever the graph gave.
        # Its floor is a difference no one sees (`tolerance_floor`).
        allowed = max(atol * min(1.0, scale) + rtol * scale + extra, tolerance_floor(name))
        result.append(Difference(name, float(np.abs(got - reference).max()), scale,
                                 allowed, extra, cause))
    return result


def float16_sensitivity(heatmap_function, tf_outputs: dict[str, np.ndarray],
                        onnx_activations: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Heatmap name -> SENSITIVITY_FACTOR * max |TF heatmap on TF's activations - TF heatmap on
    the graph's activations|: how far the float16 activations alone move each heatmap."""
    moved = {k: v.numpy() for k, v in heatmap_function(onnx_activations, classes).items()}
    return {name: SENSITIVITY_FACTOR * float(np.abs(np.asarray(value, np.float64)
                                                    - tf_outputs[name]).max())
            for name, value in moved.items()}


def rounding_sensitivity(function, images: np.ndarray, classes: np.ndarray, variables,
                         reference: dict[str, np.ndarray], seed: int = 0) -> dict[str, float]:
    """Output name -> SENSITIVITY_FACTOR * max |TF outputs - TF outputs with every float weight
    in `variables` (tf.Variable) moved by ROUNDING_STEP of itself, random signs|: how far
    rounding inside the model alone moves each output. The weights are restored afterwards."""
    rng = np.random.default_rng(seed)
    saved = [variable.numpy() for variable in variables]
    try:
        for variable, value in zip(variables, saved):
            if np.issubdtype(value.dtype, np.floating):
                signs = rng.choice((-1.0, 1.0), size=value.shape)
                variable.assign((value * (1.0 + signs * ROUNDING_STEP)).astype(value.dtype))
        moved = {k: v.numpy() for k, v in function(images, classes).items()}
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
    return {name: SENSITIVITY_FACTOR * float(np.abs(np.asarray(moved[name], np.float64) - value).max())
            for name, value in reference.items() if np.asarray(value).size}


def run_onnx(model_bytes: bytes, images: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    """All outputs of a CAM graph on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {"image": images, "class_index": classes})
    return dict(zip(names, values))


def verify(model_bytes: bytes, function, input_size, channels, num_classes,
           precision: str = "fp32", batch: int = 3, heatmap_function=None,
           variables=()) -> list[Difference]:
    """Run both on one batch; raise ModelError listing the outputs over tolerance.

    function: the graph's tf.function (image, class_index) -> outputs. heatmap_function
    (float16 graphs): tf.function (activations, class_index) -> heatmaps, with which the
    heatmaps' tolerances are widened by their measured sensitivity. variables (float32
    graphs): the model's tf.Variables, with which every output's tolerance is widened by its
    sensitivity to rounding (`rounding_sensitivity`; module docstring)."""
    images, classes = sample_batch(input_size, channels, num_classes, batch)
    reference = {k: v.numpy() for k, v in function(images, classes).items()}
    got = run_onnx(model_bytes, images, classes)
    sensitivity, cause = None, "float16 activations"
    if heatmap_function is not None:
        sensitivity = float16_sensitivity(heatmap_function, reference, got["activations"], classes)
    elif variables:
        sensitivity = rounding_sensitivity(function, images, classes, variables, reference)
        cause = f"weights moved {ROUNDING_STEP:.1e}"
    differences = compare(got, reference, precision, sensitivity, cause)
    failed = [d for d in differences if not d.ok]
    if failed:
        raise ModelError("exported graph disagrees with TensorFlow: "
                         + "; ".join(str(d) for d in failed))
    return differences
