"""Shared fixtures: real face images that packages ship, written to tmp_path when needed."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def astronaut_bgr() -> np.ndarray:
    """scikit-image's public-domain astronaut photo (512x512), uint8 BGR.

    MediaPipe finds one face at about x=177, y=82, w=95, h=95 (pixels)."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])
