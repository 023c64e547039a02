"""The global index: build from a store, save/load (mmap), append, atomic save, search."""

import json
import logging

import numpy as np
import pytest

from delf_tf.config import RetrievalConfig
from delf_tf.features import FeatureStore, LocalFeatures
from delf_tf.matching.ransac import apply_transform
from delf_tf.retrieval import FingerprintMismatchError, Index, IndexFormatError, Searcher
from delf_tf.retrieval import index as index_module

DIM = 16
AFFINE = np.array([[0.7, -0.3, 30.0], [0.25, 0.75, 10.0], [0.0, 0.0, 1.0]])


def random_features(rng, count, dim=DIM):
    descriptors = rng.normal(size=(count, dim)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return LocalFeatures(
        rng.uniform([0, 0], [320, 240], (count, 2)),
        np.ones(count),
        rng.uniform(size=count),
        descriptors,
    )


def make_store(path, names, seed, fingerprint="a" * 64, count=60):
    rng = np.random.default_rng(seed)
    store = FeatureStore.open_or_create(path, fingerprint, {"descriptor_dim": DIM, "model": "test"})
    for name in names:
        store.save(name, random_features(rng, count))
    return store


def assert_same(first: Index, second: Index):
    for name in index_module.ARRAYS:
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert first.images == second.images and first.fingerprint == second.fingerprint


def test_build_save_load_round_trip(tmp_path):
    store = make_store(tmp_path / "store", ["a.jpg", "sub/b.jpg", "c.jpg"], seed=0)
    index = Index.from_store(store, progress=False)
    assert (index.num_images, index.num_descriptors, index.dim) == (3, 180, DIM)
    np.testing.assert_array_equal(index.image_descriptors(1), store.load("c.jpg").descriptors)
    index.save(tmp_path / "index")
    loaded = Index.load(tmp_path / "index")
    assert isinstance(loaded.descriptors, np.memmap)
    assert_same(index, loaded)
    header = json.loads((tmp_path / "index" / "index.json").read_text())
    assert header["format_version"] == 1 and header["fingerprint"] == "a" * 64
    assert [r.key for r in loaded.images] == ["a.jpg", "c.jpg", "sub/b.jpg"]
    assert loaded.images[0].width is None  # no image folder given


def test_image_paths_and_sizes_from_image_folder(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (30, 20)).save(tmp_path / "images" / "a.jpg")
    store = make_store(tmp_path / "store", ["a.jpg"], seed=0)
    record = Index.from_store(store, tmp_path / "images", progress=False).images[0]
    assert (record.width, record.height, record.num_features) == (30, 20, 60)
    assert record.path == str((tmp_path / "images" / "a.jpg").resolve())


def test_append_adds_new_images_only(tmp_path):
    first = Index.from_store(make_store(tmp_path / "s1", ["a", "b"], seed=0), progress=False)
    first.save(tmp_path / "index")
    second_store = make_store(tmp_path / "s2", ["c", "d", "e"], seed=1)
    appended, added = Index.load(tmp_path / "index").add_store(second_store, progress=False)
    assert added == 3 and appended.num_images == 5
    np.testing.assert_array_equal(appended.image_ids[-60:], np.full(60, 4))
    np.testing.assert_array_equal(appended.image_descriptors(3), second_store.load("d").descriptors)
    appended.save(tmp_path / "index")
    again, added = Index.load(tmp_path / "index").add_store(second_store, progress=False)
    assert added == 0 and again.num_images == 5
    other = make_store(tmp_path / "s3", ["f"], seed=2, fingerprint="b" * 64)
    with pytest.raises(FingerprintMismatchError, match="one model"):
        again.add_store(other, progress=False)


def test_save_killed_midway_leaves_previous_index_loadable(tmp_path, monkeypatch):
    path = tmp_path / "index"
    old = Index.from_store(make_store(tmp_path / "s1", ["a", "b"], seed=0), progress=False)
    old.save(path)
    new, _ = Index.load(path).add_store(make_store(tmp_path / "s2", ["c"], seed=1), progress=False)
    # add_store streamed the new arrays into files of a scratch folder beside the index;
    # save hard-links them into the staging folder: die at the third.
    link = index_module.link_or_copy
    calls = []

    def dies_on_third_array(source, target):
        calls.append(target)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        link(source, target)

    monkeypatch.setattr(index_module, "link_or_copy", dies_on_third_array)
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    assert len(calls) == 3
    scratch = new._scratch.name  # the new index's own arrays, removed by its save
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != scratch)
    assert names == ["index", "s1", "s2"]  # no debris
    assert_same(old, Index.load(path))
    # A crash between the two renames of the directory swap (the writer, a process that
    # is gone now, had renamed the index to its backup name): the backup is restored.
    import subprocess
    import sys

    from delf_tf import atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=-1)
    backup = f".index.{atomic._HOST}-{int(dead.stdout)}-0123abcd{atomic.BACKUP_SUFFIX}"
    path.rename(tmp_path / backup)
    assert_same(old, Index.load(path))
    monkeypatch.setattr(index_module, "link_or_copy", link)
    new.save(path)
    assert Index.load(path).num_images == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "s1", "s2"]


