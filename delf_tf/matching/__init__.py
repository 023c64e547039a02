"""Nearest-neighbour matching and RANSAC geometric verification (no TensorFlow needed)."""

from delf_tf.matching.neighbors import NeighborIndex, build_neighbors
from delf_tf.matching.pairwise import Matches, match_descriptors, match_pair, verify
from delf_tf.matching.ransac import RansacResult, fit_transform, ransac

__all__ = [
    "Matches",
    "NeighborIndex",
    "RansacResult",
    "build_neighbors",
    "fit_transform",
    "match_descriptors",
    "match_pair",
    "ransac",
    "verify",
]
