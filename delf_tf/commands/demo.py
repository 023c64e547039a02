"""`delf demo`: the main job on an embedded default, offline.

Writes a few photographs that ship with scikit-image into <output>/images and
extracts their features in process with a seeded random DelfModel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import flags
from PIL import Image

from delf_tf.config import ExtractionConfig
from delf_tf.extraction.extractor import build_extractor
from delf_tf.features.extract import extract_to_store

SKIMAGE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string(
        "output", "demo_output", "folder for images, features and pictures", **define
    )
    flags.DEFINE_integer("max_image_size", 512, "long side limit (smaller is faster)", **define)
    flags.DEFINE_integer("seed", 0, "seed of the random weights", **define)


def write_skimage_images(folder: Path) -> list[Path]:
    """Saves the scikit-image sample photographs as PNG files; returns their paths."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SKIMAGE_IMAGES:
        path = folder / f"{name}.png"
        if not path.exists():
            image = getattr(skimage.data, name)()
            if image.ndim == 2:
                image = np.repeat(image[:, :, None], 3, axis=2)
            Image.fromarray(image[:, :, :3]).save(path)
        paths.append(path)
    return paths


def run(flag_values: flags.FlagValues) -> int:
    output = Path(flag_values.output)
    write_skimage_images(output / "images")
    print(
        "delf demo: weights are UNTRAINED (random, seed "
        f"{flag_values.seed}); score_threshold=0 keeps the top-K of an untrained "
        "attention head. The numbers show the pipeline works, not retrieval quality."
    )
    config = ExtractionConfig(score_threshold=0.0, max_image_size=flag_values.max_image_size)
    extractor = build_extractor(weights="random", seed=flag_values.seed, config=config)
    store, summary = extract_to_store(extractor, output / "images", output / "features")
    for key in store.stored_keys():
        features = store.load(key)
        print(f"  {key:<16} {len(features):5d} features  descriptors {features.descriptors.shape}")
    print(json.dumps({"features": str(store.root), **summary.to_dict()}))
    return 0
