"""Feature stores read through tf.io.gfile (`delf_tf.features.remote`)."""

import numpy as np
import pytest

from delf_tf.errors import FingerprintMismatchError, InputError
from delf_tf.features import FeatureStore, LocalFeatures
from delf_tf.features.remote import StoreReader


def test_reader_fetches_in_order_and_refuses_other_stores(tmp_path):
    store = FeatureStore.open_or_create(tmp_path / "s", "a" * 64, {"descriptor_dim": 4})
    rng = np.random.default_rng(0)
    for number in range(5):
        count = number + 1
        store.save(
            f"dir/{number}.jpg",
            LocalFeatures(
                rng.uniform(0, 9, (count, 2)), np.ones(count), np.ones(count), np.eye(count, 4)
            ),
        )
    reader = StoreReader({store.identity: str(store.root)}, "a" * 64, concurrency=3)
    found = reader.fetch((store.identity, f"dir/{n}.jpg") for n in (4, 0, 2))
    assert [len(features) for features in found] == [5, 1, 3]
    np.testing.assert_array_equal(found[1].keypoints, store.load("dir/0.jpg").keypoints)
    with pytest.raises(FingerprintMismatchError, match="aaaaaaaaaaaa"):
        StoreReader({store.identity: str(store.root)}, "b" * 64).load(store.identity, "dir/0.jpg")
    with pytest.raises(InputError, match="no recorded location"):
        reader.load("another-store", "dir/0.jpg")
    with pytest.raises(InputError, match="missing.jpg.npz"):
        reader.load(store.identity, "missing.jpg")
