"""Retrieval at scale: saved k-NN structures, ASMK*, global descriptors, batch queries."""

import json
import math
import shutil

import faiss
import numpy as np
import pytest

from delf_tf.cli import main
from delf_tf.config import RetrievalConfig
from delf_tf.features import FeatureStore, LocalFeatures
from delf_tf.matching import neighbors as neighbors_module
from delf_tf.matching.neighbors import (
    AUTO_EXACT_MAX_DESCRIPTORS,
    IvfPqNeighbors,
    choose_backend,
    ivfpq_parameters,
)
from delf_tf.matching.ransac import apply_transform
from delf_tf.retrieval import Index, IndexFormatError, Searcher
from delf_tf.retrieval import asmk as asmk_module
from delf_tf.retrieval.asmk import AsmkIndex, default_codebook_size
from delf_tf.retrieval.batch import QueryRunner, read_queries, search_to_jsonl
from delf_tf.retrieval.global_ranking import GlobalRanker
from delf_tf.retrieval.structures import votes as votes_module

DIM = 16
GLOBAL_DIM = 24
PER_IMAGE = 80
AFFINE = np.array([[0.7, -0.3, 30.0], [0.25, 0.75, 10.0], [0.0, 0.0, 1.0]])


def unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


class Synthetic:
    """Clustered unit descriptors (shared 'visual words'), keypoints in a 320x240 frame."""

    def __init__(self, seed=0, words=64):
        self.rng = np.random.default_rng(seed)
        self.words = unit(self.rng.normal(size=(words, DIM)))

    def features(self, count=PER_IMAGE, with_global=True):
        rng = self.rng
        descriptors = unit(
            self.words[rng.integers(0, len(self.words), count)]
            + 0.35 * rng.normal(size=(count, DIM))
        )
        return LocalFeatures(
            rng.uniform([0, 0], [320, 240], (count, 2)),
            np.ones(count),
            rng.uniform(size=count),
            descriptors,
            unit(rng.normal(size=GLOBAL_DIM)) if with_global else None,
        )

    def query_of(self, source: LocalFeatures, kept=50, clutter=30, global_noise=0.3):
        """A view of `source`: `kept` of its features moved by AFFINE and perturbed, + clutter."""
        rng = self.rng
        keep = rng.choice(len(source), kept, replace=False)
        noisy = unit(source.descriptors[keep] + rng.normal(0, 0.03, (kept, DIM)))
        other = self.features(clutter, with_global=False)
        global_descriptor = None
        if source.global_descriptor is not None:
            global_descriptor = unit(
                source.global_descriptor + global_noise * rng.normal(size=GLOBAL_DIM) / 5
            )
        return LocalFeatures(
            np.concatenate(
                [apply_transform(np.linalg.inv(AFFINE), source.keypoints[keep]), other.keypoints]
            ),
            np.ones(kept + clutter),
            np.ones(kept + clutter),
            np.concatenate([noisy, other.descriptors]),
            global_descriptor,
        )


def make_store(path, names, data, fingerprint="a" * 64, with_global=True):
    store = FeatureStore.open_or_create(path, fingerprint, {"descriptor_dim": DIM, "model": "t"})
    for name in names:
        store.save(name, data.features(with_global=with_global))
    return store


@pytest.fixture(scope="module")
def planted_source(tmp_path_factory):
    """A 30-image store (with global descriptors) and its index with every structure saved."""
    root = tmp_path_factory.mktemp("planted")
    data = Synthetic(0)
    names = [f"img{i:02d}" for i in range(30)]
    store = make_store(root / "store", names, data)
    index = Index.from_store(store, progress=False)
    index.build_structures(backend="ivfpq", asmk=True, codebook_size=128, progress=False)
    index.save(root / "index")
    return data, store, root / "index"


@pytest.fixture()
def planted(planted_source, tmp_path):
    """(data, store, a copy of the planted index that the test may change)."""
    data, store, index = planted_source
    shutil.copytree(index, tmp_path / "index")
    return data, store, tmp_path / "index"


# --- k-NN structures ------------------------------------------------------------------------


