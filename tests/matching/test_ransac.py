"""RANSAC: known affine / homography recovered among outliers; vectorised vs skimage."""

import numpy as np
import pytest

from delf_tf.matching.ransac import apply_transform, fit_transform, ransac

CORNERS = np.array([[0, 0], [640, 0], [640, 480], [0, 480]], np.float64)
AFFINE = np.array([[0.8, -0.35, 60.0], [0.3, 0.9, -25.0], [0.0, 0.0, 1.0]])
HOMOGRAPHY = np.array([[0.9, -0.2, 40.0], [0.15, 1.05, -30.0], [4e-4, -3e-4, 1.0]])


def synthetic_matches(model, count, inlier_fraction, seed, noise=1.0):
    """src [count, 2], dst [count, 2] and the true inlier mask."""
    rng = np.random.default_rng(seed)
    src = rng.uniform([0, 0], [640, 480], (count, 2))
    dst = apply_transform(model, src) + rng.normal(0, noise, (count, 2))
    truth = np.zeros(count, bool)
    truth[rng.choice(count, round(count * inlier_fraction), replace=False)] = True
    dst[~truth] = rng.uniform([0, 0], [640, 480], ((~truth).sum(), 2))
    return src, dst, truth


def corner_error(estimated, true):
    return np.linalg.norm(
        apply_transform(estimated, CORNERS) - apply_transform(true, CORNERS), axis=1
    ).mean()


@pytest.mark.parametrize("method", ["vectorized", "skimage"])
@pytest.mark.parametrize(("transform", "model"), [("affine", AFFINE), ("homography", HOMOGRAPHY)])
def test_known_transform_recovered_among_outliers(method, transform, model):
    src, dst, truth = synthetic_matches(model, 150, 0.4, seed=1)
    result = ransac(src, dst, transform, residual_threshold=5.0, max_trials=500, method=method)
    assert result.model.shape == (3, 3)
    assert corner_error(result.model, model) < 3.0
    found = result.inliers
    assert found[truth].mean() > 0.95  # true inliers found
    assert found[~truth].sum() <= 3  # outliers (uniform) rarely within 5 px by chance


def test_vectorized_finds_at_least_as_many_inliers_as_skimage():
    vectorized_total = skimage_total = 0
    for case, (transform, model, count, fraction) in enumerate(
        [
            ("affine", AFFINE, 60, 0.5),
            ("affine", AFFINE, 300, 0.25),
            ("affine", AFFINE, 40, 0.3),
            ("homography", HOMOGRAPHY, 120, 0.5),
            ("homography", HOMOGRAPHY, 200, 0.35),
        ]
    ):
        src, dst, _ = synthetic_matches(model, count, fraction, seed=10 + case, noise=4.0)
        fast = ransac(src, dst, transform, seed=case)
        reference = ransac(src, dst, transform, seed=case, method="skimage")
        assert fast.num_inliers >= reference.num_inliers, (case, transform)
        vectorized_total += fast.num_inliers
        skimage_total += reference.num_inliers
    assert vectorized_total >= skimage_total


def test_seeded_and_consistent():
    src, dst, _ = synthetic_matches(AFFINE, 80, 0.5, seed=3)
    first, second = ransac(src, dst, seed=7), ransac(src, dst, seed=7)
    np.testing.assert_array_equal(first.inliers, second.inliers)
    np.testing.assert_array_equal(first.model, second.model)
    # The model is the least-squares fit to the inliers: they lie within the threshold.
    residual = np.linalg.norm(apply_transform(first.model, src) - dst, axis=1)
    assert np.mean(residual[first.inliers] < 20.0) > 0.95


def test_too_few_and_degenerate_matches():
    two = np.array([[0.0, 0.0], [1.0, 1.0]])
    result = ransac(two, two)
    assert result.model is None and result.num_inliers == 0
    line = np.stack([np.arange(10.0), 2 * np.arange(10.0)], axis=1)
    assert ransac(line, line).model is None  # all samples collinear: no affine
    assert fit_transform(line, line, "affine") is None
    with pytest.raises(ValueError, match="transform"):
        ransac(two, two, transform="similarity")
