"""Search: an initial ranking of the whole index, then local verification of its top.

Three initial rankings (RetrievalConfig.ranking), one re-ranking:
- "votes": for every query descriptor the `neighbors` nearest database
  descriptors within `distance_bound` are looked up in one search over the whole
  index (the k-NN structure saved by `delf index`). Each database image gets at
  most one vote per query descriptor, and that vote's nearest descriptor becomes a
  putative match. Images are ranked by votes.
- "asmk": ASMK* similarity of aggregated binary residuals (`asmk.py`).
- "global": inner product of DELG global descriptors (`global_ranking.py`).
  For both, the putative matches of a shortlisted image follow the votes rule
  restricted to the shortlist (RetrievalConfig.rerank_matches "knn"), or the
  reference re-ranking's nearest descriptor per image ("nearest").
The `shortlist` best images are verified with RANSAC and ranked by (inliers,
initial score), the order of the reference's re-ranking; the others follow in
their initial order. "auto" picks global when the index has global
descriptors, else asmk when it was built, else votes.

Structures are loaded from the index (memory-mapped), never trained here.

The local features of the shortlist (for matching and RANSAC) come from the index's
arrays (`IndexRows`), or, with the Milvus back end, from the feature store the index
was built from, read through `tf.io.gfile` a bounded number of files at a time
(`StoreRows`): a search worker then holds no collection of its own.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
from absl import logging

from delf_tf.config import RetrievalConfig
from delf_tf.errors import InputError
from delf_tf.features.local_features import LocalFeatures
from delf_tf.features.remote import StoreReader
from delf_tf.matching.neighbors import (
    AUTO_EXACT_MAX_DESCRIPTORS,
    EXACT_BACKENDS,
    MISSING,
    FlatNeighbors,
    NeighborIndex,
    bounded_knn,
    build_neighbors,
)
from delf_tf.matching.pairwise import Matches, verify
from delf_tf.matching.ransac import RansacResult
from delf_tf.retrieval.asmk import AsmkIndex
from delf_tf.retrieval.global_ranking import GlobalRanker
from delf_tf.retrieval.index import Index, IndexFormatError
from delf_tf.retrieval.structures import (
    AsmkStructure,
    GlobalStructure,
    IndexChangedError,
    Ranking,
    SearchStructure,
    VotesStructure,
)
from delf_tf.retrieval.structures.votes import vote


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """One verified database image.

    Attributes:
      image_id: position in `index.images`.
      key, path: the database image's store key and file.
      votes: putative matches (query descriptor -> this image): k-NN votes for the
        votes ranking, nearest descriptors within the bound for the others.
      matches: the putative matches (query -> this image).
      verification: RANSAC on the matches; `verification.model` maps query pixels
        to database pixels.
      score: the initial ranking's score (votes, ASMK* similarity or inner product).
    """

    image_id: int
    key: str
    path: str
    votes: int
    matches: Matches
    verification: RansacResult
    score: float = 0.0

    @property
    def inliers(self) -> int:
        return self.verification.num_inliers

    def to_dict(self) -> dict[str, Any]:
        model = self.verification.model
        return {
            "image_id": self.image_id,
            "key": self.key,
            "path": self.path,
            "inliers": self.inliers,
            "votes": self.votes,
            "score": round(float(self.score), 6),
            "transform": None if model is None else np.round(model, 6).tolist(),
        }


# A query's ranking before verification (ids, scores, and the votes ranking's voted).
InitialRanking = Ranking


def resolve_ranking(ranking: str, index: Index) -> str:
    """The ranking method "auto" stands for on `index` (others are returned as they are)."""
    if ranking != "auto":
        return ranking
    if index.global_descriptors is not None:
        return "global"
    if "asmk" in index.structures:
        return "asmk"
    return "votes"


class Searcher:
    """Queries one Index with one ranking method; its structures are loaded once, here."""

    def __init__(
        self,
        index: Index,
        config: RetrievalConfig | None = None,
        neighbors: NeighborIndex | None = None,
        asmk: AsmkIndex | None = None,
        global_ranker: GlobalRanker | None = None,
        threads: int | None = None,
        stores: dict[str, str] | None = None,
    ):
        """`neighbors`, `asmk`, `global_ranker`: structures to use instead of the
        index's saved ones (benchmarks compare several over one index). `stores`:
        {store id: location} replacing those a Milvus structure recorded (a store
        copied to gs://, tests on ram://).

        `threads`: RANSAC verifications run at once, in a pool the Searcher owns and
        every query (and thread) using it shares; default `default_threads()`; 1
        verifies in the calling thread.
        """
        self.index = index
        self.threads = default_threads() if threads is None else max(1, int(threads))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.config = config or RetrievalConfig()
        self.method = resolve_ranking(self.config.ranking, index)
        self._image_ids = np.asarray(index.image_ids)
        self.neighbors: NeighborIndex | None = None
        self.asmk: AsmkIndex | None = None
        self.global_ranker: GlobalRanker | None = None
        self.structure: SearchStructure
        if self.method == "votes":
            self.neighbors = neighbors or self._votes_structure()
            if self.config.nprobe and hasattr(self.neighbors, "set_nprobe"):
                self.neighbors.set_nprobe(self.config.nprobe)
            self.structure = VotesStructure.wrap(self.neighbors)
        elif self.method == "asmk":
            self.asmk = asmk or index.asmk()
            if self.asmk is None:
                raise IndexFormatError(
                    f"{index.path or 'index'}: no ASMK structure; build it with "
                    "`delf index --index_type=asmk` (or rank with --ranking=votes)"
                )
            self.structure = AsmkStructure.wrap(self.asmk)
        else:
            self.global_ranker = global_ranker or index.global_ranker()
            if self.global_ranker is None:
                raise IndexFormatError(
                    f"{index.path or 'index'}: no global descriptors (its features come "
                    "from a model without a global head); use --ranking=votes or asmk"
                )
            self.structure = GlobalStructure.wrap(self.global_ranker)
        self._reader: StoreReader | None = None
        value = self.structure.value
        if getattr(value, "reads_store", False):
            self._reader = StoreReader({**value.stores, **(stores or {})}, index.fingerprint)

    def rows(self) -> IndexRows | StoreRows:
        """Where one query's shortlist features come from (a fresh cache per query)."""
        if self._reader is None:
            return IndexRows(self.index)
        return StoreRows(self.index, self._reader)

    def _votes_structure(self) -> NeighborIndex:
        """The saved k-NN structure, or an exact one that needs no training."""
        index, backend = self.index, self.config.backend
        saved = index.neighbors()
        if saved is not None and backend in ("auto", saved.name):
            return saved
        if backend in EXACT_BACKENDS:
            return build_neighbors(index.descriptors, backend)
        if backend == "auto":
            if index.num_descriptors > AUTO_EXACT_MAX_DESCRIPTORS:
                logging.warning(
                    "%s: no saved k-NN structure: exact search over %d descriptors (slow); "
                    "`delf index` builds one",
                    index.path or "index",
                    index.num_descriptors,
                )
            return FlatNeighbors(index.descriptors)
        have = saved.name if saved is not None else "none"
        raise IndexFormatError(
            f"{index.path or 'index'}: no saved {backend} structure (it has {have}); "
            f"build it with `delf index --backend={backend}`"
        )

    # --- the votes ranking --------------------------------------------------------------

    def vote(self, query: LocalFeatures) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """k-NN votes of one query.

        Returns:
          votes: int64 [num_images] votes per database image.
          query_rows: int64 [V] query descriptor of each vote.
          database_rows: int64 [V] nearest descriptor (index row) of each vote in
            its image.
        """
        self._check_dim(query)
        if self.neighbors is None:
            raise ValueError(f"this Searcher ranks by {self.method}, not votes")
        return vote(self.neighbors, self.index, query.descriptors, self.config)

    def _verify_votes(
        self,
        query: LocalFeatures,
        voted: tuple[np.ndarray, np.ndarray, np.ndarray],
        top_k: int,
        shortlist: int,
    ) -> list[SearchResult]:
        """RANSAC over the `shortlist` most voted images of `voted` (see `vote`); top_k best."""
        votes, query_rows, database_rows = voted
        images = self._image_ids[database_rows]
        candidates = np.argsort(-votes, kind="stable")[:shortlist]
        candidates = candidates[votes[candidates] > 0]
        source = self.rows()
        source.prefetch(candidates)
        order = np.argsort(images, kind="stable")
        starts = np.searchsorted(images[order], candidates, side="left")
        ends = np.searchsorted(images[order], candidates, side="right")
        offsets = self.index.offsets

        def jobs():
            # Inliers <= votes: candidates come by falling votes (see `_verify_in_order`).
            for image_id, start, end in zip(candidates, starts, ends, strict=True):
                rows = order[start:end]
                local = database_rows[rows] - int(offsets[image_id])
                matches = Matches(
                    query.keypoints[query_rows[rows]],
                    source.keypoints(int(image_id))[local],
                    query_rows[rows],
                    local,
                )
                yield int(votes[image_id]), int(image_id), matches, float(votes[image_id])

        results = self._verify_in_order(jobs(), top_k)
        results.sort(key=lambda r: (-r.inliers, -r.votes, r.image_id))
        return results[:top_k]

    # --- the asmk and global rankings ---------------------------------------------------

    def initial(self, query: LocalFeatures) -> InitialRanking:
        """The initial ranking of `query` over the whole index, before verification.

        votes: images with at least one vote; asmk: images with a positive
        similarity; global: every image (or the IVF structure's best).
        """
        self._check_dim(query)
        return self.structure.search(self.index, query, self.config)

    def initial_ranking(self, query: LocalFeatures) -> tuple[np.ndarray, np.ndarray]:
        """(image ids int64 [R], scores float64 [R]) of `initial`, best first."""
        initial = self.initial(query)
        return initial.ids, initial.scores

    def verify(
        self,
        query: LocalFeatures,
        initial: InitialRanking,
        top_k: int | None = None,
        shortlist: int | None = None,
    ) -> list[SearchResult]:
        """RANSAC over the `shortlist` best of `initial`; the `top_k` by (inliers, score)."""
        top_k = top_k or self.config.top_k
        shortlist = shortlist or self.config.shortlist
        if initial.voted is not None:
            return self._verify_votes(query, initial.voted, top_k, shortlist)
        return self._verify_ranked(query, initial.ids, initial.scores, top_k, shortlist)

    def shortlist_matches(
        self, query: LocalFeatures, image_ids, source: IndexRows | StoreRows | None = None
    ) -> list[Matches]:
        """Putative matches of the votes rule, restricted to `image_ids` (one per image).

        The `neighbors` nearest descriptors of every query descriptor among the
        images' descriptors (exact search, `bounded_knn`), within `distance_bound`;
        each image keeps, per query descriptor, its nearest one.
        """
        ids = np.asarray(image_ids, np.int64)
        offsets = np.asarray(self.index.offsets)
        sizes = offsets[ids + 1] - offsets[ids]
        if len(query) == 0 or not sizes.sum():
            return [_no_matches() for _ in ids]
        source = source or self.rows()
        source.prefetch(ids)
        starts = np.cumsum(sizes) - sizes  # of each image's rows in `database`
        # Each image's rows are contiguous: slices copy them sequentially.
        database = np.concatenate([source.descriptors(int(i)) for i in ids]).astype(
            np.float32, copy=False
        )
        _, found = bounded_knn(
            query.descriptors, database, self.config.neighbors, self.config.distance_bound
        )
        query_rows, column = np.nonzero(found != MISSING)
        local = found[query_rows, column]
        owner = np.repeat(np.arange(len(ids)), sizes)[local]
        # Row-major: each query descriptor's neighbours come nearest first, so the
        # first (query, image) pair is that image's nearest descriptor.
        _, first = np.unique(query_rows * len(ids) + owner, return_index=True)
        query_rows, local, owner = query_rows[first], local[first], owner[first]
        order = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(len(ids) + 1))
        out = []
        for position, image_id in enumerate(ids):
            picked = order[bounds[position] : bounds[position + 1]]
            in_image = (local[picked] - starts[position]).astype(np.int64)
            out.append(
                Matches(
                    query.keypoints[query_rows[picked]],
                    source.keypoints(int(image_id))[in_image],
                    query_rows[picked].astype(np.int64),
                    in_image,
                )
            )
        return out

    def match_image(self, query: LocalFeatures, image_id: int) -> Matches:
        """Nearest descriptor of `image_id` for every query descriptor, within the bound.

        The reference re-ranking's putative matches (a KD-tree over the database
        image, queried with the query's descriptors, k=1), computed exactly.
        """
        return self.match_images(query, [image_id])[0]

    def match_images(
        self, query: LocalFeatures, image_ids, source: IndexRows | StoreRows | None = None
    ) -> list[Matches]:
        """`match_image` for many images: one matrix product per ~_MATCH_BLOCK database rows."""
        out: list[Matches] = []
        ids = [int(i) for i in image_ids]
        source = source or self.rows()
        source.prefetch(ids)
        start = 0
        while start < len(ids):
            stop, rows = start, 0
            while stop < len(ids) and (stop == start or rows < _MATCH_BLOCK):
                rows += self.index.offsets[ids[stop] + 1] - self.index.offsets[ids[stop]]
                stop += 1
            out += self._match_block(query, ids[start:stop], source)
            start = stop
        return out

    def _match_block(self, query: LocalFeatures, ids: list[int], source) -> list[Matches]:
        blocks = [source.descriptors(i) for i in ids]
        sizes = [len(block) for block in blocks]
        if len(query) == 0 or not sum(sizes):
            return [_no_matches() for _ in ids]
        stacked = np.concatenate(blocks)
        # argmin |q - d|^2 = argmax q.d - |d|^2 / 2
        scores = query.descriptors @ stacked.T
        scores -= 0.5 * np.einsum("ij,ij->i", stacked, stacked)[None]
        out, first = [], 0
        for image_id, size in zip(ids, sizes, strict=True):
            if size == 0:
                out.append(_no_matches())
                continue
            nearest = np.argmax(scores[:, first : first + size], axis=1)
            difference = query.descriptors - stacked[first + nearest]
            distances = np.sqrt(np.einsum("ij,ij->i", difference, difference))
            query_rows = np.flatnonzero(distances <= self.config.distance_bound)
            database_rows = nearest[query_rows].astype(np.int64)
            out.append(
                Matches(
                    query.keypoints[query_rows],
                    source.keypoints(image_id)[database_rows],
                    query_rows.astype(np.int64),
                    database_rows,
                )
            )
            first += size
        return out

    def _verify_ranked(
        self,
        query: LocalFeatures,
        ids: np.ndarray,
        scores: np.ndarray,
        top_k: int,
        shortlist: int,
    ) -> list[SearchResult]:
        """Verifies the `shortlist` best of (ids, scores); the top_k by (inliers, score).

        Inliers <= putative matches, so images are verified by falling match count
        and the loop stops once no remaining image can enter the top k.
        """
        source = self.rows()
        if self.config.rerank_matches == "knn":
            matches = self.shortlist_matches(query, ids[:shortlist], source)
        else:
            matches = self.match_images(query, ids[:shortlist], source)
        candidates = [
            (int(image_id), float(score), found)
            for image_id, score, found in zip(
                ids[:shortlist], scores[:shortlist], matches, strict=True
            )
        ]
        candidates.sort(key=lambda c: (-len(c[2]), -c[1], c[0]))
        jobs = ((len(found), image_id, found, score) for image_id, score, found in candidates)
        results = self._verify_in_order(jobs, top_k)
        results.sort(key=lambda r: (-r.inliers, -r.score, r.image_id))
        return results[:top_k]

    # --- public -------------------------------------------------------------------------

    def search(
        self, query: LocalFeatures, top_k: int | None = None, shortlist: int | None = None
    ) -> list[SearchResult]:
        """The `top_k` database images best verified against `query`, best first."""
        return self.verify(query, self.initial(query), top_k, shortlist)

    def ranking(
        self, query: LocalFeatures, shortlist: int | None = None
    ) -> list[tuple[int, float]]:
        """Every ranked database image, best first, as (image_id, score).

        The shortlist, verified by RANSAC, comes first (by inliers, then the
        initial score); the other images follow in the initial order. Scores keep
        that order: 1 + inliers + s for verified images and s < 1 for the others,
        where s in [0, 1) grows with the initial score. Evaluation protocols need
        this whole list, not only the top k.
        """
        shortlist = shortlist or self.config.shortlist
        initial = self.initial(query)
        verified = self.verify(query, initial, top_k=shortlist, shortlist=shortlist)
        unit = _unit_scores(initial.scores)
        position = {int(image_id): i for i, image_id in enumerate(initial.ids)}
        ranked = [
            (r.image_id, float(1.0 + r.inliers + unit[position[r.image_id]])) for r in verified
        ]
        seen = {r.image_id for r in verified}
        others = [(int(i), float(unit[n])) for n, i in enumerate(initial.ids) if int(i) not in seen]
        return ranked + others

    # --- helpers ------------------------------------------------------------------------

    def _verify_in_order(self, jobs: Iterable[tuple], top_k: int) -> list[SearchResult]:
        """RANSAC on `jobs` (bound, image_id, matches, score) that come by falling bound.

        `bound` >= the inliers RANSAC can find (votes or putative matches), so once
        the top_k results so far all have more inliers than a job's bound, no later
        job can enter the top k and verification stops. With `threads` > 1 the next
        jobs are verified ahead in the Searcher's thread pool (numpy releases the
        GIL in RANSAC's array work); results and the stopping point are those of
        the one-by-one loop, whatever the thread count.
        """
        results: list[SearchResult] = []
        pool = self._thread_pool()
        pending: collections.deque = collections.deque()
        jobs = iter(jobs)

        def submit() -> None:
            job = next(jobs, None)
            if job is not None:
                work = pool.submit(verify, job[2], self.config) if pool else None
                pending.append((job, work))

        for _ in range(2 * self.threads if pool else 1):
            submit()
        while pending:
            (bound, image_id, matches, score), work = pending.popleft()
            if len(results) >= top_k and bound < _kth_inliers(results, top_k):
                for _, rest in pending:
                    rest.cancel()
                break
            submit()
            verification = work.result() if work else verify(matches, self.config)
            results.append(self._result(image_id, matches, score, verification))
        return results

    def _thread_pool(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """The pool that verifies candidates ahead (None with one thread), made on first use."""
        if self.threads <= 1:
            return None
        with _POOL_LOCK:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.threads, thread_name_prefix="delf-verify"
                )
        return self._pool

    def _result(
        self, image_id: int, matches: Matches, score: float, verification: RansacResult
    ) -> SearchResult:
        record = self.index.images[image_id]
        return SearchResult(
            image_id, record.key, record.path, len(matches), matches, verification, score
        )

    def _check_dim(self, query: LocalFeatures) -> None:
        if query.dim != self.index.dim:
            raise InputError(
                f"query descriptors are {query.dim}-D, the index holds {self.index.dim}-D"
            )


