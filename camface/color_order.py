"""The channel order of a CAM graph's crops (its `color_order` metadata), and every conversion
between it and the uint8 BGR images OpenCV reads, writes and shows: the one place they happen.

A `ColorOrder` is a str ("GRAY", "RGB", "BGR"): it compares equal to, prints as and serialises
to JSON as its name, so metadata and snapshot.json keep the plain strings.
"""

from __future__ import annotations

from enum import Enum

import numpy as np


class ColorOrder(str, Enum):
    """GRAY: one channel [..., 1]; RGB, BGR: three channels [..., 3] in that order."""

    GRAY = "GRAY"
    RGB = "RGB"
    BGR = "BGR"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def of(cls, name: str) -> ColorOrder:
        """The colour order named `name` (a ColorOrder or its name); ValueError otherwise."""
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown colour order {name!r}; expected GRAY, RGB or BGR") from None

    @property
    def channels(self) -> int:
        return 1 if self is ColorOrder.GRAY else 3

    def from_bgr(self, images: np.ndarray) -> np.ndarray:
        """uint8 BGR [..., 3] -> [..., C] in this order (C = 1 for GRAY: OpenCV's BGR2GRAY
        weights). BGR returns `images` itself; the others a new array."""
        if self is ColorOrder.BGR:
            return images
        if self is ColorOrder.RGB:
            return np.ascontiguousarray(images[..., ::-1])
        import cv2

        flat = np.ascontiguousarray(images).reshape(-1, images.shape[-2], 3)  # one tall image
        return cv2.cvtColor(flat, cv2.COLOR_BGR2GRAY).reshape(*images.shape[:-1], 1)

    def to_bgr(self, images: np.ndarray) -> np.ndarray:
        """[..., C] in this order (any dtype) -> BGR [..., 3], GRAY repeated into three channels.
        BGR returns `images` itself; the others a new array."""
        if self is ColorOrder.BGR:
            return images
        if self is ColorOrder.RGB:
            return np.ascontiguousarray(images[..., ::-1])
        return np.repeat(images[..., :1], 3, axis=-1)

    def to_rgb(self, images: np.ndarray) -> np.ndarray:
        """[..., C] in this order (any dtype) -> RGB [..., 3] for matplotlib and Jupyter."""
        if self is ColorOrder.GRAY:
            return np.repeat(images[..., :1], 3, axis=-1)
        return images if self is ColorOrder.RGB else np.ascontiguousarray(images[..., ::-1])

    def to_opencv(self, image: np.ndarray) -> np.ndarray:
        """One uint8 image [H, W, C] in this order -> what OpenCV writes as a PNG: gray [H, W]
        for GRAY (a single-channel file), BGR [H, W, 3] otherwise."""
        return image[..., 0] if self is ColorOrder.GRAY else self.to_bgr(image)

    def from_opencv(self, image: np.ndarray) -> np.ndarray:
        """An image OpenCV read (gray [H, W] or BGR [H, W, 3], uint8) -> [H, W, C] in this order."""
        if image.ndim == 2:
            return image[:, :, None] if self is ColorOrder.GRAY else self.from_bgr(np.repeat(image[:, :, None], 3, 2))
        return self.from_bgr(image)
