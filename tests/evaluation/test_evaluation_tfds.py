"""The ROxford5k TFDS builder prepares a tiny manual folder offline."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")


def test_roxford5k_builder_from_manual_dir(tmp_path):
    from delf_tf.evaluation import tfds_builders

    manual = tmp_path / "manual"
    (manual / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ["a", "b", "c", "q1"]:
        pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(manual / "jpg" / f"{name}.jpg")
    gnd = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q1"],
        "gnd": [{"bbx": np.array([2.0, 3.0, 20.0, 15.0]), "easy": [0], "hard": [2], "junk": [1]}],
    }
    (manual / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd))

    builder = tfds.builder("roxford5k", data_dir=str(tmp_path / "data"))
    assert isinstance(builder, tfds_builders.Roxford5k)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    assert builder.info.splits["database"].num_examples == 3
    raw = builder.as_dataset(split="database", decoders={"image": tfds.decode.SkipDecoding()})
    database = {ex["id"].decode(): ex for ex in tfds.as_numpy(raw)}
    assert sorted(database) == ["a", "b", "c"]
    # The JPEG files are stored as they are, not re-encoded.
    assert database["a"]["image"] == (manual / "jpg" / "a.jpg").read_bytes()
    (query,) = tfds.as_numpy(builder.as_dataset(split="query"))
    assert query["id"] == b"q1" and query["is_query"]
    assert query["bbox"].tolist() == [2.0, 3.0, 20.0, 15.0]
    full = np.asarray(Image.open(manual / "jpg" / "q1.jpg").convert("RGB"))
    assert np.array_equal(query["cropped_image"], full[3:15, 2:20])
    assert [query[k].tolist() for k in ("easy", "hard", "junk")] == [[b"a"], [b"c"], [b"b"]]
