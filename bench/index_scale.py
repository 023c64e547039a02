"""Benchmark: retrieval at 1k, 10k and 100k images, every ranking against exact voting.

Synthetic databases shaped like DELF output: `--per_image` (1000) descriptors per
image, 40-D, unit norm, drawn around clustered "visual words" (power-law word
frequencies) with a PCA-like variance spectrum (component i ~ (i + 2)^-1.5:
effective dimension ~11, as measured on PCA-40 DELF descriptors), keypoints in a
640x480 frame, and a `--global_dim` global descriptor per image. The arrays are
generated in 1 M-row chunks straight into memory-mapped files under
`--work_dir`, so memory stays bounded whatever the size.

Each query has a planted true image: 60% of the true image's features
(descriptors perturbed, keypoints moved by an affine map) plus 40% unrelated
ones, and its global descriptor perturbed (cosine ~0.6 to the true one).

Rankings (rows per size), all re-ranking their best `--shortlist` (100) images
by RANSAC inliers exactly as `delf search` does (`Searcher.search`, top 10):
  votes-exact      k-NN votes, exact FAISS search (the baseline of the ratios)
  votes-ivfpq      k-NN votes, IVF-PQ, exhaustive coarse quantizer
  votes-ivfpq-hnsw k-NN votes, IVF-PQ, HNSW coarse quantizer
  asmk             ASMK* (default codebook size for the data)
  global           inner product of global descriptors
  votes-ivfpq-ondisk  k-NN votes, IVF-PQ built by streaming (the library's
                   `delf_tf.matching.ondisk`, as `delf index --backend=ivfpq-ondisk`):
                   trained on a sample, added in shards of `--shard_rows` (one FAISS
                   file each, skipped when present: resumable), merged into on-disk
                   inverted lists and searched from disk, so neither the build nor
                   the search holds the codes in RAM. The
                   issue-22 10^8 run (100k x 1000) uses it; NOT YET RUN at that size
                   (estimated 1.5-3.5 h on 2 cores), only checked at small sizes.
  votes-milvus     k-NN votes, the k-NN search in a Milvus Lite collection (FLAT)
  global-milvus    the global ranking in a Milvus Lite collection (FLAT)
Milvus Lite runs inside this process (a gRPC server on threads), so the row's RSS
growth is Lite's memory for the collection. Its rows re-rank from the index arrays
(the synthetic index has no feature store; retrieval.py measures the store path);
build_seconds is the insert + flush time.
Measured: build seconds, bytes per image and per descriptor of the structure,
query latency p50/p95 (initial ranking and total with re-ranking), recall@1 of
the planted image, for votes-* the sampled k-NN recall@10 against exact search,
and for every approximate row the agreement of its top-1 with the exact
baseline's top-1 on the same queries. Ratios are row / votes-exact.

The exact baseline costs ~1 s per query per 100 000 database descriptors on 2
cores, so it runs on the first `--exact_queries` queries only; approximate rows
run all `--queries` and compare with exact on the shared ones.

Rows over `--max_descriptors` are shrunk to fewer descriptors per image (the
row's "per_image" says how many): 100 000 images x 1000 x 40-D is 16 GB of
float32, and on 2 shared cores the exact baseline alone would take ~15 min per
query; see the report for what was run.

  python bench/index_scale.py --sizes=1000,10000,100000 [--queries=10]
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from delf_tf.config import RetrievalConfig
from delf_tf.features.local_features import LocalFeatures
from delf_tf.matching.neighbors import (
    FlatNeighbors,
    IvfPqNeighbors,
    ivfpq_parameters,
    sampled_recall,
)
from delf_tf.matching.ondisk import build_ondisk as build_ondisk_lists
from delf_tf.matching.ondisk import ondisk_parameters
from delf_tf.matching.ransac import apply_transform
from delf_tf.retrieval.asmk import AsmkIndex
from delf_tf.retrieval.global_ranking import GlobalRanker
from delf_tf.retrieval.index import ImageRecord, Index
from delf_tf.retrieval.search import Searcher

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["1000", "10000", "100000"], "database sizes (images)")
flags.DEFINE_list(
    "rankings",
    ["votes-exact", "votes-ivfpq", "votes-ivfpq-hnsw", "asmk", "global"],
    "rows per size",
)
flags.DEFINE_integer("per_image", 1000, "descriptors per image")
flags.DEFINE_integer(
    "max_descriptors", 10_000_000, "rows with more descriptors get fewer per image"
)
flags.DEFINE_integer("dim", 40, "descriptor size")
flags.DEFINE_integer("global_dim", 256, "global descriptor size")
flags.DEFINE_integer("words", 10000, "cluster centres ('visual words') of the generator")
flags.DEFINE_float("spread", 0.5, "noise around a word, relative to the spectrum")
flags.DEFINE_float("decay", 1.5, "variance of component i ~ (i + 2)^-decay")
flags.DEFINE_integer("queries", 10, "queries per database size")
flags.DEFINE_integer("exact_queries", 5, "queries the exact baseline answers")
flags.DEFINE_integer("shortlist", 100, "images re-ranked by RANSAC")
flags.DEFINE_string("work_dir", None, "folder for the memory-mapped arrays (default: a temp dir)")
flags.DEFINE_integer("seed", 0, "seed of the synthetic data")
flags.DEFINE_bool(
    "keep_data",
    False,
    "keep each size's folder under --work_dir and reuse its arrays on a rerun (the 10^8 run)",
)
flags.DEFINE_list(
    "nprobe_sweep", [], "votes-ivfpq rows: also time the queries and k-NN recall at these nprobe"
)
flags.DEFINE_integer("ondisk_nprobe", 32, "votes-ivfpq-ondisk: lists visited per descriptor")
flags.DEFINE_integer(
    "recall_samples", None, "database rows used as queries for k-NN recall@10 (default: derived)"
)
flags.DEFINE_integer(
    "shard_rows", 10_000_000, "votes-ivfpq-ondisk: descriptors per shard of the streaming build"
)

# The FAISS rows a Milvus row's top-1 is compared with (the first one present).
FAISS_TWIN = {"votes-milvus": ("votes-exact", "votes-ivfpq"), "global-milvus": ("global",)}
AFFINE = np.array([[0.8, -0.2, 40.0], [0.15, 0.85, -10.0], [0.0, 0.0, 1.0]])
CHUNK = 1_000_000


def memory_status() -> dict[str, int]:
    """Bytes of this process: VmHWM (peak resident), VmRSS, RssAnon, RssFile (/proc)."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name = line.split(":")[0]
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[name] = int(line.split()[1]) * 1024
    return fields


