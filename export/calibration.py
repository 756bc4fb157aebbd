"""Face crops for int8 calibration and for the agreement check, cut exactly as the live loop
cuts them: the same source reader (`make_source`), MediaPipe detector and crop
(`camface.realtime.crop.crop_faces`) with `LiveConfig`'s default detector, confidence and margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from camface.errors import ModelError

MAX_CROPS = 256  # crops kept from a source (evenly spaced over it); more adds calibration time only
MAX_FRAMES = 1200  # frames read from a long clip at most
HELD_OUT_FRACTION = 0.25  # the last quarter of the source is held out for the agreement check
MIN_CALIBRATION, MIN_HELD_OUT = 8, 4


@dataclass(frozen=True)
class CropSets:
    """calibration and held_out: uint8 [N, H, W, C] in the graph's colour order, from the
    first 75% and the last 25% of `source` (in time: consecutive frames look alike, so an
    interleaved split would test on near-copies of calibration crops)."""

    source: str
    calibration: np.ndarray
    held_out: np.ndarray

    def __post_init__(self) -> None:
        if len(self.calibration) < MIN_CALIBRATION or len(self.held_out) < MIN_HELD_OUT:
            raise ModelError(f"calibration source {self.source}: {len(self.calibration)} calibration and "
                             f"{len(self.held_out)} held-out face crops; int8 needs at least {MIN_CALIBRATION} "
                             f"and {MIN_HELD_OUT}")


def evenly(crops: np.ndarray, limit: int = MAX_CROPS) -> np.ndarray:
    """At most `limit` of `crops`, evenly spaced, in order."""
    if len(crops) <= limit:
        return crops
    return crops[np.unique(np.linspace(0, len(crops) - 1, limit).round().astype(int))]


def from_bgr(crops_bgr: np.ndarray, color_order: str) -> np.ndarray:
    """uint8 BGR crops [N, H, W, 3] -> the graph's colour order ([N, H, W, 1] for GRAY)."""
    from camface.color_order import ColorOrder

    return ColorOrder.of(color_order).from_bgr(crops_bgr)


def face_crops(source: str, size: tuple[int, int], color_order: str, limit: int = MAX_CROPS,
               max_frames: int = MAX_FRAMES) -> np.ndarray:
    """Up to `limit` face crops, uint8 [N, H, W, C] (C = 1 for GRAY), in source order, evenly
    spaced over every face found in the first `max_frames` frames of `source` (a folder of
    photos, a clip, or 'sample'). Raises SourceError when the source does not open."""
    from camface.api import face_detector
    from camface.realtime.config import LiveConfig
    from camface.realtime.crop import crop_faces
    from camface.realtime.sources import make_source

    live = LiveConfig()
    crops = []
    with make_source(source) as frames, \
            face_detector(live) as detector:
        for index, frame in enumerate(frames):
            if index >= max_frames:
                break
            faces = detector.detect(frame)[:live.max_faces]
            if faces:
                crops.extend(crop_faces(frame, faces, live.margin, size, color_order)[0])
    if not crops:
        return np.zeros((0, *size, 1 if color_order == "GRAY" else 3), np.uint8)
    return evenly(np.stack(crops), limit)


def split(source: str, crops: np.ndarray) -> CropSets:
    """The first 75% of `crops` for calibration, the rest held out, less the held-out crops
    identical to a calibration crop (a photo and its copy in one folder, a clip's repeated
    frames): the agreement check is judged on crops the calibration has not seen. Raises
    ModelError naming the source when either part would be too small to trust."""
    held = max(MIN_HELD_OUT, int(round(len(crops) * HELD_OUT_FRACTION)))
    if len(crops) - held < MIN_CALIBRATION:
        raise ModelError(f"calibration source {source}: {len(crops)} face crops found, int8 needs at least "
                         f"{MIN_CALIBRATION + MIN_HELD_OUT} ({MIN_CALIBRATION} to calibrate, {MIN_HELD_OUT} "
                         "held out for the agreement check); give a folder of photos or a clip with more faces")
    calibration, held_out = crops[:-held], crops[-held:]
    seen = {crop.tobytes() for crop in calibration}
    unseen = np.asarray([crop.tobytes() not in seen for crop in held_out], bool)
    if not unseen.all() and unseen.sum() < MIN_HELD_OUT:
        raise ModelError(f"calibration source {source}: {int(unseen.sum())} of its {held} held-out face crops differ "
                         f"from every calibration crop (the others are copies of one); int8 needs at least "
                         f"{MIN_HELD_OUT} for the agreement check; give a folder of photos or a clip with more, "
                         "different faces")
    return CropSets(source, calibration, held_out[unseen])


def crop_sets(source: str, size: tuple[int, int], color_order: str) -> CropSets:
    """Calibration and held-out crops of `source` for a graph of input `size` and `color_order`."""
    return split(source, face_crops(source, size, color_order))
