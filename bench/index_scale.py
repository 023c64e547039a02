"""Benchmark: one global index against the pairwise approach, as the database grows.

Synthetic databases shaped like DELF output: `--per_image` (1000) descriptors per
image, 40-D, unit norm, drawn around clustered "visual words" (power-law word
frequencies) with a PCA-like variance spectrum (component i ~ (i + 2)^-1.5:
effective dimension ~11, as measured on PCA-40 DELF descriptors), keypoints in a
640x480 frame. Each query is a database image seen again: 60% of its features
(descriptors perturbed, keypoints moved by an affine map) plus 40% unrelated ones.

Measured per database size (`--sizes`, images):
- global index (this project), per back end: build time, memory of the
  nearest-neighbour structure per descriptor (estimate and RSS growth), k-NN time
  per query (timed on `--timed_descriptors` of each query's descriptors and scaled
  to all of them), and, when that projects below `--max_query_seconds`, full
  searches (k-NN + votes + RANSAC on the shortlist): latency and recall@1;
- pairwise (the DELF reference's matcher, the baseline): a KD-tree per database
  image, each queried with the query's descriptors (k=1, same bound), then RANSAC
  for every image with enough matches. At large sizes it is timed on the first
  `--pairwise_images` images and scaled linearly (marked "extrapolated").
Prints JSON; ratios are pairwise / global (speed-up of the global index).

  python bench/index_scale.py --sizes=1000,10000 [--backends=kdtree,faiss-ivfpq]
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time

import numpy as np
from absl import app, flags
from scipy.spatial import cKDTree

from delf_tf.config import RetrievalConfig
from delf_tf.matching.neighbors import build_neighbors
from delf_tf.matching.ransac import apply_transform, ransac
from delf_tf.retrieval.index import ImageRecord, Index
from delf_tf.retrieval.search import Searcher

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["1000", "10000"], "database sizes (images)")
flags.DEFINE_list("backends", ["kdtree"], "global-index back ends: kdtree, brute, faiss-ivfpq")
flags.DEFINE_integer("per_image", 1000, "descriptors per image")
flags.DEFINE_integer("dim", 40, "descriptor size")
flags.DEFINE_integer("words", 10000, "cluster centres ('visual words')")
flags.DEFINE_float("spread", 0.5, "noise around a word, relative to the spectrum")
flags.DEFINE_float("decay", 1.5, "variance of component i ~ (i + 2)^-decay")
flags.DEFINE_integer("timed_descriptors", 200, "query descriptors the k-NN timing uses")
flags.DEFINE_float("max_query_seconds", 60.0, "skip full searches projected slower than this")
flags.DEFINE_integer("queries", 5, "queries per database size")
flags.DEFINE_integer("pairwise_images", 1000, "pairwise baseline timed on at most this many")
flags.DEFINE_integer("seed", 0, "seed of the synthetic data")

AFFINE = np.array([[0.8, -0.2, 40.0], [0.15, 0.85, -10.0], [0.0, 0.0, 1.0]])


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class Generator:
    """Clustered unit descriptors: power-law word frequencies, decaying variance spectrum."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        spectrum = (np.arange(FLAGS.dim) + 2.0) ** -FLAGS.decay
        self.std = np.sqrt(spectrum / spectrum.sum()).astype(np.float32)
        self.words = (self.rng.normal(size=(FLAGS.words, FLAGS.dim)) * self.std).astype(np.float32)
        weights = 1.0 / np.sqrt(np.arange(1, FLAGS.words + 1))
        self.probabilities = weights / weights.sum()

    def descriptors(self, count: int) -> np.ndarray:
        words = self.rng.choice(FLAGS.words, count, p=self.probabilities)
        noise = self.rng.normal(0, FLAGS.spread, (count, FLAGS.dim)).astype(np.float32)
        return unit(self.words[words] + noise * self.std).astype(np.float32)


def make_index(images: int, generator: Generator) -> Index:
    per = FLAGS.per_image
    total = images * per
    descriptors = np.empty((total, FLAGS.dim), np.float32)
    for start in range(0, total, 1_000_000):
        stop = min(total, start + 1_000_000)
        descriptors[start:stop] = generator.descriptors(stop - start)
    keypoints = generator.rng.uniform([0, 0], [640, 480], (total, 2)).astype(np.float32)
    image_ids = np.repeat(np.arange(images, dtype=np.int32), per)
    offsets = np.arange(images + 1, dtype=np.int64) * per
    records = [ImageRecord(f"img{i}", f"img{i}", 640, 480, per) for i in range(images)]
    return Index(descriptors, keypoints, image_ids, offsets, records, "synthetic")


