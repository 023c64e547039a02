"""The dev server's models: `<base_path>/<version>/` SavedModels, TF Serving's layout and rules.

Each model has a base path and a version policy (TF Serving's
`model_version_policy`: latest N, default 1; all; specific versions). `refresh`
(called at start and on every file-system poll) follows TF Serving's
availability-preserving rules:
- a version is loaded (and warmed up) before a version it replaces is unloaded;
- a version that fails to load never unloads a serving one: with "latest N" the
  newest N versions that *loaded* are served, so a corrupt newer export leaves
  the working older one serving;
- a failed version is retried only when its files change (size, mtime or inode
  of `saved_model.pb`, `variables/*` and `assets.extra/*`), not on every poll;
- status (GetModelStatus, REST GET /v1/models/<name>) reports each served
  version as AVAILABLE and each failed one as END with its error code and message.
Predict validates a request against the SignatureDef (input names, dtypes,
shapes, defaults) and the server's `RequestLimits` before anything runs, and
answers with TF Serving's status codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from absl import logging
from google.protobuf import message as protobuf_message
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from delf_tf.contract import (
    EXPORT_INFO_ASSET,
    IMAGE_SIGNATURE,
    SAVED_MODEL_FILE,
    SERVING_SIGNATURE,
    WARMUP_FILE,
    existing_versions,
)
from delf_tf.errors import InputError
from delf_tf.serving.errors import ServingError
from delf_tf.serving.limits import DEFAULT_MAX_REQUEST_PIXELS, RequestLimits
from delf_tf.serving.memory import PixelBudget, check_pixels, image_sizes
from delf_tf.serving.saved_model_proto import read_saved_model_proto

DEFAULT_SIGNATURE = SERVING_SIGNATURE


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One served model: TF Serving's ModelConfig (name, base_path, version policy)."""

    name: str
    base_path: Path
    policy: str = "latest"  # "latest" | "all" | "specific"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve among those on disk (sorted), if all of them load."""
        return sorted(self.candidates(available)[: self.wanted_count(available)])

    def candidates(self, available: list[int]) -> list[int]:
        """Versions in the order they are tried (newest first for "latest")."""
        if self.policy == "all":
            return sorted(available, reverse=True)
        if self.policy == "specific":
            return sorted(set(available) & set(self.versions), reverse=True)
        return sorted(available, reverse=True)

    def wanted_count(self, available: list[int]) -> int:
        """How many versions to serve: N for "latest", every candidate otherwise."""
        return self.num_versions if self.policy == "latest" else len(available)


def sources_from_config_file(path: str | Path) -> list[ModelSource]:
    """ModelSources of a TF Serving `--model_config_file` (text ModelServerConfig)."""
    path = Path(path)
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), config)
    except (OSError, UnicodeDecodeError, text_format.ParseError) as error:
        raise InputError(f"{path}: not a readable ModelServerConfig ({error})") from error
    sources = []
    for model in config.model_config_list.config:
        base = Path(model.base_path)  # relative paths: from the working directory, as TF Serving
        policy = model.model_version_policy
        kind = policy.WhichOneof("policy_choice") or "latest"
        sources.append(
            ModelSource(
                name=model.name,
                base_path=base,
                policy=kind,
                num_versions=max(policy.latest.num_versions, 1),
                versions=tuple(policy.specific.versions),
            )
        )
    if not sources:
        raise InputError(f"{path}: model_config_list has no model")
    return sources


def check_tensor_proto(key: str, proto, signature_name: str, limits: RequestLimits) -> None:
    """Refuses (INVALID_ARGUMENT) a TensorProto over the limits before it is decoded."""
    dims = [dim.size for dim in proto.tensor_shape.dim]
    if any(size < 0 for size in dims):
        raise ServingError("INVALID_ARGUMENT", f"input '{key}': negative dimension in {dims}")
    if signature_name == SERVING_SIGNATURE and dims:
        _check_batch(key, dims[0], limits)
    itemsize = 8 if proto.dtype == tf.string.as_datatype_enum else 0
    if not itemsize:
        try:
            itemsize = tf.as_dtype(proto.dtype).size
        except TypeError as error:
            raise ServingError("INVALID_ARGUMENT", f"input '{key}': {error}") from error
    if math.prod(dims) * max(itemsize, 1) > limits.max_tensor_bytes:
        raise ServingError(
            "INVALID_ARGUMENT",
            f"input '{key}': shape {dims} is over the server's limit of "
            f"{limits.max_tensor_bytes} bytes per input tensor",
        )


