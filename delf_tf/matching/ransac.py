"""RANSAC geometric verification of matched keypoints: vectorised numpy, or skimage's.

`ransac(src, dst)` finds the affine map (default) or homography that takes most
`src` points to within `residual_threshold` pixels of their `dst` partners.

The vectorised method draws all hypotheses of a round at once, solves the
minimal problems as one batched linear system, and scores every hypothesis
against every match as one [T, N] array. The best hypothesis is then refined by
least squares on its inliers while that does not lose inliers (local
optimisation), which is why it finds at least as many inliers as
`skimage.measure.ransac` (the DELF reference's choice, kept as `method="skimage"`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import numpy as np

from delf_tf.config import RANSAC_METHODS, TRANSFORMS, RetrievalConfig
from delf_tf.errors import ConfigError

_DEFAULTS = RetrievalConfig()
MIN_SAMPLES = {"affine": 3, "homography": 4}
# Local optimisation (see `_local_optimisation`) of the REFINED_HYPOTHESES best
# hypotheses with distinct consensus sets.
REFINED_HYPOTHESES = 25
REFINEMENT_STEPS = 5
LO_THRESHOLD_FACTORS = (4.0, 2.0, 1.5, 1.0)
# Scoring works on [hypotheses, matches] blocks of at most this many entries.
_BLOCK = 1 << 21
# Minimal samples whose (normalised) triangle area is below this are degenerate.
_DEGENERATE_AREA = 1e-6
# Least-squares systems this close to singular (relative) are degenerate.
_DEGENERATE_FIT = 1e-10


@dataclasses.dataclass(frozen=True)
class RansacResult:
    """Outcome of RANSAC on N matches.

    Attributes:
      model: float64 [3, 3] mapping homogeneous src (x, y, 1) to dst, fitted by
        least squares to the inliers, or None when no model was found (fewer
        matches than the minimal sample).
      inliers: bool [N] the largest consensus set found: the matches within the
        residual threshold of the best (refined) hypothesis.
      trials: hypotheses drawn.
    """

    model: np.ndarray | None
    inliers: np.ndarray
    trials: int

    @property
    def num_inliers(self) -> int:
        return int(np.count_nonzero(self.inliers))


def ransac(
    src: np.ndarray,
    dst: np.ndarray,
    transform: str = _DEFAULTS.transform,
    residual_threshold: float = _DEFAULTS.residual_threshold,
    max_trials: int = _DEFAULTS.max_trials,
    seed: int | None = _DEFAULTS.seed,
    method: str = _DEFAULTS.ransac_method,
) -> RansacResult:
    """Robustly fits `transform` to matches src[i] -> dst[i].

    Args:
      src: [N, 2] float (x, y) points, e.g. query keypoints.
      dst: [N, 2] float (x, y) points, e.g. database keypoints.
      transform: "affine" (3-point samples) or "homography" (4-point samples).
      residual_threshold: a match is an inlier when |model(src) - dst| < this (pixels).
      max_trials: hypotheses to draw (all of them are drawn: no early stop).
      seed: seeds the sampling.
      method: "vectorized" or "skimage" (skimage.measure.ransac, the reference).
    """
    if transform not in TRANSFORMS:
        raise ConfigError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if method not in RANSAC_METHODS:
        raise ConfigError(f"method must be one of {RANSAC_METHODS}, got {method!r}")
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    if src.shape != dst.shape:
        raise ValueError(f"src {src.shape} and dst {dst.shape} must have the same shape")
    n = src.shape[0]
    if n < MIN_SAMPLES[transform]:
        return RansacResult(None, np.zeros(n, bool), 0)
    if method == "skimage":
        return _skimage_ransac(src, dst, transform, residual_threshold, max_trials, seed)
    return _vectorized_ransac(src, dst, transform, residual_threshold, max_trials, seed)


def apply_transform(model: np.ndarray, points: np.ndarray) -> np.ndarray:
    """[3, 3] model applied to [N, 2] (x, y) points -> [N, 2] float64."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    projected = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ np.asarray(model).T
    return projected[:, :2] / projected[:, 2:3]


