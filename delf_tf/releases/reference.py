"""A released model driven the reference extractor's way: prune + numpy post-processing.

This mirrors `python/examples/extractor.py` of the reference (OFFICIAL_DELF.md,
"Post-processing"), written independently of the project's extraction graph:
the image is resized with Pillow when its long side exceeds max_image_size,
the release is loaded with `tf.saved_model.load(path)` and pruned to its feeds
and fetches, and the outputs are post-processed in numpy (box centres divided by
the resize factors; L2, PCA, L2; global: per-scale L2, sum, L2). It is the
baseline of `bench/releases.py` and the oracle of the release tests.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from PIL import Image

from delf_tf.releases.folder import ReleaseFolder


@dataclasses.dataclass(frozen=True)
class ReferenceSettings:
    """What the reference extractor reads from its DelfConfig.

    pca: anything with mean [D], projection [K, D], variances [K] and whiten (a
    `delf_tf.extraction.pca.PcaParams`), or None.
    """

    scales: tuple[float, ...]
    score_threshold: float
    max_features: int
    max_image_size: int = -1
    min_image_size: int = -1
    global_scale_indices: tuple[int, ...] = ()
    pca: object | None = None
    pca_dim: int = 40

    @classmethod
    def from_config(cls, config, pca: object | None = None) -> ReferenceSettings:
        """The settings of an `ExtractionConfig` (the fields the reference reads)."""
        return cls(
            scales=config.scales,
            score_threshold=config.score_threshold,
            max_features=config.max_features,
            max_image_size=config.max_image_size,
            min_image_size=config.min_image_size,
            global_scale_indices=config.global_scale_indices,
            pca=pca,
            pca_dim=config.pca_dim,
        )


def resize_image(image: np.ndarray, max_size: int, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's ResizeImage: (resized uint8 [h, w, 3], factors float64 [2] (h, w))."""
    height, width = image.shape[:2]
    largest = max(height, width)
    if max_size >= 0 and largest > max_size:
        factor = max_size / largest
    elif min_size >= 0 and largest < min_size:
        factor = min_size / largest
    else:
        return image, np.ones(2)
    new_width, new_height = int(round(width * factor)), int(round(height * factor))
    resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.BILINEAR))
    return resized, np.array([new_height / height, new_width / width])


def _l2(x: np.ndarray, axis: int) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class ReferenceExtractor:
    """Extracts with `prune(feeds, fetches)` of a loaded release and numpy post-processing."""

    def __init__(self, release: ReleaseFolder, settings: ReferenceSettings):
        self.release = release
        self.settings = settings
        loaded = tf.saved_model.load(str(release.model_dir), tags=list(release.tags))
        self._function = loaded.prune(
            [f"{name}:0" for name in release.feeds], [f"{name}:0" for name in release.fetches]
        )
        self._loaded = loaded

    def extract(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [H, W, 3] -> {keypoints [N, 2] (x, y), scales [N], scores [N],
        descriptors [N, D], global_descriptor [G] (DELG)}, as the reference computes them."""
        s = self.settings
        resized, factors = resize_image(image, s.max_image_size, s.min_image_size)
        inputs = [
            tf.constant(resized),
            tf.constant(s.scales, tf.float32),
            tf.constant(s.score_threshold, tf.float32),
            tf.constant(s.max_features, tf.int32),
        ]
        if self.release.kind == "delg":
            indices = s.global_scale_indices or tuple(range(len(s.scales)))
            inputs.append(tf.constant(indices, tf.int32))
        outputs = [value.numpy() for value in self._function(*inputs)]
        boxes, features, scales, scores = outputs[:4]
        locations = (boxes[:, 0:2] + boxes[:, 2:4]) / 2.0 / factors
        descriptors = _l2(features.astype(np.float64), axis=1)
        if s.pca is not None:
            projected = (descriptors - s.pca.mean) @ s.pca.projection[: s.pca_dim].T
            if s.pca.whiten:
                projected = projected / np.sqrt(s.pca.variances[: s.pca_dim])
            descriptors = _l2(projected, axis=1)
        result = {
            "keypoints": locations[:, ::-1].astype(np.float32),
            "scales": scales.astype(np.float32),
            "scores": scores.reshape(-1).astype(np.float32),
            "descriptors": descriptors.astype(np.float32),
        }
        if self.release.kind == "delg":
            per_scale = _l2(outputs[4].astype(np.float64), axis=1)
            result["global_descriptor"] = _l2(per_scale.sum(axis=0), axis=0).astype(np.float32)
        return result
