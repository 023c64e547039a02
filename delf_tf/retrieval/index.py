"""One global index over the features of a whole database of images.

All database descriptors are concatenated into one array (with each row's image
id and keypoint), so a query needs one nearest-neighbour search, not one per
database image. The search structures of the rankings (`delf_tf.retrieval.search`)
are built once by `build_structures` and saved with the arrays.

Layout on disk (a directory, replaced atomically on every save):
  <index>/index.json        format version, extractor fingerprint and description,
                            array shapes and dtypes, and under "structures" the
                            saved search structures (kind, parameters, fingerprint,
                            coverage, measured recall)
  <index>/images.json       per image: key, path, width, height, num_features
  <index>/descriptors.npy   float32 [M, D] unit-norm descriptors
  <index>/keypoints.npy     float32 [M, 2] (x, y) in the database image's pixels
  <index>/image_ids.npy     int32 [M] row -> image id (position in images.json)
  <index>/offsets.npy       int64 [N + 1] rows of image i are offsets[i]:offsets[i + 1]
  <index>/global_descriptors.npy  float32 [N, G], only when every image has one (DELG)
  <index>/neighbors.faiss   the trained k-NN structure of the `votes` ranking when
                            it is IVF-PQ (exact search needs none: it scans
                            descriptors.npy)
  <index>/asmk/             ASMK* codebook and inverted file (`delf_tf.retrieval.asmk`)
  <index>/global.faiss      IVF structure over the global descriptors (large indexes)
The `.npy` files load with `mmap_mode="r"` and FAISS files with IO_FLAG_MMAP, so a
large index is paged in on demand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
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
from delf_tf.matching.neighbors import (
    PERSISTED_BACKENDS,
    FlatNeighbors,
    IvfPqNeighbors,
    IvfPqParameters,
    NeighborIndex,
    build_neighbors,
    choose_backend,
    ivfpq_parameters,
    sampled_recall,
)
from delf_tf.retrieval.asmk import AsmkIndex
from delf_tf.retrieval.global_ranking import IVF_MIN_IMAGES, GlobalRanker

FORMAT_VERSION = 1
HEADER = "index.json"
IMAGES = "images.json"
ARRAYS = {
    "descriptors": np.float32,
    "keypoints": np.float32,
    "image_ids": np.int32,
    "offsets": np.int64,
}
GLOBAL_ARRAY = "global_descriptors"
NEIGHBORS_FILE = "neighbors.faiss"
ASMK_FOLDER = "asmk"
# An IVF-PQ structure is grown without retraining until the index holds this many
# times the descriptors it was trained on; then its cells are too coarse (the
# derived nlist would have doubled twice) and `build_structures` retrains it.
RETRAIN_GROWTH = 4.0
# Recall of an approximate structure is measured for this k (RetrievalConfig.neighbors).
RECALL_K = 10
RECALL_DISTANCE = 0.8


class IndexFormatError(InputError):
    """An index directory is missing, unreadable or inconsistent; the message names it."""


@dataclasses.dataclass
class _Structure:
    """A search structure of the index: its index.json header and, once loaded, the object.

    fresh: the object was built or changed in this process (saved by writing it);
    otherwise its files are copied from `Index.path` on save.
    """

    header: dict[str, Any]
    value: Any = None
    fresh: bool = False


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
    """Descriptors, keypoints and image ids of all database images, plus image records.

    Optional: `global_descriptors` float32 [N, G] (when every image has one) and
    the saved search structures (see `build_structures`; loaded on first use).
    """

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
        global_descriptors: np.ndarray | None = None,
        structures: dict[str, dict[str, Any]] | None = None,
    ):
        self.descriptors = descriptors
        self.keypoints = keypoints
        self.image_ids = image_ids
        self.offsets = offsets
        self.images = images
        self.fingerprint = fingerprint
        self.extractor = extractor or {}
        self.path = path
        self.global_descriptors = global_descriptors
        self._structures = {
            name: _Structure(dict(header)) for name, header in (structures or {}).items()
        }
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
        if self.global_descriptors is not None and (
            self.global_descriptors.ndim != 2 or self.global_descriptors.shape[0] != n
        ):
            problems.append(f"global_descriptors {self.global_descriptors.shape} for {n} images")
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
        Global descriptors are kept when every image (old and new) has one.
        The search structures are carried over, covering the old images only:
        `build_structures` extends them before `save`.
        Raises FingerprintMismatchError when the store's extractor differs, and
        IndexFormatError when the store lacks the global descriptors the index has.
        """
        if store.fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"{store.root}: features of extractor {_short(store.fingerprint)}, but the "
                f"index holds features of extractor {_short(self.fingerprint)}; "
                "an index can only combine features of one model"
            )
        root = Path(images_root).resolve() if images_root is not None else None
        known = set().union(*(record.identities() for record in self.images))
        records, arrays = [], {"descriptors": [], "keypoints": [], "globals": []}
        without_global: str | None = None
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
            if len(features) == 0:  # an empty .delf file does not say its descriptor size
                features = dataclasses.replace(features, descriptors=np.zeros((0, self.dim)))
            if features.dim != self.dim:
                raise IndexFormatError(
                    f"{store.path(key)}: {features.dim}-D descriptors, the index has {self.dim}-D"
                )
            width, height = _image_size(path) if root is not None else (None, None)
            records.append(ImageRecord(key, path, width, height, len(features), identity))
            arrays["descriptors"].append(features.descriptors)
            arrays["keypoints"].append(features.keypoints)
            known |= records[-1].identities()
            if features.global_descriptor is None:
                without_global = without_global or key
            else:
                arrays["globals"].append(features.global_descriptor)
        if skipped:
            logging.info("%d image(s) of %s are in the index already: skipped", skipped, store.root)
        if not records:
            return self, 0
        global_descriptors = self._combined_globals(store, arrays["globals"], without_global)
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
            global_descriptors,
        )
        index._structures = {
            name: dataclasses.replace(structure) for name, structure in self._structures.items()
        }
        return index, len(records)

    def _combined_globals(
        self, store: FeatureStore, new: list[np.ndarray], without: str | None
    ) -> np.ndarray | None:
        """The global descriptors of old + new images, or None when some image lacks one."""
        if self.num_images and self.global_descriptors is None:
            if new:
                logging.info(
                    "%s: global descriptors not indexed (the index's images have none)", store.root
                )
            return None
        if without is not None:
            if self.global_descriptors is not None:
                raise IndexFormatError(
                    f"{store.path(without)}: no global descriptor, but the index at "
                    f"{self.path or 'index'} ranks by global descriptors; append features "
                    "of the same (DELG) model"
                )
            if new:
                logging.warning(
                    "%s: some images have no global descriptor (e.g. %s): global "
                    "descriptors not indexed",
                    store.root,
                    without,
                )
            return None
        stacked = np.stack(new).astype(np.float32)
        if self.global_descriptors is None:
            return stacked
        if stacked.shape[1] != self.global_descriptors.shape[1]:
            raise IndexFormatError(
                f"{store.root}: {stacked.shape[1]}-D global descriptors, the index has "
                f"{self.global_descriptors.shape[1]}-D"
            )
        return np.concatenate([np.asarray(self.global_descriptors), stacked])

    # --- search structures -------------------------------------------------------------

    @property
    def structures(self) -> dict[str, dict[str, Any]]:
        """index.json headers of the search structures: "neighbors", "asmk", "global"."""
        return {name: structure.header for name, structure in self._structures.items()}

    def build_structures(
        self,
        backend: str | None = None,
        asmk: bool | None = None,
        votes: bool | None = None,
        codebook_size: int | None = None,
        recall: bool = True,
        progress: bool = True,
        global_ivf_min_images: int = IVF_MIN_IMAGES,
    ) -> dict[str, Any]:
        """Builds, or extends without retraining, the search structures; returns a report.

        backend: k-NN structure of the votes ranking (RetrievalConfig.backend
          values); None keeps the index's (or "auto" for a new index).
        asmk: True builds ASMK* (extends it if present), False drops it, None
          extends it if present.
        votes: the same for the k-NN structure, except that None builds it for an
          index that has no structures yet.
        codebook_size: ASMK words (None: the present codebook, or a size derived
          from the data); a different size than the present codebook retrains it.
        recall: measure the sampled recall@10 of an approximate k-NN structure
          against exact search (stored in index.json and returned).
        global_ivf_min_images: global descriptors get an IVF structure from this
          many images on (exact ranking below).

        Returns {"neighbors": {...}, "asmk": {...}, "global": {...}, "notes": [...]}:
        per structure what was done ("built", "extended", "retrained", "kept") and
        its header; notes are sentences for the user.
        """
        notes: list[str] = []
        report: dict[str, Any] = {"notes": notes}
        if votes is None:
            votes = "neighbors" in self._structures or not self._structures
        if votes:
            report["neighbors"] = self._build_neighbors(backend, recall, notes)
        else:
            self._structures.pop("neighbors", None)
        if asmk is False:
            self._structures.pop("asmk", None)
        elif asmk or "asmk" in self._structures:
            report["asmk"] = self._build_asmk(codebook_size, progress, notes)
        if self.global_descriptors is not None:
            report["global"] = self._build_global(global_ivf_min_images, notes)
        else:
            self._structures.pop("global", None)
        return report

    def _build_neighbors(self, backend: str | None, recall: bool, notes: list[str]) -> dict:
        current = self._structures.get("neighbors")
        requested = backend or (current.header.get("requested") if current else None) or "auto"
        count = self.num_descriptors
        kind = choose_backend(count) if requested == "auto" else requested
        header: dict[str, Any] = {
            "backend": kind,
            "requested": requested,
            "fingerprint": self.fingerprint,
            "num_descriptors": count,
        }
        if kind not in PERSISTED_BACKENDS:
            # Exact back ends: flat scans descriptors.npy; kdtree/brute are built on load.
            self._structures["neighbors"] = _Structure(header, None, fresh=True)
            return {"action": "built" if current is None else "kept", **header}
        action, structure = None, None
        if current is not None and current.header.get("backend") == kind:
            trained_on = int(current.header.get("trained_on_descriptors", 0))
            if count == current.header.get("num_descriptors"):
                action = "kept"
            elif count <= RETRAIN_GROWTH * trained_on:
                structure = self._writable_neighbors(current)
                added = structure.add(self.descriptors)
                action = "extended"
                notes.append(
                    f"added {added} descriptors to the trained {kind} structure (no retraining)"
                )
            else:
                notes.append(
                    f"retraining the {kind} structure: the index grew from {trained_on} to "
                    f"{count} descriptors (more than {RETRAIN_GROWTH:g}x)"
                )
        elif current is not None and current.header.get("backend") in PERSISTED_BACKENDS:
            notes.append(
                f"retraining: the k-NN structure changes from {current.header.get('backend')} "
                f"to {kind}"
            )
        if action == "kept":
            return {"action": "kept", **current.header}
        if structure is None:
            start = time.perf_counter()
            quantizer = "hnsw" if kind == "ivfpq-hnsw" else "flat"
            parameters = ivfpq_parameters(count, self.dim, quantizer)
            structure = IvfPqNeighbors.train(self.descriptors, parameters)
            header["trained_on_descriptors"] = count
            header["train_seconds"] = round(time.perf_counter() - start, 1)
            action = "retrained" if current is not None else "built"
            notes.append(
                f"trained {kind} (nlist {parameters.nlist}, {parameters.subquantizers}-byte "
                f"codes, nprobe {parameters.nprobe}) on {parameters.train_size} of {count} "
                f"descriptors in {header['train_seconds']} s"
            )
        else:
            header["trained_on_descriptors"] = current.header["trained_on_descriptors"]
        header["file"] = NEIGHBORS_FILE
        header["parameters"] = structure.parameters.to_dict()
        header["bytes_per_descriptor"] = round(structure.memory_bytes() / max(count, 1), 1)
        if recall:
            measured = sampled_recall(structure, self.descriptors, RECALL_K, RECALL_DISTANCE)
            header["recall"] = measured
            notes.append(
                f"{kind}: sampled recall@{RECALL_K} against exact search "
                f"{measured['recall_at_k']:.3f} ({measured['samples']} database descriptors "
                f"as queries, neighbours within L2 {RECALL_DISTANCE})"
            )
        self._structures["neighbors"] = _Structure(header, structure, fresh=True)
        return {"action": action, **header}

    def _writable_neighbors(self, current: _Structure) -> IvfPqNeighbors:
        if current.fresh and current.value is not None:
            return current.value
        parameters = IvfPqParameters.from_dict(current.header["parameters"])
        file = self._source(current.header["file"])
        index = _read_faiss(file, writable=True)
        return IvfPqNeighbors(index, self.descriptors, parameters)

    def _build_asmk(self, codebook_size: int | None, progress: bool, notes: list[str]) -> dict:
        current = self._structures.get("asmk")
        existing = current.header.get("parameters", {}).get("codebook_size") if current else None
        header: dict[str, Any] = {"fingerprint": self.fingerprint, "folder": ASMK_FOLDER}
        if current is not None and codebook_size in (None, existing):
            if current.header.get("num_images") == self.num_images:
                return {"action": "kept", **current.header}
            structure = current.value if current.fresh else self._read_asmk(current, mmap=False)
            before = structure.num_images
            structure = structure.extended(self.descriptors, self.offsets, progress=progress)
            action = "extended"
            notes.append(
                f"ASMK: indexed {self.num_images - before} more images with the existing "
                f"{existing}-word codebook (no retraining)"
            )
        else:
            if current is not None:
                notes.append(f"ASMK: retraining the codebook ({existing} -> {codebook_size} words)")
            start = time.perf_counter()
            structure = AsmkIndex.build(
                self.descriptors, np.asarray(self.offsets), codebook_size, progress=progress
            )
            header["build_seconds"] = round(time.perf_counter() - start, 1)
            action = "retrained" if current is not None else "built"
            notes.append(
                f"ASMK: {structure.codebook_size}-word codebook, "
                f"{structure.num_entries / max(self.num_images, 1):.0f} words per image, "
                f"{structure.memory_bytes() / max(self.num_images, 1):.0f} bytes per image "
                f"(built in {header['build_seconds']} s)"
            )
        header["parameters"] = structure.parameters.to_dict()
        header["num_images"] = structure.num_images
        header["bytes_per_image"] = round(structure.memory_bytes() / max(self.num_images, 1), 1)
        self._structures["asmk"] = _Structure(header, structure, fresh=True)
        return {"action": action, **header}

    def _build_global(self, min_ivf_images: int, notes: list[str]) -> dict:
        current = self._structures.get("global")
        header: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "num_images": self.num_images,
            "dim": int(self.global_descriptors.shape[1]),
        }
        if self.num_images < min_ivf_images:
            ranker, action = GlobalRanker(self.global_descriptors), "built"
        elif current is not None and current.header.get("kind") == "ivf":
            ranker = self.global_ranker(mmap=False)
            added = ranker.add(self.global_descriptors)
            action = "extended"
            notes.append(f"global IVF: added {added} images (no retraining)")
        else:
            ranker, action = GlobalRanker.build(self.global_descriptors, min_ivf_images), "built"
            notes.append(f"global IVF: trained {ranker.parameters.nlist} cells")
        header["kind"] = ranker.kind
        if ranker.parameters is not None:
            header["parameters"] = ranker.parameters.to_dict()
        self._structures["global"] = _Structure(header, ranker, fresh=True)
        return {"action": action, **header}

    # --- loaded structures ---------------------------------------------------------------

    def neighbors(self, mmap: bool = True) -> NeighborIndex | None:
        """The saved k-NN structure of the votes ranking (loaded once), or None if there is none.

        IVF-PQ is read with FAISS IO_FLAG_MMAP | IO_FLAG_READ_ONLY; "flat" scans the
        (memory-mapped) descriptors; "kdtree"/"brute" are built here (they cannot
        be saved without pickle).
        """
        structure = self._structures.get("neighbors")
        if structure is None:
            return None
        if structure.value is None:
            header = structure.header
            kind = header["backend"]
            if header.get("num_descriptors") != self.num_descriptors:
                raise IndexFormatError(
                    f"{self.path or 'index'}: the {kind} structure covers "
                    f"{header.get('num_descriptors')} descriptors, the index has "
                    f"{self.num_descriptors}"
                )
            if kind in PERSISTED_BACKENDS:
                file = self._source(header["file"])
                index = _read_faiss(file, writable=not mmap)
                parameters = IvfPqParameters.from_dict(header["parameters"])
                if int(index.ntotal) != self.num_descriptors:
                    raise IndexFormatError(
                        f"{file}: holds {index.ntotal} descriptors, the index has "
                        f"{self.num_descriptors}"
                    )
                structure.value = IvfPqNeighbors(index, self.descriptors, parameters, mmap)
            elif kind == "flat":
                structure.value = FlatNeighbors(self.descriptors)
            else:
                structure.value = build_neighbors(self.descriptors, kind)
        return structure.value

    def asmk(self, mmap: bool = True) -> AsmkIndex | None:
        """The saved ASMK* structure (loaded once, arrays memory-mapped), or None."""
        structure = self._structures.get("asmk")
        if structure is None:
            return None
        if structure.value is None:
            value = self._read_asmk(structure, mmap)
            if value.num_images != self.num_images:
                raise IndexFormatError(
                    f"{self._source(ASMK_FOLDER)}: ASMK covers {value.num_images} images, "
                    f"the index has {self.num_images}"
                )
            structure.value = value
        return structure.value

    def _read_asmk(self, structure: _Structure, mmap: bool) -> AsmkIndex:
        folder = self._source(structure.header.get("folder", ASMK_FOLDER))
        try:
            return AsmkIndex.load(folder, structure.header, mmap=mmap)
        except (ValueError, KeyError, TypeError) as error:
            raise IndexFormatError(f"{folder}: {error}") from error

    def global_ranker(self, mmap: bool = True) -> GlobalRanker | None:
        """Ranking by global descriptors (None when the index has none)."""
        if self.global_descriptors is None:
            return None
        structure = self._structures.get("global")
        if structure is None:
            structure = self._structures["global"] = _Structure(
                {"kind": "flat"}, GlobalRanker(self.global_descriptors)
            )
        if structure.value is None:
            source = self._source(".")
            try:
                structure.value = GlobalRanker.load(
                    source, self.global_descriptors, structure.header, mmap
                )
            except RuntimeError as error:
                raise IndexFormatError(
                    f"{source}: unreadable global structure ({error})"
                ) from error
        return structure.value

    def _source(self, name: str) -> Path:
        if self.path is None:
            raise IndexFormatError(f"index has a {name} structure but no directory to read it from")
        return Path(self.path) / name

    # --- disk ------------------------------------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {name: getattr(self, name) for name in ARRAYS}
        if self.global_descriptors is not None:
            arrays[GLOBAL_ARRAY] = self.global_descriptors
        return arrays

    def header(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "extractor": self.extractor,
            "descriptor_dim": self.dim,
            "num_images": self.num_images,
            "num_descriptors": self.num_descriptors,
            "arrays": {
                name: {
                    "dtype": np.dtype(np.float32 if name == GLOBAL_ARRAY else ARRAYS[name]).name,
                    "shape": list(array.shape),
                }
                for name, array in self._arrays().items()
            },
            "structures": self.structures,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index directory atomically: a crash leaves the previous one loadable.

        Search structures are written with it (or copied from the index's own
        directory when unchanged). A structure that covers fewer images than the
        index (after `add_store`) must be extended first by `build_structures`.
        """
        path = Path(path)
        self._check_structures_cover()
        recover_staged_directory(path)
        with staged_directory(path) as staging:
            for name, array in self._arrays().items():
                dtype = np.float32 if name == GLOBAL_ARRAY else ARRAYS[name]
                _write_array(staging / f"{name}.npy", np.asarray(array, dtype))
            images = [dataclasses.asdict(record) for record in self.images]
            _write_text(staging / IMAGES, json.dumps(images, indent=1) + "\n")
            self._save_structures(staging)
            _write_text(staging / HEADER, json.dumps(self.header(), indent=2) + "\n")
        self.path = path
        for structure in self._structures.values():
            structure.fresh = False
            structure.value = None if _is_mapped(structure.value) else structure.value

    def _check_structures_cover(self) -> None:
        expected = {
            "neighbors": ("num_descriptors", self.num_descriptors),
            "asmk": ("num_images", self.num_images),
            "global": ("num_images", self.num_images),
        }
        for name, structure in self._structures.items():
            field, value = expected[name]
            if structure.header.get(field, value) != value:
                raise ValueError(
                    f"the {name} structure covers {structure.header.get(field)} {field[4:]}, "
                    f"the index has {value}: call build_structures() before save()"
                )

    def _save_structures(self, staging: Path) -> None:
        for name, structure in self._structures.items():
            header = structure.header
            if name == "neighbors" and "file" in header:
                target = staging / header["file"]
                if structure.fresh:
                    structure.value.save(target)
                else:
                    shutil.copyfile(self._source(header["file"]), target)
                _fsync(target)
            elif name == "asmk":
                folder = staging / header.get("folder", ASMK_FOLDER)
                if structure.fresh:
                    header.update(structure.value.save(folder, _write_array))
                else:
                    shutil.copytree(self._source(header.get("folder", ASMK_FOLDER)), folder)
            elif name == "global" and header.get("kind") == "ivf":
                if structure.fresh:
                    header.update(structure.value.save(staging))
                else:
                    shutil.copyfile(self._source(header["file"]), staging / header["file"])
                _fsync(staging / header["file"])

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> Index:
        """Reads an index directory; arrays are memory-mapped unless mmap=False.

        Search structures are read on first use (`neighbors`, `asmk`, `global_ranker`).
        """
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
        if not isinstance(header.get("fingerprint"), str) and header.get("fingerprint") is not None:
            raise IndexFormatError(f"{path / HEADER}: malformed extractor fingerprint")
        names = dict(ARRAYS)
        if GLOBAL_ARRAY in header.get("arrays", {}):
            names[GLOBAL_ARRAY] = np.float32
        arrays = {}
        for name, dtype in names.items():
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
        structures = header.get("structures") or {}
        for name, entry in structures.items():
            if entry.get("fingerprint", header["fingerprint"]) != header["fingerprint"]:
                raise IndexFormatError(
                    f"{path / HEADER}: the {name} structure was built from features of "
                    f"extractor {_short(entry.get('fingerprint'))}, the index holds "
                    f"{_short(header['fingerprint'])}; rebuild it with `delf index`"
                )
        global_descriptors = arrays.pop(GLOBAL_ARRAY, None)
        return cls(
            **arrays,
            images=images,
            fingerprint=header["fingerprint"],
            extractor=header.get("extractor"),
            path=path,
            global_descriptors=global_descriptors,
            structures=structures,
        )

    def check_fingerprint(self, fingerprint: str | None, source: str = "query extractor") -> bool:
        """Raises FingerprintMismatchError if `fingerprint` is not the index's.

        Returns False (and logs a warning) when either fingerprint is None: a back
        end that cannot report one, or an index of reference `.delf` files, cannot
        be checked.
        """
        if self.fingerprint is None:
            logging.warning(
                "%s: an index of files without an extractor fingerprint (reference .delf "
                "files): cannot check that the %s's descriptors match it",
                self.path or "index",
                source,
            )
            return False
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


def _short(fingerprint: str | None) -> str:
    """The first 12 characters of a fingerprint, or "(none)" for files that carry none."""
    return fingerprint[:12] if fingerprint else "(none)"


def _store_dim(store: FeatureStore) -> int:
    dim = store.manifest.get("extractor", {}).get("descriptor_dim")
    if dim is None:
        for key in store.stored_keys():  # the first image with features says it
            features = store.load(key)
            if len(features):
                return features.dim
        raise IndexFormatError(f"{store.root}: no features in the store, nothing to index")
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


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _read_faiss(path: Path, writable: bool) -> Any:
    """A FAISS index file: memory-mapped read-only, or fully read (writable)."""
    import faiss

    flags = 0 if writable else faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as error:
        raise IndexFormatError(f"{path}: unreadable FAISS structure ({error})") from error


def _is_mapped(value: Any) -> bool:
    """Whether a structure object reads its own files (must be reloaded after a save moved them)."""
    return bool(getattr(value, "read_only", False))


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


def read_generation(directory: str | os.PathLike) -> int | None:
    """The generation of the index in `directory`, or None while it is missing (mid-swap).

    Minimal version for the search service's reload (branch `service`): the
    `indexsplit` branch adds an integer "generation" to index.json, incremented by
    every save, and replaces this. Until then, an index.json without one is
    identified by its inode, size and modification time (every save writes a new
    index.json in a new directory, so these change).
    """
    path = Path(directory) / HEADER
    try:
        status = path.stat()
        header = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    generation = header.get("generation") if isinstance(header, dict) else None
    if isinstance(generation, int) and not isinstance(generation, bool):
        return generation
    signature = f"{status.st_ino}:{status.st_size}:{status.st_mtime_ns}".encode()
    return int.from_bytes(hashlib.sha256(signature).digest()[:7], "big")
