"""Bundled model files and builders for the original study's architectures.

Paths here point inside the installed package, so camface works offline with no
`../shared` and no downloads.
"""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent

EMOTION_KERAS = MODELS_DIR / "emotion" / "emotion_mini_xception_fer2013.hdf5"
EMOTION_ONNX = MODELS_DIR / "emotion" / "emotion.onnx"
EMOTION_LABELS = MODELS_DIR / "emotion" / "labels.txt"

DETECTORS = {
    "short": MODELS_DIR / "detectors" / "blaze_face_short_range.tflite",
    "full": MODELS_DIR / "detectors" / "blaze_face_full_range_sparse.tflite",
}
# the same models converted to ONNX (`make detectors`; camface.realtime.blazeface runs them)
DETECTORS_ONNX = {name: path.with_suffix(".onnx") for name, path in DETECTORS.items()}


def read_labels(path: str | Path) -> list[str]:
    """Class names, one per non-empty line of a UTF-8 text file. A byte-order mark (Windows
    Notepad writes one) is not part of the first name: it was, and `--class NAME` missed it."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines() if line.strip()]
