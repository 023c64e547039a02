"""Time from `delf search` to its first result on the demo index, per way of giving the model.

Each variant runs the real command in a fresh process (as a user does), several times,
interleaved; the median wall time from process start to the JSON result is reported:
- uncached: `--weights=random --seed=0 --pca=...` with DELF_CACHE_DIR=off: the model is
  built with Keras and its extraction graph traced on every call (before the cache);
- cached: the same flags with the traced-extractor cache (delf_tf/extraction/cache.py):
  its first run builds and saves the graph (reported as cached_first_run), later runs
  load it;
- export: `--model=<export>`, the same model and PCA exported once with `delf export`;
- import_only: `python -c "import tensorflow"` (the floor no command can go under).
Prints JSON with the medians and the ratio cached / uncached.

    make demo   # writes demo_output/ (index, pca.npz, queries)
    python bench/search_latency.py --demo=demo_output --runs=3
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("demo", "demo_output", "output folder of `delf demo`")
flags.DEFINE_integer("runs", 3, "runs per variant")

# The demo's extraction settings (delf_tf/commands/demo.py).
DEMO_FLAGS = ["--preset=fast", "--score_threshold=0", "--max_image_size=320"]


def wall_time(command: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    del argv
    demo = Path(FLAGS.demo)
    query = sorted((demo / "queries").glob("*.png"))[0]
    delf = [sys.executable, "-m", "delf_tf.cli"]
    model_flags = ["--weights=random", "--seed=0", f"--pca={demo / 'pca.npz'}", *DEMO_FLAGS]
    scratch = Path(tempfile.mkdtemp(prefix="bench_search_"))
    subprocess.run(
        [*delf, "export", *model_flags[:3], *DEMO_FLAGS, f"--export_base={scratch}"],
        check=True,
        capture_output=True,
    )
    search = [*delf, "search", f"--index={demo / 'index'}", f"--image={query}"]
    uncached = dict(os.environ, DELF_CACHE_DIR="off")
    cached = dict(os.environ, DELF_CACHE_DIR=str(scratch / "cache"))
    variants = {
        "uncached": ([*search, *model_flags], uncached),
        "cached": ([*search, *model_flags], cached),
        "export": ([*search, f"--model={scratch / 'delf'}"], uncached),
        "import_only": ([sys.executable, "-c", "import tensorflow"], uncached),
    }
    first_cached = round(wall_time(*variants["cached"]), 2)  # builds and saves the entry
    seconds = {name: [] for name in variants}
    for _ in range(FLAGS.runs):
        for name, (command, env) in variants.items():
            seconds[name].append(round(wall_time(command, env), 2))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(
        json.dumps(
            {
                "query": str(query),
                "cached_first_run": first_cached,
                "seconds": seconds,
                "median_seconds": medians,
                "ratio_cached_to_uncached": round(medians["cached"] / medians["uncached"], 3),
                "seconds_above_import": {
                    name: round(m - medians["import_only"], 2) for name, m in medians.items()
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    app.run(main)
