"""Pictures of matches with Pillow: two images side by side, lines between inliers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

INLIER_COLORS = ((0, 255, 255), (255, 255, 0), (0, 255, 0), (255, 128, 0), (255, 0, 255))
OUTLIER_COLOR = (255, 60, 60)
BACKGROUND = (255, 255, 255)


def draw_matches(
    image1: np.ndarray,
    image2: np.ndarray,
    points1: np.ndarray,
    points2: np.ndarray,
    inliers: np.ndarray | None = None,
    height: int = 360,
    caption: str | None = None,
    show_outliers: bool = False,
) -> Image.Image:
    """image1 | image2 side by side at `height` px, a line per (inlier) match.

    Args:
      image1, image2: uint8 [H, W, 3] RGB.
      points1, points2: [N, 2] (x, y) matched keypoints in each image's pixels.
      inliers: bool [N]; lines are drawn for inliers (all matches when None).
      caption: text written in the top-left corner.
      show_outliers: also mark the outliers' keypoints (small red dots).
    """
    points1 = np.asarray(points1, np.float64).reshape(-1, 2)
    points2 = np.asarray(points2, np.float64).reshape(-1, 2)
    inliers = np.ones(len(points1), bool) if inliers is None else np.asarray(inliers, bool)
    left, scale1 = _resize(image1, height)
    right, scale2 = _resize(image2, height)
    gap = 8
    canvas = Image.new("RGB", (left.width + gap + right.width, height), BACKGROUND)
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    draw = ImageDraw.Draw(canvas)
    offset = left.width + gap
    if show_outliers:
        for (x1, y1), (x2, y2) in zip(points1[~inliers], points2[~inliers], strict=True):
            _dot(draw, x1 * scale1, y1 * scale1, OUTLIER_COLOR, 1)
            _dot(draw, offset + x2 * scale2, y2 * scale2, OUTLIER_COLOR, 1)
    for i, ((x1, y1), (x2, y2)) in enumerate(zip(points1[inliers], points2[inliers], strict=True)):
        color = INLIER_COLORS[i % len(INLIER_COLORS)]
        start, end = (x1 * scale1, y1 * scale1), (offset + x2 * scale2, y2 * scale2)
        draw.line([start, end], fill=color, width=1)
        _dot(draw, *start, color, 2)
        _dot(draw, *end, color, 2)
    if caption:
        box = draw.textbbox((4, 4), caption)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((4, 4), caption, fill=(255, 255, 255))
    return canvas


def stack_vertically(pictures: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Pictures one under the other, left-aligned, on a white background."""
    if not pictures:
        raise ValueError("no pictures to stack")
    width = max(p.width for p in pictures)
    height = sum(p.height for p in pictures) + gap * (len(pictures) - 1)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    top = 0
    for picture in pictures:
        canvas.paste(picture, (0, top))
        top += picture.height + gap
    return canvas


def save_picture(picture: Image.Image, path: str | os.PathLike) -> None:
    """Saves a PNG (format from the suffix), creating the folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


def _resize(image: np.ndarray, height: int) -> tuple[Image.Image, float]:
    picture = Image.fromarray(np.asarray(image, np.uint8))
    scale = height / picture.height
    width = max(1, round(picture.width * scale))
    return picture.resize((width, height), Image.Resampling.BILINEAR), scale


def _dot(draw: ImageDraw.ImageDraw, x: float, y: float, color, radius: float) -> None:
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=color, fill=color)
