"""One global index over the features of a whole database of images.

All database descriptors are concatenated into one array (with each row's image
id and keypoint), so a query needs one nearest-neighbour search, not one per
database image. The search structures of the rankings (`delf_tf.retrieval.search`)
are built once by `build_structures` and saved with the arrays; each is one module
of `delf_tf.retrieval.structures` (votes k-NN, ASMK*, global) behind one interface,
so `Index` keeps only the collection's arrays and the directory.

Layout on disk (a directory, replaced atomically on every save):
  <index>/index.json        format version, generation (one more on every save),
                            extractor fingerprint and description, array shapes and
                            dtypes, and under "structures" the saved search
                            structures (kind, parameters, fingerprint, coverage,
                            measured recall, the files they own)
  <index>/images.json       per image: key, path, width, height, num_features
  <index>/descriptors.npy   float32 [M, D] unit-norm descriptors
  <index>/keypoints.npy     float32 [M, 2] (x, y) in the database image's pixels
  <index>/image_ids.npy     int32 [M] row -> image id (position in images.json)
  <index>/offsets.npy       int64 [N + 1] rows of image i are offsets[i]:offsets[i + 1]
  <index>/global_descriptors.npy  float32 [N, G], only when every image has one (DELG)
  <index>/neighbors.faiss   the trained k-NN structure of the `votes` ranking when
                            it is IVF-PQ (exact search needs none: it scans
                            descriptors.npy)
  <index>/neighbors.ivfdata its inverted lists when it is "ivfpq-ondisk" (on disk)
  <index>/asmk/             ASMK* codebook and inverted file (`delf_tf.retrieval.asmk`)
  <index>/global.faiss      IVF structure over the global descriptors (large indexes)
The `.npy` files load with `mmap_mode="r"` and FAISS files with IO_FLAG_MMAP, so a
large index is paged in on demand. A new generation's arrays are streamed into files
(`add_store`, `row_files.py`), never concatenated in memory.

Readers never mix generations: `Index.load` reads index.json, the arrays and
images.json, then checks that the directory still holds the generation it started
with (and reads again when a writer swapped it meanwhile); a structure read later
checks it too (IndexChangedError). `read_generation` tells a poller (hot reload)
which generation the directory holds. index.json is validated field by field
(`index_files.check_header`, and each structure's `check_header`), and every file
it names must stay inside the directory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from delf_tf.atomic import (
    link_or_copy,
    recover_staged_directory,
    scratch_directory,
    staged_directory,
)
from delf_tf.features import fingerprint as fingerprints
from delf_tf.features.store import FeatureStore
from delf_tf.images import TRANSPOSED_ORIENTATIONS, exif_orientation
from delf_tf.matching.neighbors import NeighborIndex
from delf_tf.retrieval.asmk import AsmkIndex
from delf_tf.retrieval.global_ranking import IVF_MIN_IMAGES, GlobalRanker
from delf_tf.retrieval.index_files import (
    ARRAYS,
    FORMAT_VERSION,
    GLOBAL_ARRAY,
    HEADER,
    IMAGES,
    check_header,
    check_image_ids,
    read_generation,
    read_json,
    read_records,
)
from delf_tf.retrieval.row_files import RowWriter
from delf_tf.retrieval.structures import base, class_for, structure_type
from delf_tf.retrieval.structures.base import (
    BuildOptions,
    IndexChangedError,
    IndexFormatError,
    SearchStructure,
)
from delf_tf.retrieval.structures.global_descriptors import GlobalStructure

__all__ = [
    "ARRAYS",
    "FORMAT_VERSION",
    "GLOBAL_ARRAY",
    "HEADER",
    "IMAGES",
    "ImageRecord",
    "Index",
    "IndexChangedError",
    "IndexFormatError",
    "read_generation",
]
# Reads of a directory that a writer keeps replacing, before giving up (IndexChangedError).
LOAD_ATTEMPTS = 20
# Reads of a directory that is absent (a swap between its two renames is waited for by
# `recover_staged_directory`; a second absence means there is no index).
ABSENT_ATTEMPTS = 2


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
        self._structures: dict[str, SearchStructure] = {
            name: structure_type(name, header)(dict(header))
            for name, header in (structures or {}).items()
        }
        # The generation of index.json this was read from or saved as (None: in memory).
        self.generation: int | None = None
        # Arrays `add_store` streamed into files of a scratch folder: name -> (array, file),
        # hard-linked into the directory by `save`.
        self._scratch: Path | None = None
        self._streamed_files: dict[str, tuple[np.ndarray, Path]] = {}
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
        elif n and np.any(np.diff(self.offsets) < 0):
            problems.append("offsets fall")
        elif m > 0 and self.image_ids.shape == (m,):
            problems += check_image_ids(self.image_ids, self.offsets)
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
        beside: str | os.PathLike | None = None,
    ) -> Index:
        """An index of every image in `store` (see `add_store` for `images_root`, `beside`)."""
        dim = _store_dim(store)
        index = cls.empty(store.fingerprint, dim, store.manifest.get("extractor"))
        return index.add_store(store, images_root, progress, beside)[0]

    def add_store(
        self,
        store: FeatureStore,
        images_root: str | os.PathLike | None = None,
        progress: bool = True,
        beside: str | os.PathLike | None = None,
    ) -> tuple[Index, int]:
        """A new index with the images of `store` that this one lacks; (index, added).

        images_root: the folder the store was extracted from; image paths and sizes
          are recorded from it (without it, paths are the store keys and sizes unknown).
        beside: the index directory the result will be saved as (default: this
          index's, else a folder in the system's temporary directory). The new arrays
          are streamed into `.npy` files of a scratch folder next to it (this index's
          rows, then each new image's features: memory is one chunk, not the
          collection; `row_files`), memory-mapped, and hard-linked into the directory
          by `save`.
        Global descriptors are kept when every image (old and new) has one.
        The search structures are carried over, covering the old images only:
        `build_structures` extends them before `save`.
        Raises FingerprintMismatchError when the store's extractor differs, and
        IndexFormatError when the store lacks the global descriptors the index has.
        """
        fingerprints.require_same(
            store.fingerprint,
            self.fingerprint,
            lambda found, expected: (
                f"{store.root}: features of extractor {found}, but the "
                f"index holds features of extractor {expected}; "
                "an index can only combine features of one model"
            ),
        )
        root = Path(images_root).resolve() if images_root is not None else None
        known = set().union(*(record.identities() for record in self.images))
        todo: list[tuple[str, str]] = []
        skipped = 0
        identity = store.identity
        for key in store.stored_keys():
            path = str(root / key) if root is not None else key
            record_ids = {("store", identity, key), ("key", key)} | (
                {("path", path)} if root is not None else set()
            )
            if record_ids & known:
                skipped += 1
                continue
            todo.append((key, path))
            known |= ImageRecord(key, path, None, None, 0, identity).identities()
        if skipped:
            logging.info("%d image(s) of %s are in the index already: skipped", skipped, store.root)
        if not todo:
            return self, 0
        scratch = scratch_directory(beside or self._scratch_beside())
        try:
            return self._streamed(store, todo, root, identity, scratch, progress)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def _scratch_beside(self) -> Path:
        if self.path is not None:
            return self.path
        return Path(tempfile.gettempdir()) / "delf-index"

    def _streamed(
        self,
        store: FeatureStore,
        todo: list[tuple[str, str]],
        root: Path | None,
        identity: str,
        scratch: Path,
        progress: bool,
    ) -> tuple[Index, int]:
        """`add_store`'s new index, its arrays written row by row into `scratch`."""
        writers = {
            name: RowWriter(scratch / f"{name}.npy", ARRAYS[name], shape)
            for name, shape in (
                ("descriptors", (self.dim,)),
                ("keypoints", (2,)),
                ("image_ids", ()),
            )
        }
        for name, writer in writers.items():
            writer.extend(getattr(self, name))
        globals_ = _GlobalRows(self, store, scratch)
        records, counts = [], []
        next_id = self.num_images
        for key, path in tqdm(todo, desc="index", unit="img", disable=not progress):
            features = store.load(key)
            if len(features) == 0:  # an empty .delf file does not say its descriptor size
                features = dataclasses.replace(features, descriptors=np.zeros((0, self.dim)))
            if features.dim != self.dim:
                raise IndexFormatError(
                    f"{store.path(key)}: {features.dim}-D descriptors, the index has {self.dim}-D"
                )
            width, height = _image_size(path) if root is not None else (None, None)
            records.append(ImageRecord(key, path, width, height, len(features), identity))
            counts.append(len(features))
            writers["descriptors"].append(features.descriptors)
            writers["keypoints"].append(features.keypoints)
            writers["image_ids"].append(np.full(len(features), next_id, np.int32))
            globals_.add(key, features.global_descriptor)
            next_id += 1
        arrays = {name: writer.close() for name, writer in writers.items()}
        global_descriptors = globals_.close()
        offsets = np.concatenate(
            [np.asarray(self.offsets), self.offsets[-1] + np.cumsum(np.array(counts, np.int64))]
        )
        index = Index(
            **arrays,
            offsets=offsets,
            images=self.images + records,
            fingerprint=self.fingerprint,
            extractor=self.extractor,
            path=self.path,
            global_descriptors=global_descriptors,
        )
        index._structures = {name: structure.copy() for name, structure in self._structures.items()}
        index.generation = self.generation
        index._scratch = scratch
        index._streamed_files = {
            name: (array, scratch / f"{name}.npy")
            for name, array in {**arrays, GLOBAL_ARRAY: global_descriptors}.items()
            if isinstance(array, np.memmap)
        }
        weakref.finalize(index, shutil.rmtree, scratch, True)
        return index, len(records)

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
        others: tuple[str, ...] = (),
        milvus_uri: str | None = None,
        milvus_prefix: str | None = None,
        stores: dict[str, str] | None = None,
        work_dir: str | os.PathLike | None = None,
        shard_rows: int | None = None,
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
        others: names of further registered structures (`structures.STRUCTURES`,
          e.g. an external back end) to build; those the index has are extended.
        milvus_uri, milvus_prefix, stores: backend "milvus" puts the votes and the
          global rankings into Milvus collections (`structures/milvus.py`).
        work_dir, shard_rows: backend "ivfpq-ondisk" builds in shards of shard_rows
          descriptors, resumably, in a folder under work_dir (`BuildOptions`).

        Returns {"neighbors": {...}, "asmk": {...}, "global": {...}, "notes": [...]}:
        per structure what was done ("built", "extended", "retrained", "kept") and
        its header; notes are sentences for the user. What each structure does is
        its module's (`delf_tf.retrieval.structures`).
        """
        options = BuildOptions(
            backend,
            codebook_size,
            recall,
            progress,
            global_ivf_min_images,
            milvus_uri,
            milvus_prefix,
            stores,
            None if work_dir is None else str(work_dir),
            shard_rows or BuildOptions.shard_rows,
        )
        notes: list[str] = []
        report: dict[str, Any] = {"notes": notes}
        if votes is None:
            votes = "neighbors" in self._structures or not self._structures
        wanted = {
            "neighbors": votes,
            "asmk": asmk is not False and (bool(asmk) or "asmk" in self._structures),
            "global": self.global_descriptors is not None,
        }
        for name in (*others, *self._structures):
            wanted.setdefault(name, True)
        for name, want in wanted.items():
            if not want:
                self._structures.pop(name, None)
                continue
            current = self._structures.get(name)
            kind = class_for(name, backend, current)
            if current is not None and type(current) is not kind:
                current = None  # from FAISS to Milvus or back: built anew
            if current is None:
                structure, action = kind.build(self, options, notes), "built"
            else:
                structure, action = current.append(self, options, notes)
            self._structures[name] = structure
            report[name] = {"action": action, **structure.header}
        return report

    # --- loaded structures ---------------------------------------------------------------

    def neighbors(self, mmap: bool = True) -> NeighborIndex | None:
        """The saved k-NN structure of the votes ranking (loaded once), or None if there is none.

        IVF-PQ is read with FAISS IO_FLAG_MMAP | IO_FLAG_READ_ONLY; "flat" scans the
        (memory-mapped) descriptors; "kdtree"/"brute" are built here (they cannot
        be saved without pickle).
        """
        return self._loaded("neighbors", mmap)

    def asmk(self, mmap: bool = True) -> AsmkIndex | None:
        """The saved ASMK* structure (loaded once, arrays memory-mapped), or None."""
        return self._loaded("asmk", mmap)

    def global_ranker(self, mmap: bool = True) -> GlobalRanker | None:
        """Ranking by global descriptors (None when the index has none)."""
        if self.global_descriptors is None:
            return None
        if "global" not in self._structures:  # an index saved before global structures
            self._structures["global"] = GlobalStructure(
                {"kind": "flat"}, GlobalRanker(self.global_descriptors)
            )
        return self._loaded("global", mmap)

    def structure(self, name: str, mmap: bool = True) -> SearchStructure | None:
        """The search structure `name` with its object loaded, or None if the index has none."""
        if self._loaded(name, mmap) is None:
            return None
        return self._structures[name]

    def _loaded(self, name: str, mmap: bool) -> Any:
        """The object of structure `name`, read once; the directory must not have been
        replaced since the arrays were read (IndexChangedError)."""
        structure = self._structures.get(name)
        if structure is None:
            return None
        if structure.value is None:
            try:
                value = structure.load(self, mmap)
            except IndexFormatError:
                self.check_unchanged()  # a file of the next generation: IndexChangedError
                raise
            self.check_unchanged()
            structure.value = value
        return structure.value

    def check_unchanged(self) -> None:
        """Raises IndexChangedError when the directory holds another generation than the
        one this object was read from (a writer replaced it since)."""
        if self.path is None or self.generation is None:
            return
        now = read_generation(self.path)
        if now != self.generation:
            raise IndexChangedError(
                f"{self.path}: replaced while in use (generation {self.generation}, now "
                f"{'being replaced' if now is None else now}); load it again"
            )

    # --- disk ------------------------------------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {name: getattr(self, name) for name in ARRAYS}
        if self.global_descriptors is not None:
            arrays[GLOBAL_ARRAY] = self.global_descriptors
        return arrays

    def header(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "generation": self.generation or 0,
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
        The generation in index.json becomes one more than that of the index it
        replaces at `path` (1 where there is none). Arrays that `add_store` streamed
        into files are hard-linked into the new directory (copied across file
        systems); others are written from memory or their memory map, streamed.
        """
        path = Path(path)
        self._check_structures_cover()
        recover_staged_directory(path)
        generation = (read_generation(path) or 0) + 1
        previous = _saved_structures(path)
        with staged_directory(path) as staging:
            for name, array in self._arrays().items():
                streamed = self._streamed_files.get(name)
                if streamed is not None and streamed[0] is array:
                    link_or_copy(streamed[1], staging / f"{name}.npy")
                    continue
                dtype = np.float32 if name == GLOBAL_ARRAY else ARRAYS[name]
                base.write_array(staging / f"{name}.npy", np.asarray(array, dtype))
            images = [dataclasses.asdict(record) for record in self.images]
            base.write_json(staging / IMAGES, images)
            for structure in self._structures.values():
                structure.save(staging, self.path)
            header = {**self.header(), "generation": generation}
            base.write_json(staging / HEADER, header)
        self.path = path
        self.generation = generation
        if self._scratch is not None:  # its files are the directory's now (mapped: still valid)
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch, self._streamed_files = None, {}
        for structure in self._structures.values():
            structure.saved()
            structure.fresh = False
            structure.value = None if structure.loaded() else structure.value
        # External structures (Milvus) drop what no header names any more.
        for name in sorted(set(previous) | set(self._structures)):
            new, old = self._structures.get(name), previous.get(name)
            if new is not None and new.external:
                new.published(old)
            elif old is not None and old.external:
                old.retired()

    def _check_structures_cover(self) -> None:
        for name, structure in self._structures.items():
            field = structure.covers
            value = getattr(self, field)
            if structure.header.get(field, value) != value:
                raise ValueError(
                    f"the {name} structure covers {structure.header.get(field)} {field[4:]}, "
                    f"the index has {value}: call build_structures() before save()"
                )

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> Index:
        """Reads an index directory; arrays are memory-mapped unless mmap=False.

        Search structures are read on first use (`neighbors`, `asmk`, `global_ranker`).
        The arrays returned are all of one generation: when a writer replaces the
        directory while it is read (its generation changes, or it is briefly absent
        between the two renames of the swap), the read starts again.
        Raises IndexFormatError (one line) for anything missing or malformed.
        """
        path = Path(path)
        absent = 0
        for _ in range(LOAD_ATTEMPTS):
            recover_staged_directory(path)
            seen: dict[str, int] = {}
            try:
                index = cls._read(path, mmap, seen)
            except IndexFormatError:
                now = read_generation(path)
                if "generation" in seen and now == seen["generation"]:
                    raise  # the directory did not change: the error is its own
                if now is None:  # absent (mid-swap, or no index) or unreadable
                    absent += 1
                    if absent >= ABSENT_ATTEMPTS:
                        raise
                time.sleep(0.001)
                continue
            if read_generation(path) == index.generation:
                return index
        raise IndexChangedError(
            f"{path}: replaced {LOAD_ATTEMPTS} times while being read; try again"
        )

    @classmethod
    def _read(cls, path: Path, mmap: bool, seen: dict[str, int]) -> Index:
        """One read of the directory; seen["generation"]: that of the index.json read."""
        header = read_json(path / HEADER, f"{path}: not an index (no {HEADER})")
        if isinstance(header, dict) and isinstance(header.get("generation", 0), int):
            seen["generation"] = header.get("generation", 0)
        structures = check_header(header, path / HEADER)
        arrays = {}
        for name, entry in header["arrays"].items():
            dtype = np.float32 if name == GLOBAL_ARRAY else ARRAYS[name]
            arrays[name] = base.read_array(path / f"{name}.npy", dtype, entry["shape"], mmap)
        images = [ImageRecord(**record) for record in read_records(path / IMAGES)]
        for name, entry in structures.items():
            fingerprints.require_same(
                entry.get("fingerprint", header["fingerprint"]),
                header["fingerprint"],
                lambda found, expected, name=name: (
                    f"{path / HEADER}: the {name} structure "
                    f"was built from features of extractor {found}, the index holds "
                    f"{expected}; rebuild it with `delf index`"
                ),
                IndexFormatError,
            )
        global_descriptors = arrays.pop(GLOBAL_ARRAY, None)
        index = cls(
            **arrays,
            images=images,
            fingerprint=header["fingerprint"],
            extractor=header.get("extractor"),
            path=path,
            global_descriptors=global_descriptors,
            structures=structures,
        )
        index.generation = seen["generation"]
        return index

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
                fingerprints.short(self.fingerprint),
            )
            return False
        model = self.extractor.get("model", "unknown model")
        fingerprints.require_same(
            self.fingerprint,
            fingerprint,
            lambda found, expected: (
                f"{self.path or 'index'}: built from features of extractor "
                f"{found} ({model}), but the {source} is {expected}; pass the "
                "--model/--weights/--seed/--pca that `delf extract` used for the index"
            ),
        )
        return True


