"""Benchmark: vectorised RANSAC against skimage.measure.ransac (the baseline), same matches.

Two sets of matches:
- real: the EVD pairs of `--data` (e.g. ../shared/data/homography-pairs), matched with
  skimage SIFT + Lowe's ratio test (0.8, cross-checked): real feature matches with
  realistic outliers, independent of our (untrained) DELF weights;
- synthetic: random homographies, uniform outliers, known inliers.
Per method: time, inliers, and the mean corner error of the estimated transform
against the ground-truth homography. Prints JSON with vectorised / skimage ratios.

  python bench/ransac.py --data=../shared/data/homography-pairs [--seeds=3]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

from delf_tf.config import RetrievalConfig
from delf_tf.matching.ransac import apply_transform, ransac

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "folder holding evd/NAME_{1,2}.png and NAME_H_1to2.txt")
flags.DEFINE_integer("seeds", 3, "RANSAC runs (seeds) per match set and method")
flags.DEFINE_integer("max_size", 1000, "long side limit for SIFT (H is rescaled to match)")
flags.DEFINE_float("ratio", 0.8, "Lowe's ratio test bound")
flags.DEFINE_float(
    "residual_threshold", RetrievalConfig.residual_threshold, "RANSAC inlier bound (px)"
)
flags.DEFINE_integer("max_trials", RetrievalConfig.max_trials, "RANSAC hypotheses")
flags.DEFINE_bool("synthetic", True, "also run the synthetic match sets")

METHODS = ("vectorized", "skimage")
TRANSFORMS = ("homography", "affine")


def corners(width: float, height: float) -> np.ndarray:
    return np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], float)


def corner_error(model, truth, width, height) -> float:
    """Mean distance (px) between the image corners mapped by `model` and by `truth`."""
    if model is None:
        return float("inf")
    points = corners(width, height)
    with np.errstate(all="ignore"):
        error = np.linalg.norm(
            apply_transform(model, points) - apply_transform(truth, points), axis=1
        )
    return float(error.mean()) if np.all(np.isfinite(error)) else float("inf")


def load_gray(path: Path, max_size: int) -> tuple[np.ndarray, float]:
    """float32 [H, W] in [0, 1] with long side <= max_size, and the scale applied."""
    picture = Image.open(path).convert("L")
    scale = min(1.0, max_size / max(picture.size))
    if scale < 1.0:
        size = (round(picture.width * scale), round(picture.height * scale))
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(picture, np.float32) / 255.0, scale


def sift_matches(first: np.ndarray, second: np.ndarray, ratio: float):
    """(src [N, 2], dst [N, 2]) (x, y) SIFT matches passing the ratio test."""
    from skimage.feature import SIFT, match_descriptors

    found = []
    for image in (first, second):
        sift = SIFT()
        sift.detect_and_extract(image)
        found.append(sift)
    pairs = match_descriptors(
        found[0].descriptors, found[1].descriptors, max_ratio=ratio, cross_check=True
    )
    # skimage keypoints are (row, col); ours are (x, y).
    src = found[0].keypoints[pairs[:, 0]][:, ::-1].astype(np.float64)
    dst = found[1].keypoints[pairs[:, 1]][:, ::-1].astype(np.float64)
    return src, dst


def run_methods(src, dst, truth, size, transform, seeds) -> dict:
    """Per method: median seconds, mean inliers, median corner error over seeds."""
    out = {}
    for method in METHODS:
        times, inliers, errors = [], [], []
        for seed in range(seeds):
            start = time.perf_counter()
            result = ransac(
                src,
                dst,
                transform,
                residual_threshold=FLAGS.residual_threshold,
                max_trials=FLAGS.max_trials,
                seed=seed,
                method=method,
            )
            times.append(time.perf_counter() - start)
            inliers.append(result.num_inliers)
            errors.append(corner_error(result.model, truth, *size))
        out[method] = {
            "seconds": statistics.median(times),
            "inliers": float(np.mean(inliers)),
            "min_inliers": int(min(inliers)),
            "corner_error": statistics.median(errors),
        }
    return out


def summarize(rows: list[dict]) -> dict:
    """Ratios vectorised / skimage over all match sets of one transform."""
    fast = [r["vectorized"] for r in rows]
    base = [r["skimage"] for r in rows]
    time_ratios = [f["seconds"] / b["seconds"] for f, b in zip(fast, base, strict=True)]

    def solved(results, bound=10.0):
        return sum(r["corner_error"] < bound for r in results)

    def mean_error(results):
        finite = [min(r["corner_error"], 1e4) for r in results]
        return round(float(np.mean(finite)), 2)

    return {
        "sets": len(rows),
        "time_ratio_median": round(statistics.median(time_ratios), 4),
        "speedup_median": round(1.0 / statistics.median(time_ratios), 1),
        "inlier_ratio": round(
            sum(f["inliers"] for f in fast) / max(1e-9, sum(b["inliers"] for b in base)), 4
        ),
        "sets_vectorized_ge_skimage": sum(
            f["inliers"] >= b["inliers"] for f, b in zip(fast, base, strict=True)
        ),
        "mean_corner_error_px": {"vectorized": mean_error(fast), "skimage": mean_error(base)},
        "median_corner_error_px": {
            "vectorized": round(statistics.median(r["corner_error"] for r in fast), 2),
            "skimage": round(statistics.median(r["corner_error"] for r in base), 2),
        },
        "solved_under_10px": {"vectorized": solved(fast), "skimage": solved(base)},
    }


def evd_benchmark(root: Path) -> dict:
    folder = root / "evd" if (root / "evd").is_dir() else root
    names = sorted(p.name[: -len("_H_1to2.txt")] for p in folder.glob("*_H_1to2.txt"))
    if not names:
        raise SystemExit(f"{folder}: no NAME_H_1to2.txt files")
    per_transform = {t: [] for t in TRANSFORMS}
    pairs = []
    for name in names:
        first, scale1 = load_gray(folder / f"{name}_1.png", FLAGS.max_size)
        second, scale2 = load_gray(folder / f"{name}_2.png", FLAGS.max_size)
        truth = np.loadtxt(folder / f"{name}_H_1to2.txt")
        truth = np.diag([scale2, scale2, 1.0]) @ truth @ np.diag([1 / scale1, 1 / scale1, 1.0])
        src, dst = sift_matches(first, second, FLAGS.ratio)
        size = (first.shape[1], first.shape[0])
        with np.errstate(all="ignore"):
            true_inliers = int(
                (
                    np.linalg.norm(apply_transform(truth, src) - dst, axis=1)
                    < FLAGS.residual_threshold
                ).sum()
            )
        pair = {"pair": name, "matches": len(src), "true_inliers": true_inliers}
        for transform in TRANSFORMS:
            result = run_methods(src, dst, truth, size, transform, FLAGS.seeds)
            per_transform[transform].append(result)
            pair[transform] = {
                m: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                for m, r in result.items()
            }
        pairs.append(pair)
        print(json.dumps(pair), file=sys.stderr)
    return {
        "matches": "skimage SIFT + ratio test",
        "summary": {t: summarize(rows) for t, rows in per_transform.items()},
        "pairs": pairs,
    }


def synthetic_benchmark() -> dict:
    rng = np.random.default_rng(0)
    width, height = 640, 480
    rows = {t: [] for t in TRANSFORMS}
    for count in (100, 300, 1000):
        for fraction in (0.15, 0.3, 0.6):
            for transform in TRANSFORMS:
                square = corners(width, height)
                moved = square + rng.uniform(-0.15, 0.15, (4, 2)) * [width, height]
                truth = _homography(square, moved)
                if transform == "affine":
                    truth[2] = [0, 0, 1]
                src = rng.uniform([0, 0], [width, height], (count, 2))
                dst = apply_transform(truth, src) + rng.normal(0, 2.0, (count, 2))
                outliers = rng.random(count) > fraction
                dst[outliers] = rng.uniform([0, 0], [width, height], (int(outliers.sum()), 2))
                rows[transform].append(
                    run_methods(src, dst, truth, (width, height), transform, FLAGS.seeds)
                )
    return {"summary": {t: summarize(r) for t, r in rows.items()}}


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    from delf_tf.matching.ransac import fit_transform

    return fit_transform(src, dst, "homography")


def main(argv: list[str]) -> None:
    del argv
    report = {
        "residual_threshold": FLAGS.residual_threshold,
        "max_trials": FLAGS.max_trials,
        "seeds": FLAGS.seeds,
        "baseline": "skimage.measure.ransac",
    }
    if FLAGS.synthetic:
        report["synthetic"] = synthetic_benchmark()
    if FLAGS.data:
        report["evd"] = evd_benchmark(Path(FLAGS.data))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
