"""Regression tests for bugs found in review of the live loop (realtime/). Offline, synthetic."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from realtime_helpers import FakeCamera

from camface.realtime.sources import ImageFolderSource, LiveSource
from camface.realtime.window import Controls, apply_key


@pytest.mark.parametrize("char", ["\u00b2", "\u00b3", "\u00b9"])  # ² (AZERTY top-left key), ³, ¹
def test_superscript_digit_keys_are_ignored_not_a_crash(char):
    """cv2.waitKey returns the low byte of the key (Latin-1): '²'.isdigit() is True but
    int('²') raises ValueError, which used to stop the live loop."""
    controls = Controls(method="gradcam", explained=1)
    assert apply_key(controls, ord(char), ("gradcam",), 7) == (controls, None)
    assert apply_key(controls, ord("2"), ("gradcam",), 7) == (Controls("gradcam", explained=2), None)


def test_live_source_interrupted_while_opening_releases_the_camera(monkeypatch):
    """Ctrl-C while the camera's frame rate is being measured: `with` never calls __exit__
    for a failed __enter__, so __enter__ itself must stop the reader thread and release."""
    camera = FakeCamera()

    def interrupted(self, frames=10):
        raise KeyboardInterrupt

    monkeypatch.setattr(LiveSource, "_measure_fps", interrupted)
    source = LiveSource(0, timeout_s=0.5, opener=lambda target, timeout: camera)
    with pytest.raises(KeyboardInterrupt):
        with source:
            pass
    assert camera.released
    assert source._thread is not None and not source._thread.is_alive()


def test_face_detector_failing_warm_up_is_closed(monkeypatch):
    """An error (or Ctrl-C) in the warm-up detection inside __enter__ left MediaPipe's
    detector open: it must be closed explicitly."""
    from camface.models import DETECTORS
    from camface.realtime.detect import FaceDetector

    def interrupted(self, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(FaceDetector, "detect", interrupted)
    detector = FaceDetector(DETECTORS["short"])
    with pytest.raises(KeyboardInterrupt):
        with detector:
            pass
    assert detector._detector is None


def test_image_folder_skips_images_of_unsupported_type(tmp_path, caplog):
    """A signed 16-bit TIFF in a folder raised a bare ValueError (no file named) and stopped
    the run; like an unreadable file it is skipped with a warning naming it."""
    cv2.imwrite(str(tmp_path / "01.png"), np.full((6, 8, 3), 50, np.uint8))
    cv2.imwrite(str(tmp_path / "02.tiff"), np.full((6, 8), 200, np.int16))
    cv2.imwrite(str(tmp_path / "03.png"), np.full((6, 8, 3), 90, np.uint8))
    with caplog.at_level(logging.WARNING), ImageFolderSource(tmp_path) as source:
        frames = list(source)
    assert [int(f[0, 0, 0]) for f in frames] == [50, 90]
    assert "02.tiff" in caplog.text
