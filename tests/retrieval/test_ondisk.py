"""The on-disk IVF-PQ structure (`delf_tf.matching.ondisk`, `delf index
--backend=ivfpq-ondisk`) and the streamed arrays of `Index.add_store`."""

import shutil

import faiss
import numpy as np
import pytest

from delf_tf.config import RetrievalConfig
from delf_tf.features import FeatureStore, LocalFeatures
from delf_tf.matching import ondisk
from delf_tf.matching.neighbors import IvfPqNeighbors
from delf_tf.matching.ondisk import OnDiskIvfPqNeighbors, build_ondisk, ondisk_parameters
from delf_tf.retrieval import Index, Searcher
from delf_tf.retrieval.row_files import RowWriter

DIM = 16


def unit_rows(rng, count, dim=DIM):
    rows = rng.normal(size=(count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def stored_ids(structure) -> np.ndarray:
    lists = faiss.extract_index_ivf(structure._index).invlists
    return np.concatenate(
        [
            faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number)).copy()
            for number in range(lists.nlist)
        ]
    )


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP k-means on 2 busy cores: ~12 s per training with 2 threads, ~1 s
    with one (measured here)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def rows():
    return unit_rows(np.random.default_rng(0), 3000)


@pytest.fixture(scope="module")
def built(rows, tmp_path_factory):
    """The structure over `rows` built in shards of 1000 rows, and its folder."""
    folder = tmp_path_factory.mktemp("ondisk")
    parameters = ondisk_parameters(len(rows), DIM)
    structure, _ = build_ondisk(rows, parameters, folder, shard_rows=1000)
    return structure, parameters, folder


def test_ondisk_answers_as_the_in_memory_ivfpq_of_the_same_parameters(rows, built):
    structure, parameters, folder = built
    assert structure.name == "ivfpq-ondisk" and len(structure) == len(rows)
    assert sorted(p.name for p in folder.iterdir()) == [
        "merged.faiss",
        "merged.ivfdata",
        "timings.json",
        "trained.faiss",
    ]  # the shards are merged and gone
    queries = unit_rows(np.random.default_rng(1), 50) * 0.2 + rows[:50]
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    found = structure.search(queries, 10, 0.8)
    # The same training with the lists in memory: identical answers.
    in_memory = faiss.read_index(str(folder / "trained.faiss"))
    in_memory.add(rows)
    same = IvfPqNeighbors(in_memory, rows, parameters).search(queries, 10, 0.8)
    np.testing.assert_array_equal(found[1], same[1])
    np.testing.assert_allclose(found[0], same[0])
    # Trained in memory from scratch with the same parameters: the same top results.
    trained = IvfPqNeighbors.train(rows, parameters).search(queries, 10, 0.8)
    assert np.mean(found[1][:, 0] == trained[1][:, 0]) >= 0.95
    assert np.array_equal(found[1][:, 0], np.arange(50))  # each query finds its row


