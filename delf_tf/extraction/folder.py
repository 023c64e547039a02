"""Extraction at folder scale: resumable, atomic, every failure reported, the run goes on."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from absl import logging
from tqdm import tqdm

from delf_tf.atomic import atomic_write_text
from delf_tf.errors import DelfError, InputError
from delf_tf.extraction.extractor import Extractor
from delf_tf.features.store import FAILURES, FeatureStore
from delf_tf.images import decode_image, read_image_file, scan_images
from delf_tf.locks import writer_lock

# Errors of the output's file system, not of one image: the run stops (exit 1).
RUN_WIDE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# This many images in a row failing inside the extractor with an unexpected error
# (not DelfError / OSError), before any image succeeded, is a broken extractor or
# server rather than bad images: the run stops with that error.
BROKEN_EXTRACTOR_AFTER = 5


class OutputFullError(DelfError):
    """The store's file system refused a write for the whole run (disk full, quota,
    read-only): the run stops. The message names the file; `summary` (with `store`)
    says what was saved before, for the command's JSON summary."""

    def __init__(self, message: str, store: FeatureStore, summary: ExtractionSummary):
        super().__init__(message)
        self.store = store
        self.summary = summary


def _output_full(error: OSError, store: FeatureStore, key: str, summary) -> OutputFullError:
    where = error.filename or store.path(key)
    return OutputFullError(
        f"{where}: {error.strerror or error}; the run stopped after {summary.extracted} "
        "image(s) saved (they stay, and a rerun resumes after them)",
        store,
        summary,
    )


class Failure(NamedTuple):
    """An image (or folder) that was not extracted.

    path: as found under the image root. stage: where it failed: "scan" (not a
    readable image file), "read", "decode", "extract" or "write". reason: one line.
    """

    path: str
    reason: str
    stage: str

    def to_json(self) -> str:
        return json.dumps({"path": self.path, "stage": self.stage, "reason": self.reason})


@dataclasses.dataclass
class ExtractionSummary:
    """What one `extract_to_store` run did."""

    images: int = 0
    extracted: int = 0
    skipped_existing: int = 0
    failed: list[Failure] = dataclasses.field(default_factory=list)
    # Extracted (and stored), but with 0 features: listed in failures.jsonl too.
    zero_features: list[Failure] = dataclasses.field(default_factory=list)
    features: int = 0
    seconds: float = 0.0
    failures_file: str | None = None

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.extracted if self.extracted else 0.0

    @property
    def all_zero(self) -> bool:
        """Every image extracted in this run has 0 features (a problem, not a result)."""
        return bool(self.extracted) and len(self.zero_features) == self.extracted

    @property
    def mean_features(self) -> float:
        return self.features / self.extracted if self.extracted else 0.0

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "extracted": self.extracted,
            "skipped_existing": self.skipped_existing,
            "failed": len(self.failed),
            "zero_features": len(self.zero_features),
            "failures_file": self.failures_file,
            "mean_features": round(self.mean_features, 1),
            "seconds_per_image": round(self.seconds_per_image, 3),
        }


def image_key(path: Path, root: Path) -> str:
    """Store key of an image: its path relative to the image root (posix), or its name."""
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def one_line(reason: str, path: str | None = None) -> str:
    """`reason` on one line, without a leading "<path>: " (the path is reported beside it)."""
    if path is not None and reason.startswith(path + ": "):
        reason = reason[len(path) + 2 :]
    return " ".join(reason.split()) or "unknown error"


def zero_features_reason(description: dict) -> str:
    """Why an image may have 0 features, naming --score_threshold for untrained weights."""
    threshold = (description.get("extraction_config") or {}).get("score_threshold")
    model = str(description.get("model", ""))
    if model.startswith("DelfModel weights="):  # a fresh model: its attention head is untrained
        return (
            f"0 features: no location scored above score_threshold={threshold}; the attention "
            f"of an untrained model ({model}) scores far below it: pass --score_threshold=0"
        )
    return f"0 features: no location scored above score_threshold={threshold}"


def extract_to_store(
    extractor: Extractor,
    images: str | os.PathLike,
    output: str | os.PathLike,
    progress: bool = True,
    formats: tuple[str, ...] | None = None,
    on_failure: Callable[[Failure], None] | None = None,
    overwrite: bool = False,
    wait_for_lock: bool = False,
) -> tuple[FeatureStore, ExtractionSummary]:
    """Extracts every image under `images` (a file or a folder, recursive) into `output`.

    Images whose features are already in the store are skipped, so an interrupted
    run resumes where it stopped. Every image is read, decoded, extracted and written
    inside its own error handling: a failure is reported (`on_failure`, default a
    logged warning), listed in the summary and in `<output>/failures.jsonl` (one JSON
    object per line: path, stage, reason; the file is removed when nothing failed),
    and the run goes on. So are the paths the folder scan skips (see
    `delf_tf.images.scan_images`). Errors that concern the whole output (disk full,
    quota, read-only file system) stop the run, as does an extractor that fails on
    the first BROKEN_EXTRACTOR_AFTER images in a row with an unexpected error.
    `formats`: the store's file formats (see FeatureStore; None: npz, or what an
    existing store records).
    An image with 0 features is stored, and listed in the summary's `zero_features`
    and in failures.jsonl (stage "features") with `zero_features_reason`.
    An existing store of other extraction settings is refused (StoreMismatchError)
    unless `overwrite`, which deletes its features first; an input without any
    image file is an InputError. The run holds the store's writer lock (`delf_tf.locks`):
    another writer of `output` raises LockedError, or is waited for (wait_for_lock).
    """
    with writer_lock(output, wait=wait_for_lock):
        return _extract_to_store(
            extractor, images, output, progress, formats, on_failure, overwrite
        )


