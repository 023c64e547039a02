"""Helpers shared by the benchmark scripts (run as `python bench/<script>.py`, so this
folder is on the import path)."""

from __future__ import annotations

import socket
import time


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
