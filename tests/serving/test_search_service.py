"""The search service (`delf serve --index`): gRPC and REST end to end, the web page in
Chromium, bounds, hot reload under load, a failing reload, and refusal on a fingerprint
mismatch. One index of scikit-image photographs and one server for the module.

The query is a transformed copy (rotated) of a collection image, not itself in the
collection; its source must come first. The tests that change the index directory run
last, in file order.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import numpy as np
import pytest
import skimage.data
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from delf_tf.atomic import staged_directory
from delf_tf.config import RetrievalConfig
from delf_tf.contract import SEARCH_OUTPUTS
from delf_tf.extraction.folder import extract_to_store
from delf_tf.images import load_image
from delf_tf.retrieval import Index
from delf_tf.retrieval.index import read_generation
from delf_tf.retrieval.queries import rotated
from delf_tf.serving.limits import SearchLimits
from delf_tf.serving.local_server import LocalServer
from delf_tf.serving.repository import ModelRepository
from delf_tf.serving.search_client import SearchClient
from delf_tf.serving.search_service import SearchService

COLLECTION = ("astronaut", "coffee", "chelsea", "coins", "camera")
ADDED = "rocket"  # only in the index after the reload
SOURCE = "astronaut"  # the query is a rotated copy of it
SIZE = 160


def _save_photo(name: str, path) -> None:
    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    picture = Image.fromarray(image[:, :, :3])
    factor = SIZE / max(picture.size)
    picture.resize((round(picture.width * factor), round(picture.height * factor))).save(path)


@pytest.fixture(scope="module")
def collection(extractor, tmp_path_factory):
    """(images folder, feature store folder, index directory, query file, added-image query)."""
    root = tmp_path_factory.mktemp("search_service")
    images = root / "images"
    images.mkdir()
    for name in COLLECTION:
        _save_photo(name, images / f"{name}.png")
    store, _ = extract_to_store(extractor, images, root / "features", progress=False)
    Index.from_store(store, images, progress=False).save(root / "index")
    queries = root / "queries"
    queries.mkdir()
    query = queries / "query.png"
    Image.fromarray(rotated(load_image(images / f"{SOURCE}.png"))).save(query)
    _save_photo(ADDED, root / f"{ADDED}.png")  # outside the folder until the reload test
    added_query = queries / "added_query.png"
    Image.fromarray(rotated(load_image(root / f"{ADDED}.png"))).save(added_query)
    return images, root / "features", root / "index", query, added_query


@pytest.fixture(scope="module")
def server(extractor, collection):
    """The search service (top_k 3, polling every 0.1 s) on free loopback ports."""
    service = SearchService(collection[2], extractor, RetrievalConfig(top_k=3), poll_seconds=0.1)
    local = LocalServer(
        ModelRepository([]), grpc_port=0, rest_port=0, poll_seconds=0, search=service
    ).start()
    yield local
    local.stop(grace=1.0)


def rest(server, path: str, body: bytes | None = None, content_type="application/json"):
    """(status, content type, body bytes) of a REST request to the server."""
    request = urllib.request.Request(
        f"http://{server.addresses()['rest']}{path}",
        data=body,
        headers={"Content-Type": content_type} if body is not None else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def test_raw_grpc_stub_ranks_the_planted_match_first(server, collection):
    query = collection[3].read_bytes()
    other = (collection[0] / "coffee.png").read_bytes()
    channel = grpc.insecure_channel(server.addresses()["grpc"])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "index"
    request.inputs["image_bytes"].CopyFrom(
        tf.make_tensor_proto(np.array([query, other], dtype=object))
    )
    request.inputs["top_k"].CopyFrom(tf.make_tensor_proto(np.int32(2)))
    response = stub.Predict(request, timeout=60)
    outputs = {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}
    assert outputs["keys"].shape == (2, 2) and outputs["inliers"].dtype == np.int32
    assert outputs["keys"][0, 0] == f"{SOURCE}.png".encode()
    assert outputs["keys"][1, 0] == b"coffee.png"
    assert outputs["inliers"][0, 0] > outputs["inliers"][0, 1]
    assert list(outputs["num_results"]) == [2, 2]
    assert response.model_spec.version.value == server.search.snapshot.generation
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "index"}), timeout=10
    )
    assert status.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    metadata = stub.GetModelMetadata(
        get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec={"name": "index"}, metadata_field=["signature_def"]
        ),
        timeout=10,
    )
    signatures = get_model_metadata_pb2.SignatureDefMap()
    metadata.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert set(signature.inputs) == {"image_bytes", "top_k", "ranking"}
    assert set(signature.outputs) == set(SEARCH_OUTPUTS)
    bad = predict_pb2.PredictRequest()
    bad.model_spec.name = "index"
    bad.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(np.array([b"not an image"], object)))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(bad, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_bytes[0]" in raised.value.details()
    channel.close()


def test_rest_predict_in_tf_serving_json(server, collection):
    encoded = base64.b64encode(collection[3].read_bytes()).decode()
    status, _, body = rest(
        server, "/v1/models/index:predict", json.dumps({"instances": [{"b64": encoded}]}).encode()
    )
    assert status == 200, body
    (prediction,) = json.loads(body)["predictions"]
    assert prediction["keys"][0] == f"{SOURCE}.png" and len(prediction["keys"]) == 3
    columnar = {"inputs": {"image_bytes": [{"b64": encoded}], "top_k": 1, "ranking": "votes"}}
    status, _, body = rest(server, "/v1/models/index:predict", json.dumps(columnar).encode())
    assert status == 200, body
    assert json.loads(body)["outputs"]["keys"] == [[f"{SOURCE}.png"]]
    status, _, body = rest(
        server, "/v1/models/index:predict", json.dumps({"inputs": {"top_k": 1}}).encode()
    )
    assert status == 400 and "image_bytes" in json.loads(body)["error"]


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_search_client(server, collection, protocol):
    with SearchClient(server.addresses()[protocol], protocol=protocol) as client:
        reply = client.search(collection[3], top_k=2)
        assert reply.generation == server.search.snapshot.generation
        assert [hit.key for hit in reply.hits][0] == f"{SOURCE}.png"
        assert reply.hits[0].inliers > reply.hits[1].inliers
        assert client.status()  # the model status of the index


def test_thumbnails_only_for_files_the_index_lists(server):
    status, kind, body = rest(server, "/thumbnail?key=" + urllib.parse.quote(f"{SOURCE}.png"))
    assert status == 200 and kind == "image/jpeg" and body[:2] == b"\xff\xd8"
    for path in (
        "/thumbnail?key=../index/index.json",
        "/thumbnail?key=/etc/passwd",
        "/thumbnail",
        "/etc/passwd",
        "/images/astronaut.png",
    ):
        assert rest(server, path)[0] == 404, path


def test_operations_endpoints(server):
    assert rest(server, "/healthz")[0] == 200
    assert rest(server, "/readyz")[0] == 200
    status, kind, body = rest(server, "/metrics")
    text = body.decode()
    assert status == 200 and kind.startswith("text/plain")
    assert 'delf_search_stage_seconds_count{stage="extract"}' in text
    assert "delf_search_index_images 5.0" in text
    assert 'delf_search_requests_total{api="grpc"}' in text
    status, _, body = rest(server, "/status")
    report = json.loads(body)
    assert status == 200 and report["images"] == 5 and report["failed_reload"] is None


def test_full_queue_is_refused_at_once(extractor, collection):
    """One search running, none may wait: the next gets RESOURCE_EXHAUSTED / HTTP 503."""
    started, release = threading.Event(), threading.Event()

    class Blocking:
        fingerprint = extractor.fingerprint

        def extract(self, image):
            started.set()
            release.wait(30)
            return extractor.extract(image)

    service = SearchService(
        collection[2],
        Blocking(),
        limits=SearchLimits(max_concurrent=1, max_queued=0),
        poll_seconds=0,
    )
    query = collection[3].read_bytes()
    with LocalServer(ModelRepository([]), grpc_port=0, rest_port=0, search=service) as local:
        client = SearchClient(local.addresses()["grpc"])
        running = threading.Thread(target=client.search, args=(query,))
        running.start()
        try:
            assert started.wait(30)
            with pytest.raises(Exception) as raised:
                client.search(query)
            assert raised.value.code == "RESOURCE_EXHAUSTED"
            body = json.dumps({"instances": [{"b64": base64.b64encode(query).decode()}]})
            assert rest(local, "/v1/models/index:predict", body.encode())[0] == 503
        finally:
            release.set()
            running.join(30)
        assert client.search(query).hits[0].key == f"{SOURCE}.png"
        client.close()


def chromium_driver():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        message = "Chromium and chromedriver are not installed (`make test` installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI runs the page tests: .ci/run installs both
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def test_web_page_in_chromium(server, collection):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium_driver()
    try:
        browser.get(f"http://{server.addresses()['rest']}/")
        wait = WebDriverWait(browser, 60)
        wait.until(
            lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready"
        )
        browser.find_element(By.ID, "file").send_keys(str(collection[3]))
        wait.until(
            lambda b: (
                b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
            )
        )
        status = browser.find_element(By.ID, "status").text
        cards = browser.find_elements(By.CSS_SELECTOR, "#results figure.result")
        assert cards, status
        assert cards[0].get_attribute("data-key") == f"{SOURCE}.png", status
        assert cards[0].get_attribute("data-rank") == "1"
        assert "inliers" in cards[0].text
        wait.until(
            lambda b: b.execute_script(
                "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
            )
        )
        drawings = browser.find_elements(By.CSS_SELECTOR, "#matches img")
        assert drawings and drawings[0].get_attribute("src").startswith("data:image/jpeg")
        problems = [
            entry["message"]
            for entry in browser.get_log("browser")
            if entry["level"] in ("SEVERE", "WARNING") and "favicon" not in entry["message"]
        ]
        assert not problems, problems
    finally:
        browser.quit()


def test_refuses_to_start_on_fingerprint_mismatch(collection, model_config_file, capsys):
    from delf_tf.cli import main

    code = main(
        [
            "delf",
            "serve",
            f"--index={collection[2]}",
            f"--model_config={model_config_file}",
            "--seed=1",
            "--port=0",
            "--rest_api_port=0",
        ]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert lines[-1].startswith("delf serve: error: ") and "extractor" in lines[-1]


def test_delf_serve_index_command_and_sigterm(collection, model_config_file):
    """The command itself: ready line, a REST search, SIGTERM -> graceful exit 0."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port

    repo = Path(__file__).resolve().parents[2]
    rest_port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "delf_tf.cli", "serve", f"--index={collection[2]}"]
        + [f"--model_config={model_config_file}", "--score_threshold=0", "--max_features=200"]
        + ["--max_image_size=-1", f"--port={free_port()}", f"--rest_api_port={rest_port}"]
        + ["--shutdown_grace_seconds=2"],
        env={**os.environ, "PYTHONPATH": str(repo), "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "delf serve: ready" in line:
                break
        assert "index 'index' generation" in lines[-1], lines
        with SearchClient(f"127.0.0.1:{rest_port}", protocol="rest") as client:
            reply = client.search(collection[3], top_k=2)
        assert reply.hits and reply.hits[0].key == f"{SOURCE}.png", reply
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert "delf serve: stopped" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- these change the index directory: they run last -------------------------------------


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_missing_directory_mid_swap_keeps_serving(server, collection):
    """Between the two renames of `Index.save` the directory does not exist."""
    directory = collection[2]
    moved = directory.with_name("index-elsewhere")
    before = server.search.snapshot.generation
    os.rename(directory, moved)
    try:
        assert server.search.reload() == "missing"
        with SearchClient(server.addresses()["grpc"]) as client:
            reply = client.search(collection[3])
        assert reply.generation == before and reply.hits[0].key == f"{SOURCE}.png"
        assert rest(server, "/readyz")[0] == 200
    finally:
        os.rename(moved, directory)
    assert server.search.reload() == "unchanged"


def test_failing_new_index_keeps_the_old_one_serving(server, collection):
    directory = collection[2]
    before = server.search.snapshot.generation
    with staged_directory(directory) as staging:  # a new generation with a torn array
        for item in directory.iterdir():
            shutil.copy2(item, staging / item.name)
        (staging / "descriptors.npy").write_bytes(b"\x93NUMPY broken")
        header = json.loads((staging / "index.json").read_text())
        header["generation"] += 1  # what Index.save does
        (staging / "index.json").write_text(json.dumps(header))
    generation = read_generation(directory)
    assert generation != before
    wait_for(lambda: server.search.status()["failed_reload"] is not None)
    report = json.loads(rest(server, "/status")[2])
    assert report["generation"] == before
    assert report["failed_reload"]["generation"] == generation
    assert "descriptors.npy" in report["failed_reload"]["error"]
    versions = json.loads(rest(server, "/v1/models/index")[2])["model_version_status"]
    assert {v["state"] for v in versions} == {"AVAILABLE", "END"}
    with SearchClient(server.addresses()["grpc"]) as client:
        assert client.search(collection[3]).hits[0].key == f"{SOURCE}.png"
    # A good index again (the same images): loaded, the failure cleared.
    store, _ = extract_to_store(server.search.extractor, collection[0], collection[1])
    Index.from_store(store, collection[0], progress=False).save(directory)
    wait_for(lambda: server.search.snapshot.generation == read_generation(directory))
    assert server.search.status()["failed_reload"] is None


def test_hot_reload_under_concurrent_queries(server, collection, extractor):
    images, features, directory, query, added_query = collection
    before = server.search.snapshot.generation
    failures, answered, stop = [], [], threading.Event()
    data = query.read_bytes()

    def load(protocol):
        with SearchClient(server.addresses()[protocol], protocol=protocol) as client:
            while not stop.is_set():
                try:
                    reply = client.search(data)
                    answered.append(reply.generation)
                    if reply.hits[0].key != f"{SOURCE}.png":
                        failures.append(f"wrong top result {reply.hits[0].key}")
                except Exception as error:  # noqa: BLE001 - every failure counts
                    failures.append(repr(error))

    clients = [threading.Thread(target=load, args=(p,)) for p in ("grpc", "rest", "grpc")]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: len(answered) >= 3)
        shutil.copy(directory.parent / f"{ADDED}.png", images / f"{ADDED}.png")
        store, _ = extract_to_store(extractor, images, features, progress=False)
        grown, added = Index.load(directory, mmap=False).add_store(store, images, progress=False)
        assert added == 1
        grown.save(directory)  # `delf index --append`: the directory is swapped
        generation = read_generation(directory)
        wait_for(lambda: server.search.snapshot.generation == generation)
        count = len(answered)
        wait_for(lambda: len(answered) >= count + 3)
    finally:
        stop.set()
        for thread in clients:
            thread.join(60)
    assert not failures, failures[:5]
    assert before in answered and generation in answered
    report = json.loads(rest(server, "/status")[2])
    assert report["generation"] == generation and report["images"] == 6
    assert report["failed_reload"] is None
    with SearchClient(server.addresses()["rest"], protocol="rest") as client:
        reply = client.search(added_query)
    assert reply.generation == generation and reply.hits[0].key == f"{ADDED}.png"