def residuals(model: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """[N] float64 distances |model(src) - dst| in pixels."""
    return np.linalg.norm(apply_transform(model, src) - np.asarray(dst, np.float64), axis=1)


def fit_transform(src: np.ndarray, dst: np.ndarray, transform: str) -> np.ndarray | None:
    """Least-squares `transform` ([3, 3] float64) from >= 3 (affine) / 4 (homography) matches."""
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    if len(src) < MIN_SAMPLES[transform]:
        return None
    norm_src, norm_dst = _normalizer(src), _normalizer(dst)
    everything = np.ones((1, len(src)), bool)
    model, ok = _fit_batch(everything, _apply(norm_src, src), _apply(norm_dst, dst), transform)
    if not ok[0]:
        return None
    model = _denormalize(model, norm_src, norm_dst)[0]
    return model if np.all(np.isfinite(model)) else None


# --- vectorised RANSAC -------------------------------------------------------------


def _vectorized_ransac(src, dst, transform, threshold, max_trials, seed) -> RansacResult:
    rng = np.random.default_rng(seed)
    n, size = len(src), MIN_SAMPLES[transform]
    norm_src, norm_dst = _normalizer(src), _normalizer(dst)
    src_n, dst_n = _apply(norm_src, src), _apply(norm_dst, dst)
    samples = _draw_samples(rng, n, size, max_trials)
    solve = _solve_affine if transform == "affine" else _solve_homography
    models, valid = solve(src_n[samples], dst_n[samples])
    models = _denormalize(models[valid], norm_src, norm_dst)
    if not len(models):
        return RansacResult(None, np.zeros(n, bool), len(samples))
    counts, costs = _score(models, src, dst, threshold)
    order = np.lexsort((costs, -counts))[: 4 * REFINED_HYPOTHESES]
    # The best hypotheses with distinct consensus sets go on to local optimisation.
    masks = _masks(models[order], src, dst, threshold)
    _, first = np.unique(np.packbits(masks, axis=1), axis=0, return_index=True)
    chosen = order[np.sort(first)[:REFINED_HYPOTHESES]]
    fit = _BatchFit(src, dst, src_n, dst_n, norm_src, norm_dst, transform)
    model, inliers = _local_optimisation(models[chosen], fit, threshold)
    # As skimage does: the model returned is the least-squares fit to the consensus
    # set (a hypothesis that won by one stray outlier can be a few pixels off).
    refit, ok = fit(inliers[None])
    return RansacResult(refit[0] if ok[0] else model, inliers, len(samples))


class _BatchFit:
    """Least-squares refits of K models at once, on K inlier masks over the same matches."""

    def __init__(self, src, dst, src_n, dst_n, norm_src, norm_dst, transform):
        self.src, self.dst = src, dst
        self.src_n, self.dst_n = src_n, dst_n
        self.norm_src, self.norm_dst = norm_src, norm_dst
        self.transform = transform
        self.homogeneous = np.concatenate([src, np.ones((len(src), 1))], axis=1).T  # [3, N]

    def __call__(self, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """bool [K, N] -> models [K, 3, 3] in pixels, ok bool [K]."""
        models, ok = _fit_batch(masks, self.src_n, self.dst_n, self.transform)
        models = _denormalize(models, self.norm_src, self.norm_dst)
        return models, ok & np.all(np.isfinite(models), axis=(1, 2))

    def squared(self, models: np.ndarray) -> np.ndarray:
        """[K, N] squared transfer errors of [K, 3, 3] models (see `_squared_errors`)."""
        return _squared_errors(models, self.homogeneous, self.dst)


def _local_optimisation(candidates, fit: _BatchFit, threshold) -> tuple[np.ndarray, np.ndarray]:
    """LO-RANSAC on K hypotheses at once; the (model, inlier mask) with the most inliers.

    Each hypothesis is refitted by least squares on its inliers within a threshold
    shrinking from LO_THRESHOLD_FACTORS[0] * threshold to threshold, then refitted
    on its inliers at the threshold while that loses none (REFINEMENT_STEPS at
    most). A refit replaces a hypothesis only if it keeps at least as many inliers,
    so the result never has fewer inliers than the best hypothesis.
    """
    # Squared errors are computed once per model set and compared with each threshold
    # (as `_masks` would compute them: t * t), so masks, counts and costs are those
    # of recomputing them.
    bound = threshold * threshold
    squared = fit.squared(candidates)
    best, best_squared = candidates.copy(), squared.copy()
    best_masks = squared < bound
    best_counts = best_masks.sum(axis=1)
    current = candidates
    for factor in LO_THRESHOLD_FACTORS:
        wide = factor * threshold
        refit, ok = fit(squared < wide * wide)
        current = np.where(ok[:, None, None], refit, current)
        squared = fit.squared(current)
        masks = squared < bound
        counts = masks.sum(axis=1)
        better = ok & (counts >= best_counts)
        best[better], best_masks[better], best_counts[better] = (
            current[better],
            masks[better],
            counts[better],
        )
        best_squared[better] = squared[better]
    for _ in range(REFINEMENT_STEPS):
        refit, ok = fit(best_masks)
        squared = fit.squared(refit)
        masks = squared < bound
        counts = masks.sum(axis=1)
        # Keep the least-squares fit even when its inlier set is unchanged: the
        # result is then the best fit to its own inliers.
        better = ok & (counts >= best_counts)
        changed = better & np.any(masks != best_masks, axis=1)
        best[better], best_masks[better], best_counts[better] = (
            refit[better],
            masks[better],
            counts[better],
        )
        best_squared[better] = squared[better]
        if not changed.any():
            break
    costs = np.minimum(best_squared, bound).sum(axis=1)
    pick = int(np.lexsort((costs, -best_counts))[0])
    return best[pick], best_masks[pick]


def _draw_samples(rng: np.random.Generator, n: int, size: int, trials: int) -> np.ndarray:
    """int [T, size] index sets without repeats; every subset when there are <= trials."""
    if math.comb(n, size) <= trials:
        return np.array(list(itertools.combinations(range(n), size)), dtype=np.int64)
    samples = rng.integers(0, n, size=(trials, size))
    while True:
        ordered = np.sort(samples, axis=1)
        repeated = np.any(ordered[:, 1:] == ordered[:, :-1], axis=1)
        if not repeated.any():
            return samples
        samples[repeated] = rng.integers(0, n, size=(int(repeated.sum()), size))


def _triangle_area(a, b, c) -> np.ndarray:
    """[...] absolute twice-area of triangles from [..., 2] corners."""
    ab, ac = b - a, c - a
    return np.abs(ab[..., 0] * ac[..., 1] - ab[..., 1] * ac[..., 0])


def _solve_affine(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[T, 3, 2] minimal samples -> models [T, 3, 3], valid bool [T]."""
    valid = _triangle_area(*src.transpose(1, 0, 2)) > _DEGENERATE_AREA
    valid &= _triangle_area(*dst.transpose(1, 0, 2)) > _DEGENERATE_AREA
    system = np.concatenate([src, np.ones(src.shape[:2] + (1,))], axis=2)
    system[~valid] = np.eye(3)
    coefficients = np.linalg.solve(system, dst)  # [T, 3, 2]: columns give x' and y'
    models = np.zeros((len(src), 3, 3))
    models[:, :2, :] = coefficients.transpose(0, 2, 1)
    models[:, 2, 2] = 1.0
    return models, valid


def _solve_homography(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[T, 4, 2] minimal samples -> models [T, 3, 3] (h33 = 1), valid bool [T]."""
    valid = np.ones(len(src), bool)
    for triple in itertools.combinations(range(4), 3):
        for points in (src, dst):
            valid &= _triangle_area(*(points[:, i] for i in triple)) > _DEGENERATE_AREA
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]
    system = np.zeros((len(src), 8, 8))
    system[:, 0::2, 0], system[:, 0::2, 1], system[:, 0::2, 2] = x, y, 1.0
    system[:, 1::2, 3], system[:, 1::2, 4], system[:, 1::2, 5] = x, y, 1.0
    system[:, 0::2, 6], system[:, 0::2, 7] = -x * u, -y * u
    system[:, 1::2, 6], system[:, 1::2, 7] = -x * v, -y * v
    target = np.empty((len(src), 8))
    target[:, 0::2], target[:, 1::2] = u, v
    system[~valid] = np.eye(8)
    with np.errstate(all="ignore"):
        solution = np.linalg.solve(system, target[..., None])[..., 0]
    models = np.concatenate([solution, np.ones((len(src), 1))], axis=1).reshape(-1, 3, 3)
    valid &= np.all(np.isfinite(models), axis=(1, 2))
    return models, valid


def _score(models, src, dst, threshold) -> tuple[np.ndarray, np.ndarray]:
    """Inlier counts [T] and truncated squared-residual costs [T] of [T, 3, 3] models."""
    homogeneous = np.concatenate([src, np.ones((len(src), 1))], axis=1).T  # [3, N]
    bound = threshold * threshold
    counts = np.empty(len(models), np.int64)
    costs = np.empty(len(models))
    step = max(1, _BLOCK // max(len(src), 1))
    for start in range(0, len(models), step):
        squared = _squared_errors(models[start : start + step], homogeneous, dst)
        counts[start : start + step] = np.count_nonzero(squared < bound, axis=1)
        costs[start : start + step] = np.minimum(squared, bound).sum(axis=1)
    return counts, costs


def _squared_errors(models, homogeneous, dst) -> np.ndarray:
    """[T, N] squared transfer errors; points sent to infinity get +inf."""
    if not np.any(models[:, 2, :2]) and np.all(models[:, 2, 2] == 1.0):  # affine: w = 1
        difference = models[:, :2] @ homogeneous - dst.T[None]  # [T, 2, N]
        return np.einsum("tkn,tkn->tn", difference, difference)
    projected = models @ homogeneous  # [T, 3, N]
    with np.errstate(all="ignore"):
        inverse_w = 1.0 / projected[:, 2]
        dx = projected[:, 0] * inverse_w - dst[:, 0]
        dy = projected[:, 1] * inverse_w - dst[:, 1]
        squared = dx * dx + dy * dy
    squared[~np.isfinite(squared)] = np.inf
    return squared


def _masks(models, src, dst, threshold) -> np.ndarray:
    """bool [K, N]: matches within `threshold` px under each of K [3, 3] models."""
    homogeneous = np.concatenate([src, np.ones((len(src), 1))], axis=1).T
    return _squared_errors(models, homogeneous, dst) < threshold * threshold


# --- normalisation and least squares -----------------------------------------------


def _normalizer(points: np.ndarray) -> np.ndarray:
    """[3, 3] similarity that centres points and scales their mean radius to sqrt(2)."""
    centroid = points.mean(axis=0)
    radius = np.linalg.norm(points - centroid, axis=1).mean()
    scale = math.sqrt(2.0) / radius if radius > 0 else 1.0
    return np.array(
        [[scale, 0.0, -scale * centroid[0]], [0.0, scale, -scale * centroid[1]], [0, 0, 1.0]]
    )


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def _denormalize(models: np.ndarray, norm_src: np.ndarray, norm_dst: np.ndarray) -> np.ndarray:
    """Models between normalised coordinates -> between pixels, scaled so m33 = 1."""
    models = np.linalg.inv(norm_dst) @ models @ norm_src
    with np.errstate(all="ignore"):
        return models / models[:, 2:3, 2:3]


def _fit_batch(masks, src, dst, transform) -> tuple[np.ndarray, np.ndarray]:
    """Least squares on K subsets at once (normalised coordinates).

    masks: bool [K, N] selects each subset of the N matches src [N, 2] -> dst [N, 2].
    Returns models [K, 3, 3] and ok bool [K] (False: too few or degenerate points).
    Affine: normal equations. Homography: DLT, the eigenvector of the smallest
    eigenvalue of A^T A, with A^T A summed per subset.
    """
    weights = masks.astype(np.float64)
    counts = masks.sum(axis=1)
    if transform == "affine":
        design = np.concatenate([src, np.ones((len(src), 1))], axis=1)  # [N, 3]
        normal = np.einsum("kn,ni,nj->kij", weights, design, design)
        right = np.einsum("kn,ni,nj->kij", weights, design, dst)
        scale = np.prod(np.maximum(np.diagonal(normal, axis1=1, axis2=2), 1e-300), axis=1)
        ok = (counts >= 3) & (np.abs(np.linalg.det(normal)) > _DEGENERATE_FIT * scale)
        normal[~ok] = np.eye(3)
        coefficients = np.linalg.solve(normal, right)  # [K, 3, 2]
        models = np.zeros((len(masks), 3, 3))
        models[:, :2, :] = coefficients.transpose(0, 2, 1)
        models[:, 2, 2] = 1.0
        return models, ok
    x, y, u, v = src[:, 0], src[:, 1], dst[:, 0], dst[:, 1]
    zeros, ones = np.zeros_like(x), np.ones_like(x)
    rows_u = np.stack([x, y, ones, zeros, zeros, zeros, -x * u, -y * u, -u], axis=1)
    rows_v = np.stack([zeros, zeros, zeros, x, y, ones, -x * v, -y * v, -v], axis=1)
    per_match = rows_u[:, :, None] * rows_u[:, None, :] + rows_v[:, :, None] * rows_v[:, None, :]
    normal = np.einsum("kn,nij->kij", weights, per_match)  # [K, 9, 9]
    values, vectors = np.linalg.eigh(normal)
    models = vectors[:, :, 0].reshape(-1, 3, 3)
    ok = (counts >= 4) & (values[:, 1] > _DEGENERATE_FIT * np.maximum(values[:, 8], 1e-300))
    ok &= np.abs(models[:, 2, 2]) > 1e-12
    return models, ok


# --- reference: skimage ------------------------------------------------------------


def _skimage_ransac(src, dst, transform, threshold, max_trials, seed) -> RansacResult:
    from skimage.measure import ransac as skimage_ransac
    from skimage.transform import AffineTransform, ProjectiveTransform

    model_class = AffineTransform if transform == "affine" else ProjectiveTransform
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inliers = skimage_ransac(
            (src, dst),
            model_class,
            min_samples=MIN_SAMPLES[transform],
            residual_threshold=threshold,
            max_trials=max_trials,
            rng=seed,
        )
    if model is None or inliers is None:
        return RansacResult(None, np.zeros(len(src), bool), max_trials)
    return RansacResult(np.asarray(model.params, np.float64), np.asarray(inliers, bool), max_trials)
