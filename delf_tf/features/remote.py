"""Feature stores read through `tf.io.gfile`: gs://, s3://, hdfs://, ram:// or local.

A search worker whose first stage runs in Milvus holds no collection of its own: the
local features of a query's shortlist (keypoints and descriptors for RANSAC) are
read from the feature store `delf extract` wrote, at whatever location TensorFlow's
file systems reach, a bounded number of files at a time (`StoreReader.fetch`).
Only `.npz` stores are read this way (the store's manifest must list "npz").

The only module of `features/` that imports TensorFlow (on first use).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from delf_tf.errors import InputError
from delf_tf.features import fingerprint as fingerprints
from delf_tf.features.local_features import LocalFeatures
from delf_tf.features.store import MANIFEST, SUFFIX, _parse_manifest, _stem

# Files read at once per query (threads; the reads are I/O bound).
FETCH_CONCURRENCY = 16


class StoreReader:
    """Reads `.npz` features of the stores an index came from, by store id and key.

    stores: {store id (`FeatureStore.identity`): location (path or URL)}.
    fingerprint: the index's; every store's manifest must carry it.
    """

    def __init__(
        self,
        stores: Mapping[str, str],
        fingerprint: str | None,
        concurrency: int = FETCH_CONCURRENCY,
    ):
        self.stores = dict(stores)
        self.fingerprint = fingerprint
        self.concurrency = max(1, concurrency)
        self._checked: set[str] = set()

    def location(self, store: str | None) -> str:
        if store in self.stores:
            return self.stores[store].rstrip("/")
        if store and store.startswith("path:"):  # older stores are named by their path
            return store[len("path:") :]
        raise InputError(
            f"feature store {store!r} of the index has no recorded location; index it again "
            "with `delf index --backend=milvus --features=...`"
        )

    def _check(self, root: str) -> None:
        if root in self._checked:
            return
        manifest = _parse_manifest(f"{root}/{MANIFEST}", _read(f"{root}/{MANIFEST}"))
        fingerprints.require_same(
            manifest.get("fingerprint"),
            self.fingerprint,
            lambda found, expected: (
                f"{root}: features of extractor {found}, the index holds {expected}"
            ),
        )
        if "npz" not in manifest.get("formats", ["npz"]):
            raise InputError(f"{root}: a store without .npz files cannot be read by workers")
        self._checked.add(root)

    def load(self, store: str | None, key: str) -> LocalFeatures:
        root = self.location(store)
        self._check(root)
        path = f"{root}/{_stem(key)}{SUFFIX}"
        return LocalFeatures.load(io.BytesIO(_read(path)), where=path)

    def fetch(self, items: Iterable[tuple[str | None, str]]) -> list[LocalFeatures]:
        """`load` of every (store id, key), `concurrency` files at a time, in order."""
        items = list(items)
        if len(items) <= 1 or self.concurrency == 1:
            return [self.load(store, key) for store, key in items]
        with ThreadPoolExecutor(min(self.concurrency, len(items))) as pool:
            return list(pool.map(lambda item: self.load(*item), items))


def _read(path: str) -> bytes:
    from delf_tf.tf_runtime import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path, "rb") as handle:
            return handle.read()
    except (tf.errors.OpError, OSError) as error:
        raise InputError(f"{path}: unreadable ({' '.join(str(error).split())[:200]})") from error
