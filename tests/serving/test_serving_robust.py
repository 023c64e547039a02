"""`delf serve` under faults: broken model versions, hostile REST clients, stalled connections,
oversized batches, bad extraction settings and SIGTERM with requests in flight (issue 12)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from conftest import free_port, start_serve_process
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from delf_tf.contract import BATCH_INPUT, IMAGE_SIGNATURE, SAVED_MODEL_FILE, SERVING_SIGNATURE
from delf_tf.images import encode_png
from delf_tf.serving import repository as repository_module
from delf_tf.serving.client import ServingExtractor
from delf_tf.serving.local_server import LocalServer
from delf_tf.serving.repository import ModelRepository, ModelSource

REPO = Path(__file__).resolve().parents[2]


def client(server, protocol, **options):
    return ServingExtractor(server.addresses()[protocol], protocol=protocol, **options)


def grpc_status(address: str, name: str = "delf"):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    with grpc.insecure_channel(address) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        return {s.version: s for s in stub.GetModelStatus(request, timeout=30).model_version_status}


def grpc_predict(address: str, signature: str, timeout: float = 60, **inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "delf"
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    options = [("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=timeout)
    return {key: tf.make_ndarray(value) for key, value in response.outputs.items()}


def raw_http(address: str, data: bytes, timeout: float = 30.0, check_closed: bool = True):
    """Sends `data` on a fresh connection; returns (status, headers, JSON body, closed after:
    None unless `check_closed`)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        # The server may refuse before reading everything; its answer still counts.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {received!r}"
            received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed in the middle of the answer"
            rest += chunk
        body = json.loads(rest[:length]) if length else None
        if not check_closed:
            return status, headers, body, None
        sock.settimeout(5.0)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
    return status, headers, body, closed


# --- 1. model versions: a broken new version never takes a serving one down ------------------


def test_corrupt_new_version_keeps_old_serving_and_is_retried_when_fixed(
    exported_model, astronaut_small, tmp_path, monkeypatch
):
    base = tmp_path / "delf"
    shutil.copytree(exported_model, base / "1")
    (base / "2").mkdir()
    (base / "2" / SAVED_MODEL_FILE).write_bytes(b"this is not a SavedModel\n" * 40)
    attempts = []

    class CountingServable(repository_module.ServableVersion):
        def __init__(self, name, version, path):
            attempts.append(version)
            super().__init__(name, version, path)

    monkeypatch.setattr(repository_module, "ServableVersion", CountingServable)
    repository = ModelRepository([ModelSource("delf", base)])
    with LocalServer(repository, grpc_port=0, rest_port=0, poll_seconds=0) as server:
        assert repository.resolve("delf").version == 1
        for protocol in ("grpc", "rest"):
            assert len(client(server, protocol).extract(astronaut_small)) == 50
            rows = {row["version"]: row for row in client(server, protocol).model_status()}
            assert rows[1]["state"] == "AVAILABLE" and rows[1]["error_code"] == "OK"
            assert rows[2]["state"] == "END" and rows[2]["error_code"] != "OK"
            assert "2" in rows[2]["error_message"] and len(rows[2]["error_message"]) > 10
        status = grpc_status(server.addresses()["grpc"])
        assert status[2].state == get_model_status_pb2.ModelVersionStatus.END
        assert status[2].status.error_code != 0 and status[2].status.error_message
        assert attempts == [2, 1]
        repository.refresh()  # nothing changed on disk: the broken version is not retried
        repository.refresh()
        assert attempts == [2, 1] and repository.resolve("delf").version == 1
        # A valid export replaces the broken files: the next poll retries and switches over.
        shutil.rmtree(base / "2")
        shutil.copytree(exported_model, base / "2")
        repository.refresh()
        assert attempts == [2, 1, 2]
        assert repository.resolve("delf").version == 2
        rows = client(server, "rest").model_status()
        assert rows == [
            {"version": 2, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}
        ]
        assert len(client(server, "grpc").extract(astronaut_small)) == 50