def _extract_to_store(extractor, images, output, progress, formats, on_failure, overwrite):
    report = on_failure or (lambda f: logging.warning("skipped %r: %s", f.path, f.reason))
    root = Path(images)
    paths, skipped = scan_images(root)
    if not paths and not skipped:
        raise InputError(f"{root}: no image files in it (nothing to extract)")
    description = extractor.describe()
    store = FeatureStore.open_or_create(
        output, extractor.fingerprint or "", description, formats=formats, overwrite=overwrite
    )
    summary = ExtractionSummary(images=len(paths))

    def fail(path: Path | str, reason: str, stage: str) -> None:
        failure = Failure(str(path), one_line(reason, str(path)), stage)
        summary.failed.append(failure)
        with tqdm.external_write_mode(file=sys.stderr):  # a line of its own, not after the bar
            report(failure)

    for path, reason in skipped:
        fail(path, reason, "scan")
    extract_encoded = getattr(extractor, "extract_encoded", None)
    try:
        if extract_encoded is not None:
            _extract_encoded(extract_encoded, paths, root, store, summary, fail, progress)
        else:
            _extract_decoded(extractor, paths, root, store, summary, fail, progress)
    except OutputFullError:
        with contextlib.suppress(OSError):  # the disk is full: it may not fit either
            _write_failures(store, summary, description)
        raise
    _write_failures(store, summary, description)
    return store, summary


def _write_failures(store: FeatureStore, summary: ExtractionSummary, description) -> None:
    failures_path = store.root / FAILURES
    if summary.zero_features:
        reason = zero_features_reason(description)
        summary.zero_features = [f._replace(reason=reason) for f in summary.zero_features]
    if summary.failed or summary.zero_features:
        listed = summary.failed + summary.zero_features
        lines = "".join(failure.to_json() + "\n" for failure in listed)
        atomic_write_text(failures_path, lines)
        summary.failures_file = str(failures_path)
    else:
        failures_path.unlink(missing_ok=True)


def _count(summary: ExtractionSummary, path: Path, features) -> None:
    summary.extracted += 1
    summary.features += len(features)
    if not len(features):
        summary.zero_features.append(Failure(str(path), "0 features", "features"))


def _extract_decoded(extractor, paths, root, store, summary, fail, progress) -> None:
    """One image at a time: read, decode here, extract, write."""
    unexpected_in_a_row = 0
    for path in tqdm(paths, desc="extract", unit="img", disable=not progress):
        stage = "write"
        try:
            key = image_key(path, root)
            if key in store:
                summary.skipped_existing += 1
                continue
            stage = "read"
            data = read_image_file(path)
            stage = "decode"
            image = decode_image(data, name=str(path))
            stage = "extract"
            start = time.perf_counter()
            features = extractor.extract(image)
            summary.seconds += time.perf_counter() - start
            stage = "write"
            store.save(key, features)
        except OSError as error:
            if stage == "write" and error.errno in RUN_WIDE_ERRNOS:
                raise _output_full(error, store, key, summary) from error
            fail(path, error.strerror or str(error), stage)
            continue
        except DelfError as error:
            fail(path, str(error), stage)
            continue
        except Exception as error:  # noqa: BLE001 - one image must not stop the run
            unexpected_in_a_row += 1
            if unexpected_in_a_row >= BROKEN_EXTRACTOR_AFTER and not summary.extracted:
                raise
            fail(path, f"{type(error).__name__}: {error}", stage)
            continue
        unexpected_in_a_row = 0
        _count(summary, path, features)


def _extract_encoded(extract_encoded, paths, root, store, summary, fail, progress) -> None:
    """The files' own bytes, in batches, to an extractor that decodes them (TF Serving's
    serving_default): nothing is decoded or re-encoded here.

    `extract_encoded(list of bytes) -> list of LocalFeatures or a failure reason`.
    A server that cannot be reached stops the run (ServerUnavailableError); any other
    error of a batch fails that batch's images, and the run goes on.
    """
    from delf_tf.serving.errors import ServerUnavailableError

    batch_size = getattr(extract_encoded.__self__, "batch_size", 8)
    pending: list[tuple[Path, str, bytes]] = []

    def flush() -> None:
        if not pending:
            return
        start = time.perf_counter()
        try:
            results = extract_encoded([data for _, _, data in pending])
        except ServerUnavailableError:
            raise
        except DelfError as error:
            results = [str(error)] * len(pending)
        summary.seconds += time.perf_counter() - start
        for (path, key, _), result in zip(pending, results, strict=True):
            if isinstance(result, str):
                fail(path, result, "extract")
                continue
            try:
                store.save(key, result)
            except OSError as error:
                if error.errno in RUN_WIDE_ERRNOS:
                    raise _output_full(error, store, key, summary) from error
                fail(path, error.strerror or str(error), "write")
                continue
            _count(summary, path, result)
        pending.clear()

    for path in tqdm(paths, desc="extract", unit="img", disable=not progress):
        try:
            key = image_key(path, root)
            if key in store:
                summary.skipped_existing += 1
                continue
            pending.append((path, key, read_image_file(path)))
        except OSError as error:
            fail(path, error.strerror or str(error), "read")
            continue
        except DelfError as error:
            fail(path, str(error), "read")
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
