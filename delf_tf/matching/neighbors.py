"""Nearest-neighbour back ends behind one small interface.

`build_neighbors(descriptors, backend)` returns a `NeighborIndex` over [M, D]
descriptors; `search(queries, k, max_distance)` gives, per query, the `k` nearest
within `max_distance` (L2), nearest first. Back ends:
- "flat": FAISS exhaustive search (`faiss.knn`), exact. It needs no structure:
  it scans the descriptor array itself, memory-mapped or not.
- "ivfpq" / "ivfpq-hnsw": FAISS IVF-PQ (inverted lists of product-quantised codes:
  4-bit fast-scan codes since they were measured, 8-bit in older indexes; the
  coarse quantizer is exhaustive or an HNSW graph), approximate and
  compact. It is trained once, saved (`save`), memory-mapped on load (`load`) and
  grown without retraining (`add`). The `refine` x k candidates it returns are
  re-scored with the exact descriptors, so distances (and the bound) are exact.
- "auto": "flat" up to AUTO_EXACT_MAX_DESCRIPTORS descriptors, IVF-PQ beyond
  (`choose_backend`).
- "kdtree": scipy `cKDTree`, exact; the DELF reference's choice. Slow in 40-D
  and not persistable without pickle, so it is built in memory when asked for.
- "brute": exact matrix products, for tests.

Measured on synthetic DELF-like data (40-D, 1000 descriptors per query, one
core of a shared 2-core machine, `bench/index_scale.py`): exact FAISS search
costs ~1.8 s per query per 100 000 database descriptors (18 s at 1 M), IVF-PQ
0.34 s at 1 M descriptors (nlist 4096, nprobe 32, sampled recall@10 within the
0.8 bound 0.93 against exact search). Hence the `auto` threshold of 50 000
descriptors (about 50 images of 1000 features): below it exact search takes
about a second at most and needs no training (IVF-PQ wants >= 10^4 training
points for its 256-centroid PQ codebooks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy.spatial import cKDTree

from delf_tf.config import NEIGHBOR_BACKENDS
from delf_tf.errors import ConfigError, InputError

MISSING = -1
# `auto` picks exact search up to this many database descriptors (see the module docstring).
AUTO_EXACT_MAX_DESCRIPTORS = 50_000
# IVF structures with at least this many lists use an HNSW coarse quantizer: an
# exhaustive one costs queries x lists distances per search and per added vector.
# Measured (one core, 40-D): the nearest of 4096 / 16384 centroids costs 10 / 42 us
# exhaustively (BLAS) and 36 / 59 us through HNSW (efSearch 32), so HNSW pays
# from ~32768 lists on (~34 M descriptors under the derived nlist).
HNSW_QUANTIZER_MIN_LISTS = 32_768
# Back ends that `delf index` trains and saves; the others are built on load.
PERSISTED_BACKENDS = ("ivfpq", "ivfpq-hnsw", "ivfpq-ondisk")
EXACT_BACKENDS = ("flat", "kdtree", "brute")
# Brute force works on [queries, database] blocks of at most this many distances.
_BRUTE_BLOCK = 1 << 22
# Bytes of one scipy cKDTree node (ckdtreenode: 4 intp, 1 double, 2 pointers, 2 intp).
_KDTREE_NODE_BYTES = 72
# Vectors added to a FAISS index per call (bounds the temporary float32 copy).
_ADD_CHUNK = 1 << 20
# HNSW quantizer breadth while adding (one nearest cell per vector; ~98% exact).
_ADD_EF_SEARCH = 32


@runtime_checkable
class NeighborIndex(Protocol):
    """k-nearest-neighbour search over a fixed set of M database descriptors."""

    name: str

    def __len__(self) -> int:
        """M, the number of database descriptors."""

    def search(
        self, queries: np.ndarray, k: int, max_distance: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """float32 [Q, D] queries -> (distances float32 [Q, k], indices int64 [Q, k]).

        Nearest first; slots without a neighbour within `max_distance` have
        distance +inf and index MISSING (-1).
        """

    def memory_bytes(self) -> int:
        """Bytes the search structure holds in memory (descriptors included)."""


class KDTreeNeighbors:
    """Exact search with scipy's cKDTree (stores the descriptors as float64)."""

    name = "kdtree"

    def __init__(self, descriptors: np.ndarray, leafsize: int = 16):
        descriptors = np.asarray(descriptors)
        self._size = len(descriptors)
        # scipy's defaults (median splits, compact nodes) build slower than
        # sliding-midpoint splits but answer 40-D queries about twice as fast.
        self._tree = cKDTree(descriptors, leafsize=leafsize)

    def __len__(self) -> int:
        return self._size

    def search(self, queries, k, max_distance):
        queries = np.asarray(queries, np.float32)
        if self._size == 0 or len(queries) == 0:
            return _empty(len(queries), k)
        distances, indices = self._tree.query(
            queries, k=list(range(1, k + 1)), distance_upper_bound=max_distance, workers=-1
        )
        indices = indices.astype(np.int64)
        missing = indices >= self._size
        indices[missing] = MISSING
        return distances.astype(np.float32), indices

    def memory_bytes(self) -> int:
        tree = self._tree
        return int(tree.data.nbytes + tree.indices.nbytes + tree.size * _KDTREE_NODE_BYTES)