def _check_batch(key: str, size: int, limits: RequestLimits) -> None:
    if size > limits.max_batch_size:
        raise ServingError(
            "INVALID_ARGUMENT",
            f"batch size {size} of input '{key}' is over the server's max_batch_size of "
            f"{limits.max_batch_size}; send at most {limits.max_batch_size} items per request",
        )


def check_request(signature_name: str, inputs: dict[str, np.ndarray], limits: RequestLimits):
    """Refuses (INVALID_ARGUMENT) the values of a request that are out of the limits."""
    if signature_name == SERVING_SIGNATURE:
        for key, value in inputs.items():
            if np.ndim(value):
                _check_batch(key, np.shape(value)[0], limits)
    if signature_name != IMAGE_SIGNATURE:
        return
    if "scales" in inputs:
        scales = np.asarray(inputs["scales"], np.float64).ravel()
        if not 1 <= scales.size <= limits.max_scales:
            raise ServingError(
                "INVALID_ARGUMENT",
                f"input 'scales': {scales.size} values; 1 to {limits.max_scales} are allowed",
            )
        if not (np.all(np.isfinite(scales)) and np.all(scales > 0)) or np.any(
            scales > limits.max_scale
        ):
            raise ServingError(
                "INVALID_ARGUMENT",
                f"input 'scales': every scale must be a finite number in (0, {limits.max_scale}]"
                f", got {scales.tolist()}",
            )
    if "max_features" in inputs:
        count = np.asarray(inputs["max_features"])
        if count.size != 1 or not 1 <= int(count.ravel()[0]) <= limits.max_features:
            raise ServingError(
                "INVALID_ARGUMENT",
                f"input 'max_features': must be in 1..{limits.max_features}, got {count.tolist()}",
            )
    if "score_threshold" in inputs:
        threshold = np.asarray(inputs["score_threshold"], np.float64)
        if not np.all(np.isfinite(threshold)):
            raise ServingError(
                "INVALID_ARGUMENT",
                f"input 'score_threshold': must be a finite number, got {threshold.tolist()}",
            )


