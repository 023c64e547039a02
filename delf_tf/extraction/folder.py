"""Extraction at folder scale: resumable, atomic, bad files reported and skipped."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from absl import logging
from tqdm import tqdm

from delf_tf.extraction.extractor import Extractor
from delf_tf.features.store import FeatureStore
from delf_tf.images import ImageError, list_images, load_image


@dataclasses.dataclass
class ExtractionSummary:
    """What one `extract_to_store` run did."""

    images: int = 0
    extracted: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    features: int = 0
    seconds: float = 0.0

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.extracted if self.extracted else 0.0

    @property
    def mean_features(self) -> float:
        return self.features / self.extracted if self.extracted else 0.0

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "extracted": self.extracted,
            "skipped_existing": self.skipped_existing,
            "failed": len(self.failed),
            "mean_features": round(self.mean_features, 1),
            "seconds_per_image": round(self.seconds_per_image, 3),
        }


def image_key(path: Path, root: Path) -> str:
    """Store key of an image: its path relative to the image root (posix), or its name."""
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def extract_to_store(
    extractor: Extractor,
    images: str | os.PathLike,
    output: str | os.PathLike,
    progress: bool = True,
    formats: tuple[str, ...] | None = None,
) -> tuple[FeatureStore, ExtractionSummary]:
    """Extracts every image under `images` (a file or a folder, recursive) into `output`.

    Images whose features are already in the store are skipped, so an interrupted
    run resumes where it stopped. Unreadable images are logged and listed in the
    summary; the run goes on. `formats`: the store's file formats (see
    FeatureStore; None: npz, or what an existing store records).
    """
    root = Path(images)
    paths = list_images(root)
    store = FeatureStore.open_or_create(
        output, extractor.fingerprint or "", extractor.describe(), formats=formats
    )
    summary = ExtractionSummary(images=len(paths))
    for path in tqdm(paths, desc="extract", unit="img", disable=not progress):
        key = image_key(path, root)
        if key in store:
            summary.skipped_existing += 1
            continue
        try:
            image = load_image(path)
        except ImageError as error:
            logging.warning("skipped: %s", error)
            summary.failed.append((str(path), str(error)))
            continue
        start = time.perf_counter()
        features = extractor.extract(image)
        summary.seconds += time.perf_counter() - start
        store.save(key, features)
        summary.extracted += 1
        summary.features += len(features)
    return store, summary
