"""LocalFeatures as the reference's `.delf` files (keypoints (x, y) <-> locations (y, x))."""

from __future__ import annotations

import os

from delf_tf.features.local_features import LocalFeatures
from delf_tf.formats.delf_file import read_delf, write_delf


def local_features_to_delf(features: LocalFeatures, path: str | os.PathLike) -> None:
    """Writes LocalFeatures as a `.delf` file: keypoints (x, y) -> locations (y, x),
    scores -> attention, orientation 0. The global descriptor is not part of it
    (see `write_global_descriptor`)."""
    write_delf(
        path, features.keypoints[:, ::-1], features.scales, features.descriptors, features.scores
    )


def local_features_from_delf(path: str | os.PathLike) -> LocalFeatures:
    """Reads a `.delf` / `.delg_local` file as LocalFeatures (orientations are dropped)."""
    arrays = read_delf(path)
    return LocalFeatures(
        keypoints=arrays.locations_yx[:, ::-1],
        scales=arrays.scales,
        scores=arrays.attention,
        descriptors=arrays.descriptors,
    )
