"""ASMK*: the aggregated selective match kernel with binarised residuals.

Tolias, Avrithis and Jegou, "To aggregate or not to aggregate: selective match
kernels for image search" (ICCV 2013); used with DELF local features in
Detect-to-Retrieve (Teichmann et al., CVPR 2019) and HOW (Tolias et al., ECCV 2020).

- A codebook of W visual words is learnt with FAISS k-means on a sample of the
  database descriptors.
- Every database descriptor is assigned to its nearest word. Per image and word,
  the residuals (descriptor - centroid) are summed and binarised: bit j is 1
  when component j of the sum is positive (ASMK*: packed bits, ceil(D / 8) bytes
  per word of an image).
- An inverted file lists, for every word, the images that have it with their
  packed residual.
- A query's descriptors are assigned to their `query_assignments` nearest words
  (multiple assignment, query side only, as in HOW) and aggregated the same way.
  For a word c of both images, u = 1 - 2 hamming(b_q, b_x) / D in [-1, 1], and
  the selective kernel sigma(u) = sign(u) |u|^alpha if u > threshold, else 0
  (defaults alpha 3, threshold 0). The score of image X is
    sum_c sigma(u_c) / sqrt(|words(query)| |words(X)|),
  the normalisation of the paper (a binary word's self-similarity is 1).

Why this module and not the `asmk` package from PyPI (0.1.1): it builds (a
Cython extension) and runs with numpy 2.4 and faiss 1.15, and on 32-D
descriptors its scores equal this module's (to 1e-9, same codebook), but (1) it
saves its codebook and inverted file only with pickle, which this project never
loads from files a user hands in; (2) its inverted file grows one descriptor at
a time in a Python loop and its search loops over query words in Python, too
slow for 10^7-10^8 descriptors; (3) it divides Hamming distances by the packed
width (64 bits for DELF's 40-D descriptors) instead of D, so its similarities
are not the kernel's for D not a multiple of 32; (4) it would add a compiled
sdist to the core dependencies. Here
the inverted file is three arrays in CSR form saved as `.npy` (memory-mapped on
load), built and searched with vectorised numpy, and k-means, the word graph and
word assignment come from FAISS.

Files (inside the index directory, folder `asmk/`):
  centroids.npy         float32 [W, D]  the visual words
  words.faiss           FAISS index over the centroids (flat, or HNSW from
                        HNSW_WORDS words on) that assigns descriptors to words
  offsets.npy           int64 [W + 1]   entries of word w: offsets[w]:offsets[w + 1]
  entry_images.npy      int32 [E]       image id of each entry (ascending within a word)
  entry_bits.npy        uint8 [E, B]    packed signs of the aggregated residual, B = ceil(D / 8)
  image_words.npy       int32 [N]       words of each image (entries), its normaliser
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from delf_tf.errors import InputError
from delf_tf.matching.neighbors import kmeans

FILES = ("centroids", "offsets", "entry_images", "entry_bits", "image_words")
WORDS_FILE = "words.faiss"
DTYPES = {
    "centroids": np.float32,
    "offsets": np.int64,
    "entry_images": np.int32,
    "entry_bits": np.uint8,
    "image_words": np.int32,
}
# Codebooks of at least this many words assign descriptors through an HNSW graph
# (efSearch 32: the true nearest word ~98% of the time): exhaustive assignment
# costs descriptors x words distances (measured, one core: 42 us per descriptor
# at 16384 words exhaustively against 59 us through HNSW; ~170 against ~100-140
# at 65536).
HNSW_WORDS = 32_768
HNSW_LINKS = 32
HNSW_EF_SEARCH = 32
# Codebooks of at least this many words are learnt by two-level k-means (measured
# on 200k descriptors, 1 thread: 51 s for 4096 words in one level, 7.5 s for
# 16384 in two).
TWO_LEVEL_WORDS = 2048
# Default codebook size: about this many database descriptors per word.
DESCRIPTORS_PER_WORD = 64
# k-means: training points per word and iterations (FAISS wants >= 39 per word).
POINTS_PER_WORD = 48
KMEANS_ITERATIONS = 12
# Descriptors assigned and aggregated per step when building (bounds memory).
_CHUNK = 1 << 20


class AsmkError(InputError):
    """An ASMK structure is missing, inconsistent or cannot be built; the message names it."""


def default_codebook_size(num_descriptors: int) -> int:
    """Visual words for an index of `num_descriptors` local descriptors.

    The power of two nearest num_descriptors / DESCRIPTORS_PER_WORD (64), within
    [16, 65536]: 65536 words (the Detect-to-Retrieve / HOW size) from ~4 M
    descriptors (a few thousand images of 1000 features) on, 16384 for 1 M, 512
    for 38 images of 1000. Coarser codebooks aggregate more (a smaller inverted
    file) but separate images worse; finer ones cost more to learn and to store.
    """
    words = 2 ** round(math.log2(max(num_descriptors / DESCRIPTORS_PER_WORD, 1.0)))
    return int(min(65_536, max(16, words)))


@dataclasses.dataclass(frozen=True)
class AsmkParameters:
    """How the codebook was learnt (recorded in index.json).

    Attributes:
      codebook_size: visual words W.
      train_size: descriptors sampled for k-means.
      iterations: k-means iterations.
      seed: seed of the sample and of k-means.
      assignment: "flat" (exhaustive) or "hnsw": how descriptors find their word.
    """

    codebook_size: int
    train_size: int
    iterations: int = KMEANS_ITERATIONS
    seed: int = 0
    assignment: str = "flat"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class AsmkIndex:
    """Codebook + inverted file of binarised aggregated residuals over N images."""

    def __init__(
        self,
        centroids: np.ndarray,
        words: Any,
        offsets: np.ndarray,
        entry_images: np.ndarray,
        entry_bits: np.ndarray,
        image_words: np.ndarray,
        parameters: AsmkParameters,
    ):
        self.centroids = centroids
        self.words = words  # FAISS index over the centroids
        self.offsets = offsets
        self.entry_images = entry_images
        self.entry_bits = entry_bits
        self.image_words = image_words
        self.parameters = parameters
        self._check()

    # --- shape ---------------------------------------------------------------------

    @property
    def codebook_size(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def num_images(self) -> int:
        return int(self.image_words.shape[0])

    @property
    def num_entries(self) -> int:
        return int(self.entry_images.shape[0])

    def memory_bytes(self) -> int:
        """Bytes of the inverted file, normalisers and codebook."""
        arrays = (self.offsets, self.entry_images, self.entry_bits, self.image_words)
        return int(sum(a.nbytes for a in arrays) + self.centroids.nbytes)

    def _check(self) -> None:
        words, bytes_per_word = self.codebook_size, (self.dim + 7) // 8
        problems = []
        if self.offsets.shape != (words + 1,) or (words and int(self.offsets[-1]) != len(self)):
            problems.append(f"offsets {self.offsets.shape} for {words} words, {len(self)} entries")
        elif words and (int(self.offsets[0]) != 0 or np.any(np.diff(self.offsets) < 0)):
            problems.append("offsets do not rise from 0")  # O(words)
        if self.entry_images.shape != (len(self),):
            problems.append(f"entry_images {self.entry_images.shape} for {len(self)} entries")
        if self.entry_bits.shape != (len(self), bytes_per_word):
            problems.append(f"entry_bits {self.entry_bits.shape} for {len(self)} entries")
        if int(self.words.ntotal) != words:
            problems.append(f"{WORDS_FILE} holds {self.words.ntotal} words, centroids {words}")
        if problems:
            raise AsmkError("inconsistent ASMK structure: " + "; ".join(problems))

    def __len__(self) -> int:
        return self.num_entries

    # --- building ------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        descriptors: np.ndarray,
        offsets: np.ndarray,
        codebook_size: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> AsmkIndex:
        """Learns a codebook on a sample of `descriptors` and indexes every image.

        descriptors: float32 [M, D] of all images; offsets: int64 [N + 1], image i
        owns rows offsets[i]:offsets[i + 1].
        """
        count, dim = descriptors.shape
        size = codebook_size or default_codebook_size(count)
        if count < size:
            raise AsmkError(f"a codebook of {size} words needs >= {size} descriptors, got {count}")
        parameters = AsmkParameters(
            codebook_size=size,
            train_size=int(min(count, POINTS_PER_WORD * size)),
            seed=seed,
            assignment="hnsw" if size >= HNSW_WORDS else "flat",
        )
        start = time.perf_counter()
        centroids = train_codebook(descriptors, parameters)
        words = word_index(centroids, parameters.assignment)
        if progress:
            logging.info(
                "ASMK codebook: %d words from %d descriptors in %.1f s",
                size,
                parameters.train_size,
                time.perf_counter() - start,
            )
        empty = cls(
            centroids,
            words,
            np.zeros(size + 1, np.int64),
            np.zeros(0, np.int32),
            np.zeros((0, (dim + 7) // 8), np.uint8),
            np.zeros(0, np.int32),
            parameters,
        )
        return empty.extended(descriptors, offsets, progress=progress)

    def extended(
        self, descriptors: np.ndarray, offsets: np.ndarray, progress: bool = False
    ) -> AsmkIndex:
        """A copy that also indexes images num_images.. of (descriptors, offsets); no retraining."""
        total = len(offsets) - 1
        first = self.num_images
        if total < first:
            raise AsmkError(f"the index has {total} images, ASMK already covers {first}")
        if total == first:
            return self
        chunks = _image_chunks(offsets, first, total)
        new_images, new_words, new_bits = [], [], []
        for begin, end in chunks:
            rows = slice(int(offsets[begin]), int(offsets[end]))
            block = np.ascontiguousarray(descriptors[rows], np.float32)
            owner = np.repeat(
                np.arange(begin, end, dtype=np.int64), np.diff(offsets[begin : end + 1])
            )
            assigned = self.assign(block, 1)[:, 0]
            images, words, bits = _aggregate(block, owner, assigned, self.centroids)
            new_images.append(images.astype(np.int32))
            new_words.append(words)
            new_bits.append(bits)
            if progress:
                logging.info("ASMK: aggregated images %d-%d of %d", begin, end - 1, total)
        old_words = np.repeat(
            np.arange(self.codebook_size, dtype=np.int64), np.diff(np.asarray(self.offsets))
        )
        words = np.concatenate([old_words, *new_words])
        images = np.concatenate([np.asarray(self.entry_images), *new_images])
        bits = np.concatenate([np.asarray(self.entry_bits), *new_bits])
        # Stable: within a word, old entries (lower image ids) stay before new ones.
        order = np.argsort(words, kind="stable")
        counts = np.bincount(words, minlength=self.codebook_size)
        image_words = np.bincount(images, minlength=total).astype(np.int32)
        return AsmkIndex(
            self.centroids,
            self.words,
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            images[order],
            bits[order],
            image_words,
            self.parameters,
        )

    # --- query ---------------------------------------------------------------------

    def assign(self, descriptors: np.ndarray, k: int) -> np.ndarray:
        """int64 [Q, k]: the k nearest words of each descriptor, nearest first."""
        descriptors = np.ascontiguousarray(descriptors, np.float32)
        if len(descriptors) == 0:
            return np.zeros((0, k), np.int64)
        k = min(k, self.codebook_size)
        out = np.empty((len(descriptors), k), np.int64)
        for start in range(0, len(descriptors), _CHUNK):
            _, out[start : start + _CHUNK] = self.words.search(
                descriptors[start : start + _CHUNK], k
            )
        return out

    def aggregate_query(
        self, descriptors: np.ndarray, assignments: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(words int64 [U], packed bits uint8 [U, B]) of a query, multiple assignment."""
        nearest = self.assign(descriptors, assignments)
        if nearest.size == 0:
            return np.zeros(0, np.int64), np.zeros((0, (self.dim + 7) // 8), np.uint8)
        rows = np.repeat(np.arange(len(descriptors)), nearest.shape[1])
        words = nearest.reshape(-1)
        keep = words >= 0
        _, words, bits = _aggregate(
            np.ascontiguousarray(descriptors, np.float32)[rows[keep]],
            np.zeros(int(keep.sum()), np.int64),
            words[keep],
            self.centroids,
        )
        return words, bits

    def scores(
        self,
        descriptors: np.ndarray,
        alpha: float = 3.0,
        threshold: float = 0.0,
        assignments: int = 5,
    ) -> np.ndarray:
        """float64 [N]: the ASMK* similarity of a query (float32 [Q, D]) to every image."""
        scores = np.zeros(self.num_images, np.float64)
        words, bits = self.aggregate_query(descriptors, assignments)
        if words.size == 0 or self.num_images == 0:
            return scores
        starts = np.asarray(self.offsets[words])
        lengths = np.asarray(self.offsets[words + 1]) - starts
        total = int(lengths.sum())
        if total == 0:
            return scores
        # Entry rows of every query word's list, concatenated.
        owner = np.repeat(np.arange(len(words)), lengths)
        entries = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        entries += np.repeat(starts, lengths)
        differing = np.bitwise_count(np.bitwise_xor(self.entry_bits[entries], bits[owner]))
        similarity = 1.0 - 2.0 * differing.sum(axis=1, dtype=np.float64) / self.dim
        kernel = selective_kernel(similarity, alpha, threshold)
        images = np.asarray(self.entry_images[entries])
        if images.size and (int(images.min()) < 0 or int(images.max()) >= self.num_images):
            # Checked where read (O(entries of the query's words)), not on every load.
            raise AsmkError(
                f"entry_images holds image {int(images.min()) if images.min() < 0 else int(images.max())}"
                f" outside 0..{self.num_images - 1}: the ASMK structure is damaged"
            )
        scores = np.bincount(images, weights=kernel, minlength=self.num_images).astype(np.float64)
        image_words = np.asarray(self.image_words, np.float64)
        norm = np.where(image_words > 0, 1.0 / np.sqrt(np.maximum(image_words, 1.0)), 0.0)
        return scores * norm / math.sqrt(len(words))

    # --- disk ----------------------------------------------------------------------

    def save(self, folder: str | os.PathLike, write_array, write_faiss) -> dict[str, Any]:
        """Writes the files into `folder` (with `write_array(path, array)` and
        `write_faiss(path, index)`); returns the header."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        shapes = {}
        for name in FILES:
            array = np.asarray(getattr(self, name), DTYPES[name])
            write_array(folder / f"{name}.npy", array)
            shapes[name] = list(array.shape)
        write_faiss(folder / WORDS_FILE, self.words)
        return {
            "parameters": self.parameters.to_dict(),
            "shapes": shapes,
            "num_images": self.num_images,
            "entries": self.num_entries,
            "bytes_per_image": round(self.memory_bytes() / max(self.num_images, 1), 1),
        }

    @classmethod
    def load(cls, folder: str | os.PathLike, header: dict[str, Any], read_array, mmap: bool = True):
        """Reads the files of `save`: arrays by `read_array(path, dtype, shape, mmap)`
        (which checks them against the header's shapes), memory-mapped unless mmap=False."""
        import faiss

        folder = Path(folder)
        arrays = {}
        for name in FILES:
            path = folder / f"{name}.npy"
            expected = header.get("shapes", {}).get(name)
            if expected is None:
                raise AsmkError(f"{path}: index.json gives no shape for it")
            arrays[name] = read_array(path, DTYPES[name], expected, mmap)
        try:
            words = faiss.read_index(str(folder / WORDS_FILE))
        except RuntimeError as error:
            raise AsmkError(f"{folder / WORDS_FILE}: unreadable ({error})") from error
        _set_search_breadth(words)
        parameters = AsmkParameters(**header["parameters"])
        return cls(arrays.pop("centroids"), words, **arrays, parameters=parameters)


def selective_kernel(similarity: np.ndarray, alpha: float, threshold: float) -> np.ndarray:
    """sigma_alpha(u) = sign(u) |u|^alpha where u > threshold, else 0 (float64)."""
    similarity = np.asarray(similarity, np.float64)
    return np.where(similarity > threshold, np.sign(similarity) * np.abs(similarity) ** alpha, 0.0)


def train_codebook(descriptors: np.ndarray, parameters: AsmkParameters) -> np.ndarray:
    """float32 [W, D] k-means centroids of a sample of `descriptors` (FAISS k-means,
    two-level from TWO_LEVEL_WORDS words on; see `delf_tf.matching.neighbors.kmeans`)."""
    count = len(descriptors)
    rng = np.random.default_rng(parameters.seed)
    size = parameters.train_size
    rows = np.sort(rng.choice(count, size, replace=False)) if size < count else slice(None)
    return kmeans(
        descriptors[rows],
        parameters.codebook_size,
        iterations=parameters.iterations,
        seed=parameters.seed,
        two_level_from=TWO_LEVEL_WORDS,
    )


def word_index(centroids: np.ndarray, assignment: str) -> Any:
    """A FAISS index over the centroids that finds the nearest words of a descriptor."""
    import faiss

    dim = centroids.shape[1]
    if assignment == "hnsw":
        words = faiss.IndexHNSWFlat(dim, HNSW_LINKS)
        words.hnsw.efConstruction = 80
    else:
        words = faiss.IndexFlatL2(dim)
    words.add(np.ascontiguousarray(centroids, np.float32))
    _set_search_breadth(words)
    return words


def _set_search_breadth(words: Any) -> None:
    import faiss

    words = faiss.downcast_index(words)
    if hasattr(words, "hnsw"):
        words.hnsw.efSearch = HNSW_EF_SEARCH


def _aggregate(
    descriptors: np.ndarray, owners: np.ndarray, words: np.ndarray, centroids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums residuals per (owner, word) and binarises them.

    descriptors: float32 [R, D]; owners: int64 [R] (image ids); words: int64 [R].
    Returns (owners [E], words [E], packed bits uint8 [E, ceil(D / 8)]), sorted by
    owner then word.
    """
    if len(descriptors) == 0:
        return (
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros((0, (centroids.shape[1] + 7) // 8), np.uint8),
        )
    key = owners.astype(np.int64) * len(centroids) + words
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    residuals = descriptors[order] - centroids[words[order]]
    sums = np.add.reduceat(residuals, starts, axis=0)
    bits = np.packbits(sums > 0, axis=1)
    unique = key[starts]
    return unique // len(centroids), unique % len(centroids), bits


def _image_chunks(offsets: np.ndarray, first: int, last: int) -> list[tuple[int, int]]:
    """[(begin, end)] image ranges of first..last with about _CHUNK descriptors each."""
    chunks, begin = [], first
    while begin < last:
        limit = int(offsets[begin]) + _CHUNK
        end = int(np.searchsorted(offsets, limit, side="right")) - 1
        end = min(last, max(end, begin + 1))
        chunks.append((begin, end))
        begin = end
    return chunks
