import numpy as np
import pytest
import skimage.transform
from conftest import TINY_MODEL

from delf_tf.config import ExtractionConfig
from delf_tf.extraction import ExtractionModule, InProcessExtractor, PcaParams, fit_pca
from delf_tf.model import compute_receptive_field

DEPTH = TINY_MODEL.feature_depth  # descriptors of the session's model, before PCA


def test_output_contract(extractor, astronaut_small):
    features = extractor.extract(astronaut_small)
    n = len(features)
    assert 0 < n <= 200
    assert features.keypoints.shape == (n, 2) and features.keypoints.dtype == np.float32
    assert features.descriptors.shape == (n, DEPTH)
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, atol=1e-5)
    assert np.all(np.diff(features.scores) <= 0), "sorted by decreasing score"
    assert set(np.round(features.scales, 4)) <= {2.0, 1.0}  # 1 / scale for scales 0.5, 1.0


def test_keypoints_are_receptive_field_centres_over_the_scale(extractor, delf_model):
    """Every grid cell of every level (threshold 0): centre = (stride i - pad + (rf-1)/2) / s."""
    field = compute_receptive_field(delf_model.backbone)
    image = np.random.default_rng(0).integers(0, 255, (70, 150, 3), dtype=np.uint8)
    scales = (0.5, 1.0, 2.0)
    features = extractor.extract(image, scales=scales, max_features=10_000)
    expected = set()
    for s in scales:
        rows, cols = int(np.ceil(round(70 * s) / 16)), int(np.ceil(round(150 * s) / 16))
        for i in range(rows):
            for j in range(cols):
                y, x = (field.centers(np.array([i, j])) / s).tolist()
                expected.add((round(x, 3), round(y, 3), round(1 / s, 3)))
    found = {
        (round(float(x), 3), round(float(y), 3), round(float(v), 3))
        for (x, y), v in zip(features.keypoints, features.scales, strict=True)
    }
    assert len(features) == len(expected) and found == expected


def test_keypoints_follow_a_rescaled_image(extractor, astronaut_small):
    """Image at 2x seen at pyramid scale 0.5 == image at 1x seen at scale 1.0."""
    big = skimage.transform.resize(astronaut_small, (256, 256), order=1)
    big = (big * 255).round().astype(np.uint8)
    small = extractor.extract(astronaut_small, scales=(1.0,), max_features=10_000)
    large = extractor.extract(big, scales=(0.5,), max_features=10_000)
    assert len(small) == len(large) == 64
    order_small = np.lexsort(small.keypoints.T)
    order_large = np.lexsort(large.keypoints.T)
    # Receptive-field centres / scale (the reference's convention): coordinates double.
    np.testing.assert_allclose(
        large.keypoints[order_large], 2 * small.keypoints[order_small], atol=1e-3
    )
    np.testing.assert_allclose(large.scales, 2.0)
    np.testing.assert_allclose(small.scales, 1.0)


def test_threshold_and_top_k(extractor, astronaut_small):
    everything = extractor.extract(astronaut_small, max_features=10_000)
    assert len(everything) == 64 + 16  # 128 px at scales 1.0 and 0.5
    top = extractor.extract(astronaut_small, max_features=7)
    np.testing.assert_array_equal(top.scores, everything.scores[:7])
    threshold = float(np.median(everything.scores))
    kept = extractor.extract(astronaut_small, max_features=10_000, score_threshold=threshold)
    assert len(kept) == int(np.sum(everything.scores >= threshold))
    assert kept.scores.min() >= threshold
    none = extractor.extract(astronaut_small, score_threshold=1e9)
    assert len(none) == 0 and none.descriptors.shape == (0, DEPTH)


