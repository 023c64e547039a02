"""The search service's APIs: TF Serving's Predict (gRPC and REST) and the web routes.

gRPC and REST predict follow `delf_tf.contract` (SEARCH_*): `image_bytes` string [B],
optional `top_k` int32 and `ranking` string -> padded [B, K] results. The dev
server (`local_server`) routes requests for the service's model name here.

REST routes besides /v1/models/<name>[:predict | /metadata]:
  GET  /                  the web page (`search_page`)
  POST /search            the page's query: body = the encoded image; ?top_k=&ranking=;
                          JSON with thumbnails' URLs and the best results' match drawings
  GET  /thumbnail?key=K   JPEG of a collection image the index lists; anything else 404
  GET  /status            `SearchService.status()`: generation, failed reload, queue
  GET  /healthz           200 while the process serves
  GET  /readyz            200 when an index is loaded and the server is not stopping
  GET  /metrics           Prometheus text format
"""

from __future__ import annotations

import json
import time
import urllib.parse

import numpy as np
import tensorflow as tf
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2

from delf_tf.contract import (
    PREDICT_METHOD,
    SEARCH_INPUT,
    SEARCH_OPTIONAL_INPUTS,
    SEARCH_OUTPUT_DTYPES,
    SERVING_SIGNATURE,
)
from delf_tf.images import ImageError
from delf_tf.matching.visualize import draw_matches
from delf_tf.report.html import to_picture
from delf_tf.report.search_page import MATCH_HEIGHT, MATCH_PICTURES
from delf_tf.serving import rest_json
from delf_tf.serving.errors import HTTP_STATUS, ServingError
from delf_tf.serving.limits import RequestLimits
from delf_tf.serving.repository import check_tensor_proto
from delf_tf.serving.search_page import render_page
from delf_tf.serving.search_service import SearchService

HTML_TYPE = "text/html; charset=utf-8"
_INPUT_DTYPES = {SEARCH_INPUT: tf.string, "top_k": tf.int32, "ranking": tf.string}
_DATATYPES = {
    "int64": types_pb2.DT_INT64,
    "int32": types_pb2.DT_INT32,
    "float32": types_pb2.DT_FLOAT,
    "string": types_pb2.DT_STRING,
}


