"""Nearest-neighbour matching and RANSAC geometric verification (no TensorFlow needed).

`delf_tf.matching.ransac.ransac` fits a transform; `neighbors` holds the k-NN back
ends; `pairwise` matches two images; `visualize` draws matches.
"""

from delf_tf.matching.neighbors import NeighborIndex, build_neighbors
from delf_tf.matching.pairwise import Matches, match_descriptors, match_pair, verify
from delf_tf.matching.ransac import RansacResult, fit_transform

__all__ = [
    "Matches",
    "NeighborIndex",
    "RansacResult",
    "build_neighbors",
    "fit_transform",
    "match_descriptors",
    "match_pair",
    "verify",
]
