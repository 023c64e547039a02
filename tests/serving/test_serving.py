"""ServingExtractor against `delf serve` (LocalServer) over gRPC and REST, and every error case."""

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from conftest import free_port, start_serve_process
from google.protobuf import text_format
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from delf_tf.cli import main
from delf_tf.features import FeatureStore
from delf_tf.images import encode_png
from delf_tf.serving.client import ServingExtractor
from delf_tf.serving.errors import (
    DeadlineExceededError,
    ImageTooLargeError,
    InvalidImageError,
    ModelNotFoundError,
    ServedModelChangedError,
    ServerUnavailableError,
    ServingError,
    SignatureError,
)
from delf_tf.serving.local_server import LocalServer
from delf_tf.serving.repository import ModelSource, sources_from_config_file

REPO = Path(__file__).resolve().parents[2]
PROTOCOLS = ["grpc", "rest"]


def client(server, protocol, **options):
    return ServingExtractor(server.addresses()[protocol], protocol=protocol, **options)


@pytest.fixture(scope="module")
def mixed_images(astronaut_small):
    return [astronaut_small, astronaut_small[10:74, :96], astronaut_small[:100, 30:100]]


def assert_same(features, expected):
    assert len(features) == len(expected)
    np.testing.assert_allclose(features.keypoints, expected.keypoints, atol=1e-3)
    np.testing.assert_allclose(features.scales, expected.scales, rtol=1e-6)
    np.testing.assert_allclose(features.scores, expected.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(features.descriptors, expected.descriptors, atol=1e-5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_batch_of_mixed_sizes_matches_in_process(
    local_server, serving_reference, mixed_images, protocol
):
    extractor = client(local_server, protocol, batch_size=2)  # two requests: 2 + 1 images
    results = extractor.extract_batch(mixed_images)
    for features, image in zip(results, mixed_images, strict=True):
        assert_same(features, serving_reference.extract(image))
    assert extractor.fingerprint == serving_reference.fingerprint
    single = extractor.extract_bytes(encode_png(mixed_images[1]))
    assert_same(single, serving_reference.extract(mixed_images[1]))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_extract_image_signature_with_overrides(
    local_server, serving_reference, mixed_images, protocol
):
    extractor = client(local_server, protocol, signature="extract_image")
    image = mixed_images[2]
    assert_same(extractor.extract(image), serving_reference.extract(image))
    assert_same(
        extractor.extract(image, max_features=7, scales=(1.0,)),
        serving_reference.extract(image, max_features=7, scales=(1.0,)),
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_status_metadata_and_describe(local_server, serving_reference, protocol):
    extractor = client(local_server, protocol)
    assert extractor.model_status() == [
        {"version": 1, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}
    ]
    signatures = extractor.model_metadata()
    assert sorted(signatures) == ["extract_image", "serving_default"]
    assert signatures["serving_default"].method_name == "tensorflow/serving/predict"
    assert sorted(signatures["extract_image"].defaults) == [
        "max_features",
        "scales",
        "score_threshold",
    ]
    description = extractor.describe()
    assert description["fingerprint"] == serving_reference.fingerprint
    assert description["backend"] == f"tf-serving {protocol}"


def test_concurrent_clients(local_server, serving_reference, mixed_images):
    extractor = client(local_server, "grpc")
    results = [None] * 4

    def work(i):
        results[i] = extractor.extract(mixed_images[i % 3])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, features in enumerate(results):
        assert_same(features, serving_reference.extract(mixed_images[i % 3]))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_corrupt_image_named_by_index(local_server, mixed_images, protocol):
    extractor = client(local_server, protocol)
    batch = [mixed_images[0], b"\x89PNG\r\n\x1a\n but cut short", mixed_images[1]]
    with pytest.raises(InvalidImageError, match=r"image\(s\) \[1\] of 3"):
        extractor.extract_batch(batch)
    results = extractor.extract_batch(batch, skip_invalid=True)
    assert results[1] is None and len(results[0]) == 50 and len(results[2]) > 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_server(protocol):
    extractor = ServingExtractor(
        f"127.0.0.1:{free_port()}", protocol=protocol, retries=2, backoff=0.01, timeout=5
    )
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="after 3 attempt"):
        extractor.model_status()
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_missing_model_version_and_signature(local_server, mixed_images, protocol):
    with pytest.raises(ModelNotFoundError, match=r"Latest\(nope\)"):
        client(local_server, protocol, model_name="nope").extract(mixed_images[0])
    with pytest.raises(ModelNotFoundError, match=r"99"):
        client(local_server, protocol, version=99).model_status()
    with pytest.raises(ModelNotFoundError):
        client(local_server, protocol, version=99).extract(mixed_images[0])
    extractor = client(local_server, protocol)
    with pytest.raises(SignatureError, match="not found"):
        extractor._predict("no_such_signature", {"image_bytes": np.array([b""], dtype=object)})
    assert len(extractor.extract(mixed_images[0])) == 50  # still serving


def test_bad_inputs_get_invalid_argument_and_server_keeps_serving(local_server, mixed_images):
    channel = grpc.insecure_channel(local_server.addresses()["grpc"])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def call(signature, **inputs):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "delf"
        request.model_spec.signature_name = signature
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(request, timeout=30)
        return caught.value

    bad = [
        call("serving_default", image_bytes=np.array([1.0, 2.0], np.float32)),  # dtype
        call("serving_default", image_bytes=np.array([[b"a"]], dtype=object)),  # shape
        call("serving_default", pixels=np.array([b"a"], dtype=object)),  # unknown alias
        call("extract_image", image=np.zeros((4, 4), np.uint8)),  # shape
        call("extract_image", max_features=np.int32(5)),  # required input missing
    ]
    assert {error.code() for error in bad} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert "expects string" in bad[0].details() and "expects shape" in bad[1].details()
    unknown = call("serving_default")
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
    rest = local_server.addresses()["rest"]
    for path, body, status in [
        ("/v1/models/delf:predict", b"{not json", 400),
        ("/v1/models/delf:predict", b'{"instances": [1.5]}', 400),
        ("/v1/models/delf:predict", b'{"instances": [{"b64": "@@@"}]}', 400),
        ("/v1/models/nope:predict", b'{"instances": []}', 404),
        ("/v1/models/delf/versions/7:predict", b'{"instances": []}', 404),
        ("/v2/whatever", b"{}", 404),
    ]:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://{rest}{path}", data=body, timeout=30)
        assert caught.value.code == status, path
        assert "error" in json.loads(caught.value.read())
    assert len(client(local_server, "rest").extract(mixed_images[0])) == 50


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_deadline_exceeded_is_not_retried(local_server, mixed_images, protocol):
    extractor = client(local_server, protocol, timeout=0.001, retries=3, backoff=5.0)
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        extractor.extract(mixed_images[0])
    assert time.monotonic() - start < 5, "no backoff: only UNAVAILABLE is retried"


def test_retries_only_unavailable():
    extractor = ServingExtractor("127.0.0.1:1", retries=2, backoff=0.001)
    calls = []

    def flaky(timeout):
        calls.append(timeout)
        if len(calls) < 3:
            raise ServerUnavailableError("UNAVAILABLE", "starting")
        return "answer"

    assert extractor._with_retries(flaky) == "answer" and len(calls) == 3

    def invalid(timeout):
        calls.append(timeout)
        raise ServingError("INVALID_ARGUMENT", "bad")

    calls.clear()
    with pytest.raises(ServingError, match="bad"):
        extractor._with_retries(invalid)
    assert len(calls) == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_images_over_size_limits(local_server, mixed_images, protocol):
    with pytest.raises(ImageTooLargeError, match="image 1: .* over the client's limit"):
        client(local_server, protocol, max_image_bytes=2000).extract_batch(
            [b"\xff\xd8\xff", mixed_images[0]]
        )
    # The same models behind a second front end that takes at most 4 kB per request.
    small = LocalServer(
        local_server.repository, grpc_port=0, rest_port=0, max_request_bytes=4000, poll_seconds=0
    )
    with small:
        with pytest.raises(ImageTooLargeError):
            client(small, protocol).extract(mixed_images[0])
        assert len(client(small, protocol).extract(mixed_images[0][:16, :16])) > 0


def test_fingerprint_mismatch(local_server, mixed_images):
    extractor = client(local_server, "grpc")
    extractor._fingerprint = "0" * 64  # as if another model had answered before
    with pytest.raises(ServedModelChangedError, match="different model"):
        extractor.extract(mixed_images[0])


def test_delf_extract_through_server(
    local_server, serving_reference, astronaut_small, tmp_path, capsys
):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encode_png(astronaut_small))
    server = f"--server={local_server.addresses()['rest']}"
    out = tmp_path / "store"
    argv = [
        "delf",
        "extract",
        f"--images={images}",
        f"--output_dir={out}",
        server,
        "--protocol=rest",
    ]
    assert main(argv) == 0
    store = FeatureStore.open(out)
    assert store.fingerprint == serving_reference.fingerprint
    assert_same(store.load("a.png"), serving_reference.extract(astronaut_small))
    assert main(argv + ["--max_features=5"]) == 1
    assert "--server uses the served model and its settings; drop" in capsys.readouterr().err


def test_deployment_configs_parse():
    sources = sources_from_config_file(REPO / "serving" / "models.config")
    assert sources == [ModelSource("delf", Path("/models/delf"), "latest", 1, ())]
    assert ModelSource("m", Path("."), "latest", 2).select([3, 1, 10]) == [3, 10]
    assert ModelSource("m", Path("."), "specific", versions=(1, 7)).select([1, 2]) == [1]
    text_format.Parse((REPO / "serving" / "batching.config").read_text(), batching_parameters())
    compose = (REPO / "serving" / "docker-compose.yml").read_text()
    for needle in ("tensorflow/serving", "8500:8500", "8501:8501", "/models", "models.config"):
        assert needle in compose


def batching_parameters():
    """TF Serving's BatchingParameters message (session_bundle_config.proto), built here
    because the pip package tensorflow-serving-api does not ship it."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    fields = [
        ("max_batch_size", 1, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", 2, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", 3, ".google.protobuf.Int64Value"),
        ("num_batch_threads", 4, ".google.protobuf.Int64Value"),
        ("thread_pool_name", 5, ".google.protobuf.StringValue"),
    ]
    file = descriptor_pb2.FileDescriptorProto(
        name="batching_test.proto", package="test", dependency=["google/protobuf/wrappers.proto"]
    )
    message = file.message_type.add(name="BatchingParameters")
    for name, number, type_name in fields:
        message.field.add(name=name, number=number, type=11, type_name=type_name, label=1)
    message.field.add(name="allowed_batch_sizes", number=6, type=3, label=3)
    message.field.add(name="pad_variable_length_inputs", number=7, type=8, label=1)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(file)
    descriptor = pool.FindMessageTypeByName("test.BatchingParameters")
    return message_factory.GetMessageClass(descriptor)()


def test_delf_serve_subprocess_stops_cleanly_on_sigterm(exported_model, tmp_path):
    grpc_port, rest_port = free_port(), free_port()
    program = ["-m", "delf_tf.cli"]
    process, lines = start_serve_process(program, exported_model.parent, grpc_port, rest_port)
    try:
        assert "ready" in lines[-1], "".join(lines[-20:])
        assert f"127.0.0.1:{grpc_port}" in lines[-1] and f"127.0.0.1:{rest_port}" in lines[-1]
        with urllib.request.urlopen(
            f"http://127.0.0.1:{rest_port}/v1/models/delf", timeout=30
        ) as r:
            status = json.loads(r.read())
        assert status["model_version_status"][0]["state"] == "AVAILABLE"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "stopping" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_search_service_extracts_queries_on_the_model_server(
    local_server, serving_reference, tmp_path
):
    """`delf serve --index --server=...`: query features from TF Serving / `delf serve`."""
    import skimage.data
    from PIL import Image

    from delf_tf.extraction.folder import extract_to_store
    from delf_tf.retrieval import Index
    from delf_tf.retrieval.queries import rotated
    from delf_tf.serving.search_service import SearchService

    folder = tmp_path / "photos"
    folder.mkdir()
    pictures = {}
    for name in ("astronaut", "coffee", "chelsea"):
        picture = Image.fromarray(np.asarray(getattr(skimage.data, name)())[:, :, :3])
        picture.thumbnail((128, 128))
        picture.save(folder / f"{name}.png")
        pictures[name] = np.asarray(picture)
    store, _ = extract_to_store(serving_reference, folder, tmp_path / "features", False)
    Index.from_store(store, folder, progress=False).save(tmp_path / "index")
    extractor = ServingExtractor(local_server.addresses()["grpc"])
    service = SearchService(tmp_path / "index", extractor, poll_seconds=0)
    query = encode_png(rotated(pictures["astronaut"], 15))
    (answer,) = service.search_batch([query], top_k=2)
    assert [result.key for result in answer.results][0] == "astronaut.png"
    assert answer.stages["extract"] > 0
    extractor.close()
