"""TFRecords, image folders, the TFDS landmarks builder and the tf.data pipelines (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from delf_tf.config import DatasetBuildConfig, TrainingConfig
from delf_tf.images import load_image
from delf_tf.training import data, records, sources


def _image(rng, size=(40, 56)):
    """Smooth random uint8 [H, W, 3] content (JPEG keeps it close, unlike pure noise)."""
    coarse = Image.fromarray(rng.integers(0, 255, (5, 7, 3), dtype=np.uint8))
    return np.asarray(coarse.resize(size[::-1], Image.BILINEAR))


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """3 classes x 3 images (PNG, JPEG, one EXIF-rotated JPEG, one gray PNG) + a corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("folder") / "images"
    for label in ("arch", "bridge", "tower"):
        folder = root / label
        folder.mkdir(parents=True)
        Image.fromarray(_image(rng)).save(folder / "a.png")
        Image.fromarray(_image(rng)).save(folder / "b.jpg", quality=90)
        Image.fromarray(_image(rng)[:, :, 0]).save(folder / "c.png")
    rotated = Image.fromarray(_image(rng))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(root / "tower" / "d.jpg", exif=exif.tobytes())
    (root / "bridge" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def _read_records(pattern: str) -> list[dict]:
    dataset = tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern))).map(records.parse_example)
    return [{k: v.numpy() for k, v in example.items()} for example in dataset]


def test_tfrecord_write_read_round_trip(class_folder, tmp_path):
    listed = sources.list_image_folder(class_folder)
    out = tmp_path / "records"
    summary = records.build_tfrecords(
        listed, out, DatasetBuildConfig(validation_fraction=0.34, images_per_shard=2, num_workers=2)
    )
    assert summary.num_classes == 3
    assert [Path(p).name for p, _ in summary.skipped] == ["broken.jpg"]
    assert summary.train_images + summary.validation_images == 10
    assert summary.train_shards == 4  # 7 listed training images, 2 per shard
    label_map = json.loads((out / "label_map.json").read_text())
    assert label_map == {"num_classes": 3, "classes": ["arch", "bridge", "tower"]}
    train = _read_records(str(out / "train-*.tfrecord"))
    val = _read_records(str(out / "validation-*.tfrecord"))
    assert len(train) == summary.train_images and len(val) == summary.validation_images
    # Per-class split: every class keeps training images and gives one to validation.
    assert sorted(r["image/class/label"] for r in val) == [0, 1, 2]
    assert {r["image/class/label"] for r in train} == {0, 1, 2}
    paths = {image.image_id: image.path for image in listed.images}
    for record in train + val:
        image_id = record["image/id"].decode()
        expected = load_image(paths[image_id])  # EXIF applied, gray -> RGB
        decoded = tf.io.decode_image(record["image/encoded"], channels=3).numpy()
        assert decoded.shape == expected.shape, image_id
        assert (record["image/height"], record["image/width"]) == expected.shape[:2]
        difference = np.abs(decoded.astype(int) - expected.astype(int))
        if paths[image_id].suffix == ".png":
            assert difference.max() == 0, image_id  # PNG bytes are kept as they are
        else:
            assert difference.mean() < 4, image_id  # JPEG decoders differ by rounding
    # The rotated JPEG was re-encoded upright: 56 x 40 instead of 40 x 56.
    rotated = next(r for r in train + val if r["image/id"] == b"tower__d")
    assert (rotated["image/height"], rotated["image/width"]) == (56, 40)


def test_tfrecord_pipeline_batches_shards_and_infers_classes(class_folder, tmp_path):
    listed = sources.list_image_folder(class_folder)
    out = tmp_path / "records"
    records.build_tfrecords(
        listed, out, DatasetBuildConfig(validation_fraction=0.0, images_per_shard=3)
    )
    config = TrainingConfig(batch_size=4, image_size=32, shuffle_buffer=16)
    source = data.resolve_source(str(out / "train-*"), config)
    assert source.kind == "tfrecord" and len(source.files) == 4
    assert data.infer_num_classes(source, 0) == 3
    with pytest.raises(ValueError, match="num_classes=5"):
        data.infer_num_classes(source, 5)
    images, labels = next(iter(data.make_dataset(source, config, training=True)))
    assert images.shape == (4, 32, 32, 3) and images.dtype == tf.float32
    assert labels.dtype == tf.int32 and set(labels.numpy()) <= {0, 1, 2}
    assert float(tf.reduce_min(images)) >= 0.0 and float(tf.reduce_max(images)) <= 255.0
    # Per-worker sharding: two input pipelines read disjoint halves that cover everything.
    single = config.replace(batch_size=1)
    seen = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker)
        batches = data.make_dataset(source, single, training=False, input_context=context)
        seen.append({float(tf.reduce_sum(image)) for image, _ in batches})
    everything = {
        float(tf.reduce_sum(image)) for image, _ in data.make_dataset(source, single, False)
    }
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == everything
    assert len(everything) == 10


