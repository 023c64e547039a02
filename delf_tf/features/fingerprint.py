"""The extractor fingerprint: the one place that compares, shortens and refuses them.

A fingerprint (sha256 hex of a network's weights and its PCA, made by
`delf_tf.extraction.graph.extractor_fingerprint`) names a descriptor space.
Stores, indexes, the index's search structures and served models carry one, and
descriptors of two fingerprints are never mixed. None stands for files that carry
none (a folder of the reference's `.delf` files).

Precision is not part of it: a bfloat16 extraction of the same weights and PCA
lands in the same descriptor space (within the measured fidelity, see
bench/README.md), so a query may run in another precision than its collection.

No TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Callable

from delf_tf.errors import FingerprintMismatchError

SHORT_LENGTH = 12  # characters of the short form in messages and summaries
NONE = "(none)"  # the short form of a missing fingerprint


def short(fingerprint: str | bytes | None) -> str:
    """The first SHORT_LENGTH characters of a fingerprint, or "(none)"."""
    if isinstance(fingerprint, bytes):
        fingerprint = fingerprint.decode("utf-8", "replace")
    return fingerprint[:SHORT_LENGTH] if fingerprint else NONE


def as_text(fingerprint: str | bytes | None) -> str | None:
    """A fingerprint as str (a served model's answer holds bytes), None kept."""
    if fingerprint is None or isinstance(fingerprint, str):
        return fingerprint
    if isinstance(fingerprint, bytes):
        return fingerprint.decode("utf-8")
    return str(fingerprint)


def same(first: str | bytes | None, second: str | bytes | None) -> bool:
    """Whether two fingerprints name the same descriptor space (bytes or str; None == None)."""
    return as_text(first) == as_text(second)


def require_same(
    found: str | bytes | None,
    expected: str | bytes | None,
    message: Callable[[str, str], str],
    error: Callable[[str], Exception] = FingerprintMismatchError,
) -> None:
    """Raises `error(message(short(found), short(expected)))` unless the two are the same.

    message: builds the one-line text from the two short forms (called only on a
      mismatch), e.g. `lambda found, expected: f"{root}: extractor {found}, not {expected}"`.
    error: the exception (class or factory taking the message); default
      FingerprintMismatchError, a DelfError (one line, exit 1).
    """
    if not same(found, expected):
        raise error(message(short(found), short(expected)))