class BruteForceNeighbors:
    """Exact search by blocked matrix products; O(Q * M) per search."""

    name = "brute"

    def __init__(self, descriptors: np.ndarray):
        self._data = np.asarray(descriptors, np.float32)
        self._norms = np.einsum("ij,ij->i", self._data, self._data)

    def __len__(self) -> int:
        return len(self._data)

    def search(self, queries, k, max_distance):
        queries = np.asarray(queries, np.float32)
        distances, indices = _empty(len(queries), k)
        if len(self._data) == 0 or len(queries) == 0:
            return distances, indices
        kk = min(k, len(self._data))
        step = max(1, _BRUTE_BLOCK // len(self._data))
        for start in range(0, len(queries), step):
            block = queries[start : start + step]
            squared = (
                np.einsum("ij,ij->i", block, block)[:, None]
                + self._norms[None]
                - 2.0 * block @ self._data.T
            )
            nearest = np.argpartition(squared, kk - 1, axis=1)[:, :kk]
            values = np.take_along_axis(squared, nearest, axis=1)
            order = np.argsort(values, axis=1, kind="stable")
            nearest = np.take_along_axis(nearest, order, axis=1)
            found = np.sqrt(np.maximum(np.take_along_axis(values, order, axis=1), 0.0))
            within = found <= max_distance
            distances[start : start + step, :kk] = np.where(within, found, np.inf)
            indices[start : start + step, :kk] = np.where(within, nearest, MISSING)
        return distances, indices

    def memory_bytes(self) -> int:
        return int(self._data.nbytes + self._norms.nbytes)


class FlatNeighbors:
    """Exact search with FAISS's exhaustive k-NN over the descriptor array itself.

    No structure and no copy: a memory-mapped [M, D] float32 array (the index's
    `descriptors.npy`) is scanned in place, so nothing is built or saved.
    """

    name = "flat"

    def __init__(self, descriptors: np.ndarray):
        self._data = _contiguous(descriptors)

    def __len__(self) -> int:
        return len(self._data)

    def search(self, queries, k, max_distance):
        import faiss

        queries = _contiguous(queries)
        if len(self._data) == 0 or len(queries) == 0:
            return _empty(len(queries), k)
        kk = min(k, len(self._data))
        squared, nearest = faiss.knn(queries, self._data, kk)
        return _bounded(squared, nearest, k, max_distance)

    def memory_bytes(self) -> int:
        return int(self._data.nbytes)


@dataclasses.dataclass(frozen=True)
class IvfPqParameters:
    """Shape of an IVF-PQ structure (derived by `ivfpq_parameters`, recorded in the index).

    Attributes:
      nlist: inverted lists (k-means cells of the coarse quantizer).
      subquantizers: PQ sub-vectors; each descriptor is stored as this many codes
        of `bits` bits plus its 8-byte id.
      quantizer: "flat" (exhaustive coarse assignment) or "hnsw" (an HNSW graph
        over the cell centroids; for many lists).
      nprobe: lists visited per query (searches may override it).
      refine: each search asks FAISS for refine x k candidates and keeps the k
        nearest by exact distance (descriptors read from the index's array).
      train_size: descriptors sampled to train the k-means cells and PQ codebooks.
      hnsw_neighbors: links per node of the HNSW quantizer.
      seed: seed of the training sample.
      bits: bits per PQ code. 8: FAISS IndexIVFPQ (256-centroid codebooks, codes
        scanned one at a time; indexes built before fast-scan record no `bits` and
        load as 8). 4: IndexIVFPQFastScan (16-centroid codebooks; lists stored in
        blocks of 32 codes that SIMD shuffles score together, ~10x faster per code).
    """

    nlist: int
    subquantizers: int
    quantizer: str = "flat"
    nprobe: int = 32
    refine: int = 3
    train_size: int = 0
    hnsw_neighbors: int = 32
    seed: int = 0
    bits: int = 8

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IvfPqParameters:
        return cls(**data)


def ivfpq_parameters(count: int, dim: int, quantizer: str | None = None) -> IvfPqParameters:
    """IVF-PQ parameters for `count` descriptors of `dim` dimensions.

    nlist: the power of two nearest 4 sqrt(count) (FAISS's guideline of 4-16
      sqrt(M) cells), at least 16, at most 65536 and at most count / 39 (FAISS
      wants >= 39 training points per cell).
    subquantizers: 1-D sub-vectors up to 64-D (40 4-bit codes, 20 bytes at 40-D),
      2-D up to 256-D, 4-D beyond (a divisor of dim in any case): the bytes of the
      8-bit codes on sub-vectors twice as long that preceded them.
    quantizer: "hnsw" from HNSW_QUANTIZER_MIN_LISTS (32768) lists on, else "flat".
    nprobe: sqrt(nlist) / 2 within [16, 128] (32 lists at 4096; measured recall@10
      0.93 against exact search at 1 M descriptors, 0.98 with nprobe 64 at twice
      the search time).
    train_size: 64 points per cell, at least 100 000, at most count.
    bits, refine: 4-bit fast-scan codes (SIMD), candidates re-scored 5 x k: at 1 M
      descriptors and nprobe 64, recall@10 0.964 against 0.966 for 8-bit codes
      re-scored 3 x k, in about a third of the k-NN time (bench/README.md).
    """
    count, dim = int(count), int(dim)
    nlist = 2 ** round(math.log2(max(4.0 * math.sqrt(max(count, 1)), 1.0)))
    nlist = int(max(16, min(65_536, nlist, max(count // 39, 1))))
    sub_dim = 1 if dim <= 64 else 2 if dim <= 256 else 4
    subquantizers = max(1, dim // sub_dim)
    while dim % subquantizers:
        subquantizers -= 1
    if quantizer is None:
        quantizer = "hnsw" if nlist >= HNSW_QUANTIZER_MIN_LISTS else "flat"
    nprobe = int(min(128, max(16, round(math.sqrt(nlist) / 2))))
    train_size = int(min(count, max(64 * nlist, 100_000)))
    return IvfPqParameters(
        nlist, subquantizers, quantizer, min(nprobe, nlist), 5, train_size, bits=4
    )


class IvfPqNeighbors:
    """Approximate search with a FAISS IVF-PQ index, candidates re-scored exactly.

    Build once (`train`), save with `save`, load memory-mapped with `load` (FAISS
    IO_FLAG_MMAP | IO_FLAG_READ_ONLY: the inverted lists stay on disk and are
    paged in on demand), grow with `add` (no retraining; needs a non-mmap load).
    `descriptors` is the exact [M, D] float32 array (usually the index's
    memory-mapped `descriptors.npy`): row i of it is FAISS id i.
    """

    def __init__(
        self,
        index: Any,
        descriptors: np.ndarray,
        parameters: IvfPqParameters,
        read_only: bool = False,
    ):
        self._index = index
        self._descriptors = descriptors
        self.parameters = parameters
        self.read_only = read_only
        self.name = "ivfpq-hnsw" if parameters.quantizer == "hnsw" else "ivfpq"
        self._nprobe = None
        self.set_nprobe(parameters.nprobe)

    # --- building ------------------------------------------------------------------

    @classmethod
    def train(
        cls, descriptors: np.ndarray, parameters: IvfPqParameters | None = None, add: bool = True
    ) -> IvfPqNeighbors:
        """Trains the coarse cells and PQ codebooks on a sample, then adds every row."""
        import faiss

        count, dim = descriptors.shape
        parameters = parameters or ivfpq_parameters(count, dim)
        if count < parameters.nlist:
            raise ConfigError(
                f"IVF-PQ with {parameters.nlist} lists needs at least as many descriptors, "
                f"got {count}"
            )
        if parameters.quantizer == "hnsw":
            quantizer = faiss.IndexHNSWFlat(dim, parameters.hnsw_neighbors)
        else:
            quantizer = faiss.IndexFlatL2(dim)
        if parameters.bits == 4:
            index = faiss.IndexIVFPQFastScan(
                quantizer, dim, parameters.nlist, parameters.subquantizers, 4
            )
        elif parameters.bits == 8:
            index = faiss.IndexIVFPQ(quantizer, dim, parameters.nlist, parameters.subquantizers, 8)
        else:
            raise ValueError(f"IVF-PQ codes have 4 or 8 bits, got {parameters.bits}")
        index.own_fields = True
        quantizer.this.disown()
        rng = np.random.default_rng(parameters.seed)
        size = min(count, parameters.train_size or count)
        rows = np.sort(rng.choice(count, size, replace=False)) if size < count else slice(None)
        sample = _contiguous(descriptors[rows])
        # The cells come from `kmeans` (two-level for many lists); FAISS then only
        # trains the PQ codebooks on the residuals (a quantizer that holds nlist
        # centroids is not retrained).
        quantizer.add(kmeans(sample, parameters.nlist, seed=parameters.seed))
        index.train(sample)
        structure = cls(index, descriptors, parameters)
        if add:
            structure.add(descriptors)
        return structure

    def add(self, descriptors: np.ndarray) -> int:
        """Adds rows [len(self), len(descriptors)) of `descriptors` (no retraining); returns how many.

        `descriptors` must extend the array the structure was built on (its first
        len(self) rows unchanged); it replaces it for re-scoring.
        """
        if self.read_only:
            raise ValueError("IVF-PQ structure loaded memory-mapped (read-only): load it writable")
        start = len(self)
        nprobe = self._nprobe
        self._set_quantizer_breadth(_ADD_EF_SEARCH)  # the nearest cell of each new vector
        try:
            for first in range(start, len(descriptors), _ADD_CHUNK):
                self._index.add(_contiguous(descriptors[first : first + _ADD_CHUNK]))
        finally:
            self._set_quantizer_breadth(max(2 * nprobe, 64))
        self._descriptors = descriptors
        return len(descriptors) - start

    # --- disk ----------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        import faiss

        faiss.write_index(self._index, str(path))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        descriptors: np.ndarray,
        parameters: IvfPqParameters,
        mmap: bool = True,
    ) -> IvfPqNeighbors:
        """Reads a saved structure; memory-mapped and read-only unless mmap=False."""
        import faiss

        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(Path(path)), flags)
        if index.ntotal != len(descriptors):
            raise InputError(
                f"{path}: holds {index.ntotal} descriptors, the index has {len(descriptors)}"
            )
        return cls(index, descriptors, parameters, read_only=mmap)

    # --- search --------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def set_nprobe(self, nprobe: int) -> None:
        """Lists visited per query (and the HNSW quantizer's search breadth to match)."""
        nprobe = int(max(1, min(nprobe, self.parameters.nlist)))
        if nprobe == self._nprobe:
            return
        self._index.nprobe = nprobe
        self._set_quantizer_breadth(max(2 * nprobe, 64))
        self._nprobe = nprobe

    def _set_quantizer_breadth(self, ef_search: int) -> None:
        import faiss

        if self.parameters.quantizer == "hnsw":
            faiss.downcast_index(self._index.quantizer).hnsw.efSearch = ef_search

    def search(self, queries, k, max_distance):
        queries = _contiguous(queries)
        if len(self) == 0 or len(queries) == 0:
            return _empty(len(queries), k)
        _, candidates = self._index.search(queries, k * max(1, self.parameters.refine))
        return _rescore(queries, candidates, self._descriptors, k, max_distance)

    def memory_bytes(self) -> int:
        """PQ codes and 8-byte ids per descriptor, plus the centroids (and HNSW links)."""
        dim = self._index.d
        per_vector = self.parameters.subquantizers * self.parameters.bits / 8 + 8
        centroids = self.parameters.nlist * dim * 4
        if self.parameters.quantizer == "hnsw":
            centroids += self.parameters.nlist * self.parameters.hnsw_neighbors * 2 * 4
        codebooks = (
            self.parameters.subquantizers
            * 2**self.parameters.bits
            * (dim // self.parameters.subquantizers)
        )
        return int(len(self) * per_vector + centroids + 4 * codebooks)


def kmeans(
    points: np.ndarray,
    k: int,
    iterations: int = 12,
    seed: int = 0,
    two_level_from: int = 2048,
    points_per_centroid: int = 192,
) -> np.ndarray:
    """float32 [k, D] FAISS k-means centroids of float32 [n, D] `points` (n >= k).

    From `two_level_from` centroids on, two-level k-means: ~sqrt(k) coarse cells,
    then every cell is split into a share of the k centroids proportional to its
    points. One level costs n x k distances per iteration, two levels ~n x 2 sqrt(k):
    hours against minutes for 65536 centroids on 2 cores.
    """
    import faiss

    points = np.ascontiguousarray(points, np.float32)
    if len(points) < k:
        raise InputError(f"k-means with {k} centroids needs >= {k} points, got {len(points)}")
    if k < two_level_from:
        return _one_level_kmeans(points, k, iterations, seed, points_per_centroid)
    coarse_k = 2 ** round(math.log2(math.sqrt(k)))
    coarse = _one_level_kmeans(points, coarse_k, iterations, seed, points_per_centroid)
    _, cell = faiss.knn(points, coarse, 1)
    cell = cell[:, 0]
    sizes = np.bincount(cell, minlength=coarse_k)
    # Centroids per cell in proportion to its points, >= 1 and <= its points, summing to k.
    share = np.minimum(np.maximum(np.floor(sizes * k / len(points)), 1), sizes).astype(np.int64)
    for index in np.argsort(-sizes):
        missing = k - int(share.sum())
        if missing == 0:
            break
        share[index] = int(np.clip(share[index] + missing, min(1, sizes[index]), sizes[index]))
    if int(share.sum()) != k:
        raise InputError(f"cannot split {len(points)} points into {k} centroids")
    order = np.argsort(cell, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    centroids = []
    for index in range(coarse_k):
        members = points[order[bounds[index] : bounds[index + 1]]]
        if share[index] == 0:
            continue
        if share[index] == len(members):
            centroids.append(members)
        else:
            centroids.append(
                _one_level_kmeans(members, int(share[index]), iterations, seed, points_per_centroid)
            )
    return np.concatenate(centroids).astype(np.float32)


def _one_level_kmeans(
    points: np.ndarray, k: int, iterations: int, seed: int, points_per_centroid: int
) -> np.ndarray:
    import faiss

    clustering = faiss.Kmeans(
        points.shape[1],
        k,
        niter=iterations,
        seed=seed,
        max_points_per_centroid=points_per_centroid,
        min_points_per_centroid=1,
        verbose=False,
    )
    clustering.train(points)
    return clustering.centroids


def choose_backend(count: int) -> str:
    """The `auto` back end for `count` database descriptors: exact or IVF-PQ."""
    if count <= AUTO_EXACT_MAX_DESCRIPTORS:
        return "flat"
    parameters = ivfpq_parameters(count, 1)
    return "ivfpq-hnsw" if parameters.quantizer == "hnsw" else "ivfpq"


def build_neighbors(descriptors: np.ndarray, backend: str = "auto", **options) -> NeighborIndex:
    """[M, D] float32 descriptors -> a NeighborIndex of the named back end (trained if need be)."""
    if backend == "auto":
        backend = choose_backend(len(descriptors))
    if backend == "flat":
        return FlatNeighbors(descriptors)
    if backend == "kdtree":
        return KDTreeNeighbors(descriptors, **options)
    if backend == "brute":
        return BruteForceNeighbors(descriptors, **options)
    if backend in ("ivfpq", "ivfpq-hnsw", "faiss-ivfpq"):
        count, dim = np.shape(descriptors)
        quantizer = "hnsw" if backend == "ivfpq-hnsw" else "flat"
        parameters = ivfpq_parameters(count, dim, quantizer)
        if options:
            parameters = dataclasses.replace(parameters, **options)
        return IvfPqNeighbors.train(descriptors, parameters)
    if backend in ("milvus", "ivfpq-ondisk"):  # saved by `delf index`, not built here
        raise InputError(
            f"--backend={backend} is built by `delf index --backend={backend}` into an index "
            "directory; here use flat, kdtree, brute or ivfpq"
        )
    raise ConfigError(f"unknown nearest-neighbour backend {backend!r}; known: {NEIGHBOR_BACKENDS}")


def sampled_recall(
    structure: NeighborIndex,
    descriptors: np.ndarray,
    k: int,
    max_distance: float,
    samples: int | None = None,
    seed: int = 0,
    exact_cache: dict | None = None,
) -> dict[str, Any]:
    """Recall@k of `structure` against exact search, on database rows used as queries.

    For each sampled row, its exact k nearest other rows within `max_distance`
    (the matches that would vote) are compared with what `structure` returns
    (the row itself is left out of both). `samples` defaults to 1000, fewer for
    very large indexes so that the exact search stays under ~2e9 distances.
    `exact_cache` (a dict) keeps the exact answers between calls on the same rows,
    for comparing several settings of one structure.

    Returns {"recall_at_k", "k", "max_distance", "samples", "exact_neighbors"}.
    """
    count = len(descriptors)
    if samples is None:
        samples = int(min(1000, max(100, 2_000_000_000 // max(count, 1))))
    samples = min(samples, count)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(count, samples, replace=False))
    queries = _contiguous(descriptors[rows])
    key = (samples, seed, k, max_distance)
    if exact_cache is not None and key in exact_cache:
        exact = exact_cache[key]
    else:
        _, exact = FlatNeighbors(descriptors).search(queries, k + 1, max_distance)
        if exact_cache is not None:
            exact_cache[key] = exact
    _, approximate = structure.search(queries, k + 1, max_distance)
    found = total = 0
    for row, truth, answer in zip(rows, exact, approximate, strict=True):
        wanted = [i for i in truth if i != MISSING and i != row][:k]
        total += len(wanted)
        found += len(set(wanted) & set(answer.tolist()))
    return {
        "recall_at_k": round(found / total, 4) if total else 1.0,
        "k": k,
        "max_distance": max_distance,
        "samples": int(samples),
        "exact_neighbors": int(total),
    }


def bounded_knn(
    queries: np.ndarray, database: np.ndarray, k: int, max_distance: float, block: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest `database` rows of each query within `max_distance` (L2).

    The contract of `NeighborIndex.search`: float32 [Q, D] queries and [M, D]
    database -> (distances float32 [Q, k], indices int64 [Q, k]), nearest first,
    +inf / MISSING where fewer than k lie within the bound; equal distances keep
    the lower row first.

    The database is scanned in blocks of `block` rows: one matrix product per block
    gives |d|^2 - 2 q.d, and only entries below the query's running threshold are
    kept (the bound at first, then its k-th best so far once it has k), so the
    per-element work is a compare, not a heap or a sort. The pool is cut back to the
    k best per query whenever it exceeds 4k per query. Built for the re-ranking's
    1000 queries x ~10^5 rows, where most pairs lie beyond the bound: 256-row blocks
    keep the [Q, 256] block in cache (1000 x 100 000 x 40-D: 0.16 CPU-s against
    0.94 for `faiss.knn`, one thread each).
    """
    queries = _contiguous(queries)
    count = len(queries)
    distances, indices = _empty(count, k)
    if count == 0 or len(database) == 0:
        return distances, indices
    query_norms = np.einsum("ij,ij->i", queries, queries)
    scaled = -2.0 * queries  # exact: a power of two
    # A loose pre-filter on |q - d|^2 - |q|^2; the bound itself is applied at the end.
    limit = max_distance * max_distance * (1.0 + 1e-5) + 1e-6
    threshold = (limit - query_norms).astype(np.float32)
    pool: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    pooled = 0
    with _one_blas_thread():
        pool, pooled = _scan(scaled, database, k, threshold, block, pool, pooled)
    if not pooled:
        return distances, indices
    rows, columns, values = _k_best(pool, k, count, threshold)
    found = np.sqrt(np.maximum(values + query_norms[rows], 0.0))
    rank = np.arange(rows.size) - np.searchsorted(rows, rows)
    within = found <= max_distance  # a prefix of each query's sorted neighbours
    distances[rows[within], rank[within]] = found[within]
    indices[rows[within], rank[within]] = columns[within]
    return distances, indices


def _scan(scaled, database, k, threshold, block, pool, pooled):
    """The blocks of `bounded_knn`: (pool of (rows, columns, values), its size)."""
    count = len(scaled)
    for start in range(0, len(database), block):
        chunk = _contiguous(database[start : start + block])
        partial = scaled @ chunk.T  # [Q, B] -2 q.d
        partial += np.einsum("ij,ij->i", chunk, chunk)[None]
        # 1-D nonzero on the flat mask is several times faster than 2-D nonzero.
        flat = np.flatnonzero(partial <= threshold[:, None])
        if flat.size:
            rows = flat // partial.shape[1]
            pool.append((rows, flat - rows * partial.shape[1] + start, partial.ravel()[flat]))
            pooled += flat.size
        if pooled > 4 * k * count:
            pool = [_k_best(pool, k, count, threshold)]
            pooled = pool[0][0].size
    return pool, pooled


_BLAS_LOCK = threading.Lock()
_blas_users = 0
_blas_limiter: Any = None


@functools.cache
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def _one_blas_thread():
    """BLAS runs on one thread while any caller is inside (refcounted, thread-safe).

    `bounded_knn`'s products are small ([Q, 40] x [40, 256]): a multi-threaded
    OpenBLAS synchronises its threads for each, which costs more than the product
    and, on a loaded machine, ~10x the single-threaded time (measured: 17 s
    against 1.6 s wall for the 10k re-ranking at load 15 on 2 cores).
    """
    global _blas_users, _blas_limiter
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with _BLAS_LOCK:
        if _blas_users == 0:
            _blas_limiter = controller.limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def _k_best(pool, k: int, count: int, threshold: np.ndarray):
    """The k smallest (row, column, value) entries per row of `pool`, sorted by row, value.

    Rows that hold k entries get their `threshold` lowered to the k-th value.
    """
    rows, columns, values = (np.concatenate(parts) for parts in zip(*pool, strict=True))
    order = np.lexsort((columns, values, rows))
    rows, columns, values = rows[order], columns[order], values[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, np.arange(count))[rows]
    full = rank == k - 1
    threshold[rows[full]] = np.minimum(threshold[rows[full]], values[full])
    keep = rank < k
    return rows[keep], columns[keep], values[keep]


def _rescore(
    queries: np.ndarray, candidates: np.ndarray, descriptors: np.ndarray, k: int, bound: float
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of each query's candidate rows by exact L2 distance, within `bound`.

    Rows are gathered as they come (from the page cache of the memory-mapped
    array) and only the k best per query are sorted: 0.03 CPU-s for 1000 queries x
    100 candidates, where sorting unique rows first and a full argsort took 0.07.
    """
    valid = candidates >= 0
    if not valid.any():
        return _empty(len(queries), k)
    rows = np.where(valid, candidates, 0).ravel()
    vectors = np.asarray(descriptors[rows], np.float32).reshape(*candidates.shape, -1)
    differences = vectors - queries[:, None, :]
    squared = np.einsum("qcd,qcd->qc", differences, differences)
    squared[~valid] = np.inf
    kk = min(k, squared.shape[1])
    best = np.argpartition(squared, kk - 1, axis=1)[:, :kk]
    order = np.take_along_axis(
        best, np.argsort(np.take_along_axis(squared, best, axis=1), axis=1, kind="stable"), axis=1
    )
    return _bounded(
        np.take_along_axis(squared, order, axis=1),
        np.take_along_axis(candidates, order, axis=1),
        k,
        bound,
    )


def _bounded(
    squared: np.ndarray, nearest: np.ndarray, k: int, bound: float
) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances and ids [Q, <=k] -> ([Q, k] distances, ids) with the bound applied."""
    distances, indices = _empty(len(squared), k)
    found = np.sqrt(np.maximum(squared, 0.0))
    within = (nearest >= 0) & (found <= bound)
    width = squared.shape[1]
    distances[:, :width] = np.where(within, found, np.inf)
    indices[:, :width] = np.where(within, nearest, MISSING)
    return distances, indices


def _contiguous(array: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 view (no copy for a float32 memory map)."""
    return np.ascontiguousarray(array, dtype=np.float32)


def _empty(queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((queries, k), np.inf, np.float32), np.full((queries, k), MISSING, np.int64)
