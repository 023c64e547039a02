"""LocalFeatures: the output of every extractor, and its `.npz` form on disk."""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from delf_tf.errors import InputError

FIELDS = ("keypoints", "scales", "scores", "descriptors")
GLOBAL_FIELD = "global_descriptor"


class FeatureFileError(InputError):
    """A feature file is missing, unreadable or malformed; the message names it."""


@dataclasses.dataclass(frozen=True)
class LocalFeatures:
    """Local features of one image, sorted by decreasing score.

    Attributes:
      keypoints: float32 [N, 2] (x, y) receptive-field centres in original-image pixels.
      scales: float32 [N] 1 / (pyramid scale) of each feature's level.
      scores: float32 [N] attention scores.
      descriptors: float32 [N, D], unit L2 norm.
      global_descriptor: float32 [G], unit L2 norm, or None: the image's global
        descriptor when the model has a global head (DELG).
    """

    keypoints: np.ndarray
    scales: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray
    global_descriptor: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in FIELDS:
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float32))
        if self.global_descriptor is not None:
            value = np.asarray(self.global_descriptor, dtype=np.float32)
            if value.ndim != 1:
                raise ValueError(f"global_descriptor must be [G], got shape {value.shape}")
            object.__setattr__(self, GLOBAL_FIELD, value)
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

    def arrays(self) -> dict[str, np.ndarray]:
        """{field: array}: the four local fields, plus global_descriptor when present."""
        arrays = {name: getattr(self, name) for name in FIELDS}
        if self.global_descriptor is not None:
            arrays[GLOBAL_FIELD] = self.global_descriptor
        return arrays

    def save(self, target: str | os.PathLike | BinaryIO) -> None:
        """Writes an uncompressed `.npz` (no pickled objects) to a path or binary file."""
        if hasattr(target, "write"):
            np.savez(target, **self.arrays())
            return
        with open(target, "wb") as handle:
            np.savez(handle, **self.arrays())

    @classmethod
    def load(cls, path: str | os.PathLike | BinaryIO, where: str | None = None) -> LocalFeatures:
        """Reads an `.npz` from a path or a binary file (`where` names it in errors)."""
        source = path if hasattr(path, "read") else Path(path)
        path = where or source
        try:
            with np.load(source, allow_pickle=False) as data:
                missing = [name for name in FIELDS if name not in data.files]
                if missing:
                    raise FeatureFileError(f"{path}: missing array(s) {missing}")
                arrays = {name: data[name] for name in FIELDS}
                if GLOBAL_FIELD in data.files:
                    arrays[GLOBAL_FIELD] = data[GLOBAL_FIELD]
        except FeatureFileError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise FeatureFileError(f"{path}: not a readable feature file ({error})") from error
        try:
            return cls(**arrays)
        except ValueError as error:
            raise FeatureFileError(f"{path}: {error}") from error