class ServableVersion:
    """One loaded SavedModel version: its SignatureDefs and callable signatures."""

    def __init__(self, name: str, version: int, path: Path):
        self.name = name
        self.version = version
        self.path = path
        meta_graph = read_saved_model_proto(path).meta_graphs[0]
        self.signature_defs = dict(meta_graph.signature_def)
        self.signature_defs.pop("__saved_model_init_op", None)
        self._loaded = tf.saved_model.load(str(path))
        self._functions = dict(self._loaded.signatures)
        self.max_image_pixels = _export_max_pixels(path)

    def warm_up(self) -> int:
        """Replays `assets.extra/tf_serving_warmup_requests` (as TF Serving does); returns count."""
        from tensorflow_serving.apis import prediction_log_pb2

        path = self.path / WARMUP_FILE
        if not path.is_file():
            return 0
        count = 0
        for record in tf.data.TFRecordDataset(str(path)):
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            request = log.predict_log.request
            inputs = {key: tf.make_ndarray(value) for key, value in request.inputs.items()}
            self.predict(request.model_spec.signature_name or DEFAULT_SIGNATURE, inputs)
            count += 1
        return count

    def predict(
        self,
        signature_name: str,
        inputs: dict[str, np.ndarray],
        output_filter: list[str] | None = None,
        limits: RequestLimits | None = None,
        budget: PixelBudget | None = None,
        wait_seconds: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs a signature; ServingError (INVALID_ARGUMENT, FAILED_PRECONDITION) for bad requests.

        limits: checked on the request's own values (not on the signature's defaults)
        before the model runs; None checks none (warm-up requests).
        """
        signature_name = signature_name or DEFAULT_SIGNATURE
        signature = self.signature_defs.get(signature_name)
        if signature is None:
            raise ServingError(
                "FAILED_PRECONDITION", f'Serving signature key "{signature_name}" not found.'
            )
        arrays = {}
        for key, value in inputs.items():
            info = signature.inputs.get(key)
            if info is None:
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"input tensor alias not found in signature: {key}. Inputs expected to be "
                    f"in the set {{{','.join(sorted(signature.inputs))}}}.",
                )
            arrays[key] = _checked_array(key, value, info)
        missing = sorted(set(signature.inputs) - set(arrays) - set(signature.defaults))
        if missing:
            raise ServingError(
                "INVALID_ARGUMENT",
                f"input size does not match signature: missing but required: {{{','.join(missing)}}}",
            )
        pixels = 0
        if limits is not None:
            check_request(signature_name, arrays, limits)
            sizes = image_sizes(signature_name, arrays, self.max_image_pixels)
            pixels = check_pixels(sizes, limits.max_request_pixels, limits.max_aspect_ratio)
        arguments = {
            key: tf.constant(array, dtype=tf.as_dtype(signature.inputs[key].dtype))
            for key, array in arrays.items()
        }
        for key in set(signature.defaults) - set(arguments):
            arguments[key] = tf.constant(tf.make_ndarray(signature.defaults[key]))
        names = list(output_filter or signature.outputs)
        for alias in names:
            if alias not in signature.outputs:
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"output tensor alias not found in signature: {alias} Outputs expected to be "
                    f"in the set {{{','.join(sorted(signature.outputs))}}}.",
                )
        held = budget.hold(pixels, wait_seconds) if budget else contextlib.nullcontext()
        with held:  # the server's pixel budget (delf_tf.serving.memory)
            try:
                outputs = self._functions[signature_name](**arguments)
            except tf.errors.OpError as error:
                code = _STATUS_NAMES.get(error.error_code, "UNKNOWN")
                raise ServingError(code, error.message) from error
            return {alias: outputs[alias].numpy() for alias in names}


def _export_max_pixels(path: Path) -> int:
    """The export's per-image pixel bound (`delf export` records it), else Pillow's."""
    try:
        info = json.loads((path / "assets" / EXPORT_INFO_ASSET).read_text(encoding="utf-8"))
        value = info.get("max_pixels")
    except (OSError, ValueError, AttributeError):
        value = None
    is_int = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return value if is_int else DEFAULT_MAX_REQUEST_PIXELS


# TF error codes are the canonical status codes: 3 -> INVALID_ARGUMENT, ...
_STATUS_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}


def _checked_array(key: str, value: np.ndarray, info) -> np.ndarray:
    """`value` as an array, after checking its dtype and shape against the TensorInfo."""
    dtype = tf.as_dtype(info.dtype)
    array = np.asarray(value)
    given = tf.string if array.dtype == object or array.dtype.kind in "SU" else None
    if given is None:
        try:
            given = tf.as_dtype(array.dtype)
        except TypeError:
            given = None
    if given != dtype:
        raise ServingError(
            "INVALID_ARGUMENT",
            f"input '{key}': expects {dtype.name}, got {given.name if given else array.dtype}",
        )
    if not info.tensor_shape.unknown_rank:
        expected = [dim.size for dim in info.tensor_shape.dim]
        if len(expected) != array.ndim or any(
            e >= 0 and e != g for e, g in zip(expected, array.shape, strict=True)
        ):
            shown = [e if e >= 0 else None for e in expected]
            raise ServingError(
                "INVALID_ARGUMENT",
                f"input '{key}': expects shape {shown}, got {list(array.shape)}",
            )
    return array


def files_stamp(version_dir: Path) -> tuple:
    """What identifies a version's files on disk: (relative path, size, mtime, inode) of
    saved_model.pb and every file under variables/ and assets.extra/, sorted.

    A failed version is retried when this changes (TF Serving retries a version whose
    files were replaced; comparing these is cheap enough for every poll).
    """
    entries = []
    for relative in (Path(SAVED_MODEL_FILE),):
        info = (version_dir / relative).stat()
        entries.append((str(relative), info.st_size, info.st_mtime_ns, info.st_ino))
    for folder in ("variables", WARMUP_FILE.parent.name):
        root = version_dir / folder
        if not root.is_dir():
            entries.append((folder, -1, 0, 0))
            continue
        for dirpath, _, filenames in os.walk(root):
            for filename in filenames:
                path = Path(dirpath) / filename
                info = path.stat()
                entries.append(
                    (
                        str(path.relative_to(version_dir)),
                        info.st_size,
                        info.st_mtime_ns,
                        info.st_ino,
                    )
                )
    return tuple(sorted(entries))


@dataclasses.dataclass
class _Version:
    """One version seen on disk: served (`servable`) or failed (`error_code`, `error`)."""

    stamp: tuple
    servable: ServableVersion | None = None
    error_code: str = "OK"
    error: str = ""


def _error_code(error: BaseException) -> str:
    if isinstance(error, tf.errors.OpError):
        return _STATUS_NAMES.get(error.error_code, "UNKNOWN")
    if isinstance(error, protobuf_message.DecodeError):
        return "DATA_LOSS"
    if isinstance(error, FileNotFoundError):
        return "NOT_FOUND"
    return "UNKNOWN"


class ModelRepository:
    """The versions being served, per model name; thread-safe, refreshed from disk."""

    def __init__(self, sources: list[ModelSource]):
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise InputError(f"model names must be unique: {names}")
        self.sources = {source.name: source for source in sources}
        self._versions: dict[str, dict[int, _Version]] = {name: {} for name in names}
        self._lock = threading.Lock()  # guards _versions; never held while loading
        self._refreshing = threading.Lock()  # one refresh at a time

    def refresh(self) -> None:
        """Loads what the policies select (see the module docstring), then unloads the rest."""
        with self._refreshing:
            for name, source in self.sources.items():
                self._refresh_model(name, source)

    def _refresh_model(self, name: str, source: ModelSource) -> None:
        versions = self._versions[name]
        on_disk = existing_versions(source.base_path, complete=True)
        wanted = source.wanted_count(on_disk)
        serving: list[int] = []
        visited: set[int] = set()
        for version in source.candidates(on_disk):
            if len(serving) >= wanted:
                break
            visited.add(version)
            known = versions.get(version)
            if known is not None and known.servable is not None:
                serving.append(version)  # a served version is never reloaded
                continue
            path = source.base_path / str(version)
            try:
                stamp = files_stamp(path)
            except OSError as error:  # being written or removed right now: next poll
                logging.warning("%s version %d: cannot read %s (%s)", name, version, path, error)
                continue
            if known is not None and known.stamp == stamp:
                continue  # failed before and unchanged since: not retried
            record = self._load(name, version, path, stamp)
            with self._lock:
                versions[version] = record
            if record.servable is not None:
                serving.append(version)
        with self._lock:
            for version in list(versions):
                record = versions[version]
                if record.servable is not None and version not in serving:
                    logging.info("unloading %s version %d", name, version)
                    del versions[version]
                elif record.servable is None and version not in visited:
                    del versions[version]  # failed, and no longer a candidate

    @staticmethod
    def _load(name: str, version: int, path: Path, stamp: tuple) -> _Version:
        try:
            servable = ServableVersion(name, version, path)
            warmed = servable.warm_up()
        except Exception as error:  # a bad version must not stop the server
            message = f"failed to load version {version} from {path}: {type(error).__name__}: "
            message += str(error).strip().splitlines()[0][:500] if str(error).strip() else "-"
            logging.error("%s: %s", name, message)
            return _Version(stamp, error_code=_error_code(error), error=message)
        logging.info(
            "serving %s version %d from %s (%d warm-up requests)", name, version, path, warmed
        )
        return _Version(stamp, servable=servable)

    def resolve(self, name: str, version: int | None = None) -> ServableVersion:
        """The servable for a request; NOT_FOUND as TF Serving words it."""
        with self._lock:
            served = {
                number: record.servable
                for number, record in self._versions.get(name, {}).items()
                if record.servable is not None
            }
        if version is None:
            if not served:
                raise ServingError("NOT_FOUND", f"Servable not found for request: Latest({name})")
            return served[max(served)]
        if version not in served:
            raise ServingError(
                "NOT_FOUND", f"Servable not found for request: Specific({name}, {version})"
            )
        return served[version]

    def status(self, name: str, version: int | None = None) -> list[tuple[int, str, str, str]]:
        """[(version, state, error code name, error message)] as GetModelStatus reports them:
        AVAILABLE for served versions, END for versions that failed to load."""
        with self._lock:
            if name not in self.sources:
                raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
            rows = [
                (number, "AVAILABLE", "OK", "")
                if record.servable is not None
                else (number, "END", record.error_code, record.error)
                for number, record in self._versions[name].items()
            ]
        if version is not None:
            rows = [row for row in rows if row[0] == version]
            if not rows:
                raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name}")
        if not rows:
            raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
        return sorted(rows)