# Most verification threads a Searcher starts by default.
MAX_DEFAULT_THREADS = 4
_POOL_LOCK = threading.Lock()


def default_threads() -> int:
    """Verification threads by default: the CPUs this process may use, at most 4."""
    return max(1, min(MAX_DEFAULT_THREADS, len(os.sched_getaffinity(0))))


class IndexRows:
    """Shortlist features from the index's own (memory-mapped) arrays."""

    def __init__(self, index: Index):
        self.index = index

    def prefetch(self, image_ids) -> None:
        """Nothing to fetch: the arrays are paged in on demand."""

    def keypoints(self, image_id: int) -> np.ndarray:
        """float32 [n, 2] keypoints of one database image."""
        return self.index.image_keypoints(image_id)

    def descriptors(self, image_id: int) -> np.ndarray:
        """float32 [n, D] descriptors of one database image."""
        return self.index.image_descriptors(image_id)


class StoreRows(IndexRows):
    """Shortlist features read from the feature store through `tf.io.gfile` (Milvus back
    end), `StoreReader.concurrency` files at a time; kept for one query."""

    def __init__(self, index: Index, reader: StoreReader):
        super().__init__(index)
        self.reader = reader
        self._features: dict[int, LocalFeatures] = {}

    def prefetch(self, image_ids) -> None:
        wanted = [i for i in dict.fromkeys(int(i) for i in image_ids) if i not in self._features]
        records = [self.index.images[i] for i in wanted]
        fetched = self.reader.fetch((record.store, record.key) for record in records)
        for image_id, record, features in zip(wanted, records, fetched, strict=True):
            if len(features) != record.num_features:
                raise IndexFormatError(
                    f"{record.key}: the feature store holds {len(features)} features, the "
                    f"index {record.num_features}: the store changed since `delf index`"
                )
            self._features[image_id] = features

    def keypoints(self, image_id: int) -> np.ndarray:
        self.prefetch([image_id])
        return np.asarray(self._features[image_id].keypoints, np.float32)

    def descriptors(self, image_id: int) -> np.ndarray:
        self.prefetch([image_id])
        return np.asarray(self._features[image_id].descriptors, np.float32)


