"""A development and CI stand-in for TF Serving: its gRPC and REST APIs in Python.

Not a replacement for TF Serving (no request batching, no GPU scheduling, no
monitoring, no version labels): it lets `delf`'s client, tests and CI talk to
exported models exactly as they would talk to `tensorflow_model_server`.

gRPC: PredictionService.Predict and GetModelMetadata, ModelService.GetModelStatus.
REST: GET /v1/models/<name>[/versions/<v>] (status),
      GET /v1/models/<name>[/versions/<v>]/metadata,
      POST /v1/models/<name>[/versions/<v>]:predict.
Models come from `<model_base_path>/<version>/` or a `--model_config_file`
(version rules: `repository.ModelRepository`). Every request is checked
against `ServerLimits` before the model runs; bad requests get
INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION (REST: a 4xx with a JSON
`{"error": ...}`) and the server keeps serving. REST I/O runs on one asyncio
loop with timeouts and a connection bound (`http_front`), gRPC in grpc-core
with keepalive, idle and handshake limits, so stalled clients hold no threads.
`stop()` (SIGTERM / SIGINT in `serve_until_signalled`) stops accepting, lets
running requests finish within the grace period, then returns.

With a `SearchService` (`delf serve --index`), its model name is answered by the
search (`search_api`), and the REST port also serves its page, thumbnails,
/status, /healthz, /readyz and /metrics.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import threading
import urllib.parse
from concurrent import futures

import grpc
import numpy as np
import tensorflow as tf
from absl import logging
from google.protobuf import json_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from delf_tf.contract import IMAGE_SIGNATURE
from delf_tf.errors import DelfError
from delf_tf.serving import rest_json, search_api
from delf_tf.serving.errors import HTTP_STATUS, ServingError
from delf_tf.serving.http_front import HttpFrontEnd, error_body
from delf_tf.serving.limits import (
    RequestLimits,
    ServerLimits,
)
from delf_tf.serving.memory import (
    TRIM_AFTER_BYTES,
    PixelBudget,
    check_pixels,
    configure_allocator,
    release_memory_soon,
)
from delf_tf.serving.repository import (
    DEFAULT_SIGNATURE,
    ModelRepository,
    check_tensor_proto,
)
from delf_tf.serving.search_service import SearchService

INT64_MAX = (1 << 63) - 1
_REST_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<action>/metadata|:predict|:classify|:regress)?/?$"
)


def _state_code(state: str) -> int:
    return get_model_status_pb2.ModelVersionStatus.State.Value(state)


def predict(
    repository: ModelRepository,
    request: predict_pb2.PredictRequest,
    limits: RequestLimits | None = None,
    budget: PixelBudget | None = None,
    wait_seconds: float | None = None,
):
    """PredictRequest -> PredictResponse (raises ServingError). budget: the server's
    pixel budget, waited for up to wait_seconds (delf_tf.serving.memory)."""
    limits = limits or RequestLimits()
    spec = request.model_spec
    if spec.version_label:
        raise ServingError("UNIMPLEMENTED", "version labels are not supported by delf serve")
    servable = repository.resolve(
        spec.name, spec.version.value if spec.HasField("version") else None
    )
    signature = spec.signature_name or DEFAULT_SIGNATURE
    for key, proto in request.inputs.items():
        check_tensor_proto(key, proto, signature, limits)  # before decoding anything
    image = request.inputs.get("image") if signature == IMAGE_SIGNATURE else None
    if image is not None and len(image.tensor_shape.dim) == 3:  # its pixels, before decoding
        size = [dim.size for dim in image.tensor_shape.dim[:2]]
        check_pixels(np.array([size]), limits.max_request_pixels, limits.max_aspect_ratio)
    try:
        inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
    except (TypeError, ValueError) as error:
        raise ServingError("INVALID_ARGUMENT", f"malformed input TensorProto ({error})") from error
    outputs = servable.predict(
        signature, inputs, list(request.output_filter), limits, budget, wait_seconds
    )
    response = predict_pb2.PredictResponse()
    response.model_spec.name = spec.name
    response.model_spec.version.value = servable.version
    response.model_spec.signature_name = signature
    for alias, value in outputs.items():
        response.outputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return response


def model_metadata(
    repository: ModelRepository, request
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    spec = request.model_spec
    fields = list(request.metadata_field)
    if not fields:
        raise ServingError(
            "INVALID_ARGUMENT", "GetModelMetadataRequest must specify at least one metadata_field"
        )
    unsupported = [field for field in fields if field != "signature_def"]
    if unsupported:
        raise ServingError("INVALID_ARGUMENT", f"Metadata field {unsupported[0]} is not supported")
    servable = repository.resolve(
        spec.name, spec.version.value if spec.HasField("version") else None
    )
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in servable.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = spec.name
    response.model_spec.version.value = servable.version
    response.metadata["signature_def"].Pack(signature_map)
    return response


def model_status(
    repository: ModelRepository, request, search: SearchService | None = None
) -> get_model_status_pb2.GetModelStatusResponse:
    """AVAILABLE for served versions; END with the load error for versions that failed.

    For the search service's name: its generations (`SearchService.version_status`).
    """
    spec = request.model_spec
    version = spec.version.value if spec.HasField("version") else None
    if search is not None and spec.name == search.name:
        rows = [row for row in search.version_status() if version in (None, row[0])]
        if not rows:
            raise ServingError(
                "NOT_FOUND", f"Could not find version {version} of model {spec.name}"
            )
    else:
        rows = repository.status(spec.name, version)
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, state, code, message in rows:
        status = response.model_version_status.add()
        status.version = number
        status.state = _state_code(state)
        status.status.error_code = grpc.StatusCode[code].value[0]
        status.status.error_message = message
    return response


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(
        self,
        repository: ModelRepository,
        limits: RequestLimits,
        search: SearchService | None,
        budget: PixelBudget | None = None,
    ):
        self.repository = repository
        self.limits = limits
        self.search = search
        self.budget = budget

    def _searches(self, request) -> bool:
        return self.search is not None and request.model_spec.name == self.search.name

    def Predict(self, request, context):  # noqa: N802 (gRPC method name)
        if self._searches(request):
            return _answer(
                context,
                search_api.predict,
                self.search,
                request,
                self.limits,
                context.time_remaining(),
            )
        wait = context.time_remaining()  # the client's deadline, else the budget's own wait
        arguments = (self.repository, request, self.limits, self.budget, wait)
        try:
            return _answer(context, predict, *arguments)
        finally:
            if request.ByteSize() >= TRIM_AFTER_BYTES:
                release_memory_soon()

    def GetModelMetadata(self, request, context):  # noqa: N802
        if self._searches(request):
            return _answer(context, search_api.model_metadata, self.search, request)
        return _answer(context, model_metadata, self.repository, request)


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, repository: ModelRepository, search: SearchService | None):
        self.repository = repository
        self.search = search

    def GetModelStatus(self, request, context):  # noqa: N802
        return _answer(context, model_status, self.repository, request, self.search)


def _answer(context, handler, *arguments):
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:  # waited for a thread past its deadline
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before it ran")
    try:
        return handler(*arguments)
    except ServingError as error:
        context.abort(grpc.StatusCode[error.code], error.message)
    except DelfError as error:  # a user error inside a request (e.g. an undecodable query)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    except Exception as error:  # keep serving: report, do not crash the worker
        logging.exception("internal error")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


class RestApi:
    """TF Serving's REST API over a repository: (method, target, body) -> (status, JSON bytes).

    Every malformed request gets a 4xx with `{"error": ...}`; 500 only for bugs.
    """

    def __init__(
        self,
        repository: ModelRepository,
        limits: RequestLimits,
        search: SearchService | None = None,
        ready=lambda: True,
        budget: PixelBudget | None = None,
    ):
        self.repository = repository
        self.limits = limits
        self.search = search
        self.web = None if search is None else search_api.SearchWeb(search, limits, ready)
        self.budget = budget

    def __call__(self, method: str, target: str, headers: dict[str, str], body: bytes):
        try:
            if method not in ("GET", "POST"):
                return 405, error_body(f"{method} is not allowed; use GET or POST")
            if self.web is not None:
                answer = self.web(method, target, headers, body)
                if answer is not None:
                    return answer
            status, answer = 200, self._answer(method, target, body)
        except ServingError as error:
            status = getattr(error, "http_status", None) or HTTP_STATUS.get(error.code, 500)
            answer = {"error": error.message}
        except DelfError as error:
            status, answer = 400, {"error": str(error)}
        except Exception as error:  # keep serving
            logging.exception("internal error")
            status, answer = 500, {"error": f"{type(error).__name__}: {error}"}
        finally:
            if len(body) >= TRIM_AFTER_BYTES:
                release_memory_soon()
        return status, json.dumps(answer, default=_json_default).encode("utf-8")

    def _answer(self, method: str, target: str, body: bytes):
        match = _REST_PATH.match(target.split("?", 1)[0])
        if match is None:
            raise ServingError("NOT_FOUND", f"malformed request path: {method} {target[:200]}")
        if match["label"]:
            raise ServingError("UNIMPLEMENTED", "version labels are not supported by delf serve")
        action = match["action"] or ""
        allowed = "POST" if action.startswith(":") else "GET"
        if method != allowed:
            raise ServingError("INVALID_ARGUMENT", f"{method} is not allowed on {target[:200]}")
        name = _model_name(match["name"])
        version = None
        if match["version"]:
            version = int(match["version"][:40])
            if len(match["version"]) > 40 or version > INT64_MAX:
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"Failed to convert version: {match['version'][:40]} to numeric.",
                )
        searches = self.search is not None and name == self.search.name
        if action == ":predict" and searches:
            if version is not None and version != self.search.snapshot.generation:
                raise ServingError(
                    "NOT_FOUND", f"Servable not found for request: Specific({name}, {version})"
                )
            return self.web.predict_json(body)
        if action == ":predict":
            return self._predict(name, version, _parse_json(body))
        if action in (":classify", ":regress"):
            raise ServingError("UNIMPLEMENTED", f"{action[1:]} is not supported by delf serve")
        if action == "/metadata":
            request = get_model_metadata_pb2.GetModelMetadataRequest(
                metadata_field=["signature_def"]
            )
            request.model_spec.name = name
            if version is not None:
                request.model_spec.version.value = version
            response = (
                search_api.model_metadata(self.search, request)
                if searches
                else model_metadata(self.repository, request)
            )
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signature_map)
            return {
                "model_spec": {
                    "name": name,
                    "signature_name": "",
                    "version": str(response.model_spec.version.value),
                },
                "metadata": {"signature_def": json_format.MessageToDict(signature_map)},
            }
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        return json_format.MessageToDict(
            model_status(self.repository, request, self.search), preserving_proto_field_name=True
        )

    def _predict(self, name, version, body):
        servable = self.repository.resolve(name, version)
        if not isinstance(body, dict):
            raise ServingError("INVALID_ARGUMENT", "the request body must be a JSON object")
        signature_name = body.get("signature_name") or DEFAULT_SIGNATURE
        if not isinstance(signature_name, str):
            raise ServingError("INVALID_ARGUMENT", "'signature_name' must be a string")
        signature = servable.signature_defs.get(signature_name)
        if signature is None:
            raise ServingError(
                "FAILED_PRECONDITION", f'Serving signature key "{signature_name}" not found.'
            )
        dtypes = {key: tf.as_dtype(info.dtype) for key, info in signature.inputs.items()}
        try:
            inputs, row_format = rest_json.parse_request(body, dtypes)
        except rest_json.JsonTensorError as error:
            raise ServingError("INVALID_ARGUMENT", str(error)) from error
        except RecursionError as error:
            raise ServingError("INVALID_ARGUMENT", "JSON tensor nested too deeply") from error
        outputs = servable.predict(signature_name, inputs, None, self.limits, self.budget)
        try:
            return rest_json.format_response(outputs, row_format)
        except rest_json.JsonTensorError as error:
            raise ServingError("INVALID_ARGUMENT", str(error)) from error


def _model_name(raw: str) -> str:
    """The model name of a REST path: its bytes (the front end reads the request line as
    Latin-1, one character per byte) as UTF-8, percent-escapes decoded as UTF-8 too."""
    try:
        return urllib.parse.unquote(raw.encode("latin-1").decode("utf-8"), errors="strict")
    except UnicodeError as error:
        raise ServingError("INVALID_ARGUMENT", "the model name in the path is not UTF-8") from error


def _parse_json(body: bytes):
    try:
        return json.loads(body)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer too long
        message = " ".join(str(error).split())[:200]
        raise ServingError("INVALID_ARGUMENT", f"JSON Parse error: {message}") from error
    except RecursionError as error:
        raise ServingError("INVALID_ARGUMENT", "JSON Parse error: nested too deeply") from error


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def grpc_options(limits: ServerLimits, extra: dict[str, int | str] | None = None) -> list:
    """gRPC server channel arguments: message size, streams, keepalive, idle and handshake."""
    idle_ms = int(limits.rest_idle_timeout * 1000)
    options = {
        "grpc.max_receive_message_length": limits.max_request_bytes,
        "grpc.max_send_message_length": -1,
        "grpc.so_reuseport": 0,
        "grpc.max_concurrent_streams": limits.grpc_max_concurrent_streams,
        # A TCP connection that never completes the HTTP/2 handshake is closed after this.
        "grpc.server_handshake_timeout_ms": idle_ms,
        # A connection without calls for this long gets a GOAWAY (clients reconnect).
        "grpc.max_connection_idle_ms": max(idle_ms, 10_000),
        # Pings find dead peers; clients may ping at most every 10 s.
        "grpc.keepalive_time_ms": 60_000,
        "grpc.keepalive_timeout_ms": 20_000,
        "grpc.http2.min_ping_interval_without_data_ms": 10_000,
        "grpc.keepalive_permit_without_calls": 1,
    }
    options.update(extra or {})
    return list(options.items())


class LocalServer:
    """gRPC (and optionally REST) front ends over a ModelRepository.

    Ports: an int binds that port, 0 lets the system pick a free one (read it back
    from `grpc_port` / `rest_port` after `start()`), None disables that API.
    `poll_seconds` > 0 rescans the model directories that often (new versions are
    loaded, unselected ones dropped); 0 scans once at start. `limits` bounds
    requests and connections (`ServerLimits`); the keyword arguments below
    override single fields of it. `grpc_arguments` are extra gRPC channel
    arguments (TF Serving's --grpc_channel_arguments).
    """

    def __init__(
        self,
        repository: ModelRepository,
        host: str = "127.0.0.1",
        grpc_port: int | None = 8500,
        rest_port: int | None = 8501,
        max_request_bytes: int | None = None,
        workers: int | None = None,
        poll_seconds: float = 1.0,
        limits: ServerLimits | None = None,
        grpc_arguments: dict[str, int | str] | None = None,
        search: SearchService | None = None,
        **overrides,
    ):
        limits = limits or ServerLimits()
        if max_request_bytes is not None:
            overrides["max_request_bytes"] = max_request_bytes
        if workers is not None:
            overrides["grpc_threads"] = workers
        if "max_batch_size" in overrides:
            batch = overrides.pop("max_batch_size")
            overrides["request"] = dataclasses.replace(limits.request, max_batch_size=batch)
        self.limits = dataclasses.replace(limits, **overrides)
        self.repository = repository
        self.host = host
        self.grpc_port = grpc_port
        self.rest_port = rest_port
        self.poll_seconds = poll_seconds
        self.grpc_arguments = grpc_arguments or {}
        self.search = search
        self._grpc = None
        self._rest: HttpFrontEnd | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def max_request_bytes(self) -> int:
        return self.limits.max_request_bytes

    def start(self) -> LocalServer:
        configure_allocator()  # large blocks go back to the system when freed
        self.repository.refresh()
        limits = self.limits
        budget = PixelBudget(limits.max_server_pixels, wait_seconds=limits.rest_timeout)
        if self.grpc_port is not None:
            self._grpc = grpc.server(
                futures.ThreadPoolExecutor(
                    max_workers=limits.grpc_threads, thread_name_prefix="grpc"
                ),
                options=grpc_options(limits, self.grpc_arguments),
                maximum_concurrent_rpcs=8 * limits.grpc_threads,
            )
            prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
                _PredictionService(self.repository, limits.request, self.search, budget),
                self._grpc,
            )
            model_service_pb2_grpc.add_ModelServiceServicer_to_server(
                _ModelService(self.repository, self.search), self._grpc
            )
            address = f"[{self.host}]" if ":" in self.host else self.host
            port = self._grpc.add_insecure_port(f"{address}:{self.grpc_port}")
            if port == 0:
                raise OSError(f"cannot bind gRPC to {self.host}:{self.grpc_port}")
            self.grpc_port = port
            self._grpc.start()
        if self.rest_port is not None:
            self._rest = HttpFrontEnd(
                self.host,
                self.rest_port,
                RestApi(
                    self.repository,
                    limits.request,
                    self.search,
                    ready=lambda: not self._stopping.is_set(),
                    budget=budget,
                ),
                max_body_bytes=limits.max_request_bytes,
                threads=limits.rest_threads,
                max_connections=limits.rest_max_connections,
                idle_timeout=limits.rest_idle_timeout,
                request_timeout=limits.rest_timeout,
            ).start()
            self.rest_port = self._rest.port
        if self.poll_seconds > 0 and self.repository.sources:
            self._spawn(self._poll, "model-poll")
        if self.search is not None:
            self.search.start()
        return self

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _poll(self) -> None:
        while not self._stopping.wait(self.poll_seconds):
            try:
                self.repository.refresh()
            except Exception:  # keep serving what is loaded
                logging.exception("model refresh failed")

    def stop(self, grace: float | None = None) -> None:
        """Stops accepting requests at once, lets running ones finish for `grace` seconds
        (default: limits.shutdown_grace), then closes everything."""
        grace = self.limits.shutdown_grace if grace is None else grace
        self._stopping.set()
        if self.search is not None:
            self.search.stop()
        stopped = self._grpc.stop(grace) if self._grpc is not None else None  # does not block
        if self._rest is not None:
            self._rest.stop(grace)
            self._rest = None
        if stopped is not None:
            stopped.wait(grace + 5)
            self._grpc = None
        for thread in self._threads:
            thread.join(timeout=max(grace, 1.0))
        self._threads = []

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=min(self.limits.shutdown_grace, 2.0))

    def addresses(self) -> dict[str, str]:
        out = {}
        if self.grpc_port is not None:
            out["grpc"] = f"{self.host}:{self.grpc_port}"
        if self.rest_port is not None:
            out["rest"] = f"{self.host}:{self.rest_port}"
        return out


def serve_until_signalled(server: LocalServer) -> None:
    """Starts `server`, blocks until SIGTERM or SIGINT, then stops it gracefully.

    The first signal starts the graceful stop (`server.limits.shutdown_grace`); the
    handlers are then restored, so a second signal ends the process at once.
    """
    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def on_signal(number, frame):
        stop.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    for sig in signals:
        signal.signal(sig, on_signal)
    try:
        server.start()
        addresses = ", ".join(f"{api} on {where}" for api, where in server.addresses().items())
        if server.search is not None:
            snapshot = server.search.snapshot
            addresses += (
                f"; index {server.search.name!r} generation {snapshot.generation} "
                f"({snapshot.index.num_images} images, ranking {snapshot.default})"
            )
        print(f"delf serve: ready: {addresses}", flush=True)
        while not stop.wait(0.5):
            pass
        print(
            f"delf serve: stopping (running requests get {server.limits.shutdown_grace:g} s)",
            flush=True,
        )
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("delf serve: stopped", flush=True)