def test_broken_only_version_reports_error_and_later_loads(exported_model, tmp_path):
    base = tmp_path / "delf"
    (base / "3" / "variables").mkdir(parents=True)
    shutil.copy(exported_model / SAVED_MODEL_FILE, base / "3" / SAVED_MODEL_FILE)  # no variables
    repository = ModelRepository([ModelSource("delf", base)])
    repository.refresh()
    [(version, state, code, message)] = repository.status("delf")
    assert (version, state) == (3, "END") and code != "OK" and message
    with pytest.raises(Exception, match="NOT_FOUND"):
        repository.resolve("delf")
    shutil.rmtree(base / "3" / "variables")
    shutil.copytree(exported_model / "variables", base / "3" / "variables")
    repository.refresh()
    assert repository.resolve("delf").version == 3
    assert repository.status("delf") == [(3, "AVAILABLE", "OK", "")]


# --- 2. hostile REST clients get a 4xx JSON answer, never a 500, and bodies stay bounded -----


PREDICT = b"POST /v1/models/delf:predict HTTP/1.1\r\nHost: t\r\n"


@pytest.mark.parametrize(
    "request_bytes,statuses,closes",
    [
        (PREDICT + b"Content-Length: -1\r\n\r\n" + b"{" * 4096, (400,), True),
        (PREDICT + b"Content-Length: 12abc\r\n\r\n{}", (400,), True),
        (PREDICT + b"Content-Length: 2\r\nContent-Length: 9\r\n\r\n{}", (400,), True),
        (PREDICT + b"\r\n", (411,), True),
        (PREDICT + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", (411, 501), True),
        (PREDICT + b"Content-Length: 99999999999999999999999\r\n\r\n{}", (400, 413, 429), True),
        (b"GET /v1/models/delf/versions/99999999999999999999999 HTTP/1.1\r\n\r\n", (400, 404), 0),
        (
            b"POST /v1/models/delf/versions/99999999999999999999999:predict HTTP/1.1\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            (400, 404),
            False,
        ),
        (b"PUT /v1/models/delf HTTP/1.1\r\nContent-Length: 0\r\n\r\n", (405,), False),
        (b"garbage\r\n\r\n", (400,), True),
        (b"GET /v1/models/delf HTTP/7.3\r\n\r\n", (400, 505), True),
        (b"GET /v1/models/delf HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n", (431, 400), True),
    ],
)
def test_malformed_rest_requests_get_4xx_json(local_server, request_bytes, statuses, closes):
    address = local_server.addresses()["rest"]
    status, headers, body, closed = raw_http(address, request_bytes, check_closed=bool(closes))
    assert status in statuses, (status, body)
    assert headers["content-type"].startswith("application/json")
    assert isinstance(body["error"], str) and body["error"]
    if closes:
        assert closed, "a request whose body cannot be delimited must close the connection"


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"instances": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"instances": ' + b"[" * 900 + b"]" * 900 + b"}",
        b'{"inputs": {"image": [[[1, 2, 3]]], "max_features": 100000000000000000000000000},'
        b' "signature_name": "extract_image"}',
        b'{"inputs": {"image": [[[1, 2, 3]]], "scales": [1e999]}, "signature_name": "extract_image"}',
        b'{"instances": [{"b64": 5}]}',
        b'{"instances": [[{"b64": ""}]]}',
        b'{"signature_name": 7, "instances": []}',
        b'{"inputs": {"image_bytes": {"b64": ""}, "extra": 1}}',
        b"\xff\xfe\x00garbage",
        b'"just a string"',
        b'{"instances": [' + b"9" * 100_000 + b"]}",  # an integer too long to convert
        b'{"instances": [' + b"9" * 4000 + b"]}",  # converts, but overflows every dtype
    ],
)
def test_malformed_json_bodies_get_400(local_server, body):
    request = PREDICT + b"Content-Length: %d\r\n\r\n" % len(body) + body
    status, _, answer, _ = raw_http(local_server.addresses()["rest"], request, check_closed=False)
    assert status == 400, answer
    assert answer["error"]


