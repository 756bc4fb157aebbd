"""Face detection: MediaPipe Tasks `FaceDetector` (BlazeFace) in VIDEO mode, bundled models.

Boxes come back in pixels of the frame, clipped to it, largest first.

MediaPipe bounds a box's corner and its size each to the frame (DetectionTransformation's
`BoundedValue`), so a face partly out of the frame's left or top edge comes back as a box at
0 as wide (tall) as the whole face: over the visible face and as much again of what lies beside
it. The corner it lost is estimated from the face's keypoints, whose mean (eyes, nose tip,
mouth) lies at the box's centre to within 3% (x) and 4% (y) of its size on faces inside the
frame (52 faces of the test photos and clips), and the box is clipped there, as
`camface.realtime.blazeface` clips its exact box: on faces cut by 5-50% at the left or top,
the estimated edge is 2-4% of the face's size from the exact one (median), 4-8% (90th
percentile), where MediaPipe's was 17-22% (median).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from camface.errors import ModelError, UsageError
from camface.realtime.frames import RangeWatch, check_frame
from camface.native import quiet_native_stderr
from camface.realtime.results import Face

log = logging.getLogger(__name__)


def import_mediapipe_vision():
    """Import `mediapipe.tasks.python.vision` without letting it import TensorFlow.

    mediapipe 1.2.3 imports `tensorflow.tools.docs.doc_controls` for documentation decorators
    when TensorFlow is installed (about 2.4 s of start-up for nothing the Tasks API needs).
    While mediapipe loads, `sys.modules["tensorflow"] = None` makes that import fail fast;
    the entry is removed afterwards so a later `import tensorflow` still works. When
    TensorFlow is already imported this changes nothing.
    """
    if "mediapipe.tasks.python.vision" in sys.modules:
        return sys.modules["mediapipe.tasks.python.vision"]
    blocked = "tensorflow" not in sys.modules
    if blocked:
        sys.modules["tensorflow"] = None  # type: ignore[assignment]
    try:
        from mediapipe.tasks.python import vision
    finally:
        if blocked and sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]
    return vision


class FaceDetector:
    """`detect(frame) -> tuple[Face, ...]` with MediaPipe's BlazeFace model at `model_path`.

    frame: uint8 BGR [H, W, 3]. Timestamps given to MediaPipe are monotonic milliseconds
    (perf_counter), strictly increasing as VIDEO mode requires. Use as a context manager
    (or call close()): MediaPipe's detector must be closed explicitly.
    """

    def __init__(self, model_path: str | Path, min_confidence: float = 0.5, quiet: bool = True):
        self.model_path = Path(model_path)
        self.min_confidence = min_confidence
        self.quiet = quiet
        self._detector = None
        self._mp = None
        self._last_ms = -1
        self._range = RangeWatch()  # a 0/1 frame (a mask) finds no face: said once per process

    def __enter__(self) -> "FaceDetector":
        if not self.model_path.is_file():
            raise ModelError(f"face detector model not found: {self.model_path}")
        vision = import_mediapipe_vision()
        import mediapipe as mp
        from mediapipe.tasks.python.core.base_options import BaseOptions

        self._mp = mp
        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_path=str(self.model_path)),
            running_mode=vision.RunningMode.VIDEO,
            min_detection_confidence=self.min_confidence,
        )
        with quiet_native_stderr(self.quiet):
            try:
                self._detector = vision.FaceDetector.create_from_options(options)
            except (RuntimeError, ValueError) as exc:
                raise ModelError(f"cannot load face detector {self.model_path}: {exc}") from exc
            try:
                self.detect(np.zeros((64, 64, 3), np.uint8))  # first call logs; keep it quiet too
            except BaseException:  # `with` will not call __exit__ when __enter__ fails
                self.close()
                raise
        return self

    def close(self) -> None:
        if self._detector is not None:
            with quiet_native_stderr(self.quiet):
                self._detector.close()
            self._detector = None

    def __exit__(self, *exc) -> None:
        self.close()

    def _timestamp_ms(self) -> int:
        now = int(time.perf_counter() * 1000)
        self._last_ms = max(now, self._last_ms + 1)
        return self._last_ms

    def detect(self, frame: np.ndarray) -> tuple[Face, ...]:
        """Faces in `frame` (uint8 BGR [H, W, 3]), boxes in pixels clipped to the frame,
        largest first. Boxes entirely outside the frame are dropped. UsageError for another
        frame (a float, gray or BGRA image, a list: `camface.realtime.frames.check_frame`) or when used
        outside its `with` block."""
        if self._detector is None:
            raise UsageError("FaceDetector used outside its `with` block (or after close())")
        frame = check_frame(frame)  # a float frame in [0, 1] found no face, an empty one raised inside OpenCV
        self._range(frame)
        height, width = frame.shape[:2]
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=rgb)
        result = self._detector.detect_for_video(image, self._timestamp_ms())
        faces = []
        for detection in result.detections:
            b = detection.bounding_box
            x0, y0 = max(b.origin_x, 0), max(b.origin_y, 0)
            x1, y1 = min(b.origin_x + b.width, width), min(b.origin_y + b.height, height)
            centre = _keypoints_centre(detection, width, height)
            if centre is not None:  # a corner MediaPipe moved inside the frame (module docstring)
                if b.origin_x <= 0 and centre[0] < b.width / 2:
                    x1 = min(x1, int(centre[0] + b.width / 2))
                if b.origin_y <= 0 and centre[1] < b.height / 2:
                    y1 = min(y1, int(centre[1] + b.height / 2))
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            score = detection.categories[0].score if detection.categories else 0.0
            faces.append(Face(box=(int(x0), int(y0), int(x1 - x0), int(y1 - y0)), score=float(score)))
        faces.sort(key=lambda f: f.area, reverse=True)
        return tuple(faces)


def _keypoints_centre(detection, width: int, height: int) -> tuple[float, float] | None:
    """Mean of a detection's first four keypoints (eyes, nose tip, mouth centre), frame pixels
    (x, y); None without them. MediaPipe gives keypoints normalised and unbounded."""
    points = detection.keypoints or []
    if len(points) < 4:
        return None
    return (sum(p.x for p in points[:4]) / 4 * width, sum(p.y for p in points[:4]) / 4 * height)
