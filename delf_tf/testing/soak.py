"""A bounded soak run of `delf serve` on loopback: good traffic under hostile traffic.

`run_soak(model_dir, seconds)` starts `delf serve` in a subprocess and runs two
phases with the same 8 gRPC + 8 REST client threads:
1. baseline (`baseline_seconds`): the clients send good requests only;
2. load (`seconds`): every third request of each client is a bad one (corrupt
   image, wrong dtype, batch over --max_batch_size, body or message over
   --max_request_bytes, a tiny message declaring a huge tensor, NaN scales,
   malformed / 100k-deep JSON, Content-Length -1, unknown model), while 100
   stalled connections (half REST, half gRPC; reopened when the server closes
   them) hold partial requests.
Returns a JSON-able dict: per phase the count, errors and p50 / p95 latency of
good requests, the bad requests whose answer was not the expected refusal, the
server's RSS (start of load, peak, growth) and whether it still answered and
exited 0 on SIGTERM after the run. Used by tests/serving/test_soak.py (short) and
bench/soak.py (2 minutes). Everything stops by itself: phases are timed and
every socket has a timeout.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from delf_tf.contract import BATCH_INPUT, IMAGE_SIGNATURE, SERVING_SIGNATURE
from delf_tf.images import encode_png

SOAK_MAX_REQUEST_BYTES = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc; 0 where unavailable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class _Server:
    """`python -m delf_tf.cli serve` on free loopback ports."""

    def __init__(self, model_dir: Path, extra_flags: list[str]):
        self.grpc_port, self.rest_port = _free_port(), _free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "delf_tf.cli", "serve", f"--port={self.grpc_port}"]
            + [f"--rest_api_port={self.rest_port}", f"--model_base_path={model_dir}"]
            + ["--file_system_poll_wait_seconds=0", f"--max_request_bytes={SOAK_MAX_REQUEST_BYTES}"]
            + extra_flags,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + 300
        for line in self.process.stdout:
            if "delf serve: ready" in line:
                break
            if time.monotonic() > deadline:
                break
        else:
            raise RuntimeError(f"delf serve exited with {self.process.wait()} before ready")
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # drain

    def stop(self, timeout: float = 60) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


class _Requests:
    """Pre-built good and bad requests (built once: the clients measure the server)."""

    def __init__(self, image: np.ndarray):
        png = encode_png(image)
        self.good_grpc = self._grpc(SERVING_SIGNATURE, **{BATCH_INPUT: np.array([png], object)})
        self.good_rest = json.dumps(
            {"instances": [{"b64": base64.b64encode(png).decode()}]}
        ).encode()
        corrupt = png[: len(png) // 3]
        huge_shape = predict_pb2.PredictRequest()
        huge_shape.model_spec.name = "delf"
        huge_shape.model_spec.signature_name = SERVING_SIGNATURE
        proto = huge_shape.inputs[BATCH_INPUT]
        proto.dtype = tf.string.as_datatype_enum
        proto.tensor_shape.dim.add().size = 10_000_000
        proto.string_val.append(b"x")
        # (name, request, expected status codes)
        self.bad_grpc = [
            ("corrupt_image", self._grpc(SERVING_SIGNATURE, **{BATCH_INPUT: np.array([corrupt], object)}), {"OK"}),
            ("wrong_dtype", self._grpc(SERVING_SIGNATURE, **{BATCH_INPUT: np.zeros([1], np.float32)}), {"INVALID_ARGUMENT"}),
            ("batch_over_max", self._grpc(SERVING_SIGNATURE, **{BATCH_INPUT: np.array([b""] * 200, object)}), {"INVALID_ARGUMENT"}),
            ("oversized_message", self._grpc(SERVING_SIGNATURE, **{BATCH_INPUT: np.array([b"\0" * (SOAK_MAX_REQUEST_BYTES + 4096)], object)}), {"RESOURCE_EXHAUSTED"}),
            ("huge_declared_tensor", huge_shape, {"INVALID_ARGUMENT"}),
            ("nan_scales", self._grpc(IMAGE_SIGNATURE, image=np.zeros([16, 16, 3], np.uint8), scales=np.array([np.nan], np.float32)), {"INVALID_ARGUMENT"}),
        ]  # fmt: skip
        big = b'{"instances": [{"b64": "' + b"A" * (SOAK_MAX_REQUEST_BYTES + 4096) + b'"}]}'
        deep = b"[" * 100_000 + b"]" * 100_000
        corrupt_body = json.dumps(
            {"instances": [{"b64": base64.b64encode(corrupt).decode()}]}
        ).encode()
        predict = b"POST /v1/models/delf:predict HTTP/1.1\r\nHost: soak\r\n"
        self.bad_rest = [
            ("corrupt_image", predict + b"Content-Length: %d\r\n\r\n" % len(corrupt_body) + corrupt_body, {200}),
            ("bad_json", predict + b"Content-Length: 9\r\n\r\n{not json", {400}),
            ("deep_json", predict + b"Content-Length: %d\r\n\r\n" % len(deep) + deep, {400}),
            ("oversized_body", predict + b"Content-Length: %d\r\n\r\n" % len(big) + big, {413}),
            ("negative_length", predict + b"Content-Length: -1\r\n\r\n" + b"x" * 65536, {400}),
            ("no_length", predict + b"\r\n", {411}),
            ("unknown_model", b"GET /v1/models/nope HTTP/1.1\r\n\r\n", {404}),
        ]  # fmt: skip

    @staticmethod
    def _grpc(signature: str, **inputs) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "delf"
        request.model_spec.signature_name = signature
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        return request


def _raw_status(port: int, data: bytes, timeout: float = 30.0) -> int:
    """Status code of the answer to raw bytes on a fresh REST connection (-1: none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        received = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in received:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
    try:
        return int(received.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return -1


class _Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {"grpc": [], "rest": []}
        self.errors: list[str] = []
        self.bad_counts: dict[str, int] = {}
        self.bad_unexpected: list[str] = []

    def good(self, protocol: str, seconds: float) -> None:
        with self.lock:
            self.latencies[protocol].append(seconds)

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text[:300])

    def bad(self, name: str, ok: bool, detail: str) -> None:
        with self.lock:
            self.bad_counts[name] = self.bad_counts.get(name, 0) + 1
            if not ok:
                self.bad_unexpected.append(f"{name}: {detail}"[:300])

    def summary(self) -> dict:
        every = self.latencies["grpc"] + self.latencies["rest"]
        out = {
            "good_requests": len(every),
            "good_errors": len(self.errors),
            "p50_ms": round(1000 * _percentile(every, 50), 1),
            "p95_ms": round(1000 * _percentile(every, 95), 1),
        }
        for protocol, values in self.latencies.items():
            out[f"{protocol}_p95_ms"] = round(1000 * _percentile(values, 95), 1)
        if self.bad_counts or self.bad_unexpected:
            out["bad_requests"] = dict(sorted(self.bad_counts.items()))
            out["bad_unexpected"] = len(self.bad_unexpected)
        if self.errors:
            out["first_errors"] = self.errors[:5]
        if self.bad_unexpected:
            out["first_bad_unexpected"] = self.bad_unexpected[:5]
        return out


def _grpc_client(port, requests, stats, stop, hostile, offset=0):
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        count = 0
        while not stop.is_set():
            count += 1
            if hostile and count % 3 == 0:
                kind = (count // 3 + offset) % len(requests.bad_grpc)
                name, request, expected = requests.bad_grpc[kind]
                name = f"grpc/{name}"
                try:
                    stub.Predict(request, timeout=60)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                stats.bad(name, code in expected, code)
                continue
            start = time.perf_counter()
            try:
                response = stub.Predict(requests.good_grpc, timeout=60)
                valid = tf.make_ndarray(response.outputs["valid"]).tolist()
                count_features = int(tf.make_ndarray(response.outputs["num_features"])[0])
                if valid != [True] or count_features <= 0:
                    raise ValueError(f"bad answer: valid {valid}, {count_features} features")
            except (grpc.RpcError, ValueError, KeyError) as error:
                stats.error(f"grpc: {error}")
                continue
            stats.good("grpc", time.perf_counter() - start)


def _rest_client(port, requests, stats, stop, hostile, offset=0):
    connection = None
    count = 0
    while not stop.is_set():
        count += 1
        if hostile and count % 3 == 0:
            name, data, expected = requests.bad_rest[(count // 3 + offset) % len(requests.bad_rest)]
            name = f"rest/{name}"
            status = _raw_status(port, data)
            stats.bad(name, status in expected, str(status))
            continue
        start = time.perf_counter()
        try:
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            connection.request(
                "POST",
                "/v1/models/delf:predict",
                body=requests.good_rest,
                headers={"Content-Type": "application/json"},
            )
            answer = connection.getresponse()
            body = answer.read()
            if answer.status != 200:
                raise ValueError(f"HTTP {answer.status}: {body[:200]!r}")
            prediction = json.loads(body)["predictions"][0]
            if prediction["valid"] is not True or prediction["num_features"] <= 0:
                raise ValueError(f"bad answer: {str(prediction)[:200]}")
        except (OSError, http.client.HTTPException, ValueError, KeyError) as error:
            stats.error(f"rest: {type(error).__name__}: {error}")
            if connection is not None:
                connection.close()
            connection = None
            continue
        stats.good("rest", time.perf_counter() - start)
    if connection is not None:
        connection.close()


def _stall(grpc_port, rest_port, count, stop, reopened):
    """Keeps `count` stalled connections open (half REST, half gRPC) until `stop`."""
    partial = [
        b"",
        b"POST /v1/models/delf:predict HTTP/1.1\r\n",
        b"POST /v1/models/delf:predict HTTP/1.1\r\nContent-Length: 5000\r\n\r\n{",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # an HTTP/2 preface, then nothing (gRPC port)
    ]
    sockets: list[tuple[socket.socket, int, bytes]] = []

    def open_one(i):
        port = rest_port if i % 2 == 0 else grpc_port
        data = partial[i % 3] if port == rest_port else partial[3 if i % 4 == 1 else 0]
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if data:
                sock.sendall(data)
            sock.setblocking(False)
            return sock, port, data
        except OSError:
            return None

    sockets = [s for s in (open_one(i) for i in range(count)) if s is not None]
    while not stop.wait(0.5):
        for index, (sock, _, _) in enumerate(sockets):
            try:
                closed = sock.recv(65536) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                sock.close()
                fresh = open_one(index)
                if fresh is not None:
                    sockets[index] = fresh
                    reopened[0] += 1
    for sock, _, _ in sockets:
        sock.close()


def _phase(server, requests, seconds, hostile, stalled, rss_samples):
    stats = _Stats()
    stop = threading.Event()
    reopened = [0]
    threads = [
        threading.Thread(target=_grpc_client, args=(server.grpc_port, requests, stats, stop, hostile, i))
        for i in range(8)
    ] + [
        threading.Thread(target=_rest_client, args=(server.rest_port, requests, stats, stop, hostile, i))
        for i in range(8)
    ]  # fmt: skip
    if stalled:
        threads.append(
            threading.Thread(
                target=_stall, args=(server.grpc_port, server.rest_port, stalled, stop, reopened)
            )
        )
    for thread in threads:
        thread.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rss_samples.append(rss_bytes(server.process.pid))
        time.sleep(min(0.5, max(end - time.monotonic(), 0)))
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    summary = stats.summary()
    if stalled:
        summary["stalled_reopened"] = reopened[0]
    return summary


def run_soak(
    model_dir: str | os.PathLike,
    seconds: float = 20.0,
    baseline_seconds: float | None = None,
    stalled: int = 100,
    extra_flags: list[str] | None = None,
) -> dict:
    """Runs the two phases (see the module docstring) against a fresh `delf serve`."""
    import skimage.data
    import skimage.transform

    image = skimage.transform.resize(skimage.data.astronaut(), (96, 96), anti_aliasing=True)
    requests = _Requests((image * 255).round().astype(np.uint8))
    baseline_seconds = baseline_seconds or max(3.0, seconds / 4)
    flags = ["--rest_api_idle_timeout_seconds=5", "--rest_api_timeout_in_ms=10000"]
    server = _Server(Path(model_dir), flags + list(extra_flags or []))
    try:
        _phase(server, requests, 2.0, False, 0, [])  # warm-up: connections, first calls
        rss: list[int] = []
        baseline = _phase(server, requests, baseline_seconds, False, 0, rss)
        rss_start = rss_bytes(server.process.pid)
        rss_load: list[int] = []
        load = _phase(server, requests, seconds, True, stalled, rss_load)
        time.sleep(1.0)
        rss_end = rss_bytes(server.process.pid)
        after = _Stats()
        once = threading.Event()
        threading.Timer(2.0, once.set).start()
        _grpc_client(server.grpc_port, requests, after, once, False)
        alive = server.process.poll() is None and after.summary()["good_requests"] > 0
        alive = alive and not after.errors
    finally:
        exit_code = server.stop()
    peak = max(rss_load + [rss_end]) if rss_load else rss_end
    return {
        "seconds": seconds,
        "baseline_seconds": baseline_seconds,
        "stalled_connections": stalled,
        "baseline": baseline,
        "load": load,
        "p95_ratio": round(load["p95_ms"] / baseline["p95_ms"], 2)
        if baseline["p95_ms"] > 0
        else None,
        "rss_mb": {
            "start_of_load": round(rss_start / 2**20, 1),
            "peak": round(peak / 2**20, 1),
            "end": round(rss_end / 2**20, 1),
            "growth": round((peak - rss_start) / 2**20, 1),
        },
        "alive_after": bool(alive),
        "exit_code_on_sigterm": exit_code,
    }
