"""Decoded pixels bounded per request and per server, the aspect ratio bounded, and the
allocator settings that give memory back (delf_tf.serving.memory). Small configured
bounds: nothing here allocates more than a few MB; the hostile sizes run in bench/soak.py."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from delf_tf.contract import IMAGE_SIGNATURE
from delf_tf.extraction.image_bytes import header_size
from delf_tf.images import encode_png
from delf_tf.serving.errors import ServingError
from delf_tf.serving.limits import RequestLimits, ServerLimits
from delf_tf.serving.local_server import LocalServer
from delf_tf.serving.memory import (
    PixelBudget,
    configure_allocator,
    header_sizes,
    release_memory,
)
from delf_tf.serving.repository import ModelRepository, ModelSource

SIDE = 64


@pytest.fixture(scope="module")
def small_server(exported_model):
    """Two 64 x 64 images per request at most, an aspect ratio of 8 at most."""
    repository = ModelRepository([ModelSource("delf", exported_model.parent)])
    request = RequestLimits(max_request_pixels=2 * SIDE * SIDE, max_aspect_ratio=8)
    limits = ServerLimits(request=request)
    server = LocalServer(repository, grpc_port=0, rest_port=0, poll_seconds=0, limits=limits)
    server.start()
    yield server
    server.stop()


def _png(height=SIDE, width=SIDE) -> bytes:
    return encode_png(np.full((height, width, 3), 128, np.uint8))


def _rest(server, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://{server.addresses()['rest']}/v1/models/delf:predict",
        data=json.dumps(body).encode(),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _instances(*images: bytes) -> dict:
    return {"instances": [{"b64": base64.b64encode(data).decode()} for data in images]}


def test_pixels_per_request_are_bounded(small_server):
    status, answer = _rest(small_server, _instances(_png(), _png()))
    assert status == 200 and all(row["valid"] for row in answer["predictions"])
    status, answer = _rest(small_server, _instances(_png(), _png(), _png()))
    assert status == 400 and "max_request_pixels" in answer["error"], answer
    # An item the graph would not decode (not an image) costs no pixels.
    status, answer = _rest(small_server, _instances(_png(), _png(), b"not an image"))
    assert status == 200 and [row["valid"] for row in answer["predictions"]] == [1, 1, 0]


def test_aspect_ratio_is_bounded_before_the_model(small_server):
    status, answer = _rest(small_server, _instances(_png(4, 8 * 4 + 1)))
    assert status == 400 and "aspect ratio" in answer["error"], answer
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "delf"
    request.model_spec.signature_name = IMAGE_SIGNATURE
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 100, 3), np.uint8)))
    with grpc.insecure_channel(small_server.addresses()["grpc"]) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "aspect ratio" in caught.value.details()


def test_header_sizes_without_decoding():
    truncated = _png(5, 7)[:20]  # a PNG signature, its IHDR cut
    images = np.array([_png(5, 7), b"garbage", _png(1, 3), truncated], dtype=object)
    sizes = header_sizes(images)
    assert sizes.tolist() == [[5, 7], [0, 0], [1, 3], [0, 0]]
    assert header_size(tf.constant(truncated)).numpy().prod() == 0  # the graph: not sized


def test_server_budget_waits_then_refuses():
    budget = PixelBudget(100, wait_seconds=0.2)
    with budget.hold(80):
        start = time.monotonic()
        with (
            pytest.raises(ServingError, match="max_server_pixels") as caught,
            budget.hold(30),
        ):
            pass
        assert caught.value.code == "RESOURCE_EXHAUSTED" and time.monotonic() - start >= 0.2
    entered = []

    def second():
        with budget.hold(30, wait_seconds=5):
            entered.append(budget.in_use)

    with budget.hold(80):
        worker = threading.Thread(target=second)
        worker.start()
        time.sleep(0.2)
        assert not entered  # waits for the running request
    worker.join(5)
    assert entered == [30] and budget.in_use == 0
    with budget.hold(10**9):  # one request alone always fits (its own bound is per request)
        assert budget.in_use == 100


def test_allocator_settings_apply_on_glibc():
    assert configure_allocator() and isinstance(release_memory(), bool)
