"""LocalFeatures: the output of every extractor, and its `.npz` form on disk."""

from __future__ import annotations

import dataclasses
import os
import stat
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
    def load(
        cls,
        path: str | os.PathLike | BinaryIO,
        max_features: int | None = None,
        max_dim: int | None = None,
        max_global_dim: int | None = None,
        where: str | None = None,
    ) -> LocalFeatures:
        """Reads a `.npz` of `save` from a path or a seekable binary file (`where` names
        it in errors); FeatureFileError (one line naming the file) for anything else:
        not a regular file (a fifo is never opened), a member that is not a float array,
        shapes that disagree, NaN or infinite values, or more than `max_features` rows /
        `max_dim` columns / `max_global_dim` global dimensions (default
        FALLBACK_MAX_FEATURES / FALLBACK_MAX_DIM). Those bounds are checked on the `.npy`
        headers and the zip members' declared sizes, before any array is inflated: a
        small file that claims gigabytes costs nothing."""
        source = path if hasattr(path, "read") else Path(path)
        path = where or source
        max_features = max_features or FALLBACK_MAX_FEATURES
        max_dim = max_dim or FALLBACK_MAX_DIM
        max_global_dim = max_global_dim or FALLBACK_MAX_DIM
        if isinstance(source, Path):
            try:
                mode = os.stat(source).st_mode
            except OSError as error:
                raise FeatureFileError(f"{path}: cannot read ({error.strerror})") from error
            if not stat.S_ISREG(mode):
                raise FeatureFileError(f"{path}: not a regular file ({_kind(mode)})")
        try:
            with zipfile.ZipFile(source) as archive:
                _check_members(path, archive, max_features, max_dim, max_global_dim)
            if not isinstance(source, Path):
                source.seek(0)
            with np.load(source, allow_pickle=False) as data:
                missing = [name for name in FIELDS if name not in data.files]
                if missing:
                    raise FeatureFileError(f"{path}: missing array(s) {missing}")
                arrays = {name: data[name] for name in FIELDS}
                if GLOBAL_FIELD in data.files:
                    arrays[GLOBAL_FIELD] = data[GLOBAL_FIELD]
        except FeatureFileError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError) as error:
            raise FeatureFileError(f"{path}: not a readable feature file ({error})") from error
        for name, array in arrays.items():
            if array.dtype.kind != "f":
                raise FeatureFileError(f"{path}: {name} is {array.dtype}, expected float32")
            if not np.all(np.isfinite(array)):
                raise FeatureFileError(f"{path}: {name} holds NaN or infinite values")
        try:
            return cls(**arrays)
        except ValueError as error:
            raise FeatureFileError(f"{path}: {error}") from error


# Bounds of a feature file when its store does not record the extractor's settings.
FALLBACK_MAX_FEATURES = 100_000
FALLBACK_MAX_DIM = 4096
_NPY_HEADER_BYTES = 4096  # the longest .npy header read (numpy's own are < 200 bytes)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return f"mode {mode:o}"


def _check_members(
    path: Path, archive: zipfile.ZipFile, max_features: int, max_dim: int, max_global_dim: int
) -> None:
    """Checks every `.npy` member's header (dtype, shape) and declared size against the
    bounds, reading only the first bytes of each member."""
    limits = {  # name -> the largest shape allowed
        "keypoints": (max_features, 2),
        "scales": (max_features,),
        "scores": (max_features,),
        "descriptors": (max_features, max_dim),
        GLOBAL_FIELD: (max_global_dim,),
    }
    for info in archive.infolist():
        name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if name not in limits:
            raise FeatureFileError(f"{path}: unexpected member {info.filename!r}")
        bound = limits[name]
        largest = _NPY_HEADER_BYTES + 8 * int(np.prod(bound))  # float64 at most
        if info.file_size > largest:
            raise FeatureFileError(
                f"{path}: {name} declares {info.file_size} bytes, more than "
                f"{max_features} features x {max_dim} dimensions allow"
            )
        with archive.open(info) as member:
            try:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            except (ValueError, OSError, zipfile.BadZipFile) as error:
                raise FeatureFileError(f"{path}: {name}: not a .npy array ({error})") from error
        if dtype.kind != "f":
            raise FeatureFileError(f"{path}: {name} is {dtype}, expected float32")
        if len(shape) != len(bound) or any(
            size > limit for size, limit in zip(shape, bound, strict=True)
        ):
            raise FeatureFileError(
                f"{path}: {name} has shape {list(shape)}, beyond {list(bound)} "
                "(the store's max_features x descriptor dimension)"
            )
