"""The traced-extractor cache of one-query commands: same features, no rebuild, right keys."""

from __future__ import annotations

import numpy as np

from delf_tf.extraction import cache


def test_second_build_loads_the_cached_graph(
    delf_model, small_config, astronaut_small, tmp_path, monkeypatch
):
    from delf_tf.extraction.extractor import InProcessExtractor

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    builds = []

    def build():
        builds.append(1)
        return InProcessExtractor.from_model(delf_model, small_config)

    pca_file = tmp_path / "pca.npz"
    pca_file.write_bytes(b"first")
    arguments = {"weights": "random", "seed": 0, "pca": str(pca_file)}
    first = cache.cached_extractor(arguments, build)
    second = cache.cached_extractor(arguments, build)
    assert builds == [1]  # the second one came from the cache
    assert not hasattr(second, "module") and second.fingerprint == first.fingerprint
    a, b = first.extract(astronaut_small), second.extract(astronaut_small)
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)
    assert second.describe() == first.describe()
    # A changed file named by the arguments is another key: rebuilt.
    pca_file.write_bytes(b"second, longer")
    cache.cached_extractor(arguments, build)
    assert builds == [1, 1]
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_cache_can_be_switched_off(delf_model, small_config, tmp_path, monkeypatch):
    from delf_tf.extraction.extractor import InProcessExtractor

    monkeypatch.setenv(cache.CACHE_ENV, "off")
    builds = []

    def build():
        builds.append(1)
        return InProcessExtractor.from_model(delf_model, small_config)

    cache.cached_extractor({"seed": 0}, build)
    cache.cached_extractor({"seed": 0}, build)
    assert builds == [1, 1] and cache.cache_root() is None
