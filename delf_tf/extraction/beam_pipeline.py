"""Extraction as an Apache Beam pipeline: the exported graph on many workers, one feature store.

A different runner, not a different result: every worker loads the same exported
SavedModel (see `delf_tf.contract`) and calls its `serving_default` signature on
batches of encoded images (the files' own bytes), and the features land in the
feature-store layout of `delf_tf.features.store` (one `.npz` per image, keyed by
its path relative to the image root, plus manifest.json with the fingerprint),
so `delf index` reads the result as it reads an in-process extraction.

    images (file | folder | glob pattern, local or gs://, listed with tf.io.gfile)
      -> (key, path) -> Reshuffle (spread over workers)
      -> skip keys already in the store (before any image byte is read)
      -> read the bytes -> RunInference(serving_default, batches of encoded images)
      -> valid: write <key>.npz atomically | invalid: reported, skipped
      -> one run report (counts + failures) at <output_dir>/.beam_runs/<run id>.json

Why RunInference with an own ModelHandler rather than Beam's
`TFModelHandlerTensor`: that handler (Beam 2.77) imports `tensorflow_hub` at
module level (not a dependency of delf-tf), loads models with
`tf.keras.models.load_model`, which under Keras 3 refuses a TF SavedModel
folder, and calls `model(batch)` rather than a named signature.
`ServingSignatureHandler` below keeps what RunInference offers (the model loaded
once per worker process through `beam.utils.shared`, `BatchElements` batching,
inference metrics) and loads the export with `tf.saved_model.load`.

Resumable: files are written atomically (local: temporary file + rename; GCS:
an object appears only when its upload completes), so a killed pipeline leaves
complete files only, and a rerun skips the keys that exist. Images the graph
cannot decode (valid = False in the batch outputs) and files that cannot be read
are listed in the run report and skipped, as the in-process extraction does.

TensorFlow and Beam are imported by this module; `delf extract --help` does not
import it (see `delf_tf.commands.extract_beam`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
from apache_beam.runners.runner import PipelineState

from delf_tf.atomic import atomic_write_text, is_remote
from delf_tf.contract import (
    BATCH_INPUT,
    EXPORT_INFO_ASSET,
    SAVED_MODEL_FILE,
    SERVING_SIGNATURE,
    is_version_name,
)
from delf_tf.errors import DelfError, InputError
from delf_tf.features import fingerprint as fingerprints
from delf_tf.features.local_features import LocalFeatures
from delf_tf.features.store import StoreMismatchError, StoreWriter, prepare_store
from delf_tf.images import IMAGE_SUFFIXES
from delf_tf.serving.client import decode_batch_outputs

RUNS_DIR = ".beam_runs"  # per-run reports inside the store (hidden: not a feature file)
INVALID_REASON = "the served graph could not decode it (unsupported format, corrupt, or too large)"
_GLOB_CHARS = "*?["
# Runners whose workers run on this machine (and so see its local paths).
_LOCAL_RUNNERS = ("direct", "switchingdirect", "bundlebaseddirect", "prism", "fnapi")

# Outcome kinds (one outcome per listed image).
EXTRACTED, SKIPPED, FAILED = "extracted", "skipped_existing", "failed"


class BeamRunError(DelfError):
    """The pipeline did not finish (cancelled, failed on the runner, or no report)."""


def is_local_runner(runner: str) -> bool:
    """DirectRunner and friends: workers on this machine, local paths are reachable."""
    name = runner.rsplit(".", 1)[-1].lower()
    name = name[: -len("runner")] if name.endswith("runner") else name
    return name in _LOCAL_RUNNERS


def beam_runner_name(runner: str) -> str:
    """The runner Beam is asked for: DirectRunner becomes its local executor, FnApiRunner.

    Beam 2.77's DirectRunner first tries the Prism runner, a Go binary it downloads
    from GitHub on first use (a failed download where there is no internet, a
    download where there is), which ignores --direct_num_workers and
    --direct_running_mode; FnApiRunner, where DirectRunner falls back to, honours
    them. Ask for PrismRunner by name to get Prism.
    """
    name = runner.rsplit(".", 1)[-1].lower()
    return "FnApiRunner" if name in ("direct", "directrunner", "switchingdirectrunner") else runner


def check_runner(runner: str) -> None:
    """InputError for a runner name Beam does not know (checked before any work)."""
    from apache_beam.runners.runner import create_runner

    try:
        create_runner(beam_runner_name(runner))
    except ValueError as error:
        raise InputError(f"--runner={runner}: {' '.join(str(error).split())}") from error


# --- inputs -----------------------------------------------------------------------------------


def _is_image_name(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_SUFFIXES


def _relative(path: str, root: str) -> str:
    """`path` relative to `root` (both as gfile gives them), posix separators."""
    rest = path[len(root) :] if path.startswith(root) else path
    return rest.replace(os.sep, "/").lstrip("/")


def glob_root(pattern: str) -> str:
    """The folder of `pattern` above its first component with a wildcard: keys are relative to it."""
    parts = pattern.split("/")
    for index, part in enumerate(parts):
        if any(char in part for char in _GLOB_CHARS):
            return "/".join(parts[:index])
    return posixpath.dirname(pattern)


def list_inputs(images: str) -> Iterator[tuple[str, str]]:
    """(store key, path) of every image `images` names.

    images: one image file (key: its name), a folder (recursive; key: the path
      relative to it, as in-process extraction keys it), or a glob pattern
      (`tf.io.gfile.glob`; key: relative to the folder above the first wildcard).
      Folders and patterns keep files with an image suffix (delf_tf.images.IMAGE_SUFFIXES).
    """
    images = str(images)
    if any(char in images for char in _GLOB_CHARS):
        root = glob_root(images)
        for path in sorted(tf.io.gfile.glob(images)):
            if _is_image_name(path):
                yield _relative(path, root), path
    elif tf.io.gfile.isdir(images):
        root = images.rstrip("/")
        for directory, _, files in tf.io.gfile.walk(root):
            for name in sorted(files):
                if _is_image_name(name):
                    path = posixpath.join(str(directory), name)
                    yield _relative(path, root), path
    else:
        yield posixpath.basename(images), images


def check_inputs_exist(images: str) -> None:
    """InputError for a file or folder that does not exist (patterns may match nothing)."""
    if not any(char in images for char in _GLOB_CHARS) and not tf.io.gfile.exists(images):
        raise InputError(f"{images}: no such file or directory")


# --- the model --------------------------------------------------------------------------------


def resolve_export(path: str) -> str | None:
    """The version folder of an export of `delf export` at `path` (itself or its highest
    version), or None when `path` is no such export (a .keras model, a release, ...).

    Works on any TF file system (gs:// included): exports are recognised by their
    `assets/extraction_config.json`, which released reference models lack.
    """
    path = str(path).rstrip("/")

    def is_export(folder: str) -> bool:
        return tf.io.gfile.exists(f"{folder}/{SAVED_MODEL_FILE}") and tf.io.gfile.exists(
            f"{folder}/assets/{EXPORT_INFO_ASSET}"
        )

    if not tf.io.gfile.isdir(path):
        return None
    if is_export(path):
        return path
    versions = sorted(
        (
            int(name.rstrip("/"))
            for name in tf.io.gfile.listdir(path)
            if is_version_name(name.rstrip("/"))
        ),
        reverse=True,
    )
    for version in versions:
        if is_export(f"{path}/{version}"):
            return f"{path}/{version}"
    return None


def export_info(version_dir: str) -> dict[str, Any]:
    """assets/extraction_config.json of an export: fingerprint, config, descriptor sizes."""
    with tf.io.gfile.GFile(f"{version_dir}/assets/{EXPORT_INFO_ASSET}", "rb") as handle:
        return json.loads(handle.read().decode("utf-8"))


def stage_export(local_dir: str, remote_base: str) -> str:
    """Copies an export folder to `<remote_base>/delf-export-<random>/` (gfile) for remote
    workers; returns the copy's path."""
    target = f"{remote_base.rstrip('/')}/delf-export-{uuid.uuid4().hex[:12]}"
    for directory, _, files in tf.io.gfile.walk(local_dir):
        relative = _relative(str(directory), local_dir.rstrip("/"))
        destination = f"{target}/{relative}".rstrip("/")
        tf.io.gfile.makedirs(destination)
        for name in files:
            tf.io.gfile.copy(posixpath.join(str(directory), name), f"{destination}/{name}")
    return target


class ExtractionResult(NamedTuple):
    """One image's share of a serving_default call."""

    valid: bool
    features: LocalFeatures | None  # None when not valid
    fingerprint: str
    seconds: float  # the batch call's time / batch size


def rows_to_results(outputs: dict[str, np.ndarray], seconds: float) -> list[ExtractionResult]:
    """serving_default's padded batch outputs -> one ExtractionResult per row (decoded by
    the client's `decode_batch_outputs`, the one decoder of these outputs)."""
    return [
        ExtractionResult(features is not None, features, fingerprint, seconds)
        for fingerprint, features in decode_batch_outputs(outputs)
    ]


class ServingSignatureHandler(ModelHandler[bytes, ExtractionResult, Any]):
    """RunInference handler: an export's serving_default on batches of encoded images.

    Examples are bytes (a file's contents); predictions are ExtractionResults.
    `load_model` runs once per worker process (RunInference shares the model).
    Batches hold `batch_size` images (fewer at the end of a bundle): the graph
    extracts the images of a batch one after the other, so BatchElements' adaptive
    sizing (which starts at 1) would only add calls.
    """

    def __init__(self, export_dir: str, batch_size: int = 8):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._export_dir = export_dir

    def load_model(self) -> Any:
        # The loaded object owns the variables the signature reads: keep it, not the signature.
        return tf.saved_model.load(self._export_dir)

    def run_inference(
        self,
        batch: Sequence[bytes],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[ExtractionResult]:
        signature = model.signatures[SERVING_SIGNATURE]
        start = time.perf_counter()
        outputs = signature(**{BATCH_INPUT: tf.constant(list(batch), dtype=tf.string)})
        arrays = {name: value.numpy() for name, value in outputs.items()}
        return rows_to_results(arrays, (time.perf_counter() - start) / max(len(batch), 1))

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(item) for item in batch)

    def get_metrics_namespace(self) -> str:
        return "delf_extract"


# --- the pipeline's steps ---------------------------------------------------------------------

OUTCOMES = "outcomes"


class _SkipStored(beam.DoFn):
    """(key, path) -> (key, path) when the key is not in the store, else a skipped outcome."""

    def __init__(self, output_dir: str, formats: tuple[str, ...]):
        self._output_dir = output_dir
        self._formats = formats

    def setup(self) -> None:
        self._store = StoreWriter(self._output_dir, self._formats)

    def process(self, item: tuple[str, str]):
        key, path = item
        if key in self._store:
            yield beam.pvalue.TaggedOutput(OUTCOMES, (SKIPPED, path, None))
        else:
            yield item


class _ReadBytes(beam.DoFn):
    """(key, path) -> ((key, path), bytes), or a failed outcome for an unreadable file."""

    def process(self, item: tuple[str, str]):
        key, path = item
        try:
            with tf.io.gfile.GFile(path, "rb") as handle:
                data = handle.read()
        except (tf.errors.OpError, OSError) as error:
            reason = getattr(error, "message", None) or str(error)
            yield beam.pvalue.TaggedOutput(OUTCOMES, (FAILED, path, f"unreadable: {reason}"))
            return
        yield (key, path), data


class _WriteFeatures(beam.DoFn):
    """((key, path), ExtractionResult) -> the key's file in the store; one outcome."""

    def __init__(self, output_dir: str, formats: tuple[str, ...], fingerprint: str):
        self._output_dir = output_dir
        self._formats = formats
        self._fingerprint = fingerprint

    def setup(self) -> None:
        self._store = StoreWriter(self._output_dir, self._formats)

    def process(self, item: tuple[tuple[str, str], ExtractionResult]):
        (key, path), result = item
        # The export changed under the pipeline: never mix descriptor spaces in a store.
        fingerprints.require_same(
            result.fingerprint,
            self._fingerprint,
            lambda found, expected: (
                f"the served graph's fingerprint {found} is not the store's {expected}"
            ),
            StoreMismatchError,
        )
        if not result.valid:
            yield FAILED, path, INVALID_REASON
            return
        self._store.save(key, result.features)
        yield EXTRACTED, path, (len(result.features), result.seconds)


@dataclasses.dataclass
class BeamSummary:
    """What one pipeline run did (the counts of ExtractionSummary, from the run report)."""

    images: int = 0
    extracted: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    features: int = 0
    seconds: float = 0.0  # serving_default time, summed over images (all workers)
    wall_seconds: float = 0.0  # the whole run as the driver saw it

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "extracted": self.extracted,
            "skipped_existing": self.skipped_existing,
            "failed": len(self.failed),
            "mean_features": round(self.features / self.extracted, 1) if self.extracted else 0.0,
            "seconds_per_image": round(self.seconds / self.extracted, 3) if self.extracted else 0.0,
            "wall_seconds": round(self.wall_seconds, 2),
        }


