"""One global index over the features of a whole database of images.

All database descriptors are concatenated into one array (with each row's image
id and keypoint), so a query needs one nearest-neighbour search, not one per
database image.

Layout on disk (a directory, replaced atomically on every save):
  <index>/index.json        format version, extractor fingerprint and description,
                            array shapes and dtypes
  <index>/images.json       per image: key, path, width, height, num_features
  <index>/descriptors.npy   float32 [M, D] unit-norm descriptors
  <index>/keypoints.npy     float32 [M, 2] (x, y) in the database image's pixels
  <index>/image_ids.npy     int32 [M] row -> image id (position in images.json)
  <index>/offsets.npy       int64 [N + 1] rows of image i are offsets[i]:offsets[i + 1]
The `.npy` files load with `mmap_mode="r"`, so a large index is paged in on demand.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from delf_tf.atomic import recover_staged_directory, staged_directory
from delf_tf.errors import FingerprintMismatchError, InputError
from delf_tf.features.store import FeatureStore
from delf_tf.images import TRANSPOSED_ORIENTATIONS, exif_orientation

FORMAT_VERSION = 1
HEADER = "index.json"
IMAGES = "images.json"
ARRAYS = {
    "descriptors": np.float32,
    "keypoints": np.float32,
    "image_ids": np.int32,
    "offsets": np.int64,
}
# EXIF orientations that swap width and height (see delf_tf.images.load_image).


class IndexFormatError(InputError):
    """An index directory is missing, unreadable or inconsistent; the message names it."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One database image.

    Attributes:
      key: feature-store key (the image path relative to the extracted folder).
      path: the image file (absolute when the image folder was given, else the key).
      width, height: image size in pixels (EXIF orientation applied), None if unknown.
      num_features: rows of this image in the index arrays.
      store: identity of the feature store it came from (`FeatureStore.identity`);
        None in indexes written before it was recorded.
    """

    key: str
    path: str
    width: int | None
    height: int | None
    num_features: int
    store: str | None = None

    def identities(self) -> set[tuple[str, ...]]:
        """What makes two records the same image: the same key of the same store, or
        the same absolute image path (both recorded with --images); for older records
        without a store, the recorded path (which is the key without --images)."""
        found = {("store", self.store, self.key)} if self.store else {("key", self.path)}
        if os.path.isabs(self.path):
            found.add(("path", self.path))
        return found


class Index:
    """Descriptors, keypoints and image ids of all database images, plus image records."""

    def __init__(
        self,
        descriptors: np.ndarray,
        keypoints: np.ndarray,
        image_ids: np.ndarray,
        offsets: np.ndarray,
        images: list[ImageRecord],
        fingerprint: str,
        extractor: dict[str, Any] | None = None,
        path: Path | None = None,
    ):
        self.descriptors = descriptors
        self.keypoints = keypoints
        self.image_ids = image_ids
        self.offsets = offsets
        self.images = images
        self.fingerprint = fingerprint
        self.extractor = extractor or {}
        self.path = path
        self._validate(str(path or "index"))

    # --- shape ---------------------------------------------------------------------

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_descriptors(self) -> int:
        return int(self.descriptors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])

    def image_rows(self, image_id: int) -> slice:
        return slice(int(self.offsets[image_id]), int(self.offsets[image_id + 1]))

    def image_keypoints(self, image_id: int) -> np.ndarray:
        """float32 [n, 2] keypoints of one database image."""
        return np.asarray(self.keypoints[self.image_rows(image_id)])

    def image_descriptors(self, image_id: int) -> np.ndarray:
        """float32 [n, D] descriptors of one database image."""
        return np.asarray(self.descriptors[self.image_rows(image_id)])

    def _validate(self, source: str) -> None:
        m = self.descriptors.shape[0] if self.descriptors.ndim == 2 else -1
        n = len(self.images)
        problems = []
        if self.keypoints.shape != (m, 2):
            problems.append(f"keypoints {self.keypoints.shape} for {m} descriptors")
        if self.image_ids.shape != (m,):
            problems.append(f"image_ids {self.image_ids.shape} for {m} descriptors")
        counts = np.array([record.num_features for record in self.images], np.int64)
        if self.offsets.shape != (n + 1,) or int(self.offsets[0]) != 0:
            problems.append(f"offsets {self.offsets.shape} for {n} images")
        elif not np.array_equal(np.diff(self.offsets), counts) or int(self.offsets[-1]) != m:
            problems.append("offsets disagree with the images' num_features")
        if problems:
            raise IndexFormatError(f"{source}: inconsistent index: " + "; ".join(problems))

    # --- building --------------------------------------------------------------------

    @classmethod
    def empty(cls, fingerprint: str, dim: int, extractor: dict[str, Any] | None = None) -> Index:
        return cls(
            np.zeros((0, dim), np.float32),
            np.zeros((0, 2), np.float32),
            np.zeros((0,), np.int32),
            np.zeros((1,), np.int64),
            [],
            fingerprint,
            extractor,
        )

    @classmethod
    def from_store(
        cls,
        store: FeatureStore,
        images_root: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> Index:
        """An index of every image in `store` (see `add_store` for `images_root`)."""
        dim = _store_dim(store)
        index = cls.empty(store.fingerprint, dim, store.manifest.get("extractor"))
        return index.add_store(store, images_root, progress)[0]

    def add_store(
        self,
        store: FeatureStore,
        images_root: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> tuple[Index, int]:
        """A new index with the images of `store` that this one lacks; (index, added).

        images_root: the folder the store was extracted from; image paths and sizes
          are recorded from it (without it, paths are the store keys and sizes unknown).
        Raises FingerprintMismatchError when the store's extractor differs.
        """
        if store.fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"{store.root}: features of extractor {store.fingerprint[:12]}, but the "
                f"index holds features of extractor {self.fingerprint[:12]}; "
                "an index can only combine features of one model"
            )
        root = Path(images_root).resolve() if images_root is not None else None
        known = set().union(*(record.identities() for record in self.images))
        records, arrays = [], {"descriptors": [], "keypoints": []}
        skipped = 0
        identity = store.identity
        for key in tqdm(list(store.stored_keys()), desc="index", unit="img", disable=not progress):
            path = str(root / key) if root is not None else key
            record_ids = {("store", identity, key), ("key", key)} | (
                {("path", path)} if root is not None else set()
            )
            if record_ids & known:
                skipped += 1
                continue
            features = store.load(key)
            if features.dim != self.dim:
                raise IndexFormatError(
                    f"{store.path(key)}: {features.dim}-D descriptors, the index has {self.dim}-D"
                )
            width, height = _image_size(path) if root is not None else (None, None)
            records.append(ImageRecord(key, path, width, height, len(features), identity))
            arrays["descriptors"].append(features.descriptors)
            arrays["keypoints"].append(features.keypoints)
            known |= records[-1].identities()
        if skipped:
            logging.info("%d image(s) of %s are in the index already: skipped", skipped, store.root)
        if not records:
            return self, 0
        counts = np.array([r.num_features for r in records], np.int64)
        first_id = self.num_images
        new_ids = np.repeat(np.arange(first_id, first_id + len(records), dtype=np.int32), counts)
        index = Index(
            np.concatenate([np.asarray(self.descriptors), *arrays["descriptors"]]),
            np.concatenate([np.asarray(self.keypoints), *arrays["keypoints"]]),
            np.concatenate([np.asarray(self.image_ids), new_ids]),
            np.concatenate([np.asarray(self.offsets), self.offsets[-1] + np.cumsum(counts)]),
            self.images + records,
            self.fingerprint,
            self.extractor,
            self.path,
        )
        return index, len(records)

    # --- disk ------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "extractor": self.extractor,
            "descriptor_dim": self.dim,
            "num_images": self.num_images,
            "num_descriptors": self.num_descriptors,
            "arrays": {
                name: {"dtype": np.dtype(dtype).name, "shape": list(getattr(self, name).shape)}
                for name, dtype in ARRAYS.items()
            },
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index directory atomically: a crash leaves the previous one loadable."""
        path = Path(path)
        recover_staged_directory(path)
        with staged_directory(path) as staging:
            for name, dtype in ARRAYS.items():
                _write_array(staging / f"{name}.npy", np.asarray(getattr(self, name), dtype))
            images = [dataclasses.asdict(record) for record in self.images]
            _write_text(staging / IMAGES, json.dumps(images, indent=1) + "\n")
            _write_text(staging / HEADER, json.dumps(self.header(), indent=2) + "\n")
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> Index:
        """Reads an index directory; arrays are memory-mapped unless mmap=False."""
        path = Path(path)
        recover_staged_directory(path)
        header = _read_json(path / HEADER, f"{path}: not an index (no {HEADER})")
        if not isinstance(header, dict):
            raise IndexFormatError(f"{path / HEADER}: expected a JSON object")
        if header.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(
                f"{path / HEADER}: format_version {header.get('format_version')!r}, "
                f"this version of delf-tf reads {FORMAT_VERSION}"
            )
        if not isinstance(header.get("fingerprint"), str):
            raise IndexFormatError(f"{path / HEADER}: no extractor fingerprint")
        arrays = {}
        for name, dtype in ARRAYS.items():
            file = path / f"{name}.npy"
            try:
                array = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (OSError, ValueError) as error:
                raise IndexFormatError(f"{file}: unreadable index array ({error})") from error
            expected = header.get("arrays", {}).get(name, {})
            if array.dtype != dtype or list(array.shape) != expected.get("shape"):
                raise IndexFormatError(
                    f"{file}: {array.dtype} {list(array.shape)}, {HEADER} says "
                    f"{expected.get('dtype')} {expected.get('shape')}"
                )
            arrays[name] = array
        records = _read_json(path / IMAGES, f"{path}: incomplete index (no {IMAGES})")
        try:
            images = [ImageRecord(**record) for record in records]
        except TypeError as error:
            raise IndexFormatError(f"{path / IMAGES}: malformed image record ({error})") from error
        return cls(
            **arrays,
            images=images,
            fingerprint=header["fingerprint"],
            extractor=header.get("extractor"),
            path=path,
        )

    def check_fingerprint(self, fingerprint: str | None, source: str = "query extractor") -> bool:
        """Raises FingerprintMismatchError if `fingerprint` is not the index's.

        Returns False (and logs a warning) when `fingerprint` is None: a back end
        that cannot report one cannot be checked.
        """
        if fingerprint is None:
            logging.warning(
                "%s reports no fingerprint: cannot check that its descriptors match "
                "the index's (extractor %s)",
                source,
                self.fingerprint[:12],
            )
            return False
        if fingerprint != self.fingerprint:
            model = self.extractor.get("model", "unknown model")
            raise FingerprintMismatchError(
                f"{self.path or 'index'}: built from features of extractor "
                f"{self.fingerprint[:12]} ({model}), but the {source} is "
                f"{fingerprint[:12]}; pass the --model/--weights/--seed/--pca "
                "that `delf extract` used for the index"
            )
        return True


def _store_dim(store: FeatureStore) -> int:
    dim = store.manifest.get("extractor", {}).get("descriptor_dim")
    if dim is None:
        first = next(store.stored_keys(), None)
        if first is None:
            raise IndexFormatError(f"{store.root}: empty feature store, nothing to index")
        dim = store.load(first).dim
    return int(dim)


def _image_size(path: str) -> tuple[int | None, int | None]:
    """(width, height) from the file header, EXIF orientation applied; (None, None) if unreadable."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if exif_orientation(image) in TRANSPOSED_ORIENTATIONS:
                width, height = height, width
            return width, height
    except (OSError, ValueError) as error:
        logging.warning("%s: size unknown (%s)", path, error)
        return None, None


def _write_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _read_json(path: Path, missing_message: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise IndexFormatError(missing_message) from error
    except (OSError, json.JSONDecodeError) as error:
        raise IndexFormatError(f"{path}: unreadable ({error})") from error
