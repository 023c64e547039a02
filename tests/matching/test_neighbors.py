"""Nearest-neighbour back ends agree with each other and honour the distance bound."""

import numpy as np
import pytest

from delf_tf.matching.neighbors import (
    MISSING,
    IvfPqNeighbors,
    IvfPqParameters,
    bounded_knn,
    build_neighbors,
    sampled_recall,
)


def unit(rng, shape):
    data = rng.normal(size=shape).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


@pytest.mark.parametrize("backend", ["kdtree", "flat"])
def test_exact_backends_match_brute_force_with_bound(backend):
    rng = np.random.default_rng(0)
    database = unit(rng, (2000, 8))
    queries = unit(rng, (100, 8))
    results = {
        name: build_neighbors(database, name).search(queries, 5, 0.6) for name in (backend, "brute")
    }
    (d1, i1), (d2, i2) = results[backend], results["brute"]
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


def test_ivfpq_finds_near_duplicates_with_exact_distances():
    rng = np.random.default_rng(1)
    database = unit(rng, (5000, 16))
    queries = (database[:50] + rng.normal(0, 0.01, (50, 16))).astype(np.float32)
    index = build_neighbors(database, "ivfpq", nprobe=8, subquantizers=4)
    assert index.name == "ivfpq" and index.parameters.nlist == 128
    distances, nearest = index.search(queries, 3, 0.8)
    assert (nearest[:, 0] == np.arange(50)).mean() >= 0.9
    # Candidates are re-scored exactly: reported distances are the true ones.
    found = nearest != MISSING
    true = np.linalg.norm(
        database[nearest[found]] - np.repeat(queries, 3, 0)[found.ravel()], axis=1
    )
    np.testing.assert_allclose(distances[found], true, atol=1e-5)
    assert index.memory_bytes() < database.nbytes / 2  # PQ codes: a few bytes each


def test_ivfpq_save_mmap_load_and_grow(tmp_path):
    rng = np.random.default_rng(2)
    database = unit(rng, (6000, 16))
    first = build_neighbors(database[:4000], "ivfpq", subquantizers=4)
    first.save(tmp_path / "ivf.faiss")
    loaded = IvfPqNeighbors.load(tmp_path / "ivf.faiss", database[:4000], first.parameters)
    assert loaded.read_only and len(loaded) == 4000
    queries = database[:20]
    np.testing.assert_array_equal(
        loaded.search(queries, 2, 0.5)[1], first.search(queries, 2, 0.5)[1]
    )
    with pytest.raises(ValueError, match="read-only"):
        loaded.add(database)
    writable = IvfPqNeighbors.load(
        tmp_path / "ivf.faiss", database[:4000], first.parameters, mmap=False
    )
    assert writable.add(database) == 2000 and len(writable) == 6000
    _, nearest = writable.search(database[4000:4050], 1, 0.5)
    assert (nearest[:, 0] == np.arange(4000, 4050)).mean() >= 0.9
    recall = sampled_recall(writable, database, 5, 0.8, samples=200)
    assert 0.5 < recall["recall_at_k"] <= 1.0 and recall["samples"] == 200
    assert sampled_recall(build_neighbors(database, "flat"), database, 5, 0.8)["recall_at_k"] == 1.0


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_bounded_knn_equals_brute_force_with_ties_and_pool_cuts(block):
    rng = np.random.default_rng(5)
    words = unit(rng, (6, 8))  # few words: many pairs within the bound, so the pool is cut
    database = unit(rng, (700, 8)) * 0.2 + words[rng.integers(0, 6, 700)]
    database = (database / np.linalg.norm(database, axis=1, keepdims=True)).astype(np.float32)
    database[10:14] = database[3]  # equal distances: the lower row comes first
    queries = np.concatenate([database[:20], unit(rng, (30, 8))])
    exact = np.linalg.norm(queries[:, None].astype(np.float64) - database[None], axis=2)
    order = np.lexsort((np.broadcast_to(np.arange(700), exact.shape), exact), axis=1)[:, :10]
    nearest = np.take_along_axis(exact, order, axis=1)
    distances, indices = bounded_knn(queries, database, 10, 0.7, block=block)
    np.testing.assert_array_equal(indices, np.where(nearest <= 0.7, order, MISSING))
    np.testing.assert_allclose(distances, np.where(nearest <= 0.7, nearest, np.inf), atol=1e-3)
    assert (indices == MISSING).any() and (indices[:20] != MISSING).all()
    assert indices[3, :5].tolist() == [3, 10, 11, 12, 13]
    empty = bounded_knn(queries[:2], database[:0], 3, 0.7)[1]
    assert empty.shape == (2, 3) and np.all(empty == MISSING)


def test_fast_scan_ivfpq_saves_loads_and_finds_near_duplicates(tmp_path):
    rng = np.random.default_rng(6)
    database = unit(rng, (5000, 16))
    queries = (database[:50] + rng.normal(0, 0.01, (50, 16))).astype(np.float32)
    index = build_neighbors(database, "ivfpq", nprobe=8, subquantizers=8, bits=4)
    assert index.parameters.bits == 4 and type(index._index).__name__ == "IndexIVFPQFastScan"
    _, nearest = index.search(queries, 3, 0.8)
    assert (nearest[:, 0] == np.arange(50)).mean() >= 0.9
    index.save(tmp_path / "fs.faiss")
    loaded = IvfPqNeighbors.load(tmp_path / "fs.faiss", database, index.parameters)
    np.testing.assert_array_equal(loaded.search(queries, 3, 0.8)[1], nearest)
    # Indexes saved before fast-scan record no `bits`: their parameters read as 8-bit.
    old = {k: v for k, v in index.parameters.to_dict().items() if k != "bits"}
    assert IvfPqParameters.from_dict(old).bits == 8
    assert index.memory_bytes() < 16 * 5000  # 4-byte codes + 8-byte ids
