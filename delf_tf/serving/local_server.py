"""A development and CI stand-in for TF Serving: its gRPC and REST APIs in Python.

Not a replacement for TF Serving (no request batching, no GPU scheduling, no
monitoring, no version labels): it lets `delf`'s client, tests and CI talk to
exported models exactly as they would talk to `tensorflow_model_server`.

gRPC: PredictionService.Predict and GetModelMetadata, ModelService.GetModelStatus.
REST: GET /v1/models/<name>[/versions/<v>] (status),
      GET /v1/models/<name>[/versions/<v>]/metadata,
      POST /v1/models/<name>[/versions/<v>]:predict.
Models come from `<model_base_path>/<version>/` (the highest version is served)
or a `--model_config_file`. Requests over `max_request_bytes` are refused;
bad requests get INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION and the
server keeps serving.
"""

from __future__ import annotations

import json
import re
import signal
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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

from delf_tf.serving import rest_json
from delf_tf.serving.errors import HTTP_STATUS, ServingError
from delf_tf.serving.repository import DEFAULT_SIGNATURE, ModelRepository

DEFAULT_MAX_REQUEST_BYTES = 256 << 20
_REST_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<action>/metadata|:predict|:classify|:regress)?/?$"
)


def _state_code(state: str) -> int:
    return get_model_status_pb2.ModelVersionStatus.State.Value(state)


def predict(repository: ModelRepository, request: predict_pb2.PredictRequest):
    """PredictRequest -> PredictResponse (raises ServingError)."""
    spec = request.model_spec
    if spec.version_label:
        raise ServingError("UNIMPLEMENTED", "version labels are not supported by delf serve")
    servable = repository.resolve(
        spec.name, spec.version.value if spec.HasField("version") else None
    )
    try:
        inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
    except (TypeError, ValueError) as error:
        raise ServingError("INVALID_ARGUMENT", f"malformed input TensorProto ({error})") from error
    signature = spec.signature_name or DEFAULT_SIGNATURE
    outputs = servable.predict(signature, inputs, list(request.output_filter))
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
    repository: ModelRepository, request
) -> get_model_status_pb2.GetModelStatusResponse:
    spec = request.model_spec
    version = spec.version.value if spec.HasField("version") else None
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, state, message in repository.status(spec.name, version):
        status = response.model_version_status.add()
        status.version = number
        status.state = _state_code(state)
        status.status.error_code = 0 if not message else 2  # OK / UNKNOWN
        status.status.error_message = message
    return response


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, repository: ModelRepository):
        self.repository = repository

    def Predict(self, request, context):  # noqa: N802 (gRPC method name)
        return _answer(context, predict, self.repository, request)

    def GetModelMetadata(self, request, context):  # noqa: N802
        return _answer(context, model_metadata, self.repository, request)


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, repository: ModelRepository):
        self.repository = repository

    def GetModelStatus(self, request, context):  # noqa: N802
        return _answer(context, model_status, self.repository, request)


def _answer(context, handler, repository, request):
    try:
        return handler(repository, request)
    except ServingError as error:
        context.abort(grpc.StatusCode[error.code], error.message)
    except Exception as error:  # keep serving: report, do not crash the worker
        logging.exception("internal error")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