def test_same_image_twice_gives_identical_output(extractor, astronaut_small):
    first = extractor.extract(astronaut_small)
    second = extractor.extract(astronaut_small.copy())
    for name in ("keypoints", "scales", "scores", "descriptors"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_image_downsized_to_max_image_size(delf_model, astronaut_small):
    config = ExtractionConfig(scales=(1.0,), score_threshold=0.0, max_image_size=64)
    features = InProcessExtractor.from_model(delf_model, config).extract(astronaut_small)
    assert len(features) == 16  # 128 px -> 64 px -> 4 x 4 grid
    np.testing.assert_allclose(features.scales, 1.0)  # 1 / pyramid scale, as the reference
    # Keypoints are in original-image pixels: the 64-px grid's centres divided by 0.5.
    assert 64 < features.keypoints.max() <= 127


@pytest.mark.parametrize("shape", [(5, 5, 3), (1, 300, 3), (15, 15, 3)])
def test_too_small_images_give_zero_features(extractor, shape):
    features = extractor.extract(np.full(shape, 128, np.uint8))
    assert len(features) == 0


def greedy_nms(keypoints, scores, half, iou_threshold):
    """Indices kept by greedy NMS of boxes keypoint +- half, by decreasing score (reference)."""
    low, high = keypoints - half, keypoints + half
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        overlap = np.clip(np.minimum(high[i], high[kept]) - np.maximum(low[i], low[kept]), 0, None)
        inter = overlap.prod(axis=1)
        iou = inter / (2 * (2 * half) ** 2 - inter)
        if not np.any(iou > iou_threshold):
            kept.append(i)
    return np.array(kept)


def test_nms_removes_overlapping_boxes(delf_model, astronaut_small):
    base = dict(scales=(1.0,), score_threshold=0.0, max_image_size=-1, max_features=1000)
    # Receptive-field boxes (77 px wide for the tiny net) 16 px apart: side neighbours
    # overlap with IoU 0.66, diagonal ones 0.46, so NMS at 0.5 keeps at most half.
    plain = InProcessExtractor.from_model(delf_model, ExtractionConfig(**base))
    nms = InProcessExtractor.from_model(delf_model, ExtractionConfig(**base, iou_threshold=0.5))
    a, b = plain.extract(astronaut_small), nms.extract(astronaut_small)
    half = (compute_receptive_field(delf_model.backbone).size - 1) / 2
    expected = greedy_nms(a.keypoints, a.scores, half, 0.5)
    assert 0 < len(b) == len(expected) <= len(a) / 2
    np.testing.assert_array_equal(b.keypoints, a.keypoints[expected])
    np.testing.assert_array_equal(b.scores, a.scores[expected])


def test_pca_in_graph_matches_numpy(delf_model, extractor, astronaut_small):
    raw = extractor.extract(astronaut_small)
    rng = np.random.default_rng(0)
    training = rng.normal(size=(300, DEPTH))
    for whiten in (False, True):
        pca = fit_pca(training, dim=64, whiten=whiten)
        config = extractor.config.replace(pca_dim=40)
        reduced = InProcessExtractor.from_model(delf_model, config, pca).extract(astronaut_small)
        expected = (raw.descriptors - pca.mean) @ pca.projection[:40].T
        if whiten:
            expected /= np.sqrt(pca.variances[:40])
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        np.testing.assert_allclose(reduced.descriptors, expected, atol=1e-4)
        np.testing.assert_array_equal(reduced.keypoints, raw.keypoints)


def test_pca_without_variances_in_graph(delf_model, extractor, astronaut_small):
    """A release ships no variances: the graph projects as before (no whitening)."""
    depth = delf_model.feature_depth
    pca = fit_pca(np.random.default_rng(0).normal(size=(300, depth)), dim=40)
    bare = PcaParams(mean=pca.mean, projection=pca.projection, variances=None)
    config = extractor.config.replace(pca_dim=40)
    a = InProcessExtractor.from_model(delf_model, config, pca)
    b = InProcessExtractor.from_model(delf_model, config, bare)
    np.testing.assert_array_equal(
        a.extract(astronaut_small).descriptors, b.extract(astronaut_small).descriptors
    )
    assert a.fingerprint != b.fingerprint  # the variances are part of the stored PCA


def test_fit_pca_matches_numpy_svd(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
    pca = fit_pca(data, dim=8)
    centered = data - data.mean(axis=0)
    _, singular, vt = np.linalg.svd(centered, full_matrices=False)
    np.testing.assert_allclose(pca.variances, singular[:8] ** 2 / (len(data) - 1), rtol=1e-4)
    # Same axes up to sign.
    np.testing.assert_allclose(np.abs(np.sum(pca.projection * vt[:8], axis=1)), 1.0, atol=1e-4)
    path = tmp_path / "pca.npz"
    pca.save(path)
    loaded = PcaParams.load(path)
    np.testing.assert_array_equal(loaded.projection, pca.projection)
    assert loaded.whiten is False


def test_pca_of_wrong_depth_is_refused(delf_model):
    pca = fit_pca(np.random.default_rng(0).normal(size=(50, 16)), dim=4)
    with pytest.raises(ValueError, match="16-D"):
        ExtractionModule(delf_model, ExtractionConfig(pca_dim=4), pca)


def test_fingerprint_names_the_descriptor_space(delf_model, small_config):
    a = ExtractionModule(delf_model, small_config).fingerprint
    b = ExtractionModule(delf_model, small_config.replace(score_threshold=50.0)).fingerprint
    pca = fit_pca(np.random.default_rng(0).normal(size=(50, DEPTH)), dim=8)
    c = ExtractionModule(delf_model, small_config.replace(pca_dim=8), pca).fingerprint
    assert a == b != c
