"""ServingExtractor: the Extractor interface over TF Serving (gRPC or REST).

    extractor = ServingExtractor("localhost:8500")             # gRPC
    extractor = ServingExtractor("localhost:8501", protocol="rest")
    features = extractor.extract(image)                         # uint8 [H, W, 3]
    batch = extractor.extract_batch([image, jpeg_bytes, ...])   # one request per batch_size

With `signature=SERVING_SIGNATURE` (the default) images travel encoded (arrays as
lossless PNG, bytes as given) and the server decodes them, EXIF orientation
included; the export's own settings apply. With `signature=IMAGE_SIGNATURE` the
raw uint8 array travels and max_features / score_threshold / scales may be set
per call (that signature cannot go through TF Serving's request batching).

The served model's fingerprint comes from its `fingerprint` output: every answer
carries it and is checked against the first one seen, so features of two
different models are never mixed (ServedModelChangedError).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from delf_tf.contract import (
    BATCH_INPUT,
    BATCH_OUTPUTS,
    FEATURE_OUTPUTS,
    GLOBAL_OUTPUT,
    IMAGE_INPUTS,
    IMAGE_OUTPUTS,
    IMAGE_SIGNATURE,
    RUNTIME_OVERRIDES,
    SERVING_SIGNATURE,
)
from delf_tf.errors import ConfigError, InputError
from delf_tf.features import fingerprint as fingerprints
from delf_tf.features.local_features import LocalFeatures
from delf_tf.images import decode_image, encode_png
from delf_tf.serving import rest_json
from delf_tf.serving.errors import (
    DeadlineExceededError,
    ImageTooLargeError,
    InvalidImageError,
    ServedModelChangedError,
    ServerUnavailableError,
    ServingError,
    SignatureError,
    code_from_http,
    error_for,
)

PROTOCOLS = ("grpc", "rest")
DEFAULT_MAX_IMAGE_BYTES = 64 << 20
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
_INPUT_DTYPES = {name: np.dtype(IMAGE_INPUTS[name]) for name in RUNTIME_OVERRIDES}


def decode_batch_outputs(
    outputs: dict[str, np.ndarray],
) -> list[tuple[str | None, LocalFeatures | None]]:
    """serving_default's padded batch outputs -> (fingerprint, features or None) per row.

    outputs: keypoints float32 [B, K, 2], scales / scores float32 [B, K],
      descriptors float32 [B, K, D], num_features int32 [B], valid bool [B],
      fingerprint string [B], optional global_descriptor float32 [B, G].
    A row's features are its first num_features entries; None for a row the graph
    could not decode (valid False). The one decoder of these outputs: the client
    and the Beam pipeline both use it.
    """
    rows = []
    for row in range(len(outputs["valid"])):
        fingerprint = fingerprints.as_text(outputs["fingerprint"][row])
        if not bool(outputs["valid"][row]):
            rows.append((fingerprint, None))
            continue
        n = int(outputs["num_features"][row])
        arrays = {name: np.asarray(outputs[name][row], np.float32)[:n] for name in FEATURE_OUTPUTS}
        if GLOBAL_OUTPUT in outputs:
            arrays[GLOBAL_OUTPUT] = np.asarray(outputs[GLOBAL_OUTPUT][row], np.float32)
        rows.append((fingerprint, LocalFeatures(**arrays)))
    return rows


class _GrpcTransport:
    """PredictionService / ModelService stubs over one channel."""

    def __init__(self, target: str, max_message_bytes: int):
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    @staticmethod
    def _spec(message, name: str, version: int | None, signature: str | None = None) -> None:
        message.model_spec.name = name
        if version is not None:
            message.model_spec.version.value = version
        if signature is not None:
            message.model_spec.signature_name = signature

    def _call(self, method, request, timeout: float):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as error:
            message = error.details() or str(error)
            if "http/2" in message.lower() or "http2" in message.lower():
                message += (
                    "; this port does not speak gRPC (a REST port?): use --protocol=rest, "
                    "or the gRPC port (TF Serving's --port, 8500)"
                )
            raise error_for(error.code().name, message) from None

    def predict(self, name, version, signature, inputs, output_filter, timeout):
        request = predict_pb2.PredictRequest()
        self._spec(request, name, version, signature)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        request.output_filter.extend(output_filter or [])
        response = self._call(self.prediction.Predict, request, timeout)
        outputs = {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}
        served = (
            response.model_spec.version.value if response.model_spec.HasField("version") else None
        )
        return outputs, served

    def status(self, name, version, timeout):
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request, name, version)
        response = self._call(self.models.GetModelStatus, request, timeout)
        return json_format.MessageToDict(response, preserving_proto_field_name=True)

    def metadata(self, name, version, timeout):
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request, name, version)
        response = self._call(self.prediction.GetModelMetadata, request, timeout)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return dict(signature_map.signature_def)

    def close(self) -> None:
        self.channel.close()


class _RestTransport:
    """TF Serving's REST API through urllib (JSON, {"b64": ...} for bytes)."""

    def __init__(self, target: str):
        self.base = target if "://" in target else f"http://{target}"

    def _url(self, name: str, version: int | None, suffix: str = "") -> str:
        path = f"{self.base}/v1/models/{name}"
        if version is not None:
            path += f"/versions/{version}"
        return path + suffix

    def _request(self, url: str, body: Any, timeout: float) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(
            url, data=data, headers={"Content-Type": "application/json"} if data else {}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            text = error.read().decode("utf-8", "replace")
            try:
                message = json.loads(text).get("error", text)
            except (json.JSONDecodeError, AttributeError):
                message = text or error.reason
            raise error_for(code_from_http(error.code), f"HTTP {error.code}: {message}") from None
        except TimeoutError as error:
            raise DeadlineExceededError(
                "DEADLINE_EXCEEDED", f"{url}: no answer in {timeout} s"
            ) from error
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise DeadlineExceededError(
                    "DEADLINE_EXCEEDED", f"{url}: no answer in {timeout} s"
                ) from error
            raise ServerUnavailableError("UNAVAILABLE", f"{url}: {error.reason}") from error
        except (ConnectionError, OSError) as error:
            raise ServerUnavailableError("UNAVAILABLE", f"{url}: {error}") from error

    def predict(self, name, version, signature, inputs, output_filter, timeout):
        row_format = signature == SERVING_SIGNATURE and list(inputs) == [BATCH_INPUT]
        body = rest_json.encode_inputs(inputs, signature, row_format)
        answer = self._request(self._url(name, version, ":predict"), body, timeout)
        try:
            outputs = rest_json.decode_outputs(answer, row_format)
        except rest_json.JsonTensorError as error:
            raise ServingError(
                "INTERNAL", f"unexpected answer from {self.base}: {error}"
            ) from error
        if output_filter:
            outputs = {key: value for key, value in outputs.items() if key in output_filter}
        return outputs, None

    def status(self, name, version, timeout):
        return self._request(self._url(name, version), None, timeout)

    def metadata(self, name, version, timeout):
        answer = self._request(self._url(name, version, "/metadata"), None, timeout)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        try:
            json_format.ParseDict(answer["metadata"]["signature_def"], signature_map)
        except (KeyError, TypeError, json_format.ParseError) as error:
            raise ServingError(
                "INTERNAL", f"unexpected metadata from {self.base}: {error}"
            ) from error
        return dict(signature_map.signature_def)

    def close(self) -> None:
        pass


class ServingExtractor:
    """Extractor whose graph runs in TF Serving (or `delf serve`).

    target: "host:port" (gRPC port 8500, REST port 8501 by default in TF Serving).
    version: pin a model version (default: whatever the server serves, highest).
    timeout: seconds per request (DeadlineExceededError past it).
    retries: extra attempts when the server is UNAVAILABLE (unreachable, starting,
      overloaded), with exponential backoff from `backoff` seconds; other errors
      are never retried.
    batch_size: images per request in `extract_batch`.
    max_image_bytes: refuse (ImageTooLargeError) an image whose encoded bytes (raw
      array bytes for extract_image) exceed this, before sending anything.
    """

    def __init__(
        self,
        target: str,
        model_name: str = "delf",
        signature: str = SERVING_SIGNATURE,
        protocol: str = "grpc",
        timeout: float = 60.0,
        retries: int = 3,
        version: int | None = None,
        batch_size: int = 8,
        backoff: float = 0.2,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if signature not in (SERVING_SIGNATURE, IMAGE_SIGNATURE):
            raise ConfigError(
                f"signature must be {SERVING_SIGNATURE!r} or {IMAGE_SIGNATURE!r}, got {signature!r}"
            )
        if retries < 0 or batch_size < 1 or timeout <= 0:
            raise ConfigError("retries must be >= 0, batch_size >= 1 and timeout > 0")
        self.target = target
        self.model_name = model_name
        self.signature = signature
        self.protocol = protocol
        self.timeout = timeout
        self.retries = retries
        self.version = version
        self.batch_size = batch_size
        self.backoff = backoff
        self.max_image_bytes = max_image_bytes
        self.served_version: int | None = None
        self._fingerprint: str | None = None
        self._image_defaults: dict[str, np.ndarray] | None = None
        if protocol == "grpc":
            self._transport = _GrpcTransport(target, max_message_bytes)
        else:
            self._transport = _RestTransport(target)

    # -- plumbing ---------------------------------------------------------------------------

    def _with_retries(self, method, *args):
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                return method(*args, self.timeout)
            except ServerUnavailableError as error:
                if attempt + 1 == attempts:
                    raise ServerUnavailableError(
                        "UNAVAILABLE",
                        f"cannot reach TF Serving at {self.target} over {self.protocol} "
                        f"(model {self.model_name!r}) after {attempts} attempt(s): {error.message}",
                    ) from None
                time.sleep(min(self.backoff * 2**attempt, 5.0))
        raise AssertionError("unreachable")

    def _predict(self, signature: str, inputs: dict[str, Any], output_filter=None):
        outputs, served = self._with_retries(
            self._transport.predict, self.model_name, self.version, signature, inputs, output_filter
        )
        if served is not None:
            self.served_version = served
        return outputs

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> ServingExtractor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- model information ------------------------------------------------------------------

    def model_status(self) -> list[dict[str, Any]]:
        """[{"version": int, "state": "AVAILABLE" | ..., "error_code", "error_message"}]."""
        answer = self._with_retries(self._transport.status, self.model_name, self.version)
        rows = []
        for entry in answer.get("model_version_status", []):
            status = entry.get("status", {})
            rows.append(
                {
                    "version": int(entry.get("version", 0)),
                    "state": entry.get("state", "UNKNOWN"),
                    "error_code": status.get("error_code", "OK"),
                    "error_message": status.get("error_message", ""),
                }
            )
        return rows

    def model_metadata(self) -> dict[str, Any]:
        """{signature name: SignatureDef proto} of the served version."""
        return self._with_retries(self._transport.metadata, self.model_name, self.version)

    def wait_until_available(self, timeout: float = 60.0, interval: float = 0.2) -> None:
        """Blocks until the model reports an AVAILABLE version (ServerUnavailableError if not)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if any(row["state"] == "AVAILABLE" for row in self.model_status()):
                    return
            except ServingError as error:
                last = error
            time.sleep(interval)
        raise ServerUnavailableError(
            "UNAVAILABLE",
            f"{self.model_name} at {self.target} not available after {timeout} s ({last})",
        )

    @property
    def fingerprint(self) -> str:
        """The served model's descriptor-space identity (its `fingerprint` output)."""
        if self._fingerprint is None:
            outputs = self._predict(
                SERVING_SIGNATURE, {BATCH_INPUT: np.array([b""], dtype=object)}, ["fingerprint"]
            )
            if "fingerprint" not in outputs:
                raise SignatureError(
                    "FAILED_PRECONDITION",
                    f"model {self.model_name!r} has no 'fingerprint' output: not a delf-tf export?",
                )
            self._check_fingerprint(np.ravel(outputs["fingerprint"])[0])
        return self._fingerprint

    def _check_fingerprint(self, value: Any) -> None:
        value = fingerprints.as_text(value)
        if self._fingerprint is None:
            self._fingerprint = value
            return
        fingerprints.require_same(
            value,
            self._fingerprint,
            lambda found, expected: (
                f"model {self.model_name!r} at {self.target} now answers "
                f"with fingerprint {found}..., earlier {expected}...: a different model was "
                "deployed; its features must not be mixed with the earlier ones"
            ),
            lambda message: ServedModelChangedError("FAILED_PRECONDITION", message),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "backend": f"tf-serving {self.protocol}",
            "model": f"{self.model_name}@{self.target}",
            "target": self.target,
            "model_name": self.model_name,
            "version": self.version if self.version is not None else self.served_version,
            "signature": self.signature,
            "fingerprint": self.fingerprint,
        }

    # -- extraction -------------------------------------------------------------------------

    def extract(self, image: np.ndarray, **overrides: Any) -> LocalFeatures:
        """uint8 [H, W, 3] RGB -> LocalFeatures (overrides only with signature extract_image)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(
                f"expected an RGB image uint8 [H, W, 3], got {image.dtype} {list(image.shape)}"
            )
        if self.signature == IMAGE_SIGNATURE:
            return self._extract_image(image, overrides)
        if overrides:
            raise TypeError(
                f"{SERVING_SIGNATURE} applies the export's settings; use "
                f"signature={IMAGE_SIGNATURE!r} to set {sorted(overrides)} per call"
            )
        return self.extract_batch([image])[0]

    def extract_bytes(self, data: bytes) -> LocalFeatures:
        """Encoded image bytes (JPEG, PNG, ...) -> LocalFeatures, decoded by the server."""
        return self.extract_batch([data])[0]

    def extract_batch(
        self, images: Sequence[np.ndarray | bytes], skip_invalid: bool = False
    ) -> list[LocalFeatures | None]:
        """Features of several images (arrays or encoded bytes), `batch_size` per request.

        An image the server cannot decode raises InvalidImageError naming its index,
        or gives None with `skip_invalid=True`.
        """
        if self.signature == IMAGE_SIGNATURE:
            return [
                self._extract_image(
                    item if isinstance(item, np.ndarray) else decode_image(item, f"image {i}"), {}
                )
                for i, item in enumerate(images)
            ]
        encoded = [item if isinstance(item, bytes) else encode_png(item) for item in images]
        for index, data in enumerate(encoded):
            if len(data) > self.max_image_bytes:
                raise ImageTooLargeError(
                    "RESOURCE_EXHAUSTED",
                    f"image {index}: {len(data)} encoded bytes is over the client's limit of "
                    f"{self.max_image_bytes} bytes (max_image_bytes)",
                )
        results: list[LocalFeatures | None] = []
        invalid: list[int] = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = np.array(encoded[start : start + self.batch_size], dtype=object)
            outputs = self._predict(SERVING_SIGNATURE, {BATCH_INPUT: chunk})
            missing = [name for name in BATCH_OUTPUTS if name not in outputs]
            if missing:
                raise SignatureError(
                    "FAILED_PRECONDITION",
                    f"{SERVING_SIGNATURE} of {self.model_name!r} lacks outputs {missing}",
                )
            for row, (fingerprint, features) in enumerate(decode_batch_outputs(outputs)):
                self._check_fingerprint(fingerprint)
                if features is None:
                    invalid.append(start + row)
                results.append(features)
        if invalid and not skip_invalid:
            raise InvalidImageError(
                "INVALID_ARGUMENT",
                f"the server could not decode image(s) {invalid} of {len(encoded)} (unknown "
                "format, corrupt or truncated data, or over the pixel limit)",
            )
        return results

    def extract_encoded(self, images: Sequence[bytes]) -> list[LocalFeatures | str]:
        """Encoded files' bytes (sent as they are) -> features, or a failure reason per image.

        `batch_size` images per request through serving_default; an image over
        `max_image_bytes` or one the server cannot decode gets a reason, and the
        others are extracted.
        """
        results: list[LocalFeatures | str] = [""] * len(images)
        sendable = []
        for index, data in enumerate(images):
            if len(data) > self.max_image_bytes:
                results[index] = (
                    f"{len(data)} bytes is over the client's limit of {self.max_image_bytes} "
                    "bytes (max_image_bytes)"
                )
            else:
                sendable.append(index)
        extracted = self.extract_batch([images[i] for i in sendable], skip_invalid=True)
        for index, features in zip(sendable, extracted, strict=True):
            results[index] = (
                features
                if features is not None
                else (
                    "the served model could not decode it (not a JPEG, PNG, GIF, BMP or WebP "
                    "image, corrupt data, or over the pixel limit)"
                )
            )
        return results

    def _extract_image(self, image: np.ndarray, overrides: dict[str, Any]) -> LocalFeatures:
        unknown = set(overrides) - set(_INPUT_DTYPES)
        if unknown:
            raise TypeError(f"unknown extraction override(s): {sorted(unknown)}")
        if image.nbytes > self.max_image_bytes:
            raise ImageTooLargeError(
                "RESOURCE_EXHAUSTED",
                f"image of {image.nbytes} bytes is over the client's limit of "
                f"{self.max_image_bytes} bytes (max_image_bytes)",
            )
        inputs = {"image": image, **self._signature_defaults()}
        for name, value in overrides.items():
            inputs[name] = np.asarray(value, _INPUT_DTYPES[name])
        outputs = self._predict(IMAGE_SIGNATURE, inputs)
        missing = [name for name in IMAGE_OUTPUTS if name not in outputs]
        if missing:
            raise SignatureError(
                "FAILED_PRECONDITION",
                f"{IMAGE_SIGNATURE} of {self.model_name!r} lacks outputs {missing}",
            )
        self._check_fingerprint(np.ravel(np.asarray(outputs["fingerprint"], dtype=object))[0])
        arrays = {name: np.asarray(outputs[name], np.float32) for name in FEATURE_OUTPUTS}
        if GLOBAL_OUTPUT in outputs:
            arrays[GLOBAL_OUTPUT] = np.asarray(outputs[GLOBAL_OUTPUT], np.float32)
        return LocalFeatures(**arrays)

    def _signature_defaults(self) -> dict[str, np.ndarray]:
        """extract_image's recorded defaults (from the metadata), so all four inputs are sent."""
        if self._image_defaults is None:
            signatures = self.model_metadata()
            signature = signatures.get(IMAGE_SIGNATURE)
            if signature is None or set(signature.inputs) != set(IMAGE_INPUTS):
                raise SignatureError(
                    "FAILED_PRECONDITION",
                    f"model {self.model_name!r} has no {IMAGE_SIGNATURE} signature with inputs "
                    f"{list(IMAGE_INPUTS)} (signatures: {sorted(signatures)})",
                )
            self._image_defaults = {
                name: tf.make_ndarray(proto).astype(_INPUT_DTYPES[name])
                for name, proto in signature.defaults.items()
                if name in _INPUT_DTYPES
            }
            missing = sorted(set(_INPUT_DTYPES) - set(self._image_defaults))
            if missing:
                raise SignatureError(
                    "FAILED_PRECONDITION", f"{IMAGE_SIGNATURE} records no default for {missing}"
                )
        return dict(self._image_defaults)
