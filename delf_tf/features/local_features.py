"""LocalFeatures: the output of every extractor, and its `.npz` form on disk."""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

FIELDS = ("keypoints", "scales", "scores", "descriptors")


class FeatureFileError(ValueError):
    """A feature file is missing, unreadable or malformed; the message names it."""


@dataclasses.dataclass(frozen=True)
class LocalFeatures:
    """Local features of one image, sorted by decreasing score.

    Attributes:
      keypoints: float32 [N, 2] (x, y) receptive-field centres in original-image pixels.
      scales: float32 [N] 1 / (pyramid scale), relative to the original image.
      scores: float32 [N] attention scores.
      descriptors: float32 [N, D], unit L2 norm.
    """

    keypoints: np.ndarray
    scales: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray

    def __post_init__(self) -> None:
        for name in FIELDS:
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float32))
        n = self.keypoints.shape[0] if self.keypoints.ndim == 2 else -1
        if (
            self.keypoints.shape != (n, 2)
            or self.scales.shape != (n,)
            or self.scores.shape != (n,)
            or self.descriptors.ndim != 2
            or self.descriptors.shape[0] != n
        ):
            raise ValueError(
                "inconsistent LocalFeatures shapes: "
                + ", ".join(f"{name} {getattr(self, name).shape}" for name in FIELDS)
            )

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])

    @classmethod
    def empty(cls, dim: int) -> LocalFeatures:
        return cls(np.zeros((0, 2)), np.zeros((0,)), np.zeros((0,)), np.zeros((0, dim)))

    def save(self, target: str | os.PathLike | BinaryIO) -> None:
        """Writes an uncompressed `.npz` (no pickled objects) to a path or binary file."""
        arrays = {name: getattr(self, name) for name in FIELDS}
        if hasattr(target, "write"):
            np.savez(target, **arrays)
            return
        with open(target, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LocalFeatures:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [name for name in FIELDS if name not in data.files]
                if missing:
                    raise FeatureFileError(f"{path}: missing array(s) {missing}")
                arrays = {name: data[name] for name in FIELDS}
        except FeatureFileError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise FeatureFileError(f"{path}: not a readable feature file ({error})") from error
        try:
            return cls(**arrays)
        except ValueError as error:
            raise FeatureFileError(f"{path}: {error}") from error
