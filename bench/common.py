"""Helpers shared by the benchmark scripts (run as `python bench/<script>.py`, so this
folder is on the import path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of asking."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def interleaved(runners: dict, inputs: dict) -> tuple[dict, dict]:
    """Times every runner on every photo, the runners taking turns per photo (a load
    change on a shared machine then hits all of them alike). One warm-up call each.

    runners: {mode: function(input)}; inputs: {mode: [input per photo]}.
    Returns ({mode: [seconds per photo]}, {mode: [result per photo]}).
    """
    for mode, run in runners.items():
        run(inputs[mode][0])
    seconds = {mode: [] for mode in runners}
    results = {mode: [] for mode in runners}
    for index in range(1, len(next(iter(inputs.values())))):
        for mode, run in runners.items():
            start = time.perf_counter()
            results[mode].append(run(inputs[mode][index]))
            seconds[mode].append(round(time.perf_counter() - start, 3))
    return seconds, results


def start_server(model_dir: Path, *flags: str) -> tuple[subprocess.Popen, int, int]:
    """`delf serve` over the versions in `model_dir` (a <base>/<name> folder) on free
    loopback ports, started once it says it is ready: (process, gRPC port, REST port).
    The caller terminates the process."""
    grpc_port, rest_port = free_port(), free_port()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen(
        [sys.executable, "-m", "delf_tf.cli", "serve", f"--port={grpc_port}"]
        + [f"--rest_api_port={rest_port}", f"--model_base_path={model_dir}", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in process.stdout:
        if "delf serve: ready" in line:
            return process, grpc_port, rest_port
    raise RuntimeError(f"delf serve exited with {process.wait()}")
