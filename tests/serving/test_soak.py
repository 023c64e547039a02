"""A short soak of `delf serve` (issue 12): good traffic stays correct and fast while bad
requests and 100 stalled connections hit the server; bench/soak.py runs the 2-minute one."""

import pytest

from delf_tf.testing.soak import run_soak


@pytest.mark.heavy
def test_soak_good_requests_survive_hostile_traffic(exported_model):
    result = run_soak(exported_model.parent, seconds=5, baseline_seconds=3, stalled=100)
    baseline, load = result["baseline"], result["load"]
    assert baseline["good_errors"] == 0 and load["good_errors"] == 0, result
    assert baseline["good_requests"] >= 5 and load["good_requests"] >= 10, result
    assert load["bad_unexpected"] == 0, result
    assert len(load["bad_requests"]) == 13, result  # every bad kind was sent
    assert load["p95_ms"] <= 2 * baseline["p95_ms"], result
    assert result["rss_mb"]["growth"] < 300, result
    assert result["alive_after"] and result["exit_code_on_sigterm"] == 0, result