def make_query(index: Index, image_id: int, generator: Generator):
    from delf_tf.features import LocalFeatures

    rng = generator.rng
    per = FLAGS.per_image
    keep = rng.choice(per, int(0.6 * per), replace=False)
    rows = index.image_rows(image_id)
    seen = unit(index.descriptors[rows][keep] + rng.normal(0, 0.03, (len(keep), FLAGS.dim)))
    points = apply_transform(np.linalg.inv(AFFINE), index.keypoints[rows][keep])
    clutter = per - len(keep)
    return LocalFeatures(
        np.concatenate([points, rng.uniform([0, 0], [640, 480], (clutter, 2))]),
        np.ones(per),
        np.ones(per),
        np.concatenate([seen, generator.descriptors(clutter)]),
    )


def global_index(index: Index, backend: str, queries, truths) -> dict:
    config = RetrievalConfig(backend=backend)
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    neighbors = build_neighbors(index.descriptors, backend)
    build = time.perf_counter() - start
    grown = rss_bytes() - before
    knn_times = []
    for query in queries:
        sample = query.descriptors[: FLAGS.timed_descriptors]
        start = time.perf_counter()
        neighbors.search(sample, config.neighbors, config.distance_bound)
        knn_times.append((time.perf_counter() - start) * len(query) / len(sample))
    row = {
        "backend": backend,
        "build_seconds": round(build, 2),
        "knn_seconds_per_query": round(statistics.median(knn_times), 3),
        "structure_bytes_per_descriptor_estimate": round(
            neighbors.memory_bytes() / index.num_descriptors, 1
        ),
        "structure_bytes_per_descriptor_rss": round(grown / index.num_descriptors, 1),
    }
    if statistics.median(knn_times) > FLAGS.max_query_seconds:
        row["search"] = f"skipped: k-NN projected above {FLAGS.max_query_seconds} s per query"
    else:
        searcher = Searcher(index, config, neighbors)
        latencies, hits = [], 0
        for query, truth in zip(queries, truths, strict=True):
            start = time.perf_counter()
            results = searcher.search(query)
            latencies.append(time.perf_counter() - start)
            hits += bool(results) and results[0].image_id == truth
        row["query_seconds_median"] = round(statistics.median(latencies), 3)
        row["recall_at_1"] = hits / len(queries)
    del neighbors
    gc.collect()
    return row


def pairwise(index: Index, queries, truths) -> dict:
    """The reference's matcher: one KD-tree per database image, every image verified."""
    config = RetrievalConfig()
    images = min(index.num_images, FLAGS.pairwise_images)
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    trees = [cKDTree(index.image_descriptors(i)) for i in range(images)]
    build = time.perf_counter() - start
    grown = rss_bytes() - before
    latencies, hits = [], 0
    for query, truth in zip(queries, truths, strict=True):
        start = time.perf_counter()
        best, best_inliers = -1, -1
        for image_id, tree in enumerate(trees):
            distances, nearest = tree.query(
                query.descriptors, k=1, distance_upper_bound=config.distance_bound
            )
            found = np.isfinite(distances)
            if found.sum() < 3:
                continue
            keypoints = index.image_keypoints(image_id)[nearest[found]]
            result = ransac(query.keypoints[found], keypoints, seed=config.seed)
            if result.num_inliers > best_inliers:
                best, best_inliers = image_id, result.num_inliers
        latencies.append(time.perf_counter() - start)
        hits += best == truth
    scale = index.num_images / images
    descriptors = images * FLAGS.per_image
    del trees
    gc.collect()
    return {
        "images_timed": images,
        "extrapolated": scale > 1,
        "build_seconds": round(build * scale, 2),
        "query_seconds_median": round(statistics.median(latencies) * scale, 3),
        "recall_at_1": hits / len(queries) if scale == 1 else None,
        "structure_bytes_per_descriptor_rss": round(grown / descriptors, 1),
    }


def main(argv: list[str]) -> None:
    del argv
    report = {
        "per_image": FLAGS.per_image,
        "dim": FLAGS.dim,
        "words": FLAGS.words,
        "spread": FLAGS.spread,
        "decay": FLAGS.decay,
        "queries": FLAGS.queries,
        "index_arrays_bytes_per_descriptor": 4 * FLAGS.dim + 8 + 4,
        "sizes": [],
    }
    for size in (int(s) for s in FLAGS.sizes):
        generator = Generator(FLAGS.seed)
        start = time.perf_counter()
        index = make_index(size, generator)
        truths = [int(t) for t in generator.rng.choice(size, FLAGS.queries, replace=False)]
        queries = [make_query(index, t, generator) for t in truths]
        row = {"images": size, "descriptors": index.num_descriptors}
        row["data_seconds"] = round(time.perf_counter() - start, 1)
        row["global"] = [global_index(index, b, queries, truths) for b in FLAGS.backends]
        row["pairwise"] = pairwise(index, queries, truths)
        for entry in row["global"]:
            if "query_seconds_median" in entry:
                entry["speedup_vs_pairwise"] = round(
                    row["pairwise"]["query_seconds_median"] / entry["query_seconds_median"], 1
                )
        report["sizes"].append(row)
        print(json.dumps(row), file=sys.stderr)
        del index, queries
        gc.collect()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