class _RestHandler(BaseHTTPRequestHandler):
    """TF Serving's REST API over `self.server.repository`."""

    protocol_version = "HTTP/1.1"
    server_version = "delf-serve"

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
        logging.debug("REST %s " + format, self.address_string(), *args)

    def do_GET(self):  # noqa: N802
        self._handle("GET")

    def do_POST(self):  # noqa: N802
        self._handle("POST")

    def _handle(self, method: str) -> None:
        try:
            body = self._read_body() if method == "POST" else None
            match = _REST_PATH.match(self.path.split("?", 1)[0])
            if match is None:
                raise ServingError("NOT_FOUND", f"malformed request path: {method} {self.path}")
            if match["label"]:
                raise ServingError(
                    "UNIMPLEMENTED", "version labels are not supported by delf serve"
                )
            action = match["action"] or ""
            allowed = "POST" if action.startswith(":") else "GET"
            if method != allowed:
                raise ServingError("INVALID_ARGUMENT", f"{method} is not allowed on {self.path}")
            name = match["name"]
            version = int(match["version"]) if match["version"] else None
            if action == ":predict":
                answer = self._predict(name, version, body)
            elif action in (":classify", ":regress"):
                raise ServingError("UNIMPLEMENTED", f"{action[1:]} is not supported by delf serve")
            elif action == "/metadata":
                request = get_model_metadata_pb2.GetModelMetadataRequest(
                    metadata_field=["signature_def"]
                )
                request.model_spec.name = name
                if version is not None:
                    request.model_spec.version.value = version
                response = model_metadata(self.server.repository, request)
                signature_map = get_model_metadata_pb2.SignatureDefMap()
                response.metadata["signature_def"].Unpack(signature_map)
                answer = {
                    "model_spec": {
                        "name": name,
                        "signature_name": "",
                        "version": str(response.model_spec.version.value),
                    },
                    "metadata": {"signature_def": json_format.MessageToDict(signature_map)},
                }
            else:
                request = get_model_status_pb2.GetModelStatusRequest()
                request.model_spec.name = name
                if version is not None:
                    request.model_spec.version.value = version
                answer = json_format.MessageToDict(
                    model_status(self.server.repository, request), preserving_proto_field_name=True
                )
            self._send(200, answer)
        except ServingError as error:
            self._send(HTTP_STATUS.get(error.code, 500), {"error": error.message})
        except Exception as error:  # keep serving
            logging.exception("internal error")
            self._send(500, {"error": f"{type(error).__name__}: {error}"})

    def _read_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise ServingError("INVALID_ARGUMENT", "a POST request needs a Content-Length header")
        length = int(length)
        if length > self.server.max_request_bytes:
            self._discard(length)
            raise ServingError(
                "RESOURCE_EXHAUSTED",
                f"request size {length} bytes is larger than the limit of "
                f"{self.server.max_request_bytes} bytes",
            )
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ServingError("INVALID_ARGUMENT", f"JSON Parse error: {error}") from error

    def _discard(self, length: int) -> None:
        """Reads and drops a refused body (so the client sees the answer), unless it is huge."""
        self.close_connection = True
        if length > 16 * self.server.max_request_bytes:
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                return
            length -= len(chunk)

    def _predict(self, name, version, body):
        servable = self.server.repository.resolve(name, version)
        if not isinstance(body, dict):
            raise ServingError("INVALID_ARGUMENT", "the request body must be a JSON object")
        signature_name = body.get("signature_name") or DEFAULT_SIGNATURE
        signature = servable.signature_defs.get(signature_name)
        if signature is None:
            raise ServingError(
                "FAILED_PRECONDITION", f'Serving signature key "{signature_name}" not found.'
            )
        dtypes = {key: tf.as_dtype(info.dtype) for key, info in signature.inputs.items()}
        try:
            inputs, row_format = rest_json.parse_request(body, dtypes)
            outputs = servable.predict(signature_name, inputs)
            return rest_json.format_response(outputs, row_format)
        except rest_json.JsonTensorError as error:
            raise ServingError("INVALID_ARGUMENT", str(error)) from error

    def _send(self, status: int, answer) -> None:
        data = json.dumps(answer, default=_json_default).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class _RestServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, repository: ModelRepository, max_request_bytes: int):
        super().__init__(address, _RestHandler)
        self.repository = repository
        self.max_request_bytes = max_request_bytes


class LocalServer:
    """gRPC (and optionally REST) front ends over a ModelRepository.

    Ports: an int binds that port, 0 lets the system pick a free one (read it back
    from `grpc_port` / `rest_port` after `start()`), None disables that API.
    `poll_seconds` > 0 rescans the model directories that often (new versions are
    loaded, unselected ones dropped); 0 scans once at start.
    """

    def __init__(
        self,
        repository: ModelRepository,
        host: str = "127.0.0.1",
        grpc_port: int | None = 8500,
        rest_port: int | None = 8501,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        workers: int = 8,
        poll_seconds: float = 1.0,
    ):
        self.repository = repository
        self.host = host
        self.grpc_port = grpc_port
        self.rest_port = rest_port
        self.max_request_bytes = max_request_bytes
        self.workers = workers
        self.poll_seconds = poll_seconds
        self._grpc = None
        self._rest = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> LocalServer:
        self.repository.refresh()
        if self.grpc_port is not None:
            options = [
                ("grpc.max_receive_message_length", self.max_request_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ]
            self._grpc = grpc.server(
                futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="grpc"),
                options=options,
            )
            prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
                _PredictionService(self.repository), self._grpc
            )
            model_service_pb2_grpc.add_ModelServiceServicer_to_server(
                _ModelService(self.repository), self._grpc
            )
            address = f"[{self.host}]" if ":" in self.host else self.host
            port = self._grpc.add_insecure_port(f"{address}:{self.grpc_port}")
            if port == 0:
                raise OSError(f"cannot bind gRPC to {self.host}:{self.grpc_port}")
            self.grpc_port = port
            self._grpc.start()
        if self.rest_port is not None:
            self._rest = _RestServer(
                (self.host, self.rest_port), self.repository, self.max_request_bytes
            )
            self.rest_port = self._rest.server_address[1]
            self._spawn(self._rest.serve_forever, "rest")
        if self.poll_seconds > 0:
            self._spawn(self._poll, "model-poll")
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

    def stop(self, grace: float = 2.0) -> None:
        """Stops accepting requests, lets running ones finish for `grace` seconds."""
        self._stopping.set()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
            self._grpc = None
        if self._rest is not None:
            self._rest.shutdown()
            self._rest.server_close()
            self._rest = None
        for thread in self._threads:
            thread.join(timeout=grace)
        self._threads = []

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def addresses(self) -> dict[str, str]:
        out = {}
        if self.grpc_port is not None:
            out["grpc"] = f"{self.host}:{self.grpc_port}"
        if self.rest_port is not None:
            out["rest"] = f"{self.host}:{self.rest_port}"
        return out


def serve_until_signalled(server: LocalServer) -> None:
    """Starts `server`, blocks until SIGTERM or SIGINT, then stops it cleanly."""
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        server.start()
        addresses = ", ".join(f"{api} on {where}" for api, where in server.addresses().items())
        print(f"delf serve: ready: {addresses}", flush=True)
        while not stop.wait(0.5):
            pass
        print("delf serve: stopping", flush=True)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