# Database rows compared with a query in one matrix product when re-ranking.
_MATCH_BLOCK = 16_384


def _no_matches() -> Matches:
    empty = np.zeros(0, np.int64)
    return Matches(np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32), empty, empty)


def _unit_scores(scores: np.ndarray) -> np.ndarray:
    """Scores mapped into [0, 1), order kept (the largest to 0.999)."""
    if scores.size == 0:
        return np.zeros(0, np.float64)
    low, high = float(scores.min()), float(scores.max())
    if high <= low:
        return np.full(scores.shape, 0.5)
    return 0.999 * (scores - low) / (high - low)


def _kth_inliers(results: list[SearchResult], k: int) -> int:
    return sorted((r.inliers for r in results), reverse=True)[k - 1]


def search(
    index: Index, query: LocalFeatures, config: RetrievalConfig | None = None
) -> list[SearchResult]:
    """One-off search (loads the index's structures; reuse a Searcher for many queries)."""
    return Searcher(index, config).search(query)


def load_searcher(path, config: RetrievalConfig | None = None, attempts: int = 3) -> Searcher:
    """`Index.load(path)` and a Searcher over it with its structure loaded, all of one
    generation: read again when a writer replaced the index in between."""
    for attempt in range(attempts):
        index = Index.load(path)
        try:
            return Searcher(index, config)
        except IndexChangedError:
            if attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")