class _GlobalRows:
    """The global descriptors of `Index.add_store`'s new index, streamed into a file: the
    old index's, then one per new image; None when some image (old or new) has none."""

    def __init__(self, index: Index, store: FeatureStore, scratch: Path):
        self.index, self.store, self.scratch = index, store, scratch
        self.writer: RowWriter | None = None
        self.seen = 0  # new images with a global descriptor
        self.without: str | None = None  # the first new image without one
        # An index of images without global descriptors stays without them.
        self.wanted = not (index.num_images and index.global_descriptors is None)

    def add(self, key: str, descriptor: np.ndarray | None) -> None:
        old = self.index.global_descriptors
        if descriptor is None:
            if old is not None:
                raise IndexFormatError(
                    f"{self.store.path(key)}: no global descriptor, but the index at "
                    f"{self.index.path or 'index'} ranks by global descriptors; append "
                    "features of the same (DELG) model"
                )
            self.without = self.without or key
            if self.writer is not None:
                self.writer.abort()
                self.writer = None
            return
        self.seen += 1
        if not self.wanted or self.without is not None:
            return
        if self.writer is None:
            dim = old.shape[1] if old is not None else len(descriptor)
            self.writer = RowWriter(self.scratch / f"{GLOBAL_ARRAY}.npy", np.float32, (dim,))
            if old is not None:
                self.writer.extend(old)
        if len(descriptor) != self.writer.row_shape[0]:
            raise IndexFormatError(
                f"{self.store.root}: {len(descriptor)}-D global descriptors, the index has "
                f"{self.writer.row_shape[0]}-D"
            )
        self.writer.append(np.asarray(descriptor, np.float32)[None])

    def close(self) -> np.ndarray | None:
        if not self.wanted:
            if self.seen:
                logging.info(
                    "%s: global descriptors not indexed (the index's images have none)",
                    self.store.root,
                )
            return None
        if self.without is not None:
            if self.seen:
                logging.warning(
                    "%s: some images have no global descriptor (e.g. %s): global "
                    "descriptors not indexed",
                    self.store.root,
                    self.without,
                )
            return None
        return self.writer.close() if self.writer is not None else None


def _saved_structures(path: Path) -> dict[str, SearchStructure]:
    """The structures index.json at `path` names now ({} where there is none or it is
    unreadable): what a save replaces."""
    try:
        header = read_json(path / HEADER, f"{path}: not an index")
        structures = check_header(header, path / HEADER)
    except (IndexFormatError, OSError):
        return {}
    return {name: structure_type(name, entry)(dict(entry)) for name, entry in structures.items()}


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
