"""The Milvus back end on Milvus Lite: FAISS-equal rankings, generations, fingerprints,
shortlist features read through tf.io.gfile (ram://), and `delf index --backend=milvus`.

One Milvus Lite file per module (its start-up costs ~2 s): every index here puts its
collections there under its own prefix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from delf_tf.config import RetrievalConfig  # noqa: E402
from delf_tf.features import FeatureStore, LocalFeatures  # noqa: E402
from delf_tf.retrieval import Index  # noqa: E402
from delf_tf.retrieval.search import Searcher, StoreRows  # noqa: E402
from delf_tf.retrieval.structures import milvus  # noqa: E402
from delf_tf.retrieval.structures.base import (  # noqa: E402
    IndexChangedError,
    IndexFormatError,
)

DIM, GLOBAL_DIM, PER_IMAGE = 16, 8, 40


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("milvus") / "lite.db")
    yield path
    milvus.release(path)


def write_store(root, keys, seed, fingerprint="f" * 64):
    """Random unit descriptors and global descriptors; keypoints on a 100 px grid."""
    rng = np.random.default_rng(seed)
    store = FeatureStore.open_or_create(root, fingerprint, {"descriptor_dim": DIM, "model": "t"})
    for key in keys:
        descriptors = rng.normal(size=(PER_IMAGE, DIM)).astype(np.float32)
        descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
        global_descriptor = rng.normal(size=GLOBAL_DIM).astype(np.float32)
        store.save(
            key,
            LocalFeatures(
                rng.uniform(0, 100, (PER_IMAGE, 2)).astype(np.float32),
                np.ones(PER_IMAGE, np.float32),
                np.ones(PER_IMAGE, np.float32),
                descriptors,
                global_descriptor / np.linalg.norm(global_descriptor),
            ),
        )
    return store


def queries_of(store, keys, seed=7):
    """Each database image, its descriptors and global descriptor perturbed."""
    rng = np.random.default_rng(seed)
    out = []
    for key in keys:
        features = store.load(key)
        descriptors = features.descriptors + rng.normal(0, 0.15, features.descriptors.shape)
        descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
        global_descriptor = features.global_descriptor + rng.normal(0, 0.05, GLOBAL_DIM)
        out.append(
            dataclasses.replace(
                features,
                descriptors=descriptors.astype(np.float32),
                global_descriptor=(global_descriptor / np.linalg.norm(global_descriptor)).astype(
                    np.float32
                ),
            )
        )
    return out


@pytest.fixture(scope="module")
def collection(tmp_path_factory, uri):
    """(store, keys, FAISS index, Milvus index) over the same 24 images."""
    root = tmp_path_factory.mktemp("collection")
    keys = [f"img{i:02d}.jpg" for i in range(24)]
    store = write_store(root / "store", keys, seed=0)
    faiss_index = Index.from_store(store, progress=False)
    faiss_index.build_structures(backend="flat", recall=False, progress=False)
    milvus_index = Index.from_store(store, progress=False)
    report = milvus_index.build_structures(
        backend="milvus",
        milvus_uri=uri,
        stores={store.identity: str(store.root)},
        recall=False,
        progress=False,
    )
    assert report["neighbors"]["backend"] == report["global"]["backend"] == "milvus"
    milvus_index.save(root / "index")
    return store, keys, faiss_index, Index.load(root / "index")


@pytest.mark.parametrize("ranking", ["votes", "global"])
def test_milvus_ranks_as_faiss_exact(collection, ranking):
    """Synthetic equivalence: the same top-1 (and the same votes / scores) for every query."""
    store, keys, faiss_index, milvus_index = collection
    config = RetrievalConfig(ranking=ranking)
    exact, served = Searcher(faiss_index, config), Searcher(milvus_index, config)
    assert type(served.structure.value).__name__.startswith("Milvus")
    assert type(exact.structure.value).__name__ in ("FlatNeighbors", "GlobalRanker")
    for number, query in enumerate(queries_of(store, keys)):
        want, got = exact.initial(query), served.initial(query)
        assert got.ids[0] == want.ids[0] == number
        if ranking == "votes":
            np.testing.assert_array_equal(got.voted[0], want.voted[0])
        else:
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
        found = served.search(query)
        assert found[0].image_id == number
        assert [r.inliers for r in found] == [r.inliers for r in exact.search(query)]


def test_shortlist_features_come_from_the_store_through_gfile(collection, tmp_path):
    """A Milvus searcher reads the shortlist's features from the store's location, here
    TensorFlow's ram:// file system (a plain open() cannot read it); results as FAISS."""
    import tensorflow as tf

    store, keys, faiss_index, milvus_index = collection
    ram = f"ram://store-{tmp_path.name}"
    for path in store.root.rglob("*"):
        if path.is_file():
            target = f"{ram}/{path.relative_to(store.root).as_posix()}"
            tf.io.gfile.makedirs(target.rsplit("/", 1)[0])
            with tf.io.gfile.GFile(target, "wb") as handle:
                handle.write(path.read_bytes())
    with pytest.raises(OSError):
        open(f"{ram}/manifest.json", "rb")  # noqa: SIM115
    config = RetrievalConfig(ranking="global")
    served = Searcher(milvus_index, config, stores={store.identity: ram})
    source = served.rows()
    assert isinstance(source, StoreRows) and source.reader.location(store.identity) == ram
    source.prefetch(range(len(keys)))
    np.testing.assert_array_equal(source.keypoints(3), faiss_index.image_keypoints(3))
    query = queries_of(store, keys)[5]
    got, want = served.search(query), Searcher(faiss_index, config).search(query)
    assert [(r.image_id, r.inliers) for r in got] == [(r.image_id, r.inliers) for r in want]
    # The FAISS back end reads its own arrays, never the store.
    assert not isinstance(Searcher(faiss_index, config).rows(), StoreRows)
    # A store that changed since `delf index` is refused, naming the image.
    tf.io.gfile.remove(f"{ram}/img05.jpg.npz")
    with pytest.raises(Exception, match="img05.jpg"):
        served.search(query)


