"""Search: k-NN votes over the global index -> shortlist -> RANSAC -> rank by inliers.

For every query descriptor the `neighbors` nearest database descriptors within
`distance_bound` are looked up in one search over the whole index. Each database
image gets at most one vote per query descriptor, and that vote's nearest
descriptor becomes a putative match. The `shortlist` images with the most votes
are verified with RANSAC and ranked by inliers (then votes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from delf_tf.config import RetrievalConfig
from delf_tf.features.local_features import LocalFeatures
from delf_tf.matching.neighbors import MISSING, NeighborIndex, build_neighbors
from delf_tf.matching.pairwise import Matches, verify
from delf_tf.matching.ransac import RansacResult
from delf_tf.retrieval.index import Index


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """One verified database image.

    Attributes:
      image_id: position in `index.images`.
      key, path: the database image's store key and file.
      votes: query descriptors with a neighbour in this image (= putative matches).
      matches: the putative matches (query -> this image).
      verification: RANSAC on the matches; `verification.model` maps query pixels
        to database pixels.
    """

    image_id: int
    key: str
    path: str
    votes: int
    matches: Matches
    verification: RansacResult

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
            "transform": None if model is None else np.round(model, 6).tolist(),
        }


class Searcher:
    """Queries one Index; the nearest-neighbour structure is built once, here."""

    def __init__(
        self,
        index: Index,
        config: RetrievalConfig | None = None,
        neighbors: NeighborIndex | None = None,
    ):
        self.index = index
        self.config = config or RetrievalConfig()
        self.neighbors = neighbors or build_neighbors(index.descriptors, self.config.backend)
        self._image_ids = np.asarray(index.image_ids)

    def vote(self, query: LocalFeatures) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """k-NN votes of one query.

        Returns:
          votes: int64 [num_images] votes per database image.
          query_rows: int64 [V] query descriptor of each vote.
          database_rows: int64 [V] nearest descriptor (index row) of each vote in
            its image.
        """
        if query.dim != self.index.dim:
            raise ValueError(
                f"query descriptors are {query.dim}-D, the index holds {self.index.dim}-D"
            )
        _, neighbors = self.neighbors.search(
            query.descriptors, self.config.neighbors, self.config.distance_bound
        )
        # Row-major order keeps each query's neighbours nearest first, so the first
        # (query, image) occurrence is that image's nearest descriptor.
        query_rows, column = np.nonzero(neighbors != MISSING)
        database_rows = neighbors[query_rows, column]
        images = self._image_ids[database_rows].astype(np.int64)
        _, first = np.unique(query_rows * self.index.num_images + images, return_index=True)
        query_rows, database_rows, images = query_rows[first], database_rows[first], images[first]
        votes = np.bincount(images, minlength=self.index.num_images)
        return votes, query_rows, database_rows

    def search(
        self, query: LocalFeatures, top_k: int | None = None, shortlist: int | None = None
    ) -> list[SearchResult]:
        """The `top_k` database images best verified against `query`, best first."""
        return self._verify(
            query, self.vote(query), top_k or self.config.top_k, shortlist or self.config.shortlist
        )

    def _verify(
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
        order = np.argsort(images, kind="stable")
        starts = np.searchsorted(images[order], candidates, side="left")
        ends = np.searchsorted(images[order], candidates, side="right")
        results: list[SearchResult] = []
        for image_id, start, end in zip(candidates, starts, ends, strict=True):
            # Inliers <= votes: an image with fewer votes than the k-th best inlier
            # count so far cannot enter the top k (candidates come by falling votes).
            if len(results) >= top_k and votes[image_id] < _kth_inliers(results, top_k):
                break
            rows = order[start:end]
            offset = int(self.index.offsets[image_id])
            matches = Matches(
                query.keypoints[query_rows[rows]],
                np.asarray(self.index.keypoints[database_rows[rows]]),
                query_rows[rows],
                database_rows[rows] - offset,
            )
            record = self.index.images[image_id]
            results.append(
                SearchResult(
                    int(image_id),
                    record.key,
                    record.path,
                    int(votes[image_id]),
                    matches,
                    verify(matches, self.config),
                )
            )
        results.sort(key=lambda r: (-r.inliers, -r.votes, r.image_id))
        return results[:top_k]

    def ranking(
        self, query: LocalFeatures, shortlist: int | None = None
    ) -> list[tuple[int, float]]:
        """Every database image with a vote, best first, as (image_id, score).

        The shortlist, verified by RANSAC, comes first (by inliers, then votes);
        the other voted images follow by votes. Scores keep that order:
        1 + inliers + votes / (max_votes + 1) for verified images, and
        votes / (max_votes + 1) < 1 for the others. Evaluation protocols need
        this whole list, not only the top k.
        """
        shortlist = shortlist or self.config.shortlist
        voted = self.vote(query)
        votes = voted[0]
        scale = float(votes.max(initial=0) + 1)
        verified = self._verify(query, voted, top_k=shortlist, shortlist=shortlist)
        ranked = [(r.image_id, 1.0 + r.inliers + r.votes / scale) for r in verified]
        seen = {r.image_id for r in verified}
        others = [
            int(i) for i in np.argsort(-votes, kind="stable") if votes[i] > 0 and i not in seen
        ]
        return ranked + [(i, float(votes[i]) / scale) for i in others]


def _kth_inliers(results: list[SearchResult], k: int) -> int:
    return sorted((r.inliers for r in results), reverse=True)[k - 1]


def search(
    index: Index, query: LocalFeatures, config: RetrievalConfig | None = None
) -> list[SearchResult]:
    """One-off search (builds the nearest-neighbour structure; reuse a Searcher for many)."""
    return Searcher(index, config).search(query)
