"""The votes ranking's k-NN structure: header "neighbors", file `neighbors.faiss`.

Exact back ends need no file: "flat" scans the (memory-mapped) descriptors.npy,
"kdtree"/"brute" are built on load (they cannot be saved without pickle). IVF-PQ
("ivfpq", "ivfpq-hnsw") is trained once, saved, read with FAISS IO_FLAG_MMAP |
IO_FLAG_READ_ONLY, and grown without retraining until the index holds
RETRAIN_GROWTH times the descriptors it was trained on. "ivfpq-ondisk" (8-bit
IVF-PQ whose inverted lists stay on disk: `neighbors.faiss` + `neighbors.ivfdata`,
`delf_tf.matching.ondisk`) is built in shards of `BuildOptions.shard_rows` in a
folder under `BuildOptions.work_dir` named after a digest of the rows and parameters
(a killed build resumes there), and linked into the index on save; `--append` keeps
its training and merges its lists with shards of the new rows only (until
RETRAIN_GROWTH).

A query's descriptors vote: each database image gets at most one vote per query
descriptor (its nearest descriptor within the bound), images ranked by votes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from delf_tf.atomic import link_or_copy
from delf_tf.config import NEIGHBOR_BACKENDS
from delf_tf.errors import InputError
from delf_tf.matching.neighbors import (
    MISSING,
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
from delf_tf.matching.ondisk import OnDiskIvfPqNeighbors, build_ondisk, ondisk_parameters
from delf_tf.retrieval.structures import base
from delf_tf.retrieval.structures.base import (
    BuildOptions,
    Collection,
    IndexFormatError,
    Ranking,
    SearchStructure,
)

if TYPE_CHECKING:
    from delf_tf.config import RetrievalConfig
    from delf_tf.features.local_features import LocalFeatures

NEIGHBORS_FILE = "neighbors.faiss"
ONDISK = "ivfpq-ondisk"
# Rows of the descriptors read for the digest that names an on-disk build's folder.
DIGEST_ROWS = 4096
# An IVF-PQ structure is grown without retraining until the index holds this many
# times the descriptors it was trained on; then its cells are too coarse (the
# derived nlist would have doubled twice) and it is retrained.
RETRAIN_GROWTH = 4.0
# Recall of an approximate structure is measured for this k (RetrievalConfig.neighbors).
RECALL_K = 10
RECALL_DISTANCE = 0.8
# Back-end names an index.json may record ("auto" only as "requested").
# IVF-PQ codes are 8 bits: each sub-quantizer learns 256 centroids from as many points.
PQ_CENTROIDS = 256
KINDS = tuple(name for name in NEIGHBOR_BACKENDS if name not in ("auto", "milvus"))


class VotesStructure(SearchStructure):
    """k-NN structure over every database descriptor (value: a `NeighborIndex`)."""

    name = "neighbors"
    covers = "num_descriptors"

    @classmethod
    def check_header(cls, header: Any, where: str) -> None:
        super().check_header(header, where)
        backend = header.get("backend")
        if backend not in KINDS:
            raise IndexFormatError(f"{where}.backend: unknown back end {backend!r}; known {KINDS}")
        if header.get("requested", "auto") not in NEIGHBOR_BACKENDS:
            raise IndexFormatError(f"{where}.requested: unknown back end {header['requested']!r}")
        base.count(header, "num_descriptors", where)
        if backend in PERSISTED_BACKENDS:
            base.count(header, "trained_on_descriptors", where)
            base.relative_name(header.get("file"), f"{where}.file")
            base.parameters(IvfPqParameters, header, where)
        if backend == ONDISK:
            base.relative_name(header.get("data"), f"{where}.data")
            if Path(header["data"]).name != Path(header["file"]).with_suffix(".ivfdata").name:
                raise IndexFormatError(f"{where}.data: expected the lists beside {header['file']}")

    def files(self) -> list[str]:
        return [self.header[key] for key in ("file", "data") if key in self.header]

    def copy(self) -> VotesStructure:
        copied = super().copy()
        copied._build = getattr(self, "_build", None)
        return copied

    # --- building ---------------------------------------------------------------------

    @classmethod
    def build(
        cls, collection: Collection, options: BuildOptions, notes: list[str]
    ) -> VotesStructure:
        return cls._built(collection, options.backend or "auto", options, notes, None)[0]

    def append(
        self, collection: Collection, options: BuildOptions, notes: list[str]
    ) -> tuple[VotesStructure, str]:
        requested = options.backend or self.header.get("requested") or "auto"
        return self._built(collection, requested, options, notes, self)

    @classmethod
    def _built(
        cls,
        collection: Collection,
        requested: str,
        options: BuildOptions,
        notes: list[str],
        current: VotesStructure | None,
    ) -> tuple[VotesStructure, str]:
        count = collection.num_descriptors
        kind = choose_backend(count) if requested == "auto" else requested
        header: dict[str, Any] = {
            "backend": kind,
            "requested": requested,
            "fingerprint": collection.fingerprint,
            "num_descriptors": count,
        }
        if kind not in PERSISTED_BACKENDS:
            # Exact back ends: flat scans descriptors.npy; kdtree/brute are built on load.
            return cls(header, None, fresh=True), "built" if current is None else "kept"
        if kind == ONDISK:
            return cls._built_ondisk(collection, header, options, notes, current)
        action, structure = None, None
        if current is not None and current.header.get("backend") == kind:
            trained_on = int(current.header.get("trained_on_descriptors", 0))
            if count == current.header.get("num_descriptors"):
                return current, "kept"
            if count <= RETRAIN_GROWTH * trained_on:
                structure = current._writable(collection)
                added = structure.add(collection.descriptors)
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
        if structure is None:
            if count < PQ_CENTROIDS:
                raise InputError(
                    f"--backend={kind}: {count} descriptors, its 8-bit codes are trained on at "
                    f"least {PQ_CENTROIDS}; use --backend=flat (exact) for so few"
                )
            start = time.perf_counter()
            quantizer = "hnsw" if kind == "ivfpq-hnsw" else "flat"
            parameters = ivfpq_parameters(count, collection.dim, quantizer)
            structure = IvfPqNeighbors.train(collection.descriptors, parameters)
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
        if options.recall:
            notes.append(_measured_recall(kind, structure, collection, header))
        return cls(header, structure, fresh=True), action

    @classmethod
    def _built_ondisk(
        cls,
        collection: Collection,
        header: dict[str, Any],
        options: BuildOptions,
        notes: list[str],
        current: VotesStructure | None,
    ) -> tuple[VotesStructure, str]:
        """The on-disk IVF-PQ structure: kept, extended (the previous lists merged with
        shards of the new rows) or built, in a resumable build folder."""
        count = header["num_descriptors"]
        previous, base_file = current.header if current is not None else {}, None
        if previous.get("backend") == ONDISK:
            trained_on = int(previous["trained_on_descriptors"])
            if count == previous.get("num_descriptors"):
                return current, "kept"
            if count <= RETRAIN_GROWTH * trained_on:
                base_file = _source(collection, previous["file"], cls.name)
                parameters = IvfPqParameters.from_dict(previous["parameters"])
                header["trained_on_descriptors"] = trained_on
            else:
                notes.append(
                    f"retraining the {ONDISK} structure: the index grew from {trained_on} to "
                    f"{count} descriptors (more than {RETRAIN_GROWTH:g}x)"
                )
        elif previous.get("backend") in PERSISTED_BACKENDS:
            notes.append(f"retraining: the k-NN structure changes from {previous['backend']}")
        if base_file is None:
            if count < PQ_CENTROIDS:
                raise InputError(
                    f"--backend={ONDISK}: {count} descriptors, its 8-bit codes are trained on "
                    f"at least {PQ_CENTROIDS}; use --backend=flat (exact) for so few"
                )
            parameters = ondisk_parameters(count, collection.dim)
            header["trained_on_descriptors"] = count
        folder = _build_folder(collection, header, parameters, options, base_file)
        start = time.perf_counter()
        try:
            structure, timings = build_ondisk(
                collection.descriptors,
                parameters,
                folder,
                options.shard_rows,
                name=Path(NEIGHBORS_FILE).stem,
                base=base_file,
            )
        except RuntimeError as error:  # FAISS: a damaged previous structure, a full disk
            detail = " ".join(str(error).split())[:300]
            raise IndexFormatError(f"{folder}: the {ONDISK} build failed ({detail})") from error
        header["file"] = NEIGHBORS_FILE
        header["data"] = str(Path(NEIGHBORS_FILE).with_suffix(".ivfdata"))
        header["parameters"] = parameters.to_dict()
        header["shard_rows"] = options.shard_rows
        header["build_seconds"] = timings
        disk = structure.disk_bytes(folder / NEIGHBORS_FILE)
        header["bytes_per_descriptor"] = round(disk / max(count, 1), 1)
        action = (
            "extended" if base_file is not None else "built" if current is None else "retrained"
        )
        notes.append(
            f"{ONDISK}: {action} in {round(time.perf_counter() - start, 1)} s (nlist "
            f"{parameters.nlist}, {parameters.subquantizers}-byte codes, nprobe "
            f"{parameters.nprobe}, shards of {options.shard_rows} rows in {folder}); "
            f"{header['bytes_per_descriptor']} B per descriptor on disk"
        )
        if options.recall:
            notes.append(_measured_recall(ONDISK, structure, collection, header))
        built = cls(header, structure, fresh=True)
        built._build = folder
        return built, action

    def saved(self) -> None:
        folder = getattr(self, "_build", None)
        if folder is not None:  # its files are linked into the index now
            # The merged .faiss file first: it says the folder is complete.
            (folder / NEIGHBORS_FILE).unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.parent.rmdir()  # the work folder, when nothing else is building there
            self._build = None

    def _writable(self, collection: Collection) -> IvfPqNeighbors:
        if self.fresh and self.value is not None:
            return self.value
        parameters = IvfPqParameters.from_dict(self.header["parameters"])
        file = _source(collection, self.header["file"], self.name)
        return IvfPqNeighbors(
            base.read_faiss(file, writable=True), collection.descriptors, parameters
        )

    # --- disk -------------------------------------------------------------------------

    def save(self, staging, source) -> None:
        if self.header.get("backend") == ONDISK:
            # Fresh: from the build folder; else the index's own files. Hard links: the
            # lists are as large as the codes (28 B per descriptor) and never change.
            origin = self._build if self.fresh else source
            for name in self.files():
                if origin is None:
                    raise IndexFormatError(f"the {ONDISK} structure has no files to save")
                where = f"{origin}: structures.{self.name}"
                link_or_copy(base.confined(origin, name, where), staging / name)
        elif self.fresh and "file" in self.header:
            base.write_faiss(staging / self.header["file"], self.value._index)
        elif not self.fresh:
            super().save(staging, source)

    def load(self, collection: Collection, mmap: bool = True) -> NeighborIndex:
        """IVF-PQ read with IO_FLAG_MMAP | IO_FLAG_READ_ONLY (fully when mmap=False);
        "ivfpq-ondisk" with its lists on disk whatever `mmap` says (IO_FLAG_ONDISK_SAME_DIR);
        "flat" scans the descriptors; "kdtree"/"brute" are built here."""
        header = self.header
        kind = header["backend"]
        if header.get("num_descriptors") != collection.num_descriptors:
            raise IndexFormatError(
                f"{collection.path or 'index'}: the {kind} structure covers "
                f"{header.get('num_descriptors')} descriptors, the index has "
                f"{collection.num_descriptors}"
            )
        if kind == ONDISK:
            file = _source(collection, header["file"], self.name)
            parameters = IvfPqParameters.from_dict(header["parameters"])
            try:
                return OnDiskIvfPqNeighbors.load(file, collection.descriptors, parameters)
            except RuntimeError as error:
                detail = " ".join(str(error).split())[:300] or "unreadable"
                raise IndexFormatError(
                    f"{file}: unreadable {ONDISK} structure ({detail})"
                ) from error
            except InputError as error:
                raise IndexFormatError(str(error)) from error
        if kind in PERSISTED_BACKENDS:
            file = _source(collection, header["file"], self.name)
            index = base.read_faiss(file, writable=not mmap)
            parameters = IvfPqParameters.from_dict(header["parameters"])
            if int(index.ntotal) != collection.num_descriptors:
                raise IndexFormatError(
                    f"{file}: holds {index.ntotal} descriptors, the index has "
                    f"{collection.num_descriptors}"
                )
            return IvfPqNeighbors(index, collection.descriptors, parameters, mmap)
        if kind == "flat":
            return FlatNeighbors(collection.descriptors)
        return build_neighbors(collection.descriptors, kind)

    # --- search -----------------------------------------------------------------------

    def search(
        self, collection: Collection, query: LocalFeatures, config: RetrievalConfig
    ) -> Ranking:
        voted = vote(self.value, collection, query.descriptors, config)
        votes = voted[0]
        ids = np.argsort(-votes, kind="stable")
        ids = ids[votes[ids] > 0]
        return Ranking(ids.astype(np.int64), votes[ids].astype(np.float64), voted)


def vote(
    neighbors: NeighborIndex, collection: Collection, descriptors: np.ndarray, config
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-NN votes of one query's float32 [Q, D] descriptors.

    Returns:
      votes: int64 [num_images] votes per database image.
      query_rows: int64 [V] query descriptor of each vote.
      database_rows: int64 [V] nearest descriptor (index row) of each vote in its image.
    Rows or image ids out of the collection (a damaged file) are an IndexFormatError.
    """
    try:
        _, nearest = neighbors.search(descriptors, config.neighbors, config.distance_bound)
    except IndexError as error:  # a damaged file's ids, out of the descriptors' rows
        raise _damaged(collection, error) from error
    # Row-major order keeps each query's neighbours nearest first, so the first
    # (query, image) occurrence is that image's nearest descriptor.
    query_rows, column = np.nonzero(nearest != MISSING)
    database_rows = nearest[query_rows, column]
    num_images = collection.num_images
    images = _images_of(collection, database_rows, num_images)
    _, first = np.unique(query_rows * num_images + images, return_index=True)
    query_rows, database_rows, images = query_rows[first], database_rows[first], images[first]
    votes = np.bincount(images, minlength=num_images)
    return votes, query_rows, database_rows


