"""Benchmark: peak memory of building an index (`Index.from_store` + `save`) and of
appending to one (`Index.load` + `add_store` + `save`), against the library at another
commit (the baseline) in the same run.

A synthetic feature store of `--images` x `--per_image` 40-D descriptors (`.npz`, the
store `delf extract` writes) is made once under `--work_dir`. Each measurement runs in
a fresh child process with the library of one source tree on its path and reports
VmHWM (peak resident, file pages included), the peak of RssAnon sampled every 5 ms
(the memory that cannot be paged out), and seconds. No search structure is built
(`delf index --backend=flat` builds none): this measures the arrays.

  git archive <commit> delf_tf | tar -x -C /tmp/before
  python bench/index_build_memory.py --baseline=/tmp/before --work_dir=/tmp/ibm
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 2000, "images in the synthetic store")
flags.DEFINE_integer("per_image", 1000, "descriptors per image")
flags.DEFINE_integer("dim", 40, "descriptor size")
flags.DEFINE_string("work_dir", "/tmp/index_build_memory", "store and indexes")
flags.DEFINE_string("baseline", None, "a source tree (holding delf_tf/) to compare with")

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path

    def status():
        fields = {}
        with open("/proc/self/status") as handle:
            for line in handle:
                name = line.split(":")[0]
                if name in ("VmHWM", "RssAnon", "RssFile"):
                    fields[name] = int(line.split()[1]) * 1024
        return fields

    peak = {"RssAnon": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["RssAnon"] = max(peak["RssAnon"], status()["RssAnon"])
            time.sleep(0.005)

    from delf_tf.features import FeatureStore
    from delf_tf.retrieval import Index

    mode, store_root, first_root, output = sys.argv[1:5]
    before = status()
    if mode == "append":
        Index.from_store(FeatureStore.open(first_root), progress=False).save(output)
    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    store = FeatureStore.open(store_root)
    if mode == "append":
        index, _ = Index.load(output).add_store(store, progress=False)
    else:
        index = Index.from_store(store, progress=False)
    index.save(output)
    seconds = time.perf_counter() - start
    done.set()
    end = status()
    import delf_tf
    print(json.dumps({
        "library": delf_tf.__file__,
        "seconds": round(seconds, 1),
        "descriptors": index.num_descriptors,
        "VmHWM": end["VmHWM"],
        "RssAnon_peak": peak["RssAnon"],
        "RssAnon_at_start": before["RssAnon"],
    }))
    """
)


def make_store(root: Path, images: int, seed: int) -> None:
    from delf_tf.features import FeatureStore, LocalFeatures

    if (root / "manifest.json").exists():
        return
    rng = np.random.default_rng(seed)
    store = FeatureStore.open_or_create(
        root, "c" * 64, {"descriptor_dim": FLAGS.dim, "model": "synthetic"}
    )
    n = FLAGS.per_image
    for number in range(images):
        descriptors = rng.normal(size=(n, FLAGS.dim)).astype(np.float32)
        descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
        store.save(
            f"img{number:06d}.jpg",
            LocalFeatures(
                rng.uniform(0, 640, (n, 2)).astype(np.float32),
                np.ones(n, np.float32),
                np.ones(n, np.float32),
                descriptors,
            ),
        )


def measure(tree: Path, mode: str, work: Path) -> dict:
    import shutil

    output = work / f"index_{mode}"
    shutil.rmtree(output, ignore_errors=True)
    store = work / ("second" if mode == "append" else "all")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(store), str(work / "first"), str(output)],
        env=dict(os.environ, PYTHONPATH=str(tree), TF_CPP_MIN_LOG_LEVEL="2"),
        cwd=work,  # not the repository: `python -c` puts the working folder first on the path
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    shutil.rmtree(output, ignore_errors=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    del argv
    work = Path(FLAGS.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    half = FLAGS.images // 2
    make_store(work / "all", FLAGS.images, 0)
    make_store(work / "first", half, 1)
    make_store(work / "second", FLAGS.images - half, 2)
    trees = {"streaming": REPO}
    if FLAGS.baseline:
        trees = {"baseline": Path(FLAGS.baseline), **trees}
    mib = 1 << 20
    report = {
        "images": FLAGS.images,
        "per_image": FLAGS.per_image,
        "dim": FLAGS.dim,
        "descriptor_bytes": FLAGS.images * FLAGS.per_image * FLAGS.dim * 4,
        "rows": [],
    }
    for mode in ("build", "append"):
        for name, tree in trees.items():
            row = {"mode": mode, "code": name, **measure(tree, mode, work)}
            for field in ("VmHWM", "RssAnon_peak", "RssAnon_at_start"):
                row[field + "_MiB"] = round(row.pop(field) / mib, 1)
            report["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