def rss_bytes() -> int:
    return memory_status().get("VmRSS", 0)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


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
        return unit(self.words[words] + noise * self.std)


def make_index(images: int, per: int, generator: Generator, folder: Path) -> Index:
    """An Index whose arrays are memory-mapped files written chunk by chunk.

    With --keep_data, a folder whose `data.json` records the same shape and seed is
    reused as it is (the marker is written last, so an interrupted generation reruns).
    """
    total = images * per
    marker = folder / "data.json"
    shape = {"images": images, "per_image": per, "dim": FLAGS.dim, "seed": FLAGS.seed}
    if FLAGS.keep_data and marker.exists() and json.loads(marker.read_text()) == shape:
        return open_index(images, per, folder)
    marker.unlink(missing_ok=True)
    descriptors = np.lib.format.open_memmap(
        folder / "descriptors.npy", "w+", np.float32, (total, FLAGS.dim)
    )
    keypoints = np.lib.format.open_memmap(folder / "keypoints.npy", "w+", np.float32, (total, 2))
    for start in range(0, total, CHUNK):
        stop = min(total, start + CHUNK)
        descriptors[start:stop] = generator.descriptors(stop - start)
        keypoints[start:stop] = generator.rng.uniform([0, 0], [640, 480], (stop - start, 2))
    descriptors.flush()
    keypoints.flush()
    global_descriptors = np.lib.format.open_memmap(
        folder / "global.npy", "w+", np.float32, (images, FLAGS.global_dim)
    )
    for start in range(0, images, CHUNK // 4):
        stop = min(images, start + CHUNK // 4)
        global_descriptors[start:stop] = unit(
            generator.rng.normal(size=(stop - start, FLAGS.global_dim))
        )
    global_descriptors.flush()
    image_ids = np.lib.format.open_memmap(folder / "image_ids.npy", "w+", np.int32, (total,))
    for start in range(0, total, CHUNK):
        stop = min(total, start + CHUNK)
        image_ids[start:stop] = np.arange(start, stop, dtype=np.int64) // per
    image_ids.flush()
    del descriptors, keypoints, global_descriptors, image_ids
    marker.write_text(json.dumps(shape))
    return open_index(images, per, folder)


def open_index(images: int, per: int, folder: Path) -> Index:
    """The Index over a folder's memory-mapped arrays (read-only)."""
    descriptors = np.load(folder / "descriptors.npy", mmap_mode="r")
    keypoints = np.load(folder / "keypoints.npy", mmap_mode="r")
    global_descriptors = np.load(folder / "global.npy", mmap_mode="r")
    image_ids = np.load(folder / "image_ids.npy", mmap_mode="r")
    offsets = np.arange(images + 1, dtype=np.int64) * per
    records = [ImageRecord(f"img{i}", f"img{i}", 640, 480, per) for i in range(images)]
    index = Index(descriptors, keypoints, image_ids, offsets, records, "synthetic")
    index.global_descriptors = global_descriptors
    return index


def make_query(index: Index, image_id: int, generator: Generator) -> LocalFeatures:
    rng = generator.rng
    rows = index.image_rows(image_id)
    per = rows.stop - rows.start
    keep = rng.choice(per, int(0.6 * per), replace=False)
    seen = unit(index.descriptors[rows][keep] + rng.normal(0, 0.03, (len(keep), FLAGS.dim)))
    points = apply_transform(np.linalg.inv(AFFINE), index.keypoints[rows][keep])
    clutter = per - len(keep)
    truth = np.asarray(index.global_descriptors[image_id])
    noise = rng.normal(size=FLAGS.global_dim) / np.sqrt(FLAGS.global_dim)
    return LocalFeatures(
        np.concatenate([points, rng.uniform([0, 0], [640, 480], (clutter, 2))]),
        np.ones(per),
        np.ones(per),
        np.concatenate([seen, generator.descriptors(clutter)]),
        unit(truth + 1.3 * noise),
    )


def build(name: str, index: Index, folder: Path):
    """(structure kwargs for Searcher, ranking, build seconds, structure bytes, extra fields)."""
    start = time.perf_counter()
    extra: dict = {}
    if name == "votes-exact":
        structure = FlatNeighbors(index.descriptors)
        kwargs, ranking = {"neighbors": structure}, "votes"
        size = 0  # scans descriptors.npy, which every index has anyway
    elif name in ("votes-ivfpq", "votes-ivfpq-hnsw"):
        quantizer = "hnsw" if name.endswith("hnsw") else "flat"
        parameters = ivfpq_parameters(index.num_descriptors, index.dim, quantizer)
        structure = IvfPqNeighbors.train(index.descriptors, parameters)
        kwargs, ranking = {"neighbors": structure}, "votes"
        structure.save(folder / "neighbors.faiss")
        size = (folder / "neighbors.faiss").stat().st_size
        extra["parameters"] = parameters.to_dict()
    elif name == "asmk":
        structure = AsmkIndex.build(index.descriptors, np.asarray(index.offsets))
        kwargs, ranking = {"asmk": structure}, "asmk"
        size = structure.memory_bytes()
        extra["codebook_size"] = structure.codebook_size
        extra["words_per_image"] = round(structure.num_entries / index.num_images, 1)
    elif name == "votes-ivfpq-ondisk":
        structure, parameters, size, timings = build_ondisk(index, folder, FLAGS.shard_rows)
        kwargs, ranking = {"neighbors": structure}, "votes"
        extra["parameters"] = parameters.to_dict()
        extra["shard_rows"] = FLAGS.shard_rows
        extra["build_step_seconds"] = timings  # summed over interrupted runs
    elif name.endswith("-milvus"):
        from delf_tf.retrieval.structures import MILVUS_STRUCTURES, BuildOptions

        kind = "neighbors" if name.startswith("votes") else "global"
        options = BuildOptions(
            backend="milvus", milvus_uri=str(folder / "milvus.db"), milvus_prefix="bench"
        )
        structure = MILVUS_STRUCTURES[kind].build(index, options, []).value
        structure.reads_store = False  # no store here: re-rank from the index arrays
        kwargs = {"neighbors" if kind == "neighbors" else "global_ranker": structure}
        ranking = "votes" if kind == "neighbors" else "global"
        size = sum(f.stat().st_size for f in (folder / "milvus.db").rglob("*") if f.is_file())
        extra["disk_bytes"] = size
    elif name == "global":
        structure = GlobalRanker.build(index.global_descriptors)
        kwargs, ranking = {"global_ranker": structure}, "global"
        size = int(index.global_descriptors.nbytes)
        extra["kind"] = structure.kind
    else:
        raise ValueError(f"unknown ranking row {name!r}")
    return kwargs, ranking, time.perf_counter() - start, size, extra


def build_ondisk(index: Index, folder: Path, shard_rows: int):
    """IVF-PQ over the index's descriptors with on-disk inverted lists, built by the
    library (`delf_tf.matching.ondisk.build_ondisk`, what `delf index
    --backend=ivfpq-ondisk` runs) in `<size folder>/ondisk`: trained.faiss,
    shard_NNNNN.faiss (one per --shard_rows rows, skipped when present: resumable),
    merged.faiss + merged.ivfdata, timings.json. Returns (searcher structure,
    parameters, bytes on disk, seconds per build step, summed over interrupted runs).
    8-bit codes (on-disk lists hold plain codes, not fast-scan blocks) on 2-D
    sub-vectors: 28 B per descriptor at 40-D; twice the derived lists, --ondisk_nprobe.
    """
    count, dim = index.num_descriptors, index.dim
    parameters = ondisk_parameters(count, dim, FLAGS.ondisk_nprobe)
    work = folder / "ondisk"
    structure, timings = build_ondisk_lists(
        index.descriptors,
        parameters,
        work,
        shard_rows,
        name="merged",
        log=lambda line: print(f"index_scale: {line}", file=sys.stderr, flush=True),
    )
    size = structure.disk_bytes(work / "merged.faiss")
    return structure, parameters, size, timings


def run_row(name: str, index: Index, queries, truths, folder: Path, count: int) -> dict:
    gc.collect()
    before = rss_bytes()
    kwargs, ranking, seconds, size, extra = build(name, index, folder)
    grown = rss_bytes() - before
    if "build_step_seconds" in extra:
        seconds = sum(extra["build_step_seconds"].values())
    config = RetrievalConfig(ranking=ranking, shortlist=FLAGS.shortlist, top_k=10)
    searcher = Searcher(index, config, **kwargs)
    timed = time_queries(searcher, queries[:count], truths[:count])
    row = {
        "ranking": name,
        "build_seconds": round(seconds, 1),
        "structure_bytes_per_image": round(size / index.num_images, 1),
        "structure_bytes_per_descriptor": round(size / index.num_descriptors, 2),
        "rss_growth_bytes_per_image": round(max(grown, 0) / index.num_images, 1),
        "queries": count,
        **{key: value for key, value in timed.items() if key != "top1"},
        # this process after building (or loading) and querying, before the recall check
        "memory_after_queries": memory_status(),
        **extra,
    }
    if name.startswith("votes-ivfpq"):
        row.update(recall_rows(searcher, kwargs["neighbors"], index, queries[:count], truths))
    row["_top1"] = timed["top1"]
    del searcher, kwargs
    gc.collect()
    return row


def recall_rows(searcher: Searcher, structure, index: Index, queries, truths) -> dict:
    """k-NN recall@10 against exact search at the structure's nprobe, and for each
    --nprobe_sweep value the query times and recall there (exact neighbours once)."""
    samples = FLAGS.recall_samples
    exact: dict = {}
    recall = sampled_recall(structure, index.descriptors, 10, 0.8, samples, exact_cache=exact)
    row = {"knn_recall_at_10_vs_exact": recall}
    if not FLAGS.nprobe_sweep:
        return row
    default = structure.parameters.nprobe
    sweep = []
    for nprobe in (int(n) for n in FLAGS.nprobe_sweep):
        structure.set_nprobe(nprobe)
        timed = time_queries(searcher, queries, truths)
        timed.pop("top1")
        recall = sampled_recall(structure, index.descriptors, 10, 0.8, samples, exact_cache=exact)
        sweep.append({"nprobe": nprobe, **timed, "knn_recall_at_10": recall["recall_at_k"]})
        print(json.dumps({"nprobe_sweep": sweep[-1]}), file=sys.stderr, flush=True)
    structure.set_nprobe(default)
    row["nprobe_sweep"] = sweep
    return row


def time_queries(searcher: Searcher, queries, truths) -> dict:
    """p50/p95 of `searcher.search` timed in its two steps, recall@1 of the planted image."""
    initial, total, hits, initial_hits, top1 = [], [], 0, 0, []
    count = len(queries)
    for query, truth in zip(queries, truths[:count], strict=True):
        # = searcher.search(query), timed in its two steps
        start = time.perf_counter()
        ranked = searcher.initial(query)
        middle = time.perf_counter()
        results = searcher.verify(query, ranked)
        initial.append(middle - start)
        total.append(time.perf_counter() - start)
        initial_hits += bool(len(ranked.ids)) and int(ranked.ids[0]) == truth
        best = results[0].image_id if results else -1
        hits += best == truth
        top1.append(best)
    return {
        "initial_seconds_p50": round(float(np.percentile(initial, 50)), 3),
        "initial_seconds_p95": round(float(np.percentile(initial, 95)), 3),
        "query_seconds_p50": round(float(np.percentile(total, 50)), 3),
        "query_seconds_p95": round(float(np.percentile(total, 95)), 3),
        "recall_at_1": round(hits / count, 3),
        "initial_recall_at_1": round(initial_hits / count, 3),
        "top1": top1,
    }


def compare(rows: list[dict]) -> None:
    """Adds ratios against the exact baseline (same run, shared queries) to every row."""
    exact = next((row for row in rows if row["ranking"] == "votes-exact"), None)
    for row in rows:
        top1 = row["_top1"]
        if exact is None or row is exact:
            continue
        shared = min(len(top1), len(exact["_top1"]))
        row["top1_agreement_with_exact"] = round(
            float(np.mean(np.equal(top1[:shared], exact["_top1"][:shared]))), 3
        )
        row["ratios_vs_exact"] = {
            "query_seconds_p50": round(row["query_seconds_p50"] / exact["query_seconds_p50"], 3),
            "initial_seconds_p50": round(
                row["initial_seconds_p50"] / max(exact["initial_seconds_p50"], 1e-9), 4
            ),
            "recall_at_1": round(row["recall_at_1"] / exact["recall_at_1"], 3)
            if exact["recall_at_1"]
            else None,
        }
    for row in rows:  # a Milvus row beside the FAISS row of its ranking, same queries
        twin = FAISS_TWIN.get(row["ranking"])
        faiss_row = (
            next((other for other in rows if other["ranking"] in twin), None) if twin else None
        )
        if faiss_row is not None:
            shared = min(len(row["_top1"]), len(faiss_row["_top1"]))
            row["top1_agreement_with_faiss"] = {
                "row": faiss_row["ranking"],
                "agreement": round(
                    float(np.mean(np.equal(row["_top1"][:shared], faiss_row["_top1"][:shared]))), 3
                ),
                "queries": shared,
            }
    for row in rows:
        row.pop("_top1")


def main(argv: list[str]) -> None:
    del argv
    work = Path(FLAGS.work_dir or tempfile.mkdtemp(prefix="index_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "dim": FLAGS.dim,
        "global_dim": FLAGS.global_dim,
        "words": FLAGS.words,
        "spread": FLAGS.spread,
        "decay": FLAGS.decay,
        "shortlist": FLAGS.shortlist,
        "queries": FLAGS.queries,
        "exact_queries": FLAGS.exact_queries,
        "index_arrays_bytes_per_descriptor": 4 * FLAGS.dim + 8 + 4,
        "sizes": [],
    }
    try:
        for size in (int(s) for s in FLAGS.sizes):
            per = min(FLAGS.per_image, max(1, FLAGS.max_descriptors // size))
            folder = work / f"size_{size}"
            folder.mkdir(parents=True, exist_ok=True)
            generator = Generator(FLAGS.seed)
            start = time.perf_counter()
            index = make_index(size, per, generator, folder)
            # Queries from their own stream: the same whether or not the data was reused.
            generator.rng = np.random.default_rng(FLAGS.seed + 1)
            truths = [int(t) for t in generator.rng.choice(size, FLAGS.queries, replace=False)]
            queries = [make_query(index, t, generator) for t in truths]
            entry = {
                "images": size,
                "per_image": per,
                "descriptors": index.num_descriptors,
                "data_seconds": round(time.perf_counter() - start, 1),
                "rows": [],
            }
            for name in FLAGS.rankings:
                count = FLAGS.exact_queries if name == "votes-exact" else FLAGS.queries
                row = run_row(name, index, queries, truths, folder, min(count, len(queries)))
                entry["rows"].append(row)
                print(json.dumps({"images": size, **row}), file=sys.stderr, flush=True)
            compare(entry["rows"])
            report["sizes"].append(entry)
            del index, queries
            gc.collect()
            if not FLAGS.keep_data:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if FLAGS.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
