"""Fidelity of reduced-precision extraction to float32 on real photos, and its speed.

Each model of --models extracts every photo twice, in float32 and in --precision
(bfloat16 by default), the two taking turns photo by photo (which goes first
alternates), so a load change on a shared machine hits both alike:
- paper: the paper's DelfModel (ResNet50 conv4, random weights seeded; the project
  ships no trained DELF) at --preset, threshold 0;
- delf_release, delg_release: a synthetic release of ResNet50 size (random weights,
  `delf_tf.testing.synthetic_releases`: tf-slim resnet_v1_50 as delf_gld_20190411, and
  the reference TF2 ResNet50 with autoencoder and global head as r50delg_gld_20200814),
  converted by `delf convert` to a `.keras` file and extracted the way
  `delf extract --model=converted.keras --preset=<release> [--pca=<release>/pca]
  --precision=...` does, at the release's preset (its threshold, PCA, global scales).
Per model:
- keypoint overlap: share of float32 keypoints (x, y, level) found in the other run;
- descriptor cosine between matched keypoints: median, 1st percentile and minimum;
- global descriptor cosine per photo (DELG): median and minimum;
- median seconds per photo of both and their ratio (float32 / reduced: > 1 is faster),
  each first traced on the first photo (not timed);
- with --evaluate (the paper model by default), mAP of both runs on the set's protocol
  through the same index, search and evaluation (delf_tf.evaluation), and its difference.
The precision is worth making a default where mAP is within 0.005 and the overlap
is at least 0.95 (and where the hardware makes it faster). The report records the CPU's
flags that matter (AVX512-BF16, AMX) and any oneDNN ISA cap (ONEDNN_MAX_CPU_ISA).

    python bench/precision.py --data=../shared/data/landmarks-dev --preset=fast
    python bench/precision.py --data=../shared/data/landmarks-dev --models=delf_release,\
delg_release --noevaluate --num_images=4 --max_image_size=768
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "folder with groundtruth.json and images/ (landmarks-dev)")
flags.DEFINE_enum("precision", "bfloat16", ["bfloat16", "float16"], "reduced precision")
flags.DEFINE_list("models", ["paper"], "paper, delf_release, delg_release")
flags.DEFINE_enum("preset", "paper", ["paper", "fast"], "extraction settings of the paper model")
flags.DEFINE_enum(
    "release_size", "resnet50", ["resnet50", "tiny"], "size of the synthetic releases"
)
flags.DEFINE_integer("max_image_size", None, "long side limit (default: each preset's)")
flags.DEFINE_float("score_threshold", None, "threshold of the releases (default: their preset's)")
flags.DEFINE_integer("num_images", 0, "photos used (0: all)")
flags.DEFINE_boolean("evaluate", None, "mAP of both runs (default: for the paper model only)")
flags.mark_flag_as_required("data")

RELEASES = {
    "delf_release": ("delf", "delf_gld_20190411"),
    "delg_release": ("delg", "r50delg_gld_20200814"),
}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


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


def cpu() -> dict:
    """The CPU's bfloat16-relevant flags, its model, cores and any oneDNN ISA cap."""
    from delf_tf.presets import cpu_flags, host_precision

    found = cpu_flags()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        None,
    )
    return {
        "model": model,
        "cpus": len(os.sched_getaffinity(0)),
        "flags": [flag for flag in CPU_FLAGS if flag in found],
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "host_precision": host_precision(),
    }