def _images_of(collection: Collection, rows: np.ndarray, num_images: int) -> np.ndarray:
    """int64 image ids of descriptor `rows`, checked against the offsets (O(rows))."""
    where = collection.path or "index"
    if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= collection.num_descriptors):
        raise _damaged(collection, f"row {int(rows.max())}")
    images = np.asarray(collection.image_ids)[rows].astype(np.int64)
    if images.size:
        offsets = np.asarray(collection.offsets)
        inside = (images >= 0) & (images < num_images)
        safe = np.where(inside, images, 0)
        inside &= (offsets[safe] <= rows) & (rows < offsets[safe + 1])
        if not inside.all():
            bad = int(images[~inside][0])
            raise IndexFormatError(
                f"{where}: image_ids.npy holds {bad} for a descriptor of another image "
                f"(the index has {num_images} images); the file is damaged"
            )
    return images


def _damaged(collection: Collection, detail: Any) -> IndexFormatError:
    return IndexFormatError(
        f"{collection.path or 'index'}: the k-NN structure returned descriptor rows outside "
        f"the index ({detail}; it has {collection.num_descriptors}): {NEIGHBORS_FILE} is "
        "damaged; rebuild it with `delf index`"
    )


def _build_folder(
    collection: Collection,
    header: dict[str, Any],
    parameters: IvfPqParameters,
    options: BuildOptions,
    base_file: Path | None,
) -> Path:
    """The folder of an on-disk build, under `options.work_dir`: named after a digest
    of what decides its files (fingerprint, shape, offsets, a sample of rows, the
    parameters, the shard size, the structure extended), so that a rerun over the
    same collection resumes there and any other collection starts afresh. The work
    folder is one per index (`delf index`: `<index>.build` beside it): other build
    folders there (of a collection that is no more) are removed; in the shared
    default (the system's temporary folder) they are left alone."""
    digest = hashlib.sha256()
    count = collection.num_descriptors
    describe = {
        "fingerprint": collection.fingerprint,
        "shape": [count, collection.dim],
        "parameters": parameters.to_dict(),
        "shard_rows": options.shard_rows,
        "base": None if base_file is None else [str(base_file), base_file.stat().st_size],
    }
    digest.update(json.dumps(describe, sort_keys=True).encode("utf-8"))
    digest.update(np.asarray(collection.offsets, np.int64).tobytes())
    rows = np.unique(np.linspace(0, max(count - 1, 0), min(count, DIGEST_ROWS)).astype(np.int64))
    digest.update(np.ascontiguousarray(collection.descriptors[rows], np.float32).tobytes())
    if options.work_dir is not None:
        work = Path(options.work_dir)
    elif collection.path is not None:
        work = collection.path.parent / f"{collection.path.name}.build"
    else:
        work = Path(tempfile.gettempdir()) / "delf-build"
    folder = work / f"{ONDISK}-{digest.hexdigest()[:16]}"
    if work.is_dir() and (options.work_dir is not None or collection.path is not None):
        for other in work.glob(f"{ONDISK}-*"):
            if other != folder:
                shutil.rmtree(other, ignore_errors=True)
    return folder


def _source(collection: Collection, name: str, structure: str):
    if collection.path is None:
        raise IndexFormatError(
            f"index has a {structure} structure but no directory to read it from"
        )
    return base.confined(collection.path, name, f"{collection.path}: structures.{structure}.file")


def _measured_recall(kind: str, structure, collection, header: dict) -> str:
    """Records the structure's sampled recall@k against exact search in `header`; the note."""
    measured = sampled_recall(structure, collection.descriptors, RECALL_K, RECALL_DISTANCE)
    header["recall"] = measured
    return (
        f"{kind}: sampled recall@{RECALL_K} against exact search "
        f"{measured['recall_at_k']:.3f} ({measured['samples']} database descriptors "
        f"as queries, neighbours within L2 {RECALL_DISTANCE})"
    )
