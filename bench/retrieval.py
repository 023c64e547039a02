"""Honest retrieval numbers on real photos: untrained DELF vs a SIFT baseline, same engine.

    python bench/retrieval.py --data=../shared/data/landmarks-dev [--max_image_size=512]

Both pipelines go through the same feature store, index, search (k-NN votes,
shortlist, RANSAC re-ranking) and evaluation (`delf_tf.evaluation`); only the
local features differ:
  (a) DELF with random weights (seeded), score_threshold 0, PCA to 40-D fitted on
      the database's own raw descriptors, applied in the extraction graph;
  (b) scikit-image SIFT keypoints and L2-normalised 128-D descriptors.
Prints one JSON object with mAP, mP@k, time per query and the ratio of the two.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.feature
from absl import app, flags
from PIL import Image

from delf_tf.config import ExtractionConfig, RetrievalConfig
from delf_tf.evaluation.datasets import load_dataset
from delf_tf.evaluation.engine import engine_rank_fn
from delf_tf.evaluation.evaluate import evaluate
from delf_tf.extraction.extractor import build_extractor
from delf_tf.extraction.folder import extract_to_store
from delf_tf.extraction.pca import fit_pca
from delf_tf.features.local_features import LocalFeatures
from delf_tf.retrieval.index import Index
from delf_tf.retrieval.search import Searcher

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "folder with groundtruth.json and images/ (landmarks-dev)")
flags.DEFINE_integer("max_image_size", 512, "long side limit for both pipelines")
flags.DEFINE_integer("seed", 0, "seed of the random DELF weights")
flags.DEFINE_integer("sift_features", 1000, "SIFT keypoints kept per image (by contrast)")
flags.DEFINE_integer("pca_dim", 40, "DELF descriptor size after PCA")
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


def run_pipeline(name, extractor, dataset, images: Path, work: Path) -> dict:
    start = time.perf_counter()
    store, summary = extract_to_store(extractor, images, work / f"{name}_features", progress=False)
    index = Index.from_store(store, images, progress=False)
    searcher = Searcher(index, RetrievalConfig())
    build_seconds = time.perf_counter() - start
    extract_seconds, total_seconds = [], []

    class TimedExtractor:
        fingerprint = extractor.fingerprint
        describe = extractor.describe

        def extract(self, image):
            t0 = time.perf_counter()
            features = extractor.extract(image)
            extract_seconds.append(time.perf_counter() - t0)
            return features

    rank = engine_rank_fn(TimedExtractor(), searcher)

    def timed_rank(image, query_id):
        t0 = time.perf_counter()
        ranking = rank(image, query_id)
        total_seconds.append(time.perf_counter() - t0)
        return ranking

    result = evaluate(dataset, timed_rank)
    report = result.to_dict()
    return {
        "setups": report["setups"],
        "database_images": index.num_images,
        "mean_features_per_image": round(index.num_descriptors / max(index.num_images, 1), 1),
        "descriptor_dim": index.dim,
        "index_build_seconds": round(build_seconds, 2),
        "seconds_per_image_extraction": round(summary.seconds_per_image, 3),
        "query_extract_seconds_median": round(float(np.median(extract_seconds)), 3),
        "query_search_seconds_median": round(
            float(np.median(np.subtract(total_seconds, extract_seconds))), 3
        ),
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
            "delf_untrained": run_pipeline("delf", delf, dataset, images, work),
            "sift_baseline": run_pipeline(
                "sift",
                SiftExtractor(FLAGS.max_image_size, FLAGS.sift_features),
                dataset,
                images,
                work,
            ),
        }
    setup = next(iter(results["delf_untrained"]["setups"]))
    delf_map = results["delf_untrained"]["setups"][setup]["mAP"]
    sift_map = results["sift_baseline"]["setups"][setup]["mAP"]
    results["ratios"] = {
        "map_delf_over_sift": round(delf_map / sift_map, 3) if sift_map else None,
        "query_time_delf_over_sift": round(
            (
                results["delf_untrained"]["query_extract_seconds_median"]
                + results["delf_untrained"]["query_search_seconds_median"]
            )
            / max(
                results["sift_baseline"]["query_extract_seconds_median"]
                + results["sift_baseline"]["query_search_seconds_median"],
                1e-9,
            ),
            3,
        ),
    }
    results["settings"] = {
        "data": str(data),
        "queries": len(dataset.queries),
        "max_image_size": FLAGS.max_image_size,
        "weights": f"random seed {FLAGS.seed} (untrained)",
        "pca_dim": FLAGS.pca_dim,
        "retrieval": RetrievalConfig().to_dict(),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
