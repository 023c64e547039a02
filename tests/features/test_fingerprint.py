"""The one owner of fingerprint comparison, short form and mismatch error."""

from __future__ import annotations

import numpy as np
import pytest

from delf_tf.errors import DelfError, FingerprintMismatchError
from delf_tf.features import FeatureStore, StoreMismatchError
from delf_tf.features import fingerprint as fingerprints


def test_short_form_and_comparison():
    assert fingerprints.short("0123456789abcdef" * 4) == "0123456789ab"
    assert fingerprints.short(b"0123456789abcdef") == "0123456789ab"
    assert fingerprints.short(None) == fingerprints.short("") == "(none)"
    assert fingerprints.same("ab", b"ab") and fingerprints.same(None, None)
    assert not fingerprints.same("ab", "ac") and not fingerprints.same("ab", None)


def test_require_same_raises_one_line_error_with_both_short_forms():
    fingerprints.require_same("a" * 64, b"a" * 64, lambda f, e: "never built")
    with pytest.raises(FingerprintMismatchError, match=r"^x: aaaaaaaaaaaa vs bbbbbbbbbbbb$"):
        fingerprints.require_same("a" * 64, "b" * 64, lambda f, e: f"x: {f} vs {e}")

    class Changed(DelfError):
        def __init__(self, code, message):
            super().__init__(f"{code}: {message}")

    with pytest.raises(Changed, match="GONE: \\(none\\)"):
        fingerprints.require_same(None, "c" * 64, lambda f, e: f, lambda m: Changed("GONE", m))


def test_store_index_and_client_refuse_through_it(tmp_path):
    from delf_tf.features import LocalFeatures
    from delf_tf.retrieval.index import Index

    store = FeatureStore.open_or_create(tmp_path / "s", "a" * 64, {"model": "m"})
    with pytest.raises(StoreMismatchError, match="aaaaaaaaaaaa.*bbbbbbbbbbbb.*--output_dir"):
        FeatureStore.open_or_create(tmp_path / "s", "b" * 64, {"model": "m"})
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(5, 8)).astype(np.float32)
    store.save("k", LocalFeatures(np.zeros((5, 2)), np.ones(5), np.ones(5), descriptors))
    index = Index.from_store(store)
    with pytest.raises(FingerprintMismatchError, match="aaaaaaaaaaaa.*query extractor is cc"):
        index.check_fingerprint("c" * 64)


def test_served_model_change_is_refused_through_it():
    from delf_tf.serving.client import ServingExtractor
    from delf_tf.serving.errors import ServedModelChangedError

    client = ServingExtractor("127.0.0.1:1")  # no call goes out: the check alone
    client._check_fingerprint(b"a" * 64)
    client._check_fingerprint("a" * 64)  # bytes (gRPC) and str (REST) are the same
    with pytest.raises(ServedModelChangedError, match="bbbbbbbbbbbb.*earlier aaaaaaaaaaaa"):
        client._check_fingerprint(np.array([b"b" * 64], dtype=object)[0])
