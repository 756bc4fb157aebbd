"""The heatmap overlay: one function that every picture of a heatmap goes through (the live
frame, the training montage, the guided figure), so an explanation looks the same everywhere.

A heatmap (float [h, w] at the graph's feature resolution, unnormalised) is normalised as its
method's registry entry says (`camface.methods.normalize`), upsampled bilinearly to the image,
coloured with an OpenCV colormap and alpha-blended over the image. A map with no evidence left
after normalisation (all zeros) leaves the image as it is rather than tinting it uniformly.
"""

from __future__ import annotations

import cv2
import numpy as np

from camface.methods import normalize
from camface.realtime.config import DEFAULTS as LIVE  # the look's defaults: LiveConfig's colormap and alpha

COLORMAPS = {name[len("COLORMAP_"):].lower(): getattr(cv2, name)
             for name in dir(cv2) if name.startswith("COLORMAP_")}
DETAIL = 64  # colormap resolution: colours are computed at most this many pixels across


def upsample(heatmap01: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """float32 [h, w] -> float32 [H, W] for size (H, W) (an int: a square), bilinear."""
    height, width = (size, size) if isinstance(size, int) else size
    return cv2.resize(np.asarray(heatmap01, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def colormap_lut(colormap: str) -> np.ndarray:
    """The 256-entry BGR lookup table of an OpenCV colormap, uint8 [256, 1, 3]."""
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; choose from {', '.join(sorted(COLORMAPS))}")
    levels = np.arange(256, dtype=np.uint8).reshape(256, 1)
    return cv2.applyColorMap(levels, COLORMAPS[colormap]).reshape(256, 1, 3)


def colorize(heatmap01: np.ndarray, size: tuple[int, int], lut: np.ndarray, detail: int = DETAIL) -> np.ndarray:
    """Normalised heatmap float [h, w] in [0, 1] -> uint8 BGR [H, W, 3] in the colormap, size (H, W).

    The colormap is applied at most `detail` pixels across and the colours are then upsampled:
    a few times cheaper than colouring every pixel of a large face, and the same to the eye."""
    height, width = size
    small = (min(height, detail), min(width, detail))
    levels = (upsample(heatmap01, small) * 255.0 + 0.5).astype(np.uint8)
    colored = cv2.LUT(cv2.merge([levels, levels, levels]), lut)
    return colored if small == size else cv2.resize(colored, (width, height), interpolation=cv2.INTER_LINEAR)


def overlay(image: np.ndarray, heatmap: np.ndarray, method: str, colormap: str = LIVE["colormap"],
            alpha: float = LIVE["alpha"], *, side: int | None = None, offset: tuple[int, int] = (0, 0),
            lut: np.ndarray | None = None) -> np.ndarray:
    """A NEW uint8 BGR image, shaped as `image` (uint8 BGR [h, w, 3]): `heatmap` of `method`
    blended over it with opacity `alpha`. `image` is not modified.

    By default the heatmap covers `image` itself (a face crop, square or not). With `side`, it
    covers a square of `side` pixels of which `image` is the part whose top-left corner lies at
    `offset` = (dx, dy) (the live loop draws a face box that way, inside its crop square).
    `lut` (from `colormap_lut`) saves building the table per call."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay needs a BGR image [h, w, 3], got shape {image.shape}")
    height, width = image.shape[:2]
    size = (height, width) if side is None else (side, side)
    dx, dy = offset
    if dx < 0 or dy < 0 or dx + width > size[1] or dy + height > size[0]:
        raise ValueError(f"image {width}x{height} at offset {offset} lies outside the {side}-pixel square")
    heat01 = normalize(heatmap, method)
    if not heat01.any():
        return image.copy()
    colored = colorize(heat01, size, colormap_lut(colormap) if lut is None else lut)
    return cv2.addWeighted(colored[dy:dy + height, dx:dx + width], alpha, image, 1.0 - alpha, 0.0)