def test_utf8_model_name_is_decoded_as_utf8(local_server):
    name = "modèle-日本"
    for path in (name.encode("utf-8"), urllib.parse.quote(name).encode("ascii")):
        request = b"GET /v1/models/" + path + b" HTTP/1.1\r\nHost: t\r\n\r\n"
        status, _, answer, _ = raw_http(
            local_server.addresses()["rest"], request, check_closed=False
        )
        assert status == 404 and name in answer["error"], answer


def test_rest_still_serves_after_hostile_requests(local_server, astronaut_small):
    for data in (PREDICT + b"Content-Length: -1\r\n\r\n", b"[" * 10 + b"\r\n\r\n", b"\r\n\r\n"):
        with contextlib.suppress(AssertionError, OSError):
            raw_http(local_server.addresses()["rest"], data, timeout=10)
    assert len(client(local_server, "rest").extract(astronaut_small)) == 50


# --- 3. stalled connections hold no threads and are closed ------------------------------------


def test_stalled_connections_are_bounded_and_closed(exported_model, astronaut_small):
    repository = ModelRepository([ModelSource("delf", exported_model.parent)])
    server = LocalServer(
        repository,
        grpc_port=0,
        rest_port=0,
        poll_seconds=0,
        rest_idle_timeout=1.5,
        rest_timeout=1.5,
        rest_max_connections=50,
    )
    with server:
        host, port = server.addresses()["rest"].rsplit(":", 1)
        threads_before = threading.active_count()
        stalled = []
        for i in range(60):
            sock = socket.create_connection((host, int(port)), timeout=10)
            if i % 3 == 1:
                sock.sendall(b"POST /v1/models/delf:predict HTTP/1.1\r\n")  # header never ends
            elif i % 3 == 2:
                sock.sendall(PREDICT + b"Content-Length: 1000\r\n\r\n{")  # body never ends
            stalled.append(sock)
        time.sleep(0.5)
        assert threading.active_count() - threads_before < 8, "a thread per stalled connection"
        refused = 0
        for sock in stalled[50:]:  # over the connection limit: answered 503 and closed at once
            sock.settimeout(5)
            answer = sock.recv(65536)
            refused += answer.startswith(b"HTTP/1.1 503")
        assert refused == 10
        # gRPC: stalled TCP connections do not hold its workers either.
        grpc_host, grpc_port = server.addresses()["grpc"].rsplit(":", 1)
        stalled += [socket.create_connection((grpc_host, int(grpc_port))) for _ in range(30)]
        start = time.monotonic()
        assert len(client(server, "grpc").extract(astronaut_small)) == 50
        assert time.monotonic() - start < 10
        time.sleep(2.5)  # past the idle and request timeouts: the server closed them all
        for sock in stalled[:50]:
            sock.settimeout(5)
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:100]
        for sock in stalled:
            sock.close()
        assert len(client(server, "rest").extract(astronaut_small)) == 50


# --- 4. batch size and extraction settings are checked before the model runs -----------------