def test_generations_append_and_refusals(tmp_path, uri, monkeypatch):
    """An append adds a partition of the new rows to the same collection (no copy); a
    reader of the previous generation keeps its rows; a killed writer's partition and
    collection are dropped after the next swap; past MAX_PARTITIONS the rows move to a
    new collection and old readers must load again; another model's collection is
    refused."""
    store = write_store(tmp_path / "store1", ["a.jpg", "b.jpg"], seed=1)
    more = write_store(tmp_path / "store2", ["c.jpg"], seed=2)
    index = Index.from_store(store, progress=False)
    index.build_structures(backend="milvus", milvus_uri=uri, milvus_prefix="delf_gen", recall=False)
    index.save(tmp_path / "index")
    first = {h["collection"] for h in index.structures.values()}
    client = milvus.client(milvus.location(uri))

    def ours():
        return {name for name in client.list_collections() if name.startswith("delf_gen_")}

    assert ours() == first
    reader = Searcher(Index.load(tmp_path / "index"), RetrievalConfig(ranking="votes"))
    query = more.load("c.jpg")
    before = reader.initial(query)
    grown, added = Index.load(tmp_path / "index").add_store(more, progress=False)
    assert added == 1
    report = grown.build_structures(recall=False)  # backend kept: milvus
    assert report["neighbors"]["action"] == "extended"
    local = grown.structures["neighbors"]
    assert local["collection"] in first and len(local["partitions"]) == 2
    assert client.get_partition_stats(local["collection"], local["partitions"][1]) == {
        "row_count": PER_IMAGE
    }
    orphan = "delf_gen_local_deadbeef"  # what a killed writer leaves: a collection ...
    client.create_collection(orphan, dimension=DIM)
    client.create_partition(local["collection"], "p_killed")  # ... and a partition
    # Not yet published: the reader of the previous generation sees only its rows.
    assert reader.initial(query).ids.tolist() == before.ids.tolist()
    grown.save(tmp_path / "index")
    assert ours() == first
    assert set(client.list_partitions(local["collection"])) == set(local["partitions"])
    loaded = Index.load(tmp_path / "index")
    assert len(loaded.neighbors()) == 3 * PER_IMAGE
    assert Searcher(loaded, RetrievalConfig(ranking="votes")).initial(query).ids[0] == 2
    assert Searcher(loaded, RetrievalConfig(ranking="global")).initial(query).ids[0] == 2
    # After the swap too, the previous generation's reader answers from its two images.
    assert reader.initial(query).ids.tolist() == before.ids.tolist()
    # Past MAX_PARTITIONS an append copies into a new collection of one partition.
    monkeypatch.setattr(milvus, "MAX_PARTITIONS", 2)
    reader = Searcher(loaded, RetrievalConfig(ranking="votes"))
    third = write_store(tmp_path / "store4", ["e.jpg"], seed=4)
    grown, added = Index.load(tmp_path / "index").add_store(third, progress=False)
    grown.build_structures(recall=False)
    grown.save(tmp_path / "index")
    second = {h["collection"] for h in grown.structures.values()}
    assert ours() == second and not second & first
    assert all(h["partitions"] == ["_default"] for h in grown.structures.values())
    assert len(Index.load(tmp_path / "index").neighbors()) == 4 * PER_IMAGE
    # A reader of the previous generation: its collection is gone, it must load again.
    with pytest.raises(IndexChangedError, match="load it again"):
        reader.initial(store.load("a.jpg"))
    # Another extractor's collection named by this index: refused before any search.
    other = write_store(tmp_path / "store3", ["d.jpg"], seed=3, fingerprint="e" * 64)
    foreign = Index.from_store(other, progress=False)
    foreign.build_structures(backend="milvus", milvus_uri=uri, milvus_prefix="delf_other")
    header = json.loads((tmp_path / "index" / "index.json").read_text())
    header["structures"]["global"]["collection"] = foreign.structures["global"]["collection"]
    (tmp_path / "index" / "index.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match="extractor eeeeeeeeeeee"):
        Index.load(tmp_path / "index").global_ranker()
    # Back to FAISS: the Milvus collections are dropped after the swap.
    back = Index.load(tmp_path / "index")
    back._structures.pop("global")
    back.build_structures(backend="flat", recall=False)
    back.save(tmp_path / "index")
    assert ours() == set()


def test_index_without_partitions_searches_the_collection_and_appends_by_copy(tmp_path, uri):
    """An index.json written before partitions (no "partitions"): its searches cover the
    whole collection, and its first append copies into new collections of one partition
    (a partition added there would reach readers that search every partition)."""
    store = write_store(tmp_path / "s1", ["a.jpg", "b.jpg"], seed=10)
    more = write_store(tmp_path / "s2", ["c.jpg"], seed=11)
    index = Index.from_store(store, progress=False)
    index.build_structures(backend="milvus", milvus_uri=uri, recall=False)
    index.save(tmp_path / "index")
    header = json.loads((tmp_path / "index" / "index.json").read_text())
    for structure in header["structures"].values():
        del structure["partitions"]
    (tmp_path / "index" / "index.json").write_text(json.dumps(header))
    old = Index.load(tmp_path / "index")
    assert old.neighbors().partitions is None
    query = store.load("b.jpg")
    assert Searcher(old, RetrievalConfig(ranking="global")).initial(query).ids[0] == 1
    grown, _ = Index.load(tmp_path / "index").add_store(more, progress=False)
    grown.build_structures(recall=False)
    for name, structure in grown.structures.items():
        assert structure["partitions"] == ["_default"], name
        assert structure["collection"] != header["structures"][name]["collection"]


def test_lite_file_is_one_process_at_a_time(tmp_path, uri):
    """Milvus Lite locks its file: while this process holds it (as a running `delf serve
    --index` does), `delf index --append` in another process is refused in one line naming
    the file, and the index is left as it was (docs/scale.md)."""
    from pathlib import Path

    store = write_store(tmp_path / "s1", ["a.jpg"], seed=8)
    write_store(tmp_path / "s2", ["b.jpg"], seed=9)
    index = Index.from_store(store, progress=False)
    index.build_structures(backend="milvus", milvus_uri=uri, recall=False)
    index.save(tmp_path / "index")
    before = (tmp_path / "index" / "index.json").read_bytes()
    found = subprocess.run(
        [sys.executable, "-m", "delf_tf.cli", "index", f"--features={tmp_path / 's2'}"]
        + [f"--output_dir={tmp_path / 'index'}", "--append"],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert found.returncode == 1, found.stderr
    assert "Traceback" not in found.stderr, found.stderr
    last = found.stderr.strip().splitlines()[-1]
    assert last.startswith(f"delf index: error: {milvus.location(uri)}: "), last
    assert "in use by another process" in last
    assert (tmp_path / "index" / "index.json").read_bytes() == before


def test_delf_index_and_search_with_milvus(tmp_path, uri, capsys):
    """`delf index --backend=milvus --milvus_uri`, `--append` keeps it, `delf search` uses it."""
    from delf_tf.cli import main

    write_store(tmp_path / "s1", ["a.jpg", "b.jpg"], seed=4)
    write_store(tmp_path / "s2", ["c.jpg"], seed=5)
    index = tmp_path / "index"
    base = ["delf", "index", f"--output_dir={index}"]
    assert main([*base, f"--features={tmp_path / 's1'}", "--backend=milvus"]) == 1
    assert "--milvus_uri" in capsys.readouterr().err
    args = [f"--features={tmp_path / 's1'}", "--backend=milvus", f"--milvus_uri={uri}"]
    assert main([*base, *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["structures"]["neighbors"]["backend"] == "milvus"
    assert summary["structures"]["global"]["uri"] == milvus.location(uri)
    assert main([*base, f"--features={tmp_path / 's2'}", "--append"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 3
    assert summary["structures"]["global"]["action"] == "extended"
    loaded = Index.load(index)
    assert set(loaded.structures["neighbors"]["stores"]) == {
        FeatureStore.open(tmp_path / name).identity for name in ("s1", "s2")
    }
    query = FeatureStore.open(tmp_path / "s2").load("c.jpg")
    for ranking in ("votes", "global"):
        [best, *_] = Searcher(loaded, RetrievalConfig(ranking=ranking)).search(query)
        assert best.key == "c.jpg"
