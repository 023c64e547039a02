"""A synthetic landmark task the CPU can learn: one pattern per class on random clutter.

Each class is a distinct striped pattern (its own colours, orientation and
period); every image pastes its class's pattern at a random place on clutter
(random rectangles and noise). Knowing where the pattern is (`boxes`) lets a
test measure whether attention concentrates on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

BOXES_FILE = "boxes.json"
_PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [0, 130, 200],
        [255, 225, 25],
        [145, 30, 180],
        [70, 240, 240],
        [245, 130, 48],
        [240, 50, 230],
    ],
    dtype=np.float32,
)


def class_pattern(label: int, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: stripes in two palette colours, orientation and period per class."""
    first, second = _PALETTE[label % len(_PALETTE)], _PALETTE[(label + 3) % len(_PALETTE)]
    angle = np.pi * (label % 4) / 4.0
    period = 6.0 + 2.0 * (label // 4)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = (x * np.cos(angle) + y * np.sin(angle)) / period
    mask = (np.floor(phase) % 2 == 0)[:, :, None]
    return np.where(mask, first, second).astype(np.uint8)


def clutter(rng: np.random.Generator, size: int, rectangles: int = 12) -> np.ndarray:
    """uint8 [size, size, 3]: random muted rectangles over noise."""
    image = rng.uniform(40, 160, (size, size, 3)).astype(np.float32)
    for _ in range(rectangles):
        y0, x0 = rng.integers(0, size, 2)
        h, w = rng.integers(size // 8, size // 2, 2)
        image[y0 : y0 + h, x0 : x0 + w] = rng.uniform(30, 200, 3)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_image(
    rng: np.random.Generator, label: int, size: int, pattern_size: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(uint8 [size, size, 3], box (y0, x0, y1, x1)) with the class pattern pasted at random."""
    image = clutter(rng, size)
    y0, x0 = (int(v) for v in rng.integers(0, size - pattern_size + 1, 2))
    image[y0 : y0 + pattern_size, x0 : x0 + pattern_size] = class_pattern(label, pattern_size)
    return image, (y0, x0, y0 + pattern_size, x0 + pattern_size)


def write_pattern_dataset(
    root: str | os.PathLike,
    num_classes: int,
    images_per_class: int,
    size: int = 64,
    pattern_size: int = 24,
    seed: int = 0,
) -> dict[str, list[int]]:
    """Writes root/class_<k>/<i>.png and root/../<root name>_boxes.json; returns path -> box.

    The box file sits beside (not inside) the folder, so the folder stays a
    plain one-subfolder-per-class image folder.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    boxes = {}
    for label in range(num_classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(images_per_class):
            image, box = make_image(rng, label, size, pattern_size)
            path = folder / f"{index:04d}.png"
            Image.fromarray(image).save(path)
            boxes[str(path)] = list(box)
    (root.parent / f"{root.name}_{BOXES_FILE}").write_text(json.dumps(boxes))
    return boxes
