"""An exported graph checks itself: ONNX Runtime and TensorFlow on the same batch, largest
absolute difference per output, failure above a stated tolerance."""

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


@dataclass(frozen=True)
class Difference:
    output: str
    max_abs: float  # largest |onnx - tf|
    reference_max: float  # largest |tf|, the scale the relative tolerance applies to
    allowed: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.allowed

    def __str__(self) -> str:
        mark = "ok" if self.ok else "FAIL"
        return (f"{self.output:<12} max |onnx - tf| = {self.max_abs:.2e}  "
                f"(allowed {self.allowed:.2e}, max |tf| = {self.reference_max:.3g})  {mark}")


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
            precision: str = "fp32") -> list[Difference]:
    """Per-output differences, in the order of `tf_outputs`."""
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
                                 atol + rtol * scale))
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
           precision: str = "fp32", batch: int = 3) -> list[Difference]:
    """Run both on one batch; raise ModelError listing the outputs over tolerance."""
    images, classes = sample_batch(input_size, channels, num_classes, batch)
    reference = {k: v.numpy() for k, v in function(images, classes).items()}
    differences = compare(run_onnx(model_bytes, images, classes), reference, precision)
    failed = [d for d in differences if not d.ok]
    if failed:
        raise ModelError("exported graph disagrees with TensorFlow: "
                         + "; ".join(str(d) for d in failed))
    return differences