def _scalar(inputs: dict[str, np.ndarray], key: str):
    """One value of an optional input given as a scalar or as [B] equal values."""
    if key not in inputs:
        return None
    values = np.unique(np.asarray(inputs[key]).ravel())
    if values.size != 1:
        raise ServingError(
            "INVALID_ARGUMENT", f"input '{key}': one value per request, got {values.size}"
        )
    value = values[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value.item()


def _images(inputs: dict[str, np.ndarray], limits: RequestLimits) -> list[bytes]:
    unknown = sorted(set(inputs) - set(_INPUT_DTYPES))
    if unknown:
        raise ServingError(
            "INVALID_ARGUMENT",
            f"input tensor alias not found in signature: {unknown[0]}. Inputs expected to be "
            f"in the set {{{','.join(sorted(_INPUT_DTYPES))}}}.",
        )
    if SEARCH_INPUT not in inputs:
        raise ServingError("INVALID_ARGUMENT", f"missing input '{SEARCH_INPUT}' (string [B])")
    images = np.asarray(inputs[SEARCH_INPUT])
    if images.ndim != 1 or images.dtype != object:
        raise ServingError(
            "INVALID_ARGUMENT",
            f"input '{SEARCH_INPUT}': expected string [B], got {images.dtype} {list(images.shape)}",
        )
    if len(images) > limits.max_batch_size:
        raise ServingError(
            "INVALID_ARGUMENT",
            f"batch size {len(images)} of input '{SEARCH_INPUT}' is over the server's "
            f"max_batch_size of {limits.max_batch_size}",
        )
    return [bytes(value) for value in images]


def search_arrays(
    service: SearchService,
    inputs: dict[str, np.ndarray],
    limits: RequestLimits,
    api: str,
    timeout: float | None = None,
) -> dict[str, np.ndarray]:
    """Predict inputs -> outputs (`contract.SEARCH_OUTPUTS`); raises ServingError."""
    images = _images(inputs, limits)
    top_k = _scalar(inputs, "top_k")
    top_k = None if top_k is None else int(top_k)
    answers = service.search_batch(
        images, top_k, _scalar(inputs, "ranking"), api=api, timeout=timeout
    )
    return service.outputs(answers, top_k or service.config.top_k)


def predict(
    service: SearchService,
    request: predict_pb2.PredictRequest,
    limits: RequestLimits,
    timeout: float | None = None,
) -> predict_pb2.PredictResponse:
    """gRPC PredictRequest for the service's model name -> PredictResponse."""
    spec = request.model_spec
    _check_spec(
        service, spec.signature_name, spec.version.value if spec.HasField("version") else None
    )
    for key, proto in request.inputs.items():
        check_tensor_proto(key, proto, SERVING_SIGNATURE, limits)
    try:
        inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
    except (TypeError, ValueError) as error:
        raise ServingError("INVALID_ARGUMENT", f"malformed input TensorProto ({error})") from error
    outputs = search_arrays(service, inputs, limits, "grpc", timeout)
    response = predict_pb2.PredictResponse()
    response.model_spec.name = spec.name
    response.model_spec.version.value = int(outputs["generation"][0])
    response.model_spec.signature_name = SERVING_SIGNATURE
    wanted = set(request.output_filter) or set(outputs)
    for alias, value in outputs.items():
        if alias in wanted:
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return response


def _check_spec(service: SearchService, signature: str, version: int | None) -> None:
    if signature and signature != SERVING_SIGNATURE:
        raise ServingError("FAILED_PRECONDITION", f'Serving signature key "{signature}" not found.')
    if version is not None and version != service.snapshot.generation:
        raise ServingError(
            "NOT_FOUND",
            f"Servable not found for request: Specific({service.name}, {version}); the index "
            f"serves generation {service.snapshot.generation}",
        )


def signature_def() -> meta_graph_pb2.SignatureDef:
    """The search's SignatureDef, as GetModelMetadata reports it."""
    signature = meta_graph_pb2.SignatureDef(method_name=PREDICT_METHOD)

    def info(name: str, dtype: str, dims: list[int]) -> meta_graph_pb2.TensorInfo:
        shape = tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in dims]
        )
        return meta_graph_pb2.TensorInfo(name=name, dtype=_DATATYPES[dtype], tensor_shape=shape)

    signature.inputs[SEARCH_INPUT].CopyFrom(info(SEARCH_INPUT, "string", [-1]))
    for name, dtype in SEARCH_OPTIONAL_INPUTS.items():
        signature.inputs[name].CopyFrom(info(name, dtype, []))
    for name, dtype in SEARCH_OUTPUT_DTYPES.items():
        dims = [-1] if name in ("num_results", "generation") else [-1, -1]
        signature.outputs[name].CopyFrom(info(name, dtype, dims))
    return signature


def model_metadata(service: SearchService, request):
    """GetModelMetadata for the service's model name (signature_def only)."""
    fields = list(request.metadata_field)
    if fields != ["signature_def"]:
        raise ServingError("INVALID_ARGUMENT", "only the signature_def metadata field is supported")
    spec = request.model_spec
    _check_spec(service, "", spec.version.value if spec.HasField("version") else None)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    signature_map.signature_def[SERVING_SIGNATURE].CopyFrom(signature_def())
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = service.name
    response.model_spec.version.value = service.snapshot.generation
    response.metadata["signature_def"].Pack(signature_map)
    return response