def test_build_killed_after_a_shard_resumes_without_duplicates(rows, built, tmp_path, monkeypatch):
    _, parameters, folder = built
    shutil.copyfile(folder / "trained.faiss", tmp_path / "trained.faiss")  # (no training here)
    written = []
    publish = ondisk.atomic_write

    def killed_at_third_shard(target, write):
        if target.name == "shard_00002.faiss":
            raise KeyboardInterrupt("killed")
        written.append(target.name)
        publish(target, write)

    monkeypatch.setattr(ondisk, "atomic_write", killed_at_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build_ondisk(rows, parameters, tmp_path, shard_rows=600)
    assert written == ["shard_00000.faiss", "shard_00001.faiss"]
    monkeypatch.setattr(ondisk, "atomic_write", publish)
    trained = (tmp_path / "trained.faiss").stat().st_mtime_ns
    structure, timings = build_ondisk(rows, parameters, tmp_path, shard_rows=600)
    assert (tmp_path / "trained.faiss").stat().st_mtime_ns == trained  # not trained again
    assert set(timings) == {*(f"shard_{n:05d}" for n in range(5)), "merged"}
    ids = stored_ids(structure)
    assert len(ids) == len(rows) and np.array_equal(np.sort(ids), np.arange(len(rows)))


def test_a_merged_file_without_its_lists_is_built_again(rows, built, tmp_path):
    """A kill while the build folder was being removed left the .faiss without its
    .ivfdata: the rerun builds the lists again instead of failing."""
    _, parameters, folder = built
    for name in ("trained.faiss", "merged.faiss"):
        shutil.copyfile(folder / name, tmp_path / name)
    structure, _ = build_ondisk(rows, parameters, tmp_path, shard_rows=1500)
    assert np.array_equal(np.sort(stored_ids(structure)), np.arange(len(rows)))


def test_extending_merges_the_new_rows_without_retraining(rows, built, tmp_path):
    structure, parameters, folder = built
    more = np.concatenate([rows, unit_rows(np.random.default_rng(2), 700)])
    extended, timings = build_ondisk(
        more, parameters, tmp_path, shard_rows=500, base=folder / "merged.faiss"
    )
    ids = stored_ids(extended)
    assert np.array_equal(np.sort(ids), np.arange(len(more)))
    assert set(timings) == {"trained", "shard_00000", "shard_00001", "merged"}
    new_rows = np.arange(3000, 3005)
    assert np.array_equal(extended.search(more[new_rows], 1, 0.8)[1][:, 0], new_rows)


def make_store(path, names, seed, count=100):
    rng = np.random.default_rng(seed)
    store = FeatureStore.open_or_create(path, "a" * 64, {"descriptor_dim": DIM, "model": "test"})
    for name in names:
        store.save(
            name,
            LocalFeatures(
                rng.uniform(0, 320, (count, 2)),
                np.ones(count),
                np.ones(count),
                unit_rows(rng, count),
            ),
        )
    return store


def test_index_with_the_ondisk_backend_builds_appends_and_searches(tmp_path):
    first = make_store(tmp_path / "s1", [f"a{n}.jpg" for n in range(8)], seed=0)
    second = make_store(tmp_path / "s2", ["b0.jpg", "b1.jpg"], seed=1)
    path, work = tmp_path / "index", tmp_path / "index.build"
    index = Index.from_store(first, progress=False, beside=path)
    report = index.build_structures(
        backend="ivfpq-ondisk", recall=False, progress=False, work_dir=work, shard_rows=300
    )
    assert report["neighbors"]["action"] == "built"
    index.save(path)
    assert not work.exists()  # the build folder goes once its files are in the index
    assert {"neighbors.faiss", "neighbors.ivfdata"} <= {p.name for p in path.iterdir()}
    appended, added = Index.load(path).add_store(second, progress=False)
    report = appended.build_structures(recall=False, progress=False, work_dir=work)
    assert added == 2 and report["neighbors"]["action"] == "extended"
    appended.save(path)
    loaded = Index.load(path)
    structure = loaded.neighbors()
    assert isinstance(structure, OnDiskIvfPqNeighbors) and len(structure) == 1000
    assert np.array_equal(np.sort(stored_ids(structure)), np.arange(1000))
    searcher = Searcher(loaded, RetrievalConfig(ranking="votes", backend="ivfpq-ondisk"))
    for key in ("a3.jpg", "b1.jpg"):
        query = (first if key.startswith("a") else second).load(key)
        ranking = searcher.initial(query)
        assert loaded.images[int(ranking.ids[0])].key == key
    again, added = loaded.add_store(second, progress=False)
    assert added == 0
    assert again.build_structures(recall=False)["neighbors"]["action"] == "kept"
    again.save(path)  # the kept lists are linked into the next generation
    assert len(Index.load(path).neighbors()) == 1000


class StoreExtractor:
    """A query extractor that answers with the features of one stored image."""

    fingerprint = "a" * 64

    def __init__(self, features):
        self.features = features

    def extract(self, image):
        return self.features


def test_search_service_serves_the_ondisk_lists_across_a_reload(tmp_path):
    import io

    from PIL import Image

    from delf_tf.serving.search_service import SearchService

    first = make_store(tmp_path / "s1", [f"a{n}.jpg" for n in range(4)], seed=0)
    second = make_store(tmp_path / "s2", ["b0.jpg"], seed=1)
    path = tmp_path / "index"
    index = Index.from_store(first, progress=False, beside=path)
    index.build_structures(backend="ivfpq-ondisk", recall=False, work_dir=tmp_path / "w")
    index.save(path)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    extractor = StoreExtractor(second.load("b0.jpg"))
    config = RetrievalConfig(ranking="votes")
    service = SearchService(path, extractor, config, poll_seconds=0)
    [answer] = service.search_batch([png.getvalue()], top_k=1)
    assert not answer.results or answer.results[0].key != "b0.jpg"
    old = service.snapshot
    appended, _ = Index.load(path).add_store(second, progress=False)
    appended.build_structures(recall=False, work_dir=tmp_path / "w")
    appended.save(path)  # the served generation's files are gone from the directory now
    extractor.features = first.load("a2.jpg")
    [answer] = service.search_batch([png.getvalue()], top_k=1)
    assert answer.snapshot is old and answer.results[0].key == "a2.jpg"  # still mapped
    assert service.reload() == "loaded"
    extractor.features = second.load("b0.jpg")
    [answer] = service.search_batch([png.getvalue()], top_k=1)
    assert answer.snapshot.index.num_images == 5 and answer.results[0].key == "b0.jpg"


@pytest.mark.heavy
def test_streamed_build_keeps_anonymous_memory_below_a_chunk(tmp_path):
    """`Index.from_store` + `save` and `add_store` + `save` in a fresh process: the peak
    of RssAnon (sampled) grows by far less than the collection's descriptors (before
    the streaming build it grew by about twice their size)."""
    import json
    import subprocess
    import sys

    images, per = 400, 1000
    make_store(tmp_path / "s1", [f"a{n}.jpg" for n in range(images // 2)], seed=0, count=per)
    make_store(tmp_path / "s2", [f"b{n}.jpg" for n in range(images // 2)], seed=1, count=per)
    code = """
import json, sys, threading, time
def anon():
    with open("/proc/self/status") as handle:
        return next(int(l.split()[1]) * 1024 for l in handle if l.startswith("RssAnon"))
from delf_tf.features import FeatureStore
from delf_tf.retrieval import Index
start, peak, done = anon(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
first, second, path = sys.argv[1:4]
Index.from_store(FeatureStore.open(first), progress=False).save(path)
index, _ = Index.load(path).add_store(FeatureStore.open(second), progress=False)
index.save(path)
done.set()
print(json.dumps({"growth": peak[0] - start, "descriptors": index.num_descriptors}))
"""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(tmp_path / "s1"),
            str(tmp_path / "s2"),
            str(tmp_path / "i"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["descriptors"] == images * per
    collection = images * per * DIM * 4  # 25.6 MB of float32 descriptors
    assert measured["growth"] < collection / 4, measured


def test_row_writer_streams_rows_into_a_npy_file(tmp_path):
    writer = RowWriter(tmp_path / "rows.npy", np.float32, (3,))
    parts = [np.arange(6, dtype=np.float64).reshape(2, 3), np.ones((0, 3)), np.full((1, 3), 7.0)]
    writer.extend(parts[0], chunk_rows=1)
    writer.append(parts[1])
    writer.append(parts[2])
    mapped = writer.close()
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float32
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy"), np.concatenate(parts))
    with pytest.raises(ValueError, match="rows"):
        RowWriter(tmp_path / "other.npy", np.int32, ()).append(np.zeros((2, 2)))
