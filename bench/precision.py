"""Fidelity of reduced-precision extraction to float32 on real photos, and its speed.

The same DelfModel (random weights, seeded; the project ships no trained DELF) extracts
every photo of a retrieval set twice, in float32 and in --precision (bfloat16 by
default), and each run goes through the same index, search and evaluation:
- keypoint overlap: share of float32 keypoints (x, y, level) found in the other run;
- descriptor cosine between matched keypoints: median and 1st percentile;
- mAP of both runs on the set's protocol (delf_tf.evaluation), and its difference;
- median seconds per photo of both (interleaved photo by photo).
The precision is worth making a default where mAP is within 0.005 and the overlap
is at least 0.95 (and where the hardware makes it faster).

    python bench/precision.py --data=../shared/data/landmarks-dev --preset=fast
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "folder with groundtruth.json and images/ (landmarks-dev)")
flags.DEFINE_enum("precision", "bfloat16", ["bfloat16", "float16"], "reduced precision")
flags.DEFINE_enum("preset", "paper", ["paper", "fast"], "extraction settings")
flags.DEFINE_integer("num_images", 0, "photos used (0: all)")
flags.mark_flag_as_required("data")


def matched(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Indices of features present in both (same keypoint to 0.01 px, same level)."""
    index_b = {
        (round(float(x), 2), round(float(y), 2), round(float(s), 4)): i
        for i, ((x, y), s) in enumerate(zip(b.keypoints, b.scales, strict=True))
    }
    pairs = [
        (i, index_b[key])
        for i, key in enumerate(
            (round(float(x), 2), round(float(y), 2), round(float(s), 4))
            for (x, y), s in zip(a.keypoints, a.scales, strict=True)
        )
        if key in index_b
    ]
    pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def main(argv: list[str]) -> None:
    del argv
    from delf_tf.config import RetrievalConfig
    from delf_tf.evaluation.datasets import load_dataset
    from delf_tf.evaluation.engine import engine_rank_fn
    from delf_tf.evaluation.evaluate import evaluate
    from delf_tf.extraction.extractor import InProcessExtractor
    from delf_tf.features.store import FeatureStore
    from delf_tf.images import list_images, load_image
    from delf_tf.model.delf import build_delf_model
    from delf_tf.presets import extraction_preset
    from delf_tf.retrieval.index import Index
    from delf_tf.retrieval.search import Searcher

    dataset = load_dataset("json", FLAGS.data)
    images_dir = Path(FLAGS.data) / "images"
    paths = list_images(images_dir)
    if FLAGS.num_images:
        paths = paths[: FLAGS.num_images]
    model = build_delf_model(seed=0)
    config = extraction_preset(FLAGS.preset).replace(score_threshold=0.0)
    extractors = {
        "float32": InProcessExtractor.from_model(model, config),
        FLAGS.precision: InProcessExtractor.from_model(
            model, config.replace(precision=FLAGS.precision)
        ),
    }
    work = Path(tempfile.mkdtemp(prefix="bench_precision_"))
    stores = {
        name: FeatureStore.open_or_create(work / name, e.fingerprint, e.describe())
        for name, e in extractors.items()
    }
    seconds = {name: [] for name in extractors}
    features = {name: {} for name in extractors}
    for extractor in extractors.values():  # warm-up (tracing)
        extractor.extract(load_image(paths[0]))
    for path in paths:
        image = load_image(path)
        key = path.relative_to(images_dir).as_posix()
        for name, extractor in extractors.items():
            start = time.perf_counter()
            found = extractor.extract(image)
            seconds[name].append(time.perf_counter() - start)
            features[name][key] = found
            stores[name].save(key, found)
    overlap, cosine = [], []
    for key, reference in features["float32"].items():
        other = features[FLAGS.precision][key]
        first, second = matched(reference, other)
        overlap.append(len(first) / max(len(reference), 1))
        cosine.extend(np.sum(reference.descriptors[first] * other.descriptors[second], axis=1))
    retrieval = RetrievalConfig()
    maps = {}
    for name, extractor in extractors.items():
        index = Index.from_store(stores[name], images_root=images_dir, progress=False)
        result = evaluate(dataset, engine_rank_fn(extractor, Searcher(index, retrieval)))
        maps[name] = round(result.to_dict()["setups"]["default"]["mAP"], 4)
    report = {
        "precision": FLAGS.precision,
        "preset": FLAGS.preset,
        "photos": len(paths),
        "keypoint_overlap": {
            "median": round(float(np.median(overlap)), 4),
            "min": round(float(np.min(overlap)), 4),
        },
        "descriptor_cosine": {
            "median": round(float(np.median(cosine)), 6),
            "p01": round(float(np.percentile(cosine, 1)), 6),
        },
        "mAP": maps,
        "mAP_difference": round(maps[FLAGS.precision] - maps["float32"], 4),
        "median_seconds_per_photo": {
            name: round(statistics.median(values), 3) for name, values in seconds.items()
        },
    }
    report["speed_ratio"] = round(
        report["median_seconds_per_photo"]["float32"]
        / report["median_seconds_per_photo"][FLAGS.precision],
        3,
    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