class _SummaryFn(beam.CombineFn):
    """Outcomes -> one report dict (counts, failures sorted by path)."""

    def create_accumulator(self) -> dict[str, Any]:
        return {"images": 0, EXTRACTED: 0, SKIPPED: 0, "features": 0, "seconds": 0.0, FAILED: []}

    def add_input(self, accumulator: dict[str, Any], outcome: tuple) -> dict[str, Any]:
        kind, path, info = outcome
        accumulator["images"] += 1
        if kind == FAILED:
            accumulator[FAILED].append([path, info])
        else:
            accumulator[kind] += 1
        if kind == EXTRACTED:
            accumulator["features"] += info[0]
            accumulator["seconds"] += info[1]
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[dict[str, Any]]) -> dict[str, Any]:
        merged = self.create_accumulator()
        for accumulator in accumulators:
            for name, value in accumulator.items():
                merged[name] += value
        return merged

    def extract_output(self, accumulator: dict[str, Any]) -> dict[str, Any]:
        return {**accumulator, FAILED: sorted(accumulator[FAILED])}


def _write_report(report: dict[str, Any], path: str) -> None:
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def build_pipeline(
    pipeline: beam.Pipeline,
    images: str,
    output_dir: str,
    export_dir: str,
    fingerprint: str,
    report_path: str,
    batch_size: int = 8,
    formats: tuple[str, ...] = ("npz",),
) -> None:
    """Adds the extraction steps to `pipeline` (see the module docstring)."""
    listed = (
        pipeline
        | "Images" >> beam.Create([images])
        | "List" >> beam.FlatMap(list_inputs)
        | "Spread" >> beam.Reshuffle()
    )
    pending = listed | "SkipStored" >> beam.ParDo(_SkipStored(output_dir, formats)).with_outputs(
        OUTCOMES, main="todo"
    )
    read = pending.todo | "Read" >> beam.ParDo(_ReadBytes()).with_outputs(OUTCOMES, main="bytes")
    handler = KeyedModelHandler(ServingSignatureHandler(export_dir, batch_size=batch_size))
    extracted = read.bytes | "Extract" >> RunInference(handler)
    written = extracted | "Write" >> beam.ParDo(_WriteFeatures(output_dir, formats, fingerprint))
    (
        (pending[OUTCOMES], read[OUTCOMES], written)
        | "Outcomes" >> beam.Flatten()
        | "Summarise" >> beam.CombineGlobally(_SummaryFn())
        | "Report" >> beam.Map(_write_report, report_path)
    )


