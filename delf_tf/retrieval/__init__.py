"""The global index (build, append, atomic save, mmap load) and search (vote -> RANSAC)."""

from delf_tf.errors import FingerprintMismatchError
from delf_tf.retrieval.index import ImageRecord, Index, IndexFormatError
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
