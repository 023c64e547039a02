"""Nearest-neighbour back ends agree with each other and honour the distance bound."""

import numpy as np
import pytest

from delf_tf.matching.neighbors import MISSING, build_neighbors


def unit(rng, shape):
    data = rng.normal(size=shape).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def test_kdtree_matches_brute_force_with_bound():
    rng = np.random.default_rng(0)
    database = unit(rng, (2000, 8))
    queries = unit(rng, (100, 8))
    results = {
        name: build_neighbors(database, name).search(queries, 5, 0.6)
        for name in ("kdtree", "brute")
    }
    (d1, i1), (d2, i2) = results["kdtree"], results["brute"]
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, atol=1e-5)
    assert (i1 == MISSING).any() and (i1 != MISSING).any()  # the bound cuts some
    assert np.all(np.isinf(d1[i1 == MISSING]))
    assert np.all(d1[i1 != MISSING] <= 0.6)
    assert np.all(np.diff(np.where(np.isinf(d1), 9.0, d1), axis=1) >= 0)  # nearest first


def test_empty_database_and_unknown_backend():
    distances, indices = build_neighbors(np.zeros((0, 4), np.float32)).search(
        np.ones((3, 4), np.float32), 2, 1.0
    )
    assert indices.shape == (3, 2) and np.all(indices == MISSING)
    with pytest.raises(ValueError, match="backend"):
        build_neighbors(np.zeros((1, 4), np.float32), "annoy")


def test_faiss_ivfpq_finds_near_duplicates():
    pytest.importorskip("faiss", reason="optional back end (pip install faiss-cpu)")
    rng = np.random.default_rng(1)
    database = unit(rng, (5000, 16))
    queries = database[:50] + rng.normal(0, 0.01, (50, 16))
    index = build_neighbors(database, "faiss-ivfpq", nprobe=8)
    _, nearest = index.search(queries.astype(np.float32), 3, 0.8)
    assert (nearest[:, 0] == np.arange(50)).mean() >= 0.9
    assert index.memory_bytes() < database.nbytes / 2  # PQ codes: a few bytes each
