"""Precision-recall curves drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from delf_tf.atomic import atomic_write

WIDTH, HEIGHT = 640, 480
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 60, 20, 40, 50
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def draw_pr_curves(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str = ""
) -> Image.Image:
    """An RGB image of precision-recall curves.

    Args:
      curves: (label, recall [R] in [0, 1], precision [R] in [0, 1]) per curve.
      title: drawn above the axes.
    """
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top = MARGIN_LEFT, MARGIN_TOP
    right, bottom = WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return left + x * (right - left), bottom - y * (bottom - top)

    for tick in np.linspace(0.0, 1.0, 6):
        x, y = to_pixel(tick, tick)
        draw.line([(x, top), (x, bottom)], fill=(225, 225, 225))
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((x - 8, bottom + 6), f"{tick:.1f}", fill="black", font=font)
        draw.text((left - 28, y - 6), f"{tick:.1f}", fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2 - 15, bottom + 24), "recall", fill="black", font=font)
    draw.text((6, top - 22), "precision", fill="black", font=font)
    if title:
        draw.text((left, 10), title, fill="black", font=font)
    for number, (label, recall, precision) in enumerate(curves):
        color = COLORS[number % len(COLORS)]
        points = [to_pixel(float(r), float(p)) for r, p in zip(recall, precision, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        legend_y = top + 10 + 16 * number
        draw.line([(right - 170, legend_y + 6), (right - 150, legend_y + 6)], fill=color, width=3)
        draw.text((right - 145, legend_y), label, fill="black", font=font)
    return image


def pr_curves_picture(result) -> Image.Image:
    """The mean precision-recall curve of each setup of an EvaluationResult, as a picture."""
    curves = []
    for setup in result.setups:
        recall, precision = result.pr_curve(setup)
        summary = result.summary(setup)
        label = f"{setup}: mAP {summary['mAP']:.3f}" if summary["queries_evaluated"] else setup
        curves.append((label, recall, precision))
    return draw_pr_curves(curves, title=f"{result.dataset}: mean interpolated precision-recall")


def write_pr_curves_png(result, path: str | os.PathLike) -> Path:
    """Draws the mean precision-recall curve of each setup of an EvaluationResult to a PNG."""
    image = pr_curves_picture(result)

    def write(handle) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        handle.write(buffer.getvalue())

    atomic_write(path, write)
    return Path(path)
