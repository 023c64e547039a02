"""Honest retrieval numbers on real photos: untrained DELF vs a SIFT baseline, same engine.

    python bench/retrieval.py --data=../shared/data/landmarks-dev [--max_image_size=512]

Both pipelines go through the same feature store, index, search (initial
ranking, shortlist, RANSAC re-ranking) and evaluation (`delf_tf.evaluation`);
only the local features differ:
  (a) DELF with random weights (seeded), score_threshold 0, PCA to 40-D fitted on
      the database's own raw descriptors, applied in the extraction graph;
  (b) scikit-image SIFT keypoints and L2-normalised 128-D descriptors.
Every ranking is a row (`--rankings`), over the same index and query features:
  votes-exact       k-NN votes, exact FAISS search (the reference for the deltas)
  votes-ivfpq       k-NN votes, IVF-PQ (flat coarse quantizer), parameters derived
                    for the index size
  votes-ivfpq-hnsw  the same with an HNSW coarse quantizer
  asmk              ASMK* with the default codebook size for the index
  global            inner product of a stand-in global descriptor: the project has
                    no DELG model, so each image's global descriptor is the
                    L2-normalised mean of its local descriptors (labelled as such)
  votes-milvus      votes with the k-NN search in a Milvus Lite collection; the
                    shortlist's features read from the store through tf.io.gfile
  global-milvus     the global ranking in a Milvus Lite collection (same reading)
Milvus rows report `map_minus_faiss`: their mAP minus the FAISS row's (votes-exact,
global), which the Milvus back end must match within 0.005.
Prints one JSON object with mAP, mP@k, time per query per row, each row's mAP
minus exact voting's, and the DELF / SIFT ratios of exact voting.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.feature
from absl import app, flags
from PIL import Image

from delf_tf.config import ExtractionConfig, RetrievalConfig
from delf_tf.evaluation.datasets import image_id_from_key, load_dataset
from delf_tf.evaluation.engine import engine_rank_fn
from delf_tf.evaluation.evaluate import evaluate
from delf_tf.extraction.extractor import build_extractor
from delf_tf.extraction.folder import extract_to_store
from delf_tf.extraction.pca import fit_pca
from delf_tf.features.local_features import LocalFeatures
from delf_tf.matching.neighbors import FlatNeighbors, IvfPqNeighbors, ivfpq_parameters
from delf_tf.retrieval.asmk import AsmkIndex
from delf_tf.retrieval.global_ranking import GlobalRanker
from delf_tf.retrieval.index import Index
from delf_tf.retrieval.search import Searcher

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "folder with groundtruth.json and images/ (landmarks-dev)")
flags.DEFINE_integer("max_image_size", 512, "long side limit for both pipelines")
flags.DEFINE_integer("seed", 0, "seed of the random DELF weights")
flags.DEFINE_integer("sift_features", 1000, "SIFT keypoints kept per image (by contrast)")
flags.DEFINE_integer("pca_dim", 40, "DELF descriptor size after PCA")
flags.DEFINE_list(
    "rankings",
    ["votes-exact", "votes-ivfpq", "votes-ivfpq-hnsw", "asmk", "global"],
    "rows of the DELF pipeline (the SIFT baseline runs votes-exact)",
)
flags.DEFINE_enum(
    "rerank_matches",
    "knn",
    ["knn", "nearest"],
    "putative matches when asmk/global re-rank (RetrievalConfig.rerank_matches)",
)
flags.mark_flag_as_required("data")


class SiftExtractor:
    """scikit-image SIFT as an Extractor: keypoints (x, y) in original pixels."""

    fingerprint = "skimage-sift"

    def __init__(self, max_image_size: int, max_features: int):
        self.max_image_size = max_image_size
        self.max_features = max_features

    def describe(self) -> dict:
        return {"backend": "skimage SIFT", "max_image_size": self.max_image_size}

    def extract(self, image: np.ndarray) -> LocalFeatures:
        factor = min(1.0, self.max_image_size / max(image.shape[:2]))
        picture = Image.fromarray(image).convert("L")
        if factor < 1.0:
            size = (round(picture.width * factor), round(picture.height * factor))
            picture = picture.resize(size, Image.Resampling.LANCZOS)
        sift = skimage.feature.SIFT()
        try:
            sift.detect_and_extract(np.asarray(picture, np.float32) / 255.0)
        except RuntimeError:  # no keypoints at all
            return LocalFeatures.empty(128)
        keep = np.arange(len(sift.keypoints))[: self.max_features]
        descriptors = sift.descriptors[keep].astype(np.float32)
        descriptors /= np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
        rows_cols = sift.keypoints[keep].astype(np.float32)
        keypoints = (rows_cols[:, ::-1] + 0.5) / factor - 0.5
        scales = sift.sigmas[keep].astype(np.float32) / factor
        return LocalFeatures(keypoints, scales, np.ones(len(keep), np.float32), descriptors)


def stand_in_global(features: LocalFeatures) -> np.ndarray:
    """L2-normalised mean of the local descriptors (no DELG model in the project)."""
    mean = features.descriptors.mean(axis=0) if len(features) else np.ones(features.dim)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def structures(name: str, index: Index, milvus: dict) -> tuple[str, dict, float, float]:
    """(ranking, Searcher structure kwargs, build seconds, structure bytes per image).

    milvus: BuildOptions fields of the Milvus rows (uri, prefix, stores)."""
    start = time.perf_counter()
    if name.endswith("-milvus"):
        from delf_tf.retrieval.structures import MILVUS_STRUCTURES, BuildOptions

        kind = "neighbors" if name.startswith("votes") else "global"
        built = MILVUS_STRUCTURES[kind].build(index, BuildOptions(backend="milvus", **milvus), [])
        key = "neighbors" if kind == "neighbors" else "global_ranker"
        found = (name.split("-")[0], {key: built.value}, 0)
    elif name == "votes-exact":
        found = ("votes", {"neighbors": FlatNeighbors(index.descriptors)}, 0)
    elif name.startswith("votes-ivfpq"):
        quantizer = "hnsw" if name.endswith("hnsw") else "flat"
        parameters = ivfpq_parameters(index.num_descriptors, index.dim, quantizer)
        neighbors = IvfPqNeighbors.train(index.descriptors, parameters)
        found = ("votes", {"neighbors": neighbors}, neighbors.memory_bytes())
    elif name == "asmk":
        asmk = AsmkIndex.build(index.descriptors, np.asarray(index.offsets))
        found = ("asmk", {"asmk": asmk}, asmk.memory_bytes())
    elif name == "global":
        ranker = GlobalRanker(index.global_descriptors)
        found = ("global", {"global_ranker": ranker}, index.global_descriptors.nbytes)
    else:
        raise ValueError(f"unknown ranking row {name!r}")
    ranking, kwargs, size = found
    return ranking, kwargs, time.perf_counter() - start, size / max(index.num_images, 1)


def run_pipeline(name, extractor, dataset, images: Path, work: Path, rankings) -> dict:
    start = time.perf_counter()
    store, summary = extract_to_store(extractor, images, work / f"{name}_features", progress=False)
    index = Index.from_store(store, images, progress=False)
    if "global" in rankings:
        index.global_descriptors = np.stack(
            [stand_in_global(store.load(record.key)) for record in index.images]
        )
    build_seconds = time.perf_counter() - start
    extract_seconds = []
    cache: dict[str, LocalFeatures] = {}

    class CachedExtractor:
        """Extracts each query once for all rows (timed), with the stand-in global."""

        fingerprint = extractor.fingerprint
        describe = extractor.describe

        def extract(self, image):
            digest = hashlib.sha1(image.tobytes()).hexdigest() + str(image.shape)
            if digest not in cache:
                t0 = time.perf_counter()
                features = extractor.extract(image)
                extract_seconds.append(time.perf_counter() - t0)
                cache[digest] = LocalFeatures(
                    features.keypoints,
                    features.scales,
                    features.scores,
                    features.descriptors,
                    stand_in_global(features),
                )
            return cache[digest]

    dataset_ids = [image_id_from_key(record.key) for record in index.images]
    rows = {}
    for row in rankings:
        milvus = {
            "milvus_uri": str(work / "milvus.db"),
            "milvus_prefix": f"bench_{name}",
            "stores": {store.identity: str(store.root)},
        }
        ranking, kwargs, seconds, bytes_per_image = structures(row, index, milvus)
        config = RetrievalConfig(ranking=ranking, rerank_matches=FLAGS.rerank_matches)
        searcher = Searcher(index, config, **kwargs)
        rank = engine_rank_fn(CachedExtractor(), searcher)
        search_seconds = []

        def timed_rank(image, query_id, rank=rank, search_seconds=search_seconds):
            rank(image, query_id)  # extracts (once per query for all rows)
            t0 = time.perf_counter()
            ranking_ = rank(image, query_id)  # cached features: search only
            search_seconds.append(time.perf_counter() - t0)
            return ranking_

        result = evaluate(dataset, timed_rank, progress=False).to_dict()

        def initial_rank(image, query_id, searcher=searcher, ids=dataset_ids):
            found, scores = searcher.initial_ranking(CachedExtractor().extract(image))
            return [(ids[i], float(s)) for i, s in zip(found, scores, strict=True)]

        initial = evaluate(dataset, initial_rank, progress=False).to_dict()
        rows[row] = {
            "setups": result["setups"],
            "initial_ranking_mAP": {
                name: summary["mAP"] for name, summary in initial["setups"].items()
            },
            "structure_build_seconds": round(seconds, 2),
            "structure_bytes_per_image": round(bytes_per_image, 1),
            "query_search_seconds_median": round(float(np.median(search_seconds)), 3),
        }
    for row, faiss_row in (("votes-milvus", "votes-exact"), ("global-milvus", "global")):
        if row in rows and faiss_row in rows:
            setups = rows[row]["setups"]
            rows[row]["map_minus_faiss"] = {
                setup: round(setups[setup]["mAP"] - rows[faiss_row]["setups"][setup]["mAP"], 4)
                for setup in setups
            }
    exact = rows.get("votes-exact")
    if exact is not None:
        setup = next(iter(exact["setups"]))
        for row in rows.values():
            row["map_minus_exact_votes"] = round(
                row["setups"][setup]["mAP"] - exact["setups"][setup]["mAP"], 4
            )
    return {
        "rankings": rows,
        "database_images": index.num_images,
        "mean_features_per_image": round(index.num_descriptors / max(index.num_images, 1), 1),
        "descriptor_dim": index.dim,
        "index_build_seconds": round(build_seconds, 2),
        "seconds_per_image_extraction": round(summary.seconds_per_image, 3),
        "query_extract_seconds_median": round(float(np.median(extract_seconds)), 3),
    }


def main(argv):
    del argv
    data = Path(FLAGS.data)
    dataset = load_dataset("json", data)
    images = data / "images"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = ExtractionConfig(score_threshold=0.0, max_image_size=FLAGS.max_image_size)
        raw = build_extractor(weights="random", seed=FLAGS.seed, config=base)
        raw_store, _ = extract_to_store(raw, images, work / "raw", progress=False)
        descriptors = np.concatenate(
            [raw_store.load(k).descriptors for k in raw_store.stored_keys()]
        )
        fit_pca(descriptors, FLAGS.pca_dim).save(work / "pca.npz")
        delf = build_extractor(
            weights="random",
            seed=FLAGS.seed,
            config=base.replace(pca_dim=FLAGS.pca_dim),
            pca=work / "pca.npz",
        )
        results = {
            "delf_untrained": run_pipeline("delf", delf, dataset, images, work, FLAGS.rankings),
            "sift_baseline": run_pipeline(
                "sift",
                SiftExtractor(FLAGS.max_image_size, FLAGS.sift_features),
                dataset,
                images,
                work,
                ["votes-exact"],
            ),
        }
    exact = {name: results[name]["rankings"]["votes-exact"] for name in results}
    setup = next(iter(exact["delf_untrained"]["setups"]))
    delf_map = exact["delf_untrained"]["setups"][setup]["mAP"]
    sift_map = exact["sift_baseline"]["setups"][setup]["mAP"]

    def query_seconds(name):
        return (
            results[name]["query_extract_seconds_median"]
            + exact[name]["query_search_seconds_median"]
        )

    results["ratios"] = {
        "map_delf_over_sift": round(delf_map / sift_map, 3) if sift_map else None,
        "query_time_delf_over_sift": round(
            query_seconds("delf_untrained") / max(query_seconds("sift_baseline"), 1e-9), 3
        ),
    }
    results["settings"] = {
        "data": str(data),
        "queries": len(dataset.queries),
        "max_image_size": FLAGS.max_image_size,
        "weights": f"random seed {FLAGS.seed} (untrained)",
        "pca_dim": FLAGS.pca_dim,
        "retrieval": RetrievalConfig(rerank_matches=FLAGS.rerank_matches).to_dict(),
        "global_descriptor": "stand-in: L2-normalised mean of the image's local descriptors",
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
