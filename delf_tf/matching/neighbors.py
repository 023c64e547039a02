"""Nearest-neighbour back ends behind one small interface.

`build_neighbors(descriptors, backend)` returns a `NeighborIndex` over [M, D]
descriptors; `search(queries, k, max_distance)` gives, per query, the `k` nearest
within `max_distance` (L2), nearest first. Back ends:
- "kdtree": scipy `cKDTree`, exact; the DELF reference's choice (the default).
- "brute": exact matrix products, for small databases and as a test reference.
- "faiss-ivfpq": FAISS IVF-PQ, approximate and compact; needs the optional
  `faiss-cpu` package. Distances are PQ approximations, so the bound is too.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np
from scipy.spatial import cKDTree

from delf_tf.config import NEIGHBOR_BACKENDS

MISSING = -1
# Brute force works on [queries, database] blocks of at most this many distances.
_BRUTE_BLOCK = 1 << 22
# Bytes of one scipy cKDTree node (ckdtreenode: 4 intp, 1 double, 2 pointers, 2 intp).
_KDTREE_NODE_BYTES = 72


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


class FaissIvfPqNeighbors:
    """Approximate search with FAISS IVF-PQ (optional dependency `faiss-cpu`).

    nlist: inverted lists (default ~4 sqrt(M)); subquantizers: PQ code bytes per
    descriptor (must divide D); nprobe: lists visited per query.
    """

    name = "faiss-ivfpq"

    def __init__(
        self,
        descriptors: np.ndarray,
        nlist: int | None = None,
        subquantizers: int | None = None,
        nprobe: int = 16,
        train_size: int = 200_000,
        seed: int = 0,
    ):
        try:
            import faiss
        except ImportError as error:
            raise ImportError(
                "backend 'faiss-ivfpq' needs the optional package faiss-cpu "
                "(pip install faiss-cpu); use backend 'kdtree' otherwise"
            ) from error
        descriptors = np.ascontiguousarray(descriptors, np.float32)
        count, dim = descriptors.shape
        nlist = nlist or max(1, min(int(4 * math.sqrt(max(count, 1))), count // 39 or 1))
        subquantizers = subquantizers or next(
            m for m in (dim // 2, dim // 4, dim, 1) if m and dim % m == 0
        )
        quantizer = faiss.IndexFlatL2(dim)
        self._index = faiss.IndexIVFPQ(quantizer, dim, nlist, subquantizers, 8)
        rng = np.random.default_rng(seed)
        sample = descriptors
        if count > train_size:
            sample = descriptors[np.sort(rng.choice(count, train_size, replace=False))]
        self._index.train(sample)
        for start in range(0, count, 1_000_000):
            self._index.add(descriptors[start : start + 1_000_000])
        self._index.nprobe = nprobe
        self._quantizer = quantizer
        self._size = count
        self._code_bytes = subquantizers

    def __len__(self) -> int:
        return self._size

    def search(self, queries, k, max_distance):
        queries = np.ascontiguousarray(queries, np.float32)
        if self._size == 0 or len(queries) == 0:
            return _empty(len(queries), k)
        squared, indices = self._index.search(queries, k)
        found = np.sqrt(np.maximum(squared, 0.0))
        within = (indices >= 0) & (found <= max_distance)
        distances = np.where(within, found, np.inf).astype(np.float32)
        return distances, np.where(within, indices, MISSING).astype(np.int64)

    def memory_bytes(self) -> int:
        # PQ codes + 64-bit ids per descriptor, plus the coarse centroids.
        dim = self._quantizer.d
        return int(self._size * (self._code_bytes + 8) + self._quantizer.ntotal * dim * 4)


def build_neighbors(descriptors: np.ndarray, backend: str = "kdtree", **options) -> NeighborIndex:
    """[M, D] float32 descriptors -> a NeighborIndex of the named back end."""
    if backend == "kdtree":
        return KDTreeNeighbors(descriptors, **options)
    if backend == "brute":
        return BruteForceNeighbors(descriptors, **options)
    if backend == "faiss-ivfpq":
        return FaissIvfPqNeighbors(descriptors, **options)
    raise ValueError(f"unknown nearest-neighbour backend {backend!r}; known: {NEIGHBOR_BACKENDS}")


def _empty(queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((queries, k), np.inf, np.float32), np.full((queries, k), MISSING, np.int64)
