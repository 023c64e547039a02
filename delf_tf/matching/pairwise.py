"""Pairwise matching of two images' features: nearest neighbours, then RANSAC.

The DELF reference's matcher: a KD-tree over the second image's descriptors, the
nearest one for every descriptor of the first image if it lies within the
distance bound, then RANSAC on the matched keypoints.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from delf_tf.config import RetrievalConfig
from delf_tf.features.local_features import LocalFeatures
from delf_tf.matching.neighbors import MISSING, build_neighbors
from delf_tf.matching.ransac import RansacResult, ransac


@dataclasses.dataclass(frozen=True)
class Matches:
    """N putative correspondences between a query and a database image.

    Attributes:
      query_points: float32 [N, 2] (x, y) in query-image pixels.
      database_points: float32 [N, 2] (x, y) in database-image pixels.
      query_indices: int64 [N] rows of the query's LocalFeatures.
      database_indices: int64 [N] rows of the database image's LocalFeatures.
    """

    query_points: np.ndarray
    database_points: np.ndarray
    query_indices: np.ndarray
    database_indices: np.ndarray

    def __len__(self) -> int:
        return int(self.query_points.shape[0])


def match_descriptors(
    query: LocalFeatures,
    database: LocalFeatures,
    distance_bound: float = RetrievalConfig.distance_bound,
    backend: str = RetrievalConfig.backend,
) -> Matches:
    """Nearest database descriptor of every query descriptor, if within `distance_bound`."""
    if query.dim != database.dim:
        raise ValueError(f"descriptor sizes differ: {query.dim} vs {database.dim}")
    neighbors = build_neighbors(database.descriptors, backend)
    _, nearest = neighbors.search(query.descriptors, 1, distance_bound)
    query_indices = np.nonzero(nearest[:, 0] != MISSING)[0]
    database_indices = nearest[query_indices, 0]
    return Matches(
        query.keypoints[query_indices],
        database.keypoints[database_indices],
        query_indices,
        database_indices,
    )


def verify(matches: Matches, config: RetrievalConfig | None = None) -> RansacResult:
    """RANSAC (config's transform, threshold, trials, method, seed) query -> database."""
    config = config or RetrievalConfig()
    return ransac(
        matches.query_points,
        matches.database_points,
        transform=config.transform,
        residual_threshold=config.residual_threshold,
        max_trials=config.max_trials,
        seed=config.seed,
        method=config.ransac_method,
    )


def match_pair(
    query: LocalFeatures, database: LocalFeatures, config: RetrievalConfig | None = None
) -> tuple[Matches, RansacResult]:
    """Putative matches and their RANSAC verification for one image pair."""
    config = config or RetrievalConfig()
    matches = match_descriptors(query, database, config.distance_bound, config.backend)
    return matches, verify(matches, config)