def extractors(name: str, work: Path) -> dict:
    """{"float32": extractor, precision: extractor} of model `name`."""
    from delf_tf.extraction.extractor import InProcessExtractor, build_extractor
    from delf_tf.model.delf import build_delf_model
    from delf_tf.presets import extraction_preset

    size = {} if FLAGS.max_image_size is None else {"max_image_size": FLAGS.max_image_size}
    threshold = {} if FLAGS.score_threshold is None else {"score_threshold": FLAGS.score_threshold}
    if name == "paper":
        model = build_delf_model(seed=0)
        config = extraction_preset(FLAGS.preset).replace(score_threshold=0.0, **size)
        return {
            precision: InProcessExtractor.from_model(model, config.replace(precision=precision))
            for precision in ("float32", FLAGS.precision)
        }
    from delf_tf.releases.convert import convert_release, save_converted
    from delf_tf.testing.synthetic_releases import build_in_subprocess

    kind, release_name = RELEASES[name]
    release = build_in_subprocess(work / name / release_name, kind=kind, size=FLAGS.release_size)
    converted = save_converted(convert_release(release), work / f"{name}.keras")
    pca = release / "pca" if (release / "pca").is_dir() else None
    return {
        precision: build_extractor(
            model=converted,
            preset=release_name,
            pca=pca,
            overrides={"precision": precision, **size, **threshold},
        )
        for precision in ("float32", FLAGS.precision)
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def measure(name: str, pair: dict, paths: list[Path], images_dir: Path, work: Path) -> dict:
    """Times both extractors in turns per photo; their fidelity (and mAP with --evaluate)."""
    import tensorflow as tf

    from delf_tf.features.store import FeatureStore
    from delf_tf.images import load_image

    evaluate = FLAGS.evaluate if FLAGS.evaluate is not None else name == "paper"
    reduced = FLAGS.precision
    stores = {
        precision: FeatureStore.open_or_create(
            work / f"{name}_{precision}", e.fingerprint, e.describe()
        )
        for precision, e in pair.items()
    }
    seconds = {precision: [] for precision in pair}
    features = {precision: {} for precision in pair}
    photos = {path: load_image(path) for path in paths}
    for precision, extractor in pair.items():  # warm-up (tracing), not timed
        try:
            extractor.extract(photos[paths[0]])
        except tf.errors.OpError as error:  # e.g. no bfloat16 convolution under an ISA cap
            lines = error.message.splitlines()
            cause = next((line for line in lines if "exception" in line), lines[-1])
            return {"model": name, "error": f"{precision}: {cause.strip()[:300]}"}
    for number, path in enumerate(paths):
        key = path.relative_to(images_dir).as_posix()
        order = list(pair) if number % 2 == 0 else list(pair)[::-1]
        for precision in order:
            start = time.perf_counter()
            found = pair[precision].extract(photos[path])
            seconds[precision].append(time.perf_counter() - start)
            features[precision][key] = found
            stores[precision].save(key, found)
    overlap, cosines, global_cosines, counts = [], [], [], {p: [] for p in pair}
    for key, reference in features["float32"].items():
        other = features[reduced][key]
        counts["float32"].append(len(reference))
        counts[reduced].append(len(other))
        first, second = matched(reference, other)
        overlap.append(len(first) / max(len(reference), 1))
        cosines.extend(np.sum(reference.descriptors[first] * other.descriptors[second], axis=1))
        if reference.global_descriptor is not None:
            global_cosines.append(cosine(reference.global_descriptor, other.global_descriptor))
    medians = {p: statistics.median(values) for p, values in seconds.items()}
    config = pair["float32"].config
    report = {
        "model": name,
        "extraction": {
            "scales": len(config.scales),
            "max_image_size": config.max_image_size,
            "score_threshold": config.score_threshold,
            "max_features": config.max_features,
            "pca_dim": config.pca_dim if pair["float32"].describe().get("pca") else None,
        },
        "photos": len(paths),
        "image_sizes": sorted({f"{p.shape[1]}x{p.shape[0]}" for p in photos.values()}),
        "features_per_photo_median": {p: statistics.median(c) for p, c in counts.items()},
        "keypoint_overlap": {
            "median": round(float(np.median(overlap)), 4),
            "min": round(float(np.min(overlap)), 4),
        },
        "descriptor_cosine": (
            {
                "median": round(float(np.median(cosines)), 6),
                "p01": round(float(np.percentile(cosines, 1)), 6),
                "min": round(float(np.min(cosines)), 6),
            }
            if cosines
            else None
        ),
        "global_cosine": (
            {
                "median": round(float(np.median(global_cosines)), 7),
                "min": round(float(np.min(global_cosines)), 7),
            }
            if global_cosines
            else None
        ),
        "median_seconds_per_photo": {p: round(m, 3) for p, m in medians.items()},
        "speed_ratio": round(medians["float32"] / medians[reduced], 3),
        "speed_ratio_per_photo": [
            round(a / b, 2) for a, b in zip(seconds["float32"], seconds[reduced], strict=True)
        ],
    }
    if evaluate:
        report["mAP"] = mean_average_precision(pair, stores, images_dir)
        report["mAP_difference"] = round(report["mAP"][reduced] - report["mAP"]["float32"], 4)
    return report


def mean_average_precision(pair: dict, stores: dict, images_dir: Path) -> dict:
    """mAP of each extractor's store on the set's protocol, through the same engine."""
    from delf_tf.config import RetrievalConfig
    from delf_tf.evaluation.datasets import load_dataset
    from delf_tf.evaluation.engine import engine_rank_fn
    from delf_tf.evaluation.evaluate import evaluate
    from delf_tf.retrieval.index import Index
    from delf_tf.retrieval.search import Searcher

    dataset = load_dataset("json", FLAGS.data)
    maps = {}
    for precision, extractor in pair.items():
        index = Index.from_store(stores[precision], images_root=images_dir, progress=False)
        result = evaluate(dataset, engine_rank_fn(extractor, Searcher(index, RetrievalConfig())))
        maps[precision] = round(result.to_dict()["setups"]["default"]["mAP"], 4)
    return maps


def main(argv: list[str]) -> None:
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from delf_tf.images import list_images

    unknown = set(FLAGS.models) - {"paper", *RELEASES}
    if unknown:
        raise app.UsageError(f"unknown --models {sorted(unknown)}")
    images_dir = Path(FLAGS.data) / "images"
    paths = list_images(images_dir)
    if FLAGS.num_images:
        paths = paths[: FLAGS.num_images]
    work = Path(tempfile.mkdtemp(prefix="bench_precision_"))
    report = {
        "precision": FLAGS.precision,
        "cpu": cpu(),
        "load_average_start": os.getloadavg(),
        "models": [],
    }
    for name in FLAGS.models:
        pair = extractors(name, work)
        report["models"].append(measure(name, pair, paths, images_dir, work))
        del pair
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
