"""Benchmark: `delf index --append` on the Milvus back end, a partition vs a copy.

An index of `--images` images x `--per_image` random unit 40-D descriptors (and a
global descriptor each) is built on Milvus Lite; then `--added` images are appended
twice from the same starting index: once as `delf index --append` does it (a
partition of the new rows in the same collections) and once as it does past
`MAX_PARTITIONS` (every row copied into new collections: the baseline, and what
every append cost before partitions). Prints seconds for each and the copy's
seconds per 10^6 rows.

  PYTHONPATH=. python bench/milvus_append.py [--images=3000 --added=100]
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from delf_tf.features import FeatureStore, LocalFeatures
from delf_tf.retrieval import Index
from delf_tf.retrieval.structures import milvus

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 3000, "images of the index before the append")
flags.DEFINE_integer("added", 100, "images appended")
flags.DEFINE_integer("per_image", 100, "descriptors per image")
DIM, GLOBAL_DIM = 40, 256


def write_store(root: Path, keys: range, seed: int) -> FeatureStore:
    """Random unit descriptors and global descriptors, one .npz per key."""
    rng = np.random.default_rng(seed)
    store = FeatureStore.open_or_create(root, "f" * 64, {"descriptor_dim": DIM, "model": "b"})
    per = FLAGS.per_image
    for key in keys:
        descriptors = rng.normal(size=(per, DIM)).astype(np.float32)
        descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
        global_descriptor = rng.normal(size=GLOBAL_DIM).astype(np.float32)
        store.save(
            f"img{key}.jpg",
            LocalFeatures(
                rng.uniform(0, 100, (per, 2)).astype(np.float32),
                np.ones(per, np.float32),
                np.ones(per, np.float32),
                descriptors,
                global_descriptor / np.linalg.norm(global_descriptor),
            ),
        )
    return store


def main(argv: list[str]) -> None:
    del argv
    work = Path(tempfile.mkdtemp(prefix="milvus_append_"))
    try:
        first = write_store(work / "s1", range(FLAGS.images), 0)
        more = write_store(work / "s2", range(FLAGS.images, FLAGS.images + FLAGS.added), 1)
        uri = str(work / "lite.db")
        index = Index.from_store(first, progress=False)
        start = time.perf_counter()
        index.build_structures(backend="milvus", milvus_uri=uri, recall=False, progress=False)
        report = {
            "rows_before": index.num_descriptors,
            "rows_added": FLAGS.added * FLAGS.per_image,
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        index.save(work / "index")
        default = milvus.MAX_PARTITIONS
        for mode, cap in (("partition", default), ("copy", 0)):
            milvus.MAX_PARTITIONS = cap
            grown, _ = Index.load(work / "index").add_store(more, progress=False)
            start = time.perf_counter()
            grown.build_structures(recall=False, progress=False)  # the Milvus inserts
            report[f"append_{mode}_seconds"] = round(time.perf_counter() - start, 2)
        milvus.MAX_PARTITIONS = default
        copied = report["rows_before"] + report["rows_added"]
        report["copy_seconds_per_million_rows"] = round(
            report["append_copy_seconds"] / copied * 1e6, 1
        )
        report["copy_over_partition"] = round(
            report["append_copy_seconds"] / report["append_partition_seconds"], 1
        )
        print(json.dumps(report, indent=1))
    finally:
        milvus.release(milvus.location(str(work / "lite.db")))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
