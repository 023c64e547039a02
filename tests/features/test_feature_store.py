"""FeatureStore: .npz stores, folders of reference .delf files, and writing .delf beside .npz."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from delf_tf.errors import InputError
from delf_tf.features import FeatureStore, LocalFeatures
from delf_tf.features.delf_io import local_features_to_delf
from delf_tf.formats import (
    delf_to_bytes,
    read_global_descriptor,
    write_global_descriptor,
)


def _features(n: int, dim: int = 8, seed: int = 0, with_global: bool = False) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    descriptors = rng.standard_normal((n, dim))
    return LocalFeatures(
        keypoints=rng.random((n, 2)) * 500,
        scales=rng.choice([0.5, 1.0, 2.0], n),
        scores=np.sort(rng.random(n) * 300)[::-1],
        descriptors=descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True),
        global_descriptor=rng.standard_normal(16) if with_global else None,
    )


def _assert_same(a: LocalFeatures, b: LocalFeatures) -> None:
    for name, value in a.arrays().items():
        np.testing.assert_array_equal(b.arrays()[name], value, err_msg=name)
    assert (a.global_descriptor is None) == (b.global_descriptor is None)


def _delf_bytes(features: LocalFeatures) -> bytes:
    return delf_to_bytes(
        features.keypoints[:, ::-1], features.scales, features.descriptors, features.scores
    )


def test_folder_of_reference_files_opens_without_fingerprint(tmp_path, caplog):
    a, b, c = _features(5, seed=1), _features(3, seed=2, with_global=True), _features(0)
    local_features_to_delf(a, tmp_path / "a.delf")
    local_features_to_delf(b, tmp_path / "sub" / "b.jpg.delg_local")
    write_global_descriptor(tmp_path / "sub" / "b.jpg.delg_global", b.global_descriptor)
    local_features_to_delf(c, tmp_path / "sub" / "empty.delf")
    (tmp_path / "notes.txt").write_text("not features")
    with caplog.at_level(logging.WARNING):
        store = FeatureStore.open(tmp_path)
        FeatureStore.open(tmp_path)
    warnings = [r for r in caplog.records if "fingerprint" in r.getMessage()]
    assert len(warnings) == 1 and str(tmp_path) in warnings[0].getMessage()
    assert store.fingerprint is None and store.formats == ("delf",)
    assert list(store.stored_keys()) == ["a", "sub/b.jpg", "sub/empty"]
    assert "a" in store and "sub/b.jpg" in store and "missing" not in store
    _assert_same(a, store.load("a"))
    _assert_same(b, store.load("sub/b.jpg"))
    assert len(store.load("sub/empty")) == 0
    assert store.path("sub/b.jpg").name == "b.jpg.delg_local"


def test_folder_without_features_is_still_not_a_store(tmp_path):
    (tmp_path / "image.jpg").write_bytes(b"")
    with pytest.raises(InputError, match="not a feature store .no manifest.json"):
        FeatureStore.open(tmp_path)


def test_npz_store_is_unchanged(tmp_path):
    store = FeatureStore.open_or_create(tmp_path / "s", "abc", {"descriptor_dim": 8})
    features = _features(4, with_global=True)
    store.save("x/y", features)
    assert sorted(p.name for p in (tmp_path / "s" / "x").iterdir()) == ["y.npz"]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert set(manifest) == {"format_version", "fingerprint", "extractor", "store_id"}
    reopened = FeatureStore.open(tmp_path / "s")
    assert reopened.fingerprint == "abc" and reopened.formats == ("npz",)
    _assert_same(features, reopened.load("x/y"))


def test_store_writes_delf_files_beside_npz(tmp_path):
    root = tmp_path / "s"
    store = FeatureStore.open_or_create(root, "abc", {}, formats=("npz", "delf"))
    with_global, plain = _features(6, seed=3, with_global=True), _features(2, seed=4)
    store.save("img/1.jpg", with_global)
    store.save("img/2.jpg", plain)
    assert (root / "img/1.jpg.delf").read_bytes() == _delf_bytes(with_global)
    assert (root / "img/2.jpg.delf").read_bytes() == _delf_bytes(plain)
    np.testing.assert_array_equal(
        read_global_descriptor(root / "img/1.jpg.delg_global"), with_global.global_descriptor
    )
    assert not (root / "img/2.jpg.delg_global").exists()
    reopened = FeatureStore.open(root)  # formats come from the manifest
    assert reopened.formats == ("npz", "delf") and reopened.fingerprint == "abc"
    assert list(reopened.stored_keys()) == ["img/1.jpg", "img/2.jpg"]
    (root / "img/2.jpg.delf").unlink()
    assert "img/1.jpg" in reopened and "img/2.jpg" not in reopened  # resumes the missing file
    # A save without global descriptor leaves no stale .delg_global behind.
    reopened.save("img/1.jpg", plain)
    assert not (root / "img/1.jpg.delg_global").exists()
    _assert_same(plain, reopened.load("img/1.jpg"))


def test_store_of_delf_files_only(tmp_path):
    root = tmp_path / "s"
    store = FeatureStore.open_or_create(root, "abc", {}, formats=("delf",))
    features = _features(5, seed=5, with_global=True)
    store.save("q", features)
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "q.delf", "q.delg_global"]
    assert store.path("q") == root / "q.delf"
    _assert_same(features, FeatureStore.open(root).load("q"))
    assert FeatureStore.open(root).fingerprint == "abc"


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(InputError, match="hdf5"):
        FeatureStore.open_or_create(tmp_path / "s", "abc", {}, formats=("npz", "hdf5"))
    assert not (tmp_path / "s").exists()


LONG_KEYS = [
    "sub/" + "x" * 251 + ".jpg",  # a 255-byte file name: legal, but not with ".npz" added
    "é" * 123 + "abcde.png",  # 255 bytes of UTF-8 in 132 characters
    ".hidden.jpg",  # dot-named images are images too
    "plain.jpg",
]


def test_long_and_dot_named_keys_are_saved_loaded_and_listed(tmp_path):
    """Defects 2 and 3: a 255-byte image name could not be stored (ENAMETOOLONG), and
    stored_keys() hid dot-named images."""
    store = FeatureStore.open_or_create(tmp_path / "s", "f" * 64, {"descriptor_dim": 8})
    saved = {key: _features(5, seed=number) for number, key in enumerate(LONG_KEYS)}
    for key, features in saved.items():
        assert key not in store
        store.save(key, features)
        assert key in store
    reopened = FeatureStore.open(tmp_path / "s")
    assert list(reopened.stored_keys()) == sorted(LONG_KEYS)
    for key, features in saved.items():
        _assert_same(features, reopened.load(key))
        assert len(os.fsencode(reopened.path(key).name)) <= 255
    store.save(LONG_KEYS[0], _features(5, seed=9))  # saving again replaces, no second entry
    assert list(reopened.stored_keys()) == sorted(LONG_KEYS)
    _assert_same(_features(5, seed=9), reopened.load(LONG_KEYS[0]))


def test_long_keys_in_the_delf_format(tmp_path):
    store = FeatureStore.open_or_create(
        tmp_path / "s", "f" * 64, {"descriptor_dim": 8}, formats=("delf",)
    )
    key = "y" * 255
    store.save(key, _features(4, with_global=True))
    assert key in store and list(FeatureStore.open(tmp_path / "s").stored_keys()) == [key]
    assert store.load(key).global_descriptor is not None