def test_corrupt_index_errors_name_the_file(tmp_path):
    with pytest.raises(IndexFormatError, match="not an index"):
        Index.load(tmp_path / "nothing")
    Index.from_store(make_store(tmp_path / "s", ["a"], seed=0), progress=False).save(tmp_path / "i")
    np.save(tmp_path / "i" / "keypoints.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(IndexFormatError, match="keypoints.npy"):
        Index.load(tmp_path / "i")


def test_fingerprint_check(tmp_path, caplog):
    index = Index.from_store(make_store(tmp_path / "s", ["a"], seed=0), progress=False)
    assert index.check_fingerprint("a" * 64)
    with pytest.raises(FingerprintMismatchError, match="built from features of extractor aaaa"):
        index.check_fingerprint("b" * 64)
    with caplog.at_level(logging.WARNING):
        assert index.check_fingerprint(None) is False
    assert "no fingerprint" in caplog.text


@pytest.mark.parametrize("backend", ["kdtree", "brute"])
def test_search_finds_the_transformed_image_first(tmp_path, backend):
    names = [f"img{i}" for i in range(8)]
    store = make_store(tmp_path / "s", names, seed=0, count=80)
    index = Index.from_store(store, progress=False)
    rng = np.random.default_rng(5)
    source = store.load("img5")
    # Query: 50 of img5's features, moved by AFFINE, descriptors perturbed, plus clutter.
    keep = rng.choice(80, 50, replace=False)
    noisy = source.descriptors[keep] + rng.normal(0, 0.05, (50, DIM)).astype(np.float32)
    clutter = random_features(rng, 30)
    query = LocalFeatures(
        np.concatenate(
            [apply_transform(np.linalg.inv(AFFINE), source.keypoints[keep]), clutter.keypoints]
        ),
        np.ones(80),
        np.ones(80),
        np.concatenate([noisy / np.linalg.norm(noisy, axis=1, keepdims=True), clutter.descriptors]),
    )
    results = Searcher(index, RetrievalConfig(backend=backend, top_k=3)).search(query)
    assert results[0].key == "img5"
    assert results[0].inliers >= 45 and results[0].votes >= 50
    assert all(r.inliers < 10 for r in results[1:])
    np.testing.assert_allclose(results[0].verification.model, AFFINE, atol=0.05)
    # Matches point into the right image's own features.
    matches = results[0].matches
    np.testing.assert_allclose(source.keypoints[matches.database_indices], matches.database_points)


def test_retrieval_config_round_trip_and_checks(tmp_path):
    config = RetrievalConfig(transform="homography", shortlist=20, backend="brute")
    config.save(tmp_path / "retrieval.json")
    assert RetrievalConfig.load(tmp_path / "retrieval.json") == config
    defaults = RetrievalConfig()
    assert (defaults.distance_bound, defaults.residual_threshold, defaults.max_trials) == (
        0.8,
        20.0,
        1000,
    )
    with pytest.raises(ValueError, match="transform"):
        RetrievalConfig(transform="similarity")
    with pytest.raises(ValueError, match="unknown field"):
        RetrievalConfig.from_dict({"shortlst": 5})


@pytest.mark.parametrize("first_with_images", [True, False], ids=["images-first", "keys-first"])
def test_appending_the_same_store_again_is_a_no_op(tmp_path, capsys, first_with_images):
    """Defect 5: identity was the recorded path (absolute with --images, the key without),
    so appending a store once with --images and once without added its images twice."""
    from PIL import Image

    from delf_tf.cli import main

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    names = ["a.jpg", "sub/b.jpg", ".c.jpg"]
    for name in names:
        Image.new("RGB", (30, 20)).save(images / name)
    make_store(tmp_path / "store", names, seed=0)
    other = make_store(tmp_path / "other", ["a.jpg"], seed=1)  # same key, another store
    index = tmp_path / "index"
    base = ["delf", "index", f"--output_dir={index}"]
    with_images = [f"--features={tmp_path / 'store'}", f"--images={images}"]
    without = [f"--features={tmp_path / 'store'}"]
    first, second = (with_images, without) if first_with_images else (without, with_images)
    assert main([*base, *first]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 3
    for arguments in (second, first, second):
        assert main([*base, "--append", *arguments]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert (summary["images"], summary["added"]) == (3, 0)
    # Another store's image of the same name is another image.
    assert main([*base, "--append", f"--features={other.root}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["added"]) == (4, 1)
    loaded = Index.load(index)
    assert sorted(record.key for record in loaded.images) == sorted([*names, "a.jpg"])