def run_extraction(
    images: str,
    output_dir: str,
    export_dir: str,
    runner: str,
    beam_args: Sequence[str] = (),
    batch_size: int = 8,
    formats: Sequence[str] | None = None,
) -> tuple[BeamSummary, str]:
    """Runs the pipeline to the end; returns (summary, path of the run report).

    export_dir: a version folder of `delf export`, readable by every worker (for a
      runner with remote workers: gs://..., or staged there by the caller).
    beam_args: Beam pipeline options (`--project=...`, `--direct_num_workers=2`, ...).
    formats: feature files written (`delf extract --format`); None: the store's own.
    Raises StoreMismatchError for a store of another model, BeamRunError when the
    pipeline does not end in state DONE.
    """
    # Workers may run in other working directories: local paths become absolute.
    images, output_dir, export_dir = (
        str(path).rstrip("/") if is_remote(str(path)) else os.path.abspath(path)
        for path in (images, output_dir, export_dir)
    )
    check_inputs_exist(images)
    info = export_info(export_dir)
    fingerprint = info["fingerprint"]
    description = {
        "backend": "beam savedmodel",
        "model": export_dir,
        "extraction_config": info["extraction_config"],
        "descriptor_dim": info["descriptor_dim"],
        "global_dim": info.get("global_dim"),
    }
    formats = prepare_store(output_dir, fingerprint, description, formats)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    report_path = f"{output_dir}/{RUNS_DIR}/{run_id}.json"
    try:
        options = PipelineOptions([*beam_args, f"--runner={beam_runner_name(runner)}"])
        pipeline = beam.Pipeline(options=options)
    except ValueError as error:  # an unknown runner name
        raise InputError(f"--runner={runner}: {' '.join(str(error).split())}") from error
    build_pipeline(
        pipeline, images, output_dir, export_dir, fingerprint, report_path, batch_size, formats
    )
    start = time.perf_counter()
    result = pipeline.run()
    state = result.wait_until_finish()
    wall = time.perf_counter() - start
    if state != PipelineState.DONE:
        raise BeamRunError(f"the pipeline ended in state {state}; rerun to resume")
    if not tf.io.gfile.exists(report_path):
        raise BeamRunError(f"{report_path}: the pipeline wrote no run report")
    with tf.io.gfile.GFile(report_path, "rb") as handle:
        report = json.loads(handle.read().decode("utf-8"))
    summary = BeamSummary(
        images=report["images"],
        extracted=report[EXTRACTED],
        skipped_existing=report[SKIPPED],
        failed=[tuple(item) for item in report[FAILED]],
        features=report["features"],
        seconds=report["seconds"],
        wall_seconds=wall,
    )
    return summary, report_path


def temp_location(beam_args: Sequence[str]) -> str | None:
    """--temp_location of the Beam options, if given."""
    return PipelineOptions(list(beam_args)).view_as(GoogleCloudOptions).temp_location


class LocalExport:
    """A temporary local folder for an export made on the fly; removed on exit."""

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix="delf-beam-export-")
        return self.path

    def __exit__(self, *exc_info: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def remove_tree(path: str) -> None:
    """Removes a folder (local or remote) made by `stage_export`; ignores a missing one."""
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)
