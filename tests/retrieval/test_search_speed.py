"""The search's fast paths (threaded verification, blocked re-ranking k-NN, fast-scan
IVF-PQ) rank exactly as the plain paths do."""

import numpy as np
import pytest

from delf_tf.config import RetrievalConfig
from delf_tf.features import FeatureStore, LocalFeatures
from delf_tf.matching import pairwise
from delf_tf.matching.neighbors import FlatNeighbors, IvfPqNeighbors, ivfpq_parameters
from delf_tf.matching.ransac import apply_transform
from delf_tf.retrieval import Index, Searcher

DIM, PER_IMAGE, IMAGES = 16, 120, 40
AFFINE = np.array([[0.8, -0.2, 20.0], [0.15, 0.85, 5.0], [0.0, 0.0, 1.0]])


def unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """(index of 40 images over shared visual words, 3 queries planted on images 7, 19, 31)."""
    rng = np.random.default_rng(0)
    words = unit(rng.normal(size=(24, DIM)))

    def features(count):
        return LocalFeatures(
            rng.uniform([0, 0], [320, 240], (count, 2)),
            np.ones(count),
            rng.uniform(size=count),
            unit(words[rng.integers(0, 24, count)] + 0.3 * rng.normal(size=(count, DIM))),
            unit(rng.normal(size=8)),
        )

    store = FeatureStore.open_or_create(
        tmp_path_factory.mktemp("speed") / "store", "a" * 64, {"descriptor_dim": DIM, "model": "t"}
    )
    for i in range(IMAGES):
        store.save(f"img{i:02d}", features(PER_IMAGE))
    index = Index.from_store(store, progress=False)
    queries = []
    for source in (7, 19, 31):
        kept = rng.choice(PER_IMAGE, 40, replace=False)
        clutter = features(40)
        queries.append(
            LocalFeatures(
                np.concatenate(
                    [
                        apply_transform(np.linalg.inv(AFFINE), index.image_keypoints(source)[kept]),
                        clutter.keypoints,
                    ]
                ),
                np.ones(80),
                np.ones(80),
                np.concatenate(
                    [
                        unit(
                            index.image_descriptors(source)[kept]
                            + 0.02 * rng.normal(size=(40, DIM))
                        ),
                        clutter.descriptors,
                    ]
                ),
                unit(np.asarray(index.global_descriptors[source]) + 0.3 * rng.normal(size=8)),
            )
        )
    return index, queries


def summary(results):
    return [
        (r.image_id, r.inliers, r.votes, r.matches.query_indices.tolist(), r.verification.model)
        for r in results
    ]


@pytest.mark.parametrize("ranking", ["votes", "global"])
def test_threaded_verification_returns_what_one_thread_returns(collection, ranking, monkeypatch):
    index, queries = collection
    config = RetrievalConfig(ranking=ranking, backend="flat", top_k=4, shortlist=30)
    plain, threaded = Searcher(index, config, threads=1), Searcher(index, config, threads=3)
    assert plain._thread_pool() is None and threaded._thread_pool() is not None
    calls = []
    original = pairwise.ransac
    monkeypatch.setattr(
        "delf_tf.matching.pairwise.ransac", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    for query, source in zip(queries, (7, 19, 31), strict=True):
        for top_k in (1, 4):
            calls.clear()
            expected = plain.search(query, top_k=top_k)
            one_by_one = len(calls)
            got = threaded.search(query, top_k=top_k)
            assert expected[0].image_id == source and len(expected) == top_k
            for a, b in zip(summary(expected), summary(got), strict=True):
                assert a[:4] == b[:4]
                np.testing.assert_array_equal(a[4], b[4])
            if top_k == 1:  # the early stop: no other image has as many votes/matches
                assert one_by_one < 5
        assert threaded.ranking(query) == plain.ranking(query)


def test_reranking_matches_equal_those_of_exact_faiss_search(collection):
    """shortlist_matches (blocked bounded_knn) = the votes rule over FAISS's exact k-NN."""
    index, queries = collection
    searcher = Searcher(index, RetrievalConfig(ranking="global", shortlist=30), threads=1)
    ids = np.arange(0, IMAGES, 2)
    union = np.concatenate([index.image_descriptors(i) for i in ids])
    for query in queries:
        _, found = FlatNeighbors(union).search(query.descriptors, 10, 0.8)
        expected = {}
        for row, columns in enumerate(found):
            for column in columns[columns >= 0]:
                expected.setdefault((row, int(ids[column // PER_IMAGE])), column % PER_IMAGE)
        got = {}
        for image_id, matches in zip(ids, searcher.shortlist_matches(query, ids), strict=True):
            for row, column in zip(matches.query_indices, matches.database_indices, strict=True):
                got[(int(row), int(image_id))] = int(column)
        assert got == expected and len(got) > 100


def test_fast_scan_votes_rank_the_planted_images_as_exact_votes_do(collection):
    index, queries = collection
    parameters = ivfpq_parameters(index.num_descriptors, DIM)
    assert parameters.bits == 4
    fast = IvfPqNeighbors.train(index.descriptors, parameters)
    config = RetrievalConfig(ranking="votes", top_k=3)
    exact = Searcher(index, config, neighbors=FlatNeighbors(index.descriptors))
    approximate = Searcher(index, config, neighbors=fast)
    for query, source in zip(queries, (7, 19, 31), strict=True):
        a, b = exact.search(query), approximate.search(query)
        assert a[0].image_id == b[0].image_id == source
        assert abs(a[0].inliers - b[0].inliers) <= 2