class SearchWeb:
    """REST handler of the service's own routes (see the module docstring).

    `__call__(method, target, headers, body)` returns (status, bytes, content type), or
    None for a target it does not own (the dev server's RestApi answers those).
    """

    def __init__(self, service: SearchService, limits: RequestLimits, ready=lambda: True):
        self.service = service
        self.limits = limits
        self.ready = ready

    def __call__(self, method: str, target: str, headers: dict[str, str], body: bytes):
        parts = urllib.parse.urlsplit(target)
        path, query = parts.path, urllib.parse.parse_qs(parts.query)
        routes = {
            ("GET", "/"): self._page,
            ("POST", "/search"): self._search,
            ("GET", "/thumbnail"): self._thumbnail,
            ("GET", "/status"): self._status,
            ("GET", "/healthz"): lambda q, b: _json(200, {"status": "ok"}),
            ("GET", "/readyz"): self._readyz,
            ("GET", "/metrics"): self._metrics,
        }
        route = routes.get((method, path))
        if route is None:
            if path.startswith("/v1/"):
                return None
            if any(path == known for _, known in routes):
                return _json(405, {"error": f"{method} is not allowed on {path}"})
            return _json(404, {"error": "not found"})
        try:
            return route(query, body)
        except ServingError as error:
            status = getattr(error, "http_status", None) or HTTP_STATUS.get(error.code, 500)
            return _json(status, {"error": error.message})

    def predict_json(self, body: bytes) -> dict:
        """POST /v1/models/<name>:predict with TF Serving's JSON (instances or inputs)."""
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise ServingError("INVALID_ARGUMENT", f"JSON Parse error: {error}") from error
        if not isinstance(request, dict):
            raise ServingError("INVALID_ARGUMENT", "the request body must be a JSON object")
        if request.get("signature_name") not in (None, "", SERVING_SIGNATURE):
            raise ServingError(
                "FAILED_PRECONDITION",
                f'Serving signature key "{str(request["signature_name"])[:60]}" not found.',
            )
        request.pop("signature_name", None)
        instances = request.get("instances")
        plain = isinstance(instances, list) and not (
            instances and isinstance(instances[0], dict) and "b64" not in instances[0]
        )  # a list of images: the row format with image_bytes as its only input
        dtypes = {SEARCH_INPUT: tf.string} if plain else _INPUT_DTYPES
        try:
            inputs, row_format = rest_json.parse_request(request, dtypes)
        except rest_json.JsonTensorError as error:
            raise ServingError("INVALID_ARGUMENT", str(error)) from error
        except RecursionError as error:
            raise ServingError("INVALID_ARGUMENT", "JSON tensor nested too deeply") from error
        outputs = search_arrays(self.service, inputs, self.limits, "rest")
        return rest_json.format_response(outputs, row_format)

    def _page(self, query, body):
        snapshot = self.service.snapshot
        page = render_page(
            self.service.name,
            snapshot.index.num_images,
            snapshot.generation,
            self.service.config.top_k,
        )
        return 200, page, HTML_TYPE

    def _search(self, query, body):
        start = time.perf_counter()
        top_k = _query_int(query, "top_k")
        ranking = (query.get("ranking") or [None])[0]
        (answer,) = self.service.search_batch([body], top_k, ranking, api="page")
        results = []
        for rank, result in enumerate(answer.results, start=1):
            entry = {
                "rank": rank,
                "image_id": result.image_id,
                "key": result.key,
                "score": float(result.score),
                "inliers": result.inliers,
                "votes": result.votes,
                "thumbnail": "thumbnail?key=" + urllib.parse.quote(result.key, safe=""),
                "matches": None,
            }
            if rank <= MATCH_PICTURES and result.inliers > 0:
                entry["matches"] = _drawing(answer.image, result, rank)
            results.append(entry)
        return _json(
            200,
            {
                "generation": answer.snapshot.generation,
                "images": answer.snapshot.index.num_images,
                "ranking": answer.method,
                "query_features": answer.num_features,
                "stages": answer.stages,
                "seconds": time.perf_counter() - start,
                "results": results,
            },
        )

    def _thumbnail(self, query, body):
        keys = query.get("key") or []
        if len(keys) != 1:
            raise ServingError("NOT_FOUND", "not an image of the index")
        return 200, self.service.thumbnail(keys[0]), "image/jpeg"

    def _status(self, query, body):
        return _json(200, self.service.status())

    def _readyz(self, query, body):
        ready = self.ready() and self.service.ready()
        return _json(200 if ready else 503, {"ready": ready})

    def _metrics(self, query, body):
        return 200, generate_latest(self.service.metrics.registry), CONTENT_TYPE_LATEST


def _drawing(query_image: np.ndarray, result, rank: int) -> str | None:
    from delf_tf.images import load_image

    try:
        database_image = load_image(result.path)
    except (ImageError, OSError):
        return None
    picture = draw_matches(
        query_image,
        database_image,
        result.matches.query_points,
        result.matches.database_points,
        result.verification.inliers,
        height=MATCH_HEIGHT,
        caption=f"#{rank} {result.key}: {result.inliers} inliers",
    )
    return to_picture(picture, long_side=None, kind="JPEG", quality=85).uri


def _query_int(query: dict[str, list[str]], key: str) -> int | None:
    values = query.get(key) or []
    if not values or not values[0]:
        return None
    try:
        return int(values[0])
    except ValueError as error:
        raise ServingError("INVALID_ARGUMENT", f"{key}: not an integer") from error


def _json(status: int, value) -> tuple[int, bytes, str]:
    return status, json.dumps(value).encode("utf-8"), "application/json"
