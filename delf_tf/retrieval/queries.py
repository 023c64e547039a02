"""Transformed copies of an image (rotated, scaled, cropped, recoloured) to query with.

The demo and the tests query a database with such copies of its own images:
the right answer is known, and RANSAC must recover the transform.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance


def rotated(image: np.ndarray, degrees: float = 20.0) -> np.ndarray:
    """Rotated counter-clockwise about the centre, canvas grown to fit (black corners)."""
    picture = Image.fromarray(image).rotate(
        degrees, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(0, 0, 0)
    )
    return np.asarray(picture)


def scaled(image: np.ndarray, factor: float = 0.7) -> np.ndarray:
    """Resized by `factor` on both sides."""
    height, width = image.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def cropped(image: np.ndarray, keep: float = 0.65) -> np.ndarray:
    """An off-centre window keeping `keep` of each side."""
    height, width = image.shape[:2]
    top, left = round(height * (1 - keep) * 0.3), round(width * (1 - keep) * 0.6)
    return np.ascontiguousarray(
        image[top : top + round(height * keep), left : left + round(width * keep)]
    )


def recoloured(image: np.ndarray) -> np.ndarray:
    """Darker, more saturated and warmer: a change of light, not of geometry."""
    picture = ImageEnhance.Brightness(Image.fromarray(image)).enhance(0.75)
    picture = ImageEnhance.Color(picture).enhance(1.6)
    tinted = np.asarray(picture).astype(np.float32) * np.array([1.1, 1.0, 0.85], np.float32)
    return np.clip(tinted, 0, 255).round().astype(np.uint8)


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rotated": rotated,
    "scaled": scaled,
    "cropped": cropped,
    "recoloured": recoloured,
}