def test_batch_over_max_batch_size_is_refused_before_running(local_server):
    grpc_address = local_server.addresses()["grpc"]
    images = np.array([b""] * 200, dtype=object)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        grpc_predict(grpc_address, SERVING_SIGNATURE, **{BATCH_INPUT: images})
    assert time.monotonic() - start < 2.0
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_batch_size" in caught.value.details() and "200" in caught.value.details()
    body = json.dumps({"instances": [{"b64": ""}] * 33}).encode()
    status, _, answer, _ = raw_http(
        local_server.addresses()["rest"],
        PREDICT + b"Content-Length: %d\r\n\r\n" % len(body) + body,
        check_closed=False,
    )
    assert status == 400 and "max_batch_size" in answer["error"]
    outputs = grpc_predict(grpc_address, SERVING_SIGNATURE, **{BATCH_INPUT: images[:32]})
    assert outputs["valid"].shape == (32,) and not outputs["valid"].any()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"scales": np.array([1.0, np.nan], np.float32)}, "scales"),
        ({"scales": np.array([np.inf], np.float32)}, "scales"),
        ({"scales": np.array([0.0], np.float32)}, "scales"),
        ({"scales": np.array([-1.0], np.float32)}, "scales"),
        ({"scales": np.array([], np.float32)}, "scales"),
        ({"scales": np.full([17], 0.5, np.float32)}, "scales"),
        ({"scales": np.array([100.0], np.float32)}, "scales"),
        ({"max_features": np.int32(-1)}, "max_features"),
        ({"max_features": np.int32(2_000_000)}, "max_features"),
        ({"score_threshold": np.float32(np.nan)}, "score_threshold"),
    ],
)
def test_extract_image_settings_are_validated(local_server, overrides, needle):
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(grpc.RpcError) as caught:
        grpc_predict(local_server.addresses()["grpc"], IMAGE_SIGNATURE, image=image, **overrides)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in caught.value.details()


# --- 5. SIGTERM: no new requests, running ones finish, exit 0 ----------------------------------

SLOW_SERVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from delf_tf.serving import repository

    marker = Path(sys.argv.pop(1))
    original = repository.ServableVersion.predict

    def slow_predict(self, signature_name, inputs, *args, **kwargs):
        images = inputs.get("image_bytes")
        if images is not None and len(images) == 2 and bytes(images[1]) == b"slow":
            with marker.open("a") as out:
                out.write("started\\n")
            time.sleep(4.0)
        return original(self, signature_name, inputs, *args, **kwargs)

    repository.ServableVersion.predict = slow_predict
    from delf_tf.cli import run_main
    sys.argv[0] = "delf"
    run_main()
    """
)


@pytest.mark.heavy
def test_sigterm_lets_running_requests_finish(exported_model, astronaut_small, tmp_path):
    grpc_port, rest_port = free_port(), free_port()
    marker = tmp_path / "in_flight"
    program = ["-c", SLOW_SERVER, str(marker)]
    process, lines = start_serve_process(program, exported_model.parent, grpc_port, rest_port)
    try:
        assert "ready" in lines[-1], "".join(lines[-20:])
        images = np.array([encode_png(astronaut_small), b"slow"], dtype=object)
        answers = {}

        def grpc_call():
            answers["grpc"] = grpc_predict(
                f"127.0.0.1:{grpc_port}", SERVING_SIGNATURE, **{BATCH_INPUT: images}
            )

        def rest_call():
            extractor = ServingExtractor(f"127.0.0.1:{rest_port}", protocol="rest", timeout=60)
            answers["rest"] = extractor.extract_batch(list(images), skip_invalid=True)

        callers = [threading.Thread(target=grpc_call), threading.Thread(target=rest_call)]
        for caller in callers:
            caller.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text().count("started") == 2:
                break
            time.sleep(0.05)
        assert marker.read_text().count("started") == 2
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no longer accepting
            urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/v1/models/delf", timeout=5)
        for caller in callers:
            caller.join(timeout=60)
        assert process.wait(timeout=60) == 0
        assert time.monotonic() - sent > 2.5, "exited before the running requests finished"
        grpc_answer = answers["grpc"]
        assert grpc_answer["valid"].tolist() == [True, False]
        assert grpc_answer["num_features"][0] == 50
        rest_answer = answers["rest"]
        assert len(rest_answer[0]) == 50 and rest_answer[1] is None
        output = process.stdout.read()
        assert "stopping" in output and "stopped" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_server_does_not_import_the_exporter():
    code = (
        "import sys, delf_tf.serving.local_server, delf_tf.commands.serve;"
        "print(sorted(m for m in sys.modules if m in ('delf_tf.export', 'keras')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "delf_tf.export" not in result.stdout.splitlines()[-1]
