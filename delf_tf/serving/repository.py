"""The dev server's models: `<base_path>/<version>/` SavedModels, TF Serving's layout and rules.

Each model has a base path and a version policy (TF Serving's
`model_version_policy`: latest N, default 1; all; specific versions). `refresh`
loads the versions the policy selects and drops the others, as TF Serving's file
system poller does. Predict validates a request against the SignatureDef (input
names, dtypes, shapes, defaults) and answers with TF Serving's status codes.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from absl import logging
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from delf_tf.contract import SERVING_SIGNATURE, WARMUP_FILE
from delf_tf.export import read_saved_model_proto
from delf_tf.serving.errors import ServingError

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
        """The versions to serve among those on disk (sorted)."""
        if self.policy == "all":
            return sorted(available)
        if self.policy == "specific":
            return sorted(set(available) & set(self.versions))
        return sorted(available)[-self.num_versions :]


def sources_from_config_file(path: str | Path) -> list[ModelSource]:
    """ModelSources of a TF Serving `--model_config_file` (text ModelServerConfig)."""
    path = Path(path)
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), config)
    except (OSError, text_format.ParseError) as error:
        raise ValueError(f"{path}: not a readable ModelServerConfig ({error})") from error
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
        raise ValueError(f"{path}: model_config_list has no model")
    return sources


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
    ) -> dict[str, np.ndarray]:
        """Runs a signature; ServingError (INVALID_ARGUMENT, FAILED_PRECONDITION) for bad requests."""
        signature_name = signature_name or DEFAULT_SIGNATURE
        signature = self.signature_defs.get(signature_name)
        if signature is None:
            raise ServingError(
                "FAILED_PRECONDITION", f'Serving signature key "{signature_name}" not found.'
            )
        arguments = {}
        for key, value in inputs.items():
            info = signature.inputs.get(key)
            if info is None:
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"input tensor alias not found in signature: {key}. Inputs expected to be "
                    f"in the set {{{','.join(sorted(signature.inputs))}}}.",
                )
            arguments[key] = _checked_tensor(key, value, info)
        missing = sorted(set(signature.inputs) - set(arguments) - set(signature.defaults))
        if missing:
            raise ServingError(
                "INVALID_ARGUMENT",
                f"input size does not match signature: missing but required: {{{','.join(missing)}}}",
            )
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
        try:
            outputs = self._functions[signature_name](**arguments)
        except tf.errors.OpError as error:
            code = _STATUS_NAMES.get(error.error_code, "UNKNOWN")
            raise ServingError(code, error.message) from error
        return {alias: outputs[alias].numpy() for alias in names}


# TF error codes are the canonical status codes: 3 -> INVALID_ARGUMENT, ...
_STATUS_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}


def _checked_tensor(key: str, value: np.ndarray, info) -> tf.Tensor:
    """`value` as a tensor of the TensorInfo's dtype, after checking dtype and shape."""
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
    return tf.constant(array, dtype=dtype)


class ModelRepository:
    """The versions being served, per model name; thread-safe, refreshed from disk."""

    def __init__(self, sources: list[ModelSource]):
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique: {names}")
        self.sources = {source.name: source for source in sources}
        self._served: dict[str, dict[int, ServableVersion]] = {name: {} for name in names}
        self._errors: dict[str, dict[int, str]] = {name: {} for name in names}
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Loads newly selected versions (with warm-up), then drops unselected ones."""
        for name, source in self.sources.items():
            available = []
            if source.base_path.is_dir():
                available = [
                    int(child.name)
                    for child in source.base_path.iterdir()
                    if child.name.isdigit() and (child / "saved_model.pb").is_file()
                ]
            wanted = source.select(available)
            for version in wanted:
                if version in self._served[name] or version in self._errors[name]:
                    continue
                path = source.base_path / str(version)
                try:
                    servable = ServableVersion(name, version, path)
                    warmed = servable.warm_up()
                except Exception as error:  # a bad version must not stop the server
                    logging.error(
                        "%s version %d: failed to load %s: %s", name, version, path, error
                    )
                    self._errors[name][version] = f"{type(error).__name__}: {error}"
                    continue
                logging.info(
                    "serving %s version %d from %s (%d warm-up requests)",
                    name,
                    version,
                    path,
                    warmed,
                )
                with self._lock:
                    self._served[name][version] = servable
            with self._lock:
                for version in set(self._served[name]) - set(wanted):
                    logging.info("unloading %s version %d", name, version)
                    del self._served[name][version]

    def resolve(self, name: str, version: int | None = None) -> ServableVersion:
        """The servable for a request; NOT_FOUND as TF Serving words it."""
        with self._lock:
            served = self._served.get(name)
            if not served:
                spec = f"Latest({name})" if version is None else f"Specific({name}, {version})"
                raise ServingError("NOT_FOUND", f"Servable not found for request: {spec}")
            if version is None:
                return served[max(served)]
            if version not in served:
                raise ServingError(
                    "NOT_FOUND", f"Servable not found for request: Specific({name}, {version})"
                )
            return served[version]

    def status(self, name: str, version: int | None = None) -> list[tuple[int, str, str]]:
        """[(version, state, error message)] as GetModelStatus reports them."""
        with self._lock:
            if name not in self.sources:
                raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
            rows = [(v, "AVAILABLE", "") for v in self._served[name]]
            rows += [(v, "END", message) for v, message in self._errors[name].items()]
        if version is not None:
            rows = [row for row in rows if row[0] == version]
            if not rows:
                raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name}")
        if not rows:
            raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
        return sorted(rows)
