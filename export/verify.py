"""An exported graph checks itself: ONNX Runtime and TensorFlow on the same batch, largest
absolute difference per output, failure above a stated tolerance.

A float16 graph's heatmaps are also compared with TensorFlow run on the graph's own
(float16-rounded) activations. That isolates what the graph computes after the target layer from
the features' float16 rounding, which the `activations` row already bounds. Grad-CAM++ is judged
on that comparison only: its weights divide by 2 g^2 + sum(A) g^3 = g^2 (2 + sum(A) g), which
nears 0 where a target layer without ReLU sums negative, so it amplifies a relative error e in
sum(A) to about e |sum(A) g| / |2 + sum(A) g| (at the emotion model's `add_3`, |2 + sum(A) g| gets
down to 0.003: float16 activations, rounded once, already move Grad-CAM++ by 2% of its range, and
float16 features by about its whole range). Its direct difference is printed for information.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from camface.errors import ModelError

# |onnx - tf| <= ATOL + RTOL * max|tf|, per output. float32 graphs differ from TF by rounding
# (about 1e-6 of the output's range on the bundled model); float16 graphs by far more.
TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 5e-2)}
# Grad-CAM++ divides by 2 g^2 + sum(A) g^3, which nears 0 where activations sum negative (a
# target layer without ReLU): rounding differences grow there, to about 2e-3 of the range.
TOLERANCE_SCALE = {"fp32": {"gradcampp": 10.0}, "fp16": {"gradcampp": 2.0}}
# float16 outputs compared with the image-to-heatmap reference for information only (see above).
ILL_CONDITIONED_FP16 = ("gradcampp",)
FROM_IMAGE, FROM_ACTIVATIONS = "tf", "tf(onnx activations)"


@dataclass(frozen=True)
class Difference:
    output: str
    max_abs: float  # largest |onnx - reference|
    reference_max: float  # largest |reference|, the scale the relative tolerance applies to
    allowed: float
    reference: str = FROM_IMAGE  # FROM_IMAGE or FROM_ACTIVATIONS
    binding: bool = True  # False: printed for information, never fails the export

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.allowed or not self.binding

    def __str__(self) -> str:
        within = self.max_abs <= self.allowed
        mark = ("ok" if within else "FAIL") if self.binding else (
            "info" if within else "info: over, ill-conditioned (see camface.export.verify)")
        return (f"{self.output:<12} max |onnx - {self.reference}| = {self.max_abs:.2e}  "
                f"(allowed {self.allowed:.2e}, max |ref| = {self.reference_max:.3g})  {mark}")


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


def compare(onnx_outputs: dict[str, np.ndarray], tf_outputs: dict[str, np.ndarray],
            precision: str = "fp32", reference_name: str = FROM_IMAGE,
            informational: tuple[str, ...] = ()) -> list[Difference]:
    """Per-output differences, in the order of `tf_outputs`; outputs named in `informational`
    never fail."""
    result = []
    for name, reference in tf_outputs.items():
        factor = TOLERANCE_SCALE[precision].get(name, 1.0)
        atol, rtol = (t * factor for t in TOLERANCE[precision])
        reference = np.asarray(reference, dtype=np.float64)
        got = np.asarray(onnx_outputs[name], dtype=np.float64)
        if got.shape != reference.shape:
            raise ModelError(f"exported output {name!r} has shape {got.shape}, "
                             f"TensorFlow gives {reference.shape}")
        scale = float(np.abs(reference).max()) if reference.size else 0.0
        result.append(Difference(name, float(np.abs(got - reference).max()), scale,
                                 atol + rtol * scale, reference_name, name not in informational))
    return result


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
           precision: str = "fp32", batch: int = 3, heatmap_function=None) -> list[Difference]:
    """Run both on one batch; raise ModelError listing the outputs over tolerance.

    function: the graph's tf.function (image, class_index) -> outputs. heatmap_function
    (float16 graphs): tf.function (activations, class_index) -> heatmaps, for the comparison
    on the graph's own activations described in this module's docstring."""
    images, classes = sample_batch(input_size, channels, num_classes, batch)
    reference = {k: v.numpy() for k, v in function(images, classes).items()}
    got = run_onnx(model_bytes, images, classes)
    informational = ILL_CONDITIONED_FP16 if heatmap_function is not None else ()
    differences = compare(got, reference, precision, informational=informational)
    if heatmap_function is not None:
        from_activations = {k: v.numpy() for k, v in
                            heatmap_function(got["activations"], classes).items()}
        differences += compare(got, from_activations, precision, FROM_ACTIVATIONS)
    failed = [d for d in differences if not d.ok]
    if failed:
        raise ModelError("exported graph disagrees with TensorFlow: "
                         + "; ".join(str(d) for d in failed))
    return differences
