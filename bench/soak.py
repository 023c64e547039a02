"""Soak `delf serve` on loopback: 8 gRPC + 8 REST clients mixing good, corrupt and oversized
requests with 100 stalled connections; prints JSON (see delf_tf/testing/soak.py).

    python bench/soak.py --seconds=120            # the full run (plus a 30 s baseline)

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
        result = run_soak(model_dir, FLAGS.seconds, FLAGS.baseline_seconds, stalled=FLAGS.stalled)
    result["checks"] = {
        "good_errors_zero": result["baseline"]["good_errors"] == 0
        and result["load"]["good_errors"] == 0,
        "bad_answers_as_expected": result["load"].get("bad_unexpected", 0) == 0,
        "p95_within_2x": result["load"]["p95_ms"] <= 2 * result["baseline"]["p95_ms"],
        "rss_growth_under_300_mb": result["rss_mb"]["growth"] < 300,
        "alive_after": result["alive_after"] and result["exit_code_on_sigterm"] == 0,
    }
    print(json.dumps(result, indent=2))
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    app.run(main)