def test_image_folder_source_skips_unreadable_and_maps_validation_classes(class_folder, tmp_path):
    config = TrainingConfig(batch_size=1, image_size=24)
    source = data.resolve_source(str(class_folder), config)
    assert source.kind == "folder" and source.num_classes == 3
    assert source.class_names == ("arch", "bridge", "tower")
    batches = list(data.make_dataset(source, config, training=False))
    assert len(batches) == 10  # 11 files, the corrupt one skipped with a warning
    # A validation folder with only some classes keeps the training labels.
    val_root = tmp_path / "val"
    (val_root / "tower").mkdir(parents=True)
    Image.fromarray(_image(np.random.default_rng(1))).save(val_root / "tower" / "x.png")
    val = data.resolve_source(str(val_root), config, class_names=source.class_names)
    assert val.labels == (2,)
    (val_root / "castle").mkdir()
    Image.fromarray(_image(np.random.default_rng(2))).save(val_root / "castle" / "y.png")
    with pytest.raises(ValueError, match="castle"):
        data.resolve_source(str(val_root), config, class_names=source.class_names)
    with pytest.raises(ValueError, match="neither"):
        data.resolve_source(str(tmp_path / "nothing-*.tfrecord"), config)


def _write_gldv2(root: Path, rng) -> None:
    rows = []
    for landmark in (7, 11, 30):
        for index in range(4):
            image_id = f"{landmark:02d}{index}f00d{landmark}"
            path = root / "train" / sources.gldv2_relative_path(image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_image(rng, (30, 30))).save(path, quality=90)
            rows.append(f"{image_id},http://example.invalid/{image_id},{landmark}")
    rows.append("deadbeef1,http://example.invalid/x,7")  # listed, but no file
    (root / "train.csv").write_text("id,url,landmark_id\n" + "\n".join(rows) + "\n")


def test_gldv2_csv_listing_and_split(tmp_path):
    _write_gldv2(tmp_path, np.random.default_rng(3))
    listed = sources.list_gldv2_csv(tmp_path / "train.csv", tmp_path / "train")
    assert len(listed.images) == 12 and listed.class_names == ["7", "11", "30"]
    assert [reason for _, reason in listed.missing] == ["file not found"]
    train, val = sources.split_per_class(listed.images, 0.25, seed=0)
    assert len(val) == 3 and {image.class_name for image in val} == {"7", "11", "30"}
    again = sources.split_per_class(list(reversed(listed.images)), 0.25, seed=0)
    assert {i.image_id for i in again[1]} == {i.image_id for i in val}


def test_tfds_builder_prepares_offline_and_feeds_the_pipeline(tmp_path):
    import tensorflow_datasets as tfds

    import delf_tf.training.tfds_landmarks  # noqa: F401

    rng = np.random.default_rng(4)
    manual = tmp_path / "manual"
    _write_gldv2(manual, rng)
    for split, count in (("train", 3), ("val", 1)):
        for label in ("bridge", "church"):
            folder = manual / f"landmarks_clean_{split}" / label
            folder.mkdir(parents=True)
            for index in range(count):
                Image.fromarray(_image(rng, (20, 24))).save(folder / f"{index}.png")
    data_dir = tmp_path / "tfds"
    config = TrainingConfig(
        batch_size=2,
        image_size=16,
        tfds_data_dir=str(data_dir),
        tfds_manual_dir=str(manual),
    )
    # The trainer's resolution prepares the dataset from the manual dir on first use.
    source = data.resolve_source("tfds:delf_landmarks/gldv2", config)
    assert source.kind == "tfds" and source.num_classes == 3
    assert source.class_names == ("7", "11", "30")
    builder = tfds.builder("delf_landmarks/gldv2", data_dir=str(data_dir))
    assert builder.is_prepared()
    splits = builder.info.splits
    assert splits["train"].num_examples + splits["validation"].num_examples == 12
    assert splits["validation"].num_examples == 3  # one of 4 per class (fraction 0.2)
    images, labels = next(iter(data.make_dataset(source, config, training=True)))
    assert images.shape == (2, 16, 16, 3) and set(labels.numpy()) <= {0, 1, 2}
    val = data.resolve_source("delf_landmarks/gldv2", config, default_split="validation")
    assert val.split == "validation"
    # The Landmarks clean (LC) layout: _train and _val folders.
    clean = tfds.builder("delf_landmarks/landmarks_clean", data_dir=str(data_dir))
    clean.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual), try_download_gcs=False)
    )
    assert clean.info.splits["train"].num_examples == 6
    assert clean.info.splits["validation"].num_examples == 2
    assert clean.info.features["label"].names == ["bridge", "church"]
