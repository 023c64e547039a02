"""TFRecords of labelled images: the Example schema, validated encoding, sharded writing.

Example features (the GLDv2 reference schema):
  image/encoded      bytes, JPEG or PNG that `tf.io.decode_image` decodes exactly
                     as `delf_tf.images.load_image` reads the file
  image/id           bytes, utf-8 image id
  image/class/label  int64, label index in the label map
  image/height       int64, image/width int64 (of the decoded, EXIF-rotated image)
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tensorflow as tf
from absl import logging
from PIL import Image
from tqdm import tqdm

from delf_tf.atomic import atomic_write_text, staged_directory
from delf_tf.config import DatasetBuildConfig
from delf_tf.errors import InputError
from delf_tf.images import ImageError, decode_image, exif_orientation
from delf_tf.training.sources import ImageList, LabelledImage, split_per_class

LABEL_MAP_FILE = "label_map.json"
SUMMARY_FILE = "summary.json"
RECORD_SUFFIX = ".tfrecord"
REENCODE_JPEG_QUALITY = 95
# Formats whose bytes TF decodes to the same pixels as Pillow (absent EXIF rotation).
_TF_NATIVE_FORMATS = ("JPEG", "PNG")
_TF_NATIVE_MODES = ("RGB", "L")

FEATURE_SPEC = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/id": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/height": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "image/width": tf.io.FixedLenFeature([], tf.int64, default_value=0),
}


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """Image bytes ready for `tf.io.decode_image`, with the decoded size."""

    data: bytes
    height: int
    width: int


def encode_image_file(path: str | os.PathLike) -> EncodedImage:
    """Validates `path` with `delf_tf.images` and returns bytes TF decodes identically.

    JPEG / PNG files in RGB or gray without an EXIF rotation are kept byte for
    byte; anything else (EXIF-rotated, CMYK, 16-bit, alpha, WebP, TIFF, ...) is
    re-encoded from the normalised RGB pixels as JPEG (quality 95).
    Raises ImageError naming the file when it cannot be decoded.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageError(f"{path}: cannot read file ({error.strerror})") from error
    pixels = decode_image(data, name=str(path), servable_only=False)  # re-encoded below
    height, width = pixels.shape[:2]
    if _is_tf_native(data):
        return EncodedImage(data, height, width)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=REENCODE_JPEG_QUALITY)
    return EncodedImage(buffer.getvalue(), height, width)


def _is_tf_native(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        if image.format not in _TF_NATIVE_FORMATS or image.mode not in _TF_NATIVE_MODES:
            return False
        if "transparency" in image.info:
            return False
        return exif_orientation(image) == 1


def make_example(encoded: EncodedImage, image_id: str, label: int) -> tf.train.Example:
    def _bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def _int(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    return tf.train.Example(
        features=tf.train.Features(
            feature={
                "image/encoded": _bytes(encoded.data),
                "image/id": _bytes(image_id.encode("utf-8")),
                "image/class/label": _int(label),
                "image/height": _int(encoded.height),
                "image/width": _int(encoded.width),
            }
        )
    )


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Scalar string -> {'image/encoded': string, 'image/id': string, 'image/class/label': int64, ...}."""
    return tf.io.parse_single_example(serialized, FEATURE_SPEC)


@dataclasses.dataclass
class BuildSummary:
    """What `build_tfrecords` wrote and what it skipped (path, reason)."""

    output: str
    num_classes: int
    train_images: int
    validation_images: int
    train_shards: int
    validation_shards: int
    skipped: list[tuple[str, str]]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["skipped"] = [list(item) for item in self.skipped]
        return out


def build_tfrecords(
    image_list: ImageList,
    output: str | os.PathLike,
    config: DatasetBuildConfig | None = None,
    validation: ImageList | None = None,
) -> BuildSummary:
    """Writes train-/validation- shards, `label_map.json` and `summary.json` into `output`.

    The split is per class (see `split_per_class`) unless `validation` gives the
    validation images explicitly. Unreadable images are logged and skipped. The
    directory appears complete or not at all (`staged_directory`).
    """
    config = config or DatasetBuildConfig()
    class_names = image_list.class_names
    labels = {name: index for index, name in enumerate(class_names)}
    if validation is None:
        train, val = split_per_class(image_list.images, config.validation_fraction, config.seed)
    else:
        unknown = sorted({image.class_name for image in validation.images} - set(labels))
        if unknown:
            raise InputError(f"validation classes missing from the training set: {unknown[:10]}")
        train, val = image_list.images, validation.images
    skipped = list(image_list.missing) + list(validation.missing if validation else [])
    output = Path(output)
    with staged_directory(output) as staging:
        train_written, train_shards = _write_split(staging, "train", train, labels, config, skipped)
        val_written, val_shards = _write_split(staging, "validation", val, labels, config, skipped)
        label_map = {"num_classes": len(class_names), "classes": class_names}
        atomic_write_text(staging / LABEL_MAP_FILE, json.dumps(label_map, indent=1) + "\n")
        summary = BuildSummary(
            str(output),
            len(class_names),
            train_written,
            val_written,
            train_shards,
            val_shards,
            skipped,
        )
        atomic_write_text(staging / SUMMARY_FILE, json.dumps(summary.to_dict(), indent=1) + "\n")
    for path, reason in skipped:
        logging.warning("skipped %s: %s", path, reason)
    return summary


def _write_split(
    folder: Path,
    split: str,
    images: Sequence[LabelledImage],
    labels: dict[str, int],
    config: DatasetBuildConfig,
    skipped: list[tuple[str, str]],
) -> tuple[int, int]:
    """Writes `images` into ceil(n / images_per_shard) shards; returns (written, shards)."""
    if not images:
        return 0, 0
    num_shards = max(1, math.ceil(len(images) / config.images_per_shard))
    shards = [images[i::num_shards] for i in range(num_shards)]
    progress = tqdm(total=len(images), desc=f"{split} images", unit="img", disable=None)

    def write_shard(index: int) -> tuple[int, list[tuple[str, str]]]:
        name = f"{split}-{index:05d}-of-{num_shards:05d}{RECORD_SUFFIX}"
        written, failures = 0, []
        with tf.io.TFRecordWriter(str(folder / name)) as writer:
            for image in shards[index]:
                try:
                    encoded = encode_image_file(image.path)
                except ImageError as error:
                    failures.append((str(image.path), str(error)))
                else:
                    example = make_example(encoded, image.image_id, labels[image.class_name])
                    writer.write(example.SerializeToString())
                    written += 1
                progress.update(1)
        return written, failures

    with ThreadPoolExecutor(max_workers=min(config.num_workers, num_shards)) as pool:
        results = list(pool.map(write_shard, range(num_shards)))
    progress.close()
    for _, failures in results:
        skipped.extend(failures)
    return sum(written for written, _ in results), num_shards


def read_label_map(folder: str | os.PathLike) -> dict | None:
    """The `label_map.json` in `folder` (local or gs://), or None when there is none."""
    path = os.path.join(str(folder), LABEL_MAP_FILE)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as handle:
            label_map = json.loads(handle.read())
        int(label_map["num_classes"])
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a label map ({error})") from error
    return label_map
