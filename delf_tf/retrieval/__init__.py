"""The global index (build, append, atomic save, mmap load) and search (vote -> RANSAC)."""

from delf_tf.retrieval.index import (
    FingerprintMismatchError,
    ImageRecord,
    Index,
    IndexFormatError,
)
from delf_tf.retrieval.search import Searcher, SearchResult, search

__all__ = [
    "FingerprintMismatchError",
    "ImageRecord",
    "Index",
    "IndexFormatError",
    "SearchResult",
    "Searcher",
    "search",
]