def test_auto_backend_choice_and_derived_parameters():
    assert choose_backend(1000) == "flat"
    assert choose_backend(AUTO_EXACT_MAX_DESCRIPTORS) == "flat"
    assert choose_backend(AUTO_EXACT_MAX_DESCRIPTORS + 1) == "ivfpq"
    assert choose_backend(100_000_000) == "ivfpq-hnsw"
    small, large = ivfpq_parameters(1_000_000, 40), ivfpq_parameters(100_000_000, 40)
    assert (small.nlist, small.subquantizers, small.quantizer) == (4096, 40, "flat")
    assert (small.bits, small.refine) == (4, 5)  # fast-scan: 40 4-bit codes, 20 bytes
    assert (large.nlist, large.quantizer) == (32768, "hnsw")
    assert ivfpq_parameters(1000, 128).subquantizers == 64


def test_auto_builds_exact_for_small_and_ivfpq_beyond_the_threshold(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s", [f"i{i}" for i in range(12)], Synthetic(1))
    index = Index.from_store(store, progress=False)
    report = index.build_structures(progress=False)
    assert report["neighbors"]["backend"] == "flat" and "file" not in report["neighbors"]
    monkeypatch.setattr(neighbors_module, "AUTO_EXACT_MAX_DESCRIPTORS", 500)
    report = index.build_structures(backend="auto", progress=False)
    assert report["neighbors"]["backend"] == "ivfpq"
    assert report["neighbors"]["requested"] == "auto"
    assert 0.0 < report["neighbors"]["recall"]["recall_at_k"] <= 1.0


def test_saved_structures_are_loaded_memory_mapped_and_never_rebuilt(planted, monkeypatch):
    data, store, path = planted
    header = json.loads((path / "index.json").read_text())
    neighbors = header["structures"]["neighbors"]
    assert neighbors["backend"] == "ivfpq" and neighbors["fingerprint"] == "a" * 64
    assert neighbors["num_descriptors"] == 30 * PER_IMAGE
    assert set(neighbors["parameters"]) >= {"nlist", "subquantizers", "nprobe"}
    assert (path / "neighbors.faiss").is_file() and (path / "asmk" / "entry_bits.npy").is_file()

    def never(*args, **kwargs):
        raise AssertionError("a structure was rebuilt at search time")

    monkeypatch.setattr(IvfPqNeighbors, "train", never)
    monkeypatch.setattr(AsmkIndex, "build", never)
    monkeypatch.setattr(asmk_module, "train_codebook", never)
    monkeypatch.setattr(asmk_module, "word_index", never)
    flags_seen = []
    read_index = faiss.read_index

    def recording_read(name, flags=0):
        flags_seen.append(flags)
        return read_index(name, flags)

    monkeypatch.setattr(faiss, "read_index", recording_read)
    loaded = Index.load(path)
    query = data.query_of(store.load("img11"))
    for ranking in ("votes", "asmk", "global"):
        results = Searcher(loaded, RetrievalConfig(ranking=ranking, top_k=3)).search(query)
        assert results[0].key == "img11" and results[0].inliers >= 40, ranking
    mmap = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    assert flags_seen[0] == mmap  # the IVF-PQ structure (the ASMK word graph is tiny)
    assert loaded.neighbors().read_only and isinstance(loaded.descriptors, np.memmap)
    assert isinstance(loaded.asmk().entry_bits, np.memmap)


def test_search_time_backend_choices(planted):
    _, _, path = planted
    loaded = Index.load(path)
    votes = RetrievalConfig(ranking="votes")
    assert Searcher(loaded, votes.replace(backend="flat")).neighbors.name == "flat"
    assert Searcher(loaded, votes.replace(backend="kdtree")).neighbors.name == "kdtree"
    assert Searcher(loaded, votes).neighbors.name == "ivfpq"
    with pytest.raises(IndexFormatError, match="no saved ivfpq-hnsw structure"):
        Searcher(loaded, votes.replace(backend="ivfpq-hnsw"))
    searcher = Searcher(loaded, votes.replace(nprobe=3))
    assert searcher.neighbors._index.nprobe == 3


def test_append_extends_trained_structures_without_retraining(planted, tmp_path, monkeypatch):
    data, _, path = planted
    more = make_store(tmp_path / "more", [f"new{i}" for i in range(6)], data)
    index, added = Index.load(path).add_store(more, progress=False)
    assert added == 6
    with pytest.raises(ValueError, match="build_structures"):
        index.save(path)  # stale structures are never written

    def never(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(IvfPqNeighbors, "train", never)
    monkeypatch.setattr(asmk_module, "train_codebook", never)
    report = index.build_structures(progress=False)
    assert report["neighbors"]["action"] == "extended"
    assert report["asmk"]["action"] == "extended"
    assert any("no retraining" in note for note in report["notes"])
    index.save(path)
    loaded = Index.load(path)
    assert len(loaded.neighbors()) == 36 * PER_IMAGE and loaded.asmk().num_images == 36
    assert loaded.global_descriptors.shape == (36, GLOBAL_DIM)
    query = data.query_of(more.load("new3"))
    for ranking in ("votes", "asmk", "global"):
        results = Searcher(loaded, RetrievalConfig(ranking=ranking, top_k=2)).search(query)
        assert results[0].key == "new3", ranking
    # The extended ASMK equals one built at once over all images with the same codebook.
    old = Index.load(path).asmk()
    fresh = AsmkIndex(
        old.centroids,
        old.words,
        np.zeros(old.codebook_size + 1, np.int64),
        np.zeros(0, np.int32),
        np.zeros((0, 2), np.uint8),
        np.zeros(0, np.int32),
        old.parameters,
    ).extended(loaded.descriptors, np.asarray(loaded.offsets))
    for name in asmk_module.FILES:
        np.testing.assert_array_equal(getattr(fresh, name), getattr(old, name))


def test_append_retrains_when_the_index_outgrows_the_structure(planted, tmp_path, monkeypatch):
    data, _, path = planted
    monkeypatch.setattr(votes_module, "RETRAIN_GROWTH", 1.1)
    more = make_store(tmp_path / "more", [f"new{i}" for i in range(6)], data)
    index, _ = Index.load(path).add_store(more, progress=False)
    report = index.build_structures(progress=False)
    assert report["neighbors"]["action"] == "retrained"
    assert any("retraining the ivfpq structure" in note for note in report["notes"])
    assert report["neighbors"]["trained_on_descriptors"] == 36 * PER_IMAGE


def test_delf_index_command_prints_recall_and_appends(tmp_path, capsys):
    data = Synthetic(2)
    first = make_store(tmp_path / "s1", [f"a{i}" for i in range(10)], data, with_global=False)
    second = make_store(tmp_path / "s2", [f"b{i}" for i in range(3)], data, with_global=False)
    output = tmp_path / "index"
    command = ["delf", "index", f"--features={first.root}", f"--output_dir={output}"]
    assert main([*command, "--backend=ivfpq", "--index_type=votes,asmk"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    recall = summary["structures"]["neighbors"]["recall"]
    assert 0.0 < recall["recall_at_k"] <= 1.0 and recall["k"] == 10
    assert "sampled recall@10 against exact search" in captured.err
    assert summary["structures"]["asmk"]["action"] == "built"
    append = ["delf", "index", f"--features={second.root}", f"--output_dir={output}", "--append"]
    assert main(append) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["images"] == 13 and summary["added"] == 3
    assert summary["structures"]["neighbors"]["action"] == "extended"
    assert summary["structures"]["asmk"]["action"] == "extended"
    assert "no retraining" in captured.err
    header = json.loads((output / "index.json").read_text())
    assert header["structures"]["neighbors"]["num_descriptors"] == 13 * PER_IMAGE
    # Appending the same store again changes nothing: the structures are kept (copied).
    assert main(append) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["added"] == 0 and summary["structures"]["neighbors"]["action"] == "kept"
    assert summary["structures"]["asmk"]["action"] == "kept"
    loaded = Index.load(output)
    assert len(loaded.neighbors()) == 13 * PER_IMAGE and loaded.asmk().num_images == 13


# --- ASMK* --------------------------------------------------------------------------------


def reference_asmk(centroids, images, query, alpha, threshold, assignments):
    """The selective match kernel written out with loops over images and words (float64)."""
    centroids = centroids.astype(np.float64)
    dim = centroids.shape[1]

    def nearest(x, k):
        distances = ((x[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
        return np.argsort(distances, axis=1)[:, :k]

    def binary_words(x, k):
        sums = {}
        for row, words in zip(x, nearest(x, k), strict=True):
            for word in words:
                sums[int(word)] = sums.get(int(word), 0.0) + (row - centroids[word])
        return {word: np.where(total > 0, 1.0, -1.0) for word, total in sums.items()}

    def sigma(u):
        return math.copysign(abs(u) ** alpha, u) if u > threshold else 0.0

    q = binary_words(query, assignments)
    scores = []
    for x in images:
        b = binary_words(x, 1)
        total = sum(sigma(float(q[w] @ b[w]) / dim) for w in q if w in b)
        scores.append(total / math.sqrt(len(q) * len(b)))
    return np.array(scores)


@pytest.mark.parametrize(("alpha", "threshold"), [(3.0, 0.0), (1.0, -0.25)])
def test_asmk_scores_equal_a_brute_force_selective_kernel(alpha, threshold):
    data = Synthetic(3, words=12)
    images = [data.features(int(n), with_global=False).descriptors for n in (40, 55, 70, 33)]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in images])]).astype(np.int64)
    structure = AsmkIndex.build(np.concatenate(images), offsets, codebook_size=16)
    assert structure.codebook_size == 16 and structure.num_images == 4
    query = data.query_of(LocalFeatures(np.zeros((55, 2)), np.ones(55), np.ones(55), images[1]))
    scores = structure.scores(query.descriptors, alpha, threshold, assignments=3)
    expected = reference_asmk(
        np.asarray(structure.centroids), images, query.descriptors, alpha, threshold, 3
    )
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert int(np.argmax(scores)) == 1


def test_two_level_codebook_has_the_asked_size(monkeypatch):
    monkeypatch.setattr(asmk_module, "TWO_LEVEL_WORDS", 16)
    data = Synthetic(8)
    descriptors = np.concatenate([data.features(100, False).descriptors for _ in range(10)])
    offsets = np.arange(11, dtype=np.int64) * 100
    structure = AsmkIndex.build(descriptors, offsets, codebook_size=64)
    assert (
        structure.centroids.shape == (64, DIM) and len(np.unique(structure.centroids, axis=0)) == 64
    )
    assert structure.num_images == 10 and structure.image_words.min() > 0


def test_asmk_retrieves_planted_images_and_stays_compact(planted):
    data, store, path = planted
    loaded = Index.load(path)
    structure = loaded.asmk()
    assert structure.codebook_size == 128 and default_codebook_size(30 * PER_IMAGE) == 32
    # bits (2 bytes at 16-D) + image id (4 bytes) per word of an image, plus the codebook.
    assert structure.memory_bytes() / 30 < 6 * PER_IMAGE + 200
    searcher = Searcher(loaded, RetrievalConfig(ranking="asmk", top_k=3))
    for name in ("img03", "img17", "img29"):
        query = data.query_of(store.load(name))
        ids, scores = searcher.initial_ranking(query)
        assert loaded.images[ids[0]].key == name
        ranking = searcher.ranking(query)
        assert loaded.images[ranking[0][0]].key == name and ranking[0][1] > 40
        assert [s for _, s in ranking] == sorted((s for _, s in ranking), reverse=True)
    assert Searcher(loaded, RetrievalConfig()).method == "global"  # auto: global first
    without_global = Index.load(path)
    without_global.global_descriptors = None
    assert Searcher(without_global, RetrievalConfig()).method == "asmk"


# --- global descriptors ---------------------------------------------------------------------


def test_global_ranking_is_reranked_by_local_verification(tmp_path):
    data = Synthetic(4)
    store = make_store(tmp_path / "s", [f"g{i:02d}" for i in range(20)], data)
    source = store.load("g05")
    # A distractor whose global descriptor equals the source's but shares no local features.
    decoy = data.features()
    decoy = LocalFeatures(
        decoy.keypoints, decoy.scales, decoy.scores, decoy.descriptors, source.global_descriptor
    )
    store.save("g99_decoy", decoy)
    index = Index.from_store(store, progress=False)
    index.build_structures(progress=False)
    index.save(tmp_path / "index")
    loaded = Index.load(tmp_path / "index")
    searcher = Searcher(loaded, RetrievalConfig(ranking="global", top_k=3, shortlist=5))
    query = data.query_of(source, global_noise=0.0)
    ids, _ = searcher.initial_ranking(query)
    assert {loaded.images[i].key for i in ids[:2]} == {"g05", "g99_decoy"}
    results = searcher.search(query)
    assert results[0].key == "g05" and results[0].inliers > results[1].inliers
    ranking = searcher.ranking(query)
    assert len(ranking) == 21 and loaded.images[ranking[0][0]].key == "g05"
    # Beyond the shortlist the initial (global) order is kept, below every verified image.
    assert all(score < 1.0 for _, score in ranking[5:])
    without = LocalFeatures(query.keypoints, query.scales, query.scores, query.descriptors)
    with pytest.raises(ValueError, match="no global descriptor"):
        searcher.search(without)
    # The shortlist's k-NN matches equal a brute-force reading of the votes rule.
    candidates = [5, 20, 3, 11]
    union = np.concatenate([loaded.image_descriptors(i) for i in candidates])
    owner = np.repeat(np.arange(4), PER_IMAGE)
    distances = np.linalg.norm(query.descriptors[:, None] - union[None], axis=2)
    for position, matches in enumerate(searcher.shortlist_matches(query, candidates)):
        expected = {}
        for row, d in enumerate(distances):
            for column in np.argsort(d, kind="stable")[:10]:
                if d[column] <= 0.8 and owner[column] == position and row not in expected:
                    expected[row] = column - position * PER_IMAGE
        assert matches.query_indices.tolist() == sorted(expected)
        assert matches.database_indices.tolist() == [expected[r] for r in sorted(expected)]
    # Batched nearest-descriptor matching equals a per-image brute-force nearest neighbour.
    many = searcher.match_images(query, range(21))
    for image_id, matches in enumerate(many):
        database = loaded.image_descriptors(image_id)
        distances = np.linalg.norm(query.descriptors[:, None] - database[None], axis=2)
        within = np.flatnonzero(distances.min(axis=1) <= 0.8)
        np.testing.assert_array_equal(matches.query_indices, within)
        np.testing.assert_array_equal(matches.database_indices, distances[within].argmin(axis=1))


def test_global_ivf_structure_round_trip(tmp_path):
    data = Synthetic(5)
    store = make_store(tmp_path / "s", [f"g{i:02d}" for i in range(60)], data)
    index = Index.from_store(store, progress=False)
    report = index.build_structures(progress=False, global_ivf_min_images=50)
    assert report["global"]["kind"] == "ivf"
    index.save(tmp_path / "index")
    ranker = Index.load(tmp_path / "index").global_ranker()
    assert ranker.kind == "ivf" and ranker.read_only
    exact = GlobalRanker(np.asarray(index.global_descriptors))
    query = store.load("g33").global_descriptor
    assert ranker.rank(query)[0][0] == exact.rank(query)[0][0] == 33


def test_index_without_global_descriptors_and_append_errors(tmp_path):
    data = Synthetic(6)
    plain = make_store(tmp_path / "plain", ["p0", "p1"], data, with_global=False)
    index = Index.from_store(plain, progress=False)
    index.build_structures(progress=False)
    index.save(tmp_path / "plain_index")
    loaded = Index.load(tmp_path / "plain_index")
    assert loaded.global_descriptors is None and loaded.global_ranker() is None
    with pytest.raises(IndexFormatError, match="no global descriptors"):
        Searcher(loaded, RetrievalConfig(ranking="global"))
    with pytest.raises(IndexFormatError, match="no ASMK structure"):
        Searcher(loaded, RetrievalConfig(ranking="asmk"))
    # An index with global descriptors refuses a store without them, in one line.
    with_global = make_store(tmp_path / "g", ["g0", "g1"], data)
    index = Index.from_store(with_global, progress=False)
    with pytest.raises(IndexFormatError, match="no global descriptor") as error:
        index.add_store(plain, progress=False)
    assert "\n" not in str(error.value) and "p0" in str(error.value)


def test_old_index_without_structures_still_searches(tmp_path):
    data = Synthetic(7)
    store = make_store(tmp_path / "s", [f"o{i}" for i in range(5)], data, with_global=False)
    Index.from_store(store, progress=False).save(tmp_path / "index")  # no build_structures
    header = json.loads((tmp_path / "index" / "index.json").read_text())
    assert header["structures"] == {}
    loaded = Index.load(tmp_path / "index")
    searcher = Searcher(loaded, RetrievalConfig(top_k=1))
    assert searcher.neighbors.name == "flat"
    assert searcher.search(data.query_of(store.load("o2")))[0].key == "o2"


# --- batch queries --------------------------------------------------------------------------


class PlantedExtractor:
    """Test extractor: an image whose pixel [0, 0, 0] is i stands for a view of database image i."""

    fingerprint = "a" * 64

    def __init__(self, data, store, names):
        self.data, self.store, self.names = data, store, names

    def extract(self, image):
        return self.data.query_of(self.store.load(self.names[int(image[0, 0, 0])]))


def test_batch_queries_stream_jsonl_and_resume(planted, tmp_path):
    from PIL import Image

    data, store, path = planted
    names = sorted(store.stored_keys())
    folder = tmp_path / "queries"
    folder.mkdir()
    for i in (4, 9, 21):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(folder / f"q{i:02d}.png")
    (folder / "q99_broken.jpg").write_bytes(b"not an image")
    queries = read_queries(folder)
    assert [q.rsplit("/", 1)[1] for q in queries] == [
        "q04.png",
        "q09.png",
        "q21.png",
        "q99_broken.jpg",
    ]
    runner = QueryRunner(PlantedExtractor(data, store, names), Searcher(Index.load(path)))
    output = tmp_path / "results.jsonl"
    summary = search_to_jsonl(runner, queries[:2], output, progress=False)
    assert (summary.answered, summary.skipped, summary.failed) == (2, 0, 0)
    # A torn last line (a crash mid-write) is dropped, the finished queries are kept.
    with open(output, "a") as handle:
        handle.write('{"query": "half')
    summary = search_to_jsonl(runner, queries, output, progress=False)
    assert (summary.answered, summary.skipped, summary.failed, summary.failed_before) == (
        2,
        2,
        1,
        0,
    )
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["query"] for line in lines] == queries
    for line, name in zip(lines[:3], ("img04", "img09", "img21"), strict=True):
        assert line["ranking"] == "global" and line["results"][0]["key"] == name
        best = line["results"][0]
        assert best["inliers"] >= 40 and best["votes"] >= best["inliers"] and "score" in best
    assert "q99_broken.jpg" in lines[3]["error"] and "\n" not in lines[3]["error"]
    # A list file of paths works as well.
    (tmp_path / "list.txt").write_text("# queries\nqueries/q09.png\n\n")
    assert read_queries(tmp_path / "list.txt") == [str(tmp_path / "queries" / "q09.png")]


def test_evaluation_ranks_through_the_batch_path(planted, monkeypatch):
    from delf_tf.evaluation.engine import engine_rank_fn
    from delf_tf.retrieval import batch

    data, store, path = planted
    names = sorted(store.stored_keys())
    calls = []
    run = batch.QueryRunner.run

    def counting(self, image, full_ranking=False, shortlist=None):
        calls.append((full_ranking, shortlist))
        return run(self, image, full_ranking, shortlist)

    monkeypatch.setattr(batch.QueryRunner, "run", counting)
    searcher = Searcher(Index.load(path), RetrievalConfig(ranking="asmk"))
    rank = engine_rank_fn(PlantedExtractor(data, store, names), searcher, shortlist=7)
    ranking = rank(np.full((4, 4, 3), 12, np.uint8), "q")
    assert ranking[0][0] == "img12" and calls == [(True, 7)]
