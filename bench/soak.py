"""Soak `delf serve` on loopback: 8 gRPC + 8 REST clients mixing good, corrupt and oversized
requests with 100 stalled connections; prints JSON (see delf_tf/testing/soak.py). Then the
memory phase: the memory-heavy requests of issue 20 against a server with its default
request limits, reporting the server's idle, peak (VmHWM) and after-phase RSS.

    python bench/soak.py --seconds=120            # the full run (plus a 30 s baseline)
    python bench/soak.py --memory_only            # the memory phase alone

Without --export, a model with random weights is exported to a temporary directory with
the tests' tiny settings (K = 50, scales 0.5 and 1, long side <= 128 px): the run measures
the server's protocol handling and robustness, not the network's cost.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

FLAGS = flags.FLAGS
flags.DEFINE_float("seconds", 120.0, "duration of the loaded phase")
flags.DEFINE_float("baseline_seconds", None, "duration of the unloaded phase (default seconds/4)")
flags.DEFINE_integer("stalled", 100, "stalled connections held during the loaded phase")
flags.DEFINE_string("export", None, "model dir (<dir>/<version>/) to serve (default: make one)")
flags.DEFINE_bool("memory", True, "run the memory phase after the soak")
flags.DEFINE_bool("memory_only", False, "run the memory phase alone")
flags.DEFINE_integer("max_server_pixels", None, "--max_server_pixels of the memory phase's server")
flags.DEFINE_integer("big_side", 9400, "side of the square PNG of the memory phase (88.4M px)")


def main(argv: list[str]) -> int:
    del argv
    from delf_tf.testing.soak import run_soak

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = FLAGS.export
        if model_dir is None:
            from delf_tf.config import ExtractionConfig
            from delf_tf.export import export_model
            from delf_tf.model.delf import build_delf_model

            config = ExtractionConfig(
                max_features=50, scales=(0.5, 1.0), max_image_size=128, score_threshold=0.0
            )
            model_dir = export_model(build_delf_model(seed=0), Path(scratch), config).parent
        if FLAGS.memory_only:
            result = {"memory": memory_phase(Path(model_dir))}
            result["checks"] = result["memory"]["checks"]
            print(json.dumps(result, indent=2))
            return 0 if all(result["checks"].values()) else 1
        result = run_soak(model_dir, FLAGS.seconds, FLAGS.baseline_seconds, stalled=FLAGS.stalled)
        if FLAGS.memory:
            result["memory"] = memory_phase(Path(model_dir))
    result["checks"] = {
        "good_errors_zero": result["baseline"]["good_errors"] == 0
        and result["load"]["good_errors"] == 0,
        "bad_answers_as_expected": result["load"].get("bad_unexpected", 0) == 0,
        "p95_within_2x": result["load"]["p95_ms"] <= 2 * result["baseline"]["p95_ms"],
        "rss_growth_under_300_mb": result["rss_mb"]["growth"] < 300,
        "alive_after": result["alive_after"] and result["exit_code_on_sigterm"] == 0,
        **result.get("memory", {}).get("checks", {}),
    }
    print(json.dumps(result, indent=2))
    return 0 if all(result["checks"].values()) else 1


def _hwm_and_rss(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of a process in bytes: its peak and current resident size."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            values[name] = int(rest.split()[0]) * 1024
    return values["VmHWM"], values["VmRSS"]


def _reset_peak(pid: int) -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as handle:
        handle.write("5")


def memory_phase(model_dir: Path) -> dict:
    """The memory-heavy requests of issue 20 against `delf serve` with its default request
    limits (--max_request_bytes raised to 300 MB so that the 240 MB tensor reaches the checks).

    Sequential, then concurrent: gRPC extract_image uint8 [1, 80M, 3] and [1, 10M, 3];
    REST serving_default with one `big_side`^2 PNG (one at a time, then two at once); REST
    batches of 32 such PNGs from 8 threads (over the per-request pixels). Reports each
    request's answer and seconds, the server's RSS when idle (after a warm-up request),
    its peak during the phase and its RSS once back within 10 % of idle (or after 3 min),
    with how long that took after the last answer.
    """
    import base64
    import http.client
    import threading
    import time

    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from delf_tf.contract import IMAGE_SIGNATURE
    from delf_tf.images import encode_png
    from delf_tf.testing.soak import _Server

    # A 9400 x 9400 PNG takes 10-30 s on 2 busy cores: a REST timeout that lets it answer.
    extra = ["--max_request_bytes=314572800", "--rest_api_timeout_in_ms=180000"]
    if FLAGS.max_server_pixels:
        extra.append(f"--max_server_pixels={FLAGS.max_server_pixels}")
    side = FLAGS.big_side
    big_png = encode_png(np.full((side, side, 3), 128, np.uint8))
    small_png = encode_png(np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8))

    def rest_body(*images: bytes) -> bytes:
        items = [{"b64": base64.b64encode(data).decode()} for data in images]
        return json.dumps({"instances": items}).encode()

    server = _Server(model_dir, extra)
    pid = server.process.pid
    answers: list[dict] = []
    lock = threading.Lock()

    def record(name: str, status: object, start: float, text: str) -> None:
        """One answer: its status, seconds since `start` and the server's RSS after it."""
        with lock:
            answers.append(
                {
                    "request": name,
                    "status": status,
                    "seconds": round(time.monotonic() - start, 2),
                    "rss_mb_after": round(_hwm_and_rss(pid)[1] / (1 << 20)),
                    "answer": text,
                }
            )

    def rest(name: str, body: bytes) -> None:
        start = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=600)
        try:
            connection.request("POST", "/v1/models/delf:predict", body)
            answer = connection.getresponse()
            status, text = answer.status, answer.read()[:160].decode("utf-8", "replace")
        finally:
            connection.close()
        record(name, status, start, text)

    def grpc_image(name: str, shape: tuple[int, int]) -> None:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "delf"
        request.model_spec.signature_name = IMAGE_SIGNATURE
        request.inputs["image"].CopyFrom(tf.make_tensor_proto(np.zeros((*shape, 3), np.uint8)))
        start = time.monotonic()
        options = [("grpc.max_send_message_length", 1 << 30)]
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=options) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            try:
                stub.Predict(request, timeout=600)
                status, text = "OK", ""
            except grpc.RpcError as error:
                status, text = error.code().name, (error.details() or "")[:160]
        record(name, status, start, text)

    def together(*calls) -> None:
        threads = [threading.Thread(target=call, args=args) for call, *args in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    try:
        for _ in range(3):
            rest("warm_up", rest_body(small_png))
        time.sleep(2)
        _, idle = _hwm_and_rss(pid)
        _reset_peak(pid)
        grpc_image("grpc_extract_image_1x80M", (1, 80_000_000))
        grpc_image("grpc_extract_image_1x10M", (1, 10_000_000))
        rest(f"rest_png_{side}x{side}", rest_body(big_png))
        together(*[(rest, f"rest_png_{side}x{side}_concurrent", rest_body(big_png))] * 2)
        together(*[(rest, "rest_batch_32_big_pngs", rest_body(*[big_png] * 32))] * 8)
        together(
            (grpc_image, "grpc_1x80M_concurrent", (1, 80_000_000)),
            (rest, f"rest_png_{side}x{side}_with_grpc", rest_body(big_png)),
        )
        rest("good_after", rest_body(small_png))
        # Requests whose client gave up may still run: wait (up to 3 min) for the RSS to
        # come back within 10 % of idle, sampling every second, then 5 s more.
        settled = time.monotonic()
        while time.monotonic() - settled < 180 and _hwm_and_rss(pid)[1] > 1.1 * idle:
            time.sleep(1)
        settle_seconds = round(time.monotonic() - settled, 1)
        time.sleep(5)
        peak, after = _hwm_and_rss(pid)
    finally:
        server.stop()
    mb = 1 << 20
    budget = FLAGS.max_server_pixels or 2 * 89_478_485
    at_once = max(1, min(2, budget // (side * side)))
    expected = {
        "grpc_extract_image_1x80M": "INVALID_ARGUMENT",
        "grpc_extract_image_1x10M": "INVALID_ARGUMENT",
        "grpc_1x80M_concurrent": "INVALID_ARGUMENT",
        "rest_batch_32_big_pngs": 400,
        "good_after": 200,
        f"rest_png_{side}x{side}": 200,
    }
    return {
        "server_flags": extra,
        "big_png_bytes": len(big_png),
        "answers": answers,
        "rss_mb": {
            "idle": round(idle / mb),
            "peak": round(peak / mb),
            "after": round(after / mb),
            "seconds_until_within_10_percent": settle_seconds,
            # the most pixels decoded at once: two big PNGs, unless the budget holds one
            "peak_minus_idle_bytes_per_pixel": round((peak - idle) / (at_once * side * side), 1),
        },
        "checks": {
            "memory_answers_as_expected": all(
                answer["status"] == expected[answer["request"]]
                for answer in answers
                if answer["request"] in expected
            ),
            "rss_returns_within_10_percent_of_idle": after <= 1.1 * idle,
        },
    }


if __name__ == "__main__":
    app.run(main)
