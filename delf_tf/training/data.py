"""tf.data input pipelines for training: TFRecords, TFDS datasets or image folders.

Every source becomes (encoded image bytes, label) elements, then one shared tail:
shard per worker -> shuffle (files or paths, then records, all before
decoding so the buffer holds encoded bytes) -> repeat -> parallel decode + augmentation -> batch -> prefetch, all
parallel stages at AUTOTUNE. Outputs: images float32 [B, S, S, 3] RGB in
[0, 255] (what DelfModel takes) and labels int32 [B].

Image folders are decoded with TF's decoders (JPEG, PNG, BMP, GIF; no EXIF
rotation); undecodable files are skipped with a warning. To have EXIF, CMYK,
16-bit or WebP images normalised exactly like `delf_tf.images`, convert the
folder with `training/build_tfrecords.py` first.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import tensorflow as tf
from absl import logging

from delf_tf.atomic import is_remote
from delf_tf.config import TrainingConfig
from delf_tf.errors import InputError
from delf_tf.training import records
from delf_tf.training.sources import sort_class_names

AUTOTUNE = tf.data.AUTOTUNE
TFDS_PREFIX = "tfds:"
# Suffixes tf.io.decode_image reads.
TF_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_TFDS_NAME = re.compile(r"^[a-z][a-z0-9_]*(/[\w.\-]+)?(:[\w\[\]%:.\-+]+)?$")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A resolved `--train_data` / `--val_data` value.

    kind: "tfrecord" (`files`), "folder" (`files` + `labels`) or "tfds" (`name`, `split`).
    num_classes / class_names: known from the data, or None.
    """

    kind: str
    spec: str
    files: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    name: str = ""
    split: str = ""
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None


def resolve_source(
    spec: str,
    config: TrainingConfig,
    class_names: tuple[str, ...] | None = None,
    default_split: str = "train",
) -> DataSource:
    """Interprets `spec`: an image folder, a TFRecord glob, or a TFDS name.

    `class_names` (the training set's) fixes the labels of a validation folder.
    Raises InputError naming `spec` when it is none of these.
    """
    if spec.startswith(TFDS_PREFIX):
        return _tfds_source(spec[len(TFDS_PREFIX) :], spec, config, default_split)
    path = Path(spec)
    if not is_remote(spec) and path.is_dir():
        return _folder_source(path, spec, class_names)
    files = sorted(tf.io.gfile.glob(spec))
    if files:
        label_map = records.read_label_map(os.path.dirname(files[0]))
        return DataSource(
            "tfrecord",
            spec,
            files=tuple(files),
            num_classes=int(label_map["num_classes"]) if label_map else None,
            class_names=tuple(label_map["classes"])
            if label_map and "classes" in label_map
            else None,
        )
    if _TFDS_NAME.match(spec):
        return _tfds_source(spec, spec, config, default_split)
    raise InputError(
        f"{spec}: neither an image folder, a TFRecord glob matching files, nor a TFDS "
        f"dataset name (use {TFDS_PREFIX}name[/config][:split] to force TFDS)"
    )


def _folder_source(root: Path, spec: str, class_names: tuple[str, ...] | None) -> DataSource:
    found = sort_class_names(child.name for child in root.iterdir() if child.is_dir())
    names = tuple(class_names) if class_names is not None else tuple(found)
    index = {name: i for i, name in enumerate(names)}
    unknown = [name for name in found if name not in index]
    if unknown:
        raise InputError(f"{root}: class folders not in the training classes: {unknown[:10]}")
    files, labels = [], []
    for name in found:
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in TF_IMAGE_SUFFIXES:
                files.append(str(path))
                labels.append(index[name])
    if not files:
        raise InputError(f"{root}: no {TF_IMAGE_SUFFIXES} images in class subfolders")
    return DataSource(
        "folder", spec, tuple(files), tuple(labels), num_classes=len(names), class_names=names
    )


def _tfds_source(name_split: str, spec: str, config: TrainingConfig, default_split: str):
    import tensorflow_datasets as tfds

    import delf_tf.training.tfds_landmarks  # noqa: F401  (registers delf_landmarks)

    name, _, split = name_split.partition(":")
    builder = _tfds_builder(name, config)
    split = split or default_split
    if split not in builder.info.splits:
        raise InputError(
            f"{spec}: TFDS dataset {name} has no split {split!r} "
            f"(splits: {sorted(builder.info.splits)})"
        )
    label = builder.info.features["label"]
    if not isinstance(label, tfds.features.ClassLabel):
        raise InputError(f"{spec}: TFDS feature 'label' is not a ClassLabel")
    return DataSource(
        "tfds",
        spec,
        name=name,
        split=split,
        num_classes=label.num_classes,
        class_names=tuple(label.names),
    )


def _tfds_builder(name: str, config: TrainingConfig):
    """tfds builder of `name`, prepared from `tfds_manual_dir` if it is not yet."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=config.tfds_data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise InputError(
            f"{name}: not a folder, no file matches it as a TFRecord glob, and no TFDS "
            f"dataset has this name ({error})"
        ) from error
    if not builder.is_prepared():
        if not config.tfds_manual_dir:
            raise InputError(
                f"TFDS dataset {name} is not prepared in {builder.data_dir}; pass "
                "--tfds_manual_dir to prepare a local builder offline, or prepare it with tfds"
            )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=config.tfds_manual_dir, try_download_gcs=False
            )
        )
    return builder


def make_dataset(
    source: DataSource,
    config: TrainingConfig,
    training: bool,
    input_context: tf.distribute.InputContext | None = None,
    seed: int | None = None,
) -> tf.data.Dataset:
    """(images float32 [b, S, S, 3] in [0, 255], labels int32 [b]) batches.

    b is the per-replica batch (config.batch_size split by `input_context`),
    S = config.image_size. Training data is sharded per input pipeline,
    shuffled, repeated and augmented (random resized crop, flips if enabled);
    evaluation data is one pass of centre crops in file order (partial last
    batch dropped). `seed` (default config.seed) seeds order and augmentation:
    pass a different one when resuming so the data order does not repeat.
    """
    seed = config.seed if seed is None else seed
    pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    batch = (
        input_context.get_per_replica_batch_size(config.batch_size)
        if input_context
        else config.batch_size
    )
    dataset = _encoded_dataset(source, config, training, pipelines, pipeline_id, seed)
    if training:
        dataset = dataset.repeat()
        seeds = tf.data.Dataset.random(seed=seed).batch(2)
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda element, pair: (
                train_image(element[0], pair, config),
                element[1],
            ),
            num_parallel_calls=AUTOTUNE,
            deterministic=False,
        )
    else:
        dataset = dataset.map(
            lambda encoded, label: (eval_image(encoded, config.image_size), label),
            num_parallel_calls=AUTOTUNE,
        )
    dataset = dataset.ignore_errors(log_warning=True)
    dataset = dataset.batch(batch, drop_remainder=True, num_parallel_calls=AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = not training
    return dataset.with_options(options).prefetch(AUTOTUNE)


def _encoded_dataset(
    source: DataSource,
    config: TrainingConfig,
    training: bool,
    pipelines: int,
    pipeline_id: int,
    seed: int,
) -> tf.data.Dataset:
    """(encoded image bytes string [], label int32 []) for this input pipeline's shard."""
    if source.kind == "folder":
        dataset = tf.data.Dataset.from_tensor_slices(
            (list(source.files), tf.constant(source.labels, tf.int32))
        )
        dataset = dataset.shard(pipelines, pipeline_id)
        if training:  # Shuffling paths is cheap: shuffle them all, every epoch.
            dataset = dataset.shuffle(len(source.files), seed=seed, reshuffle_each_iteration=True)
        return dataset.map(
            lambda path, label: (tf.io.read_file(path), label),
            num_parallel_calls=AUTOTUNE,
            deterministic=not training,
        )
    if source.kind == "tfrecord":
        files = tf.data.Dataset.from_tensor_slices(list(source.files))
        per_file = len(source.files) >= pipelines
        if per_file:
            files = files.shard(pipelines, pipeline_id)
        if training:
            files = files.shuffle(len(source.files), seed=seed, reshuffle_each_iteration=True)
        dataset = files.interleave(
            tf.data.TFRecordDataset,
            cycle_length=AUTOTUNE,
            num_parallel_calls=AUTOTUNE,
            deterministic=not training,
        )
        if not per_file:
            dataset = dataset.shard(pipelines, pipeline_id)
        if training:
            dataset = dataset.shuffle(config.shuffle_buffer, seed=seed)
        return dataset.map(_parse_record, num_parallel_calls=AUTOTUNE, deterministic=not training)
    if source.kind == "tfds":
        return _tfds_encoded(source, config, training, pipelines, pipeline_id, seed)
    raise ValueError(f"unknown data source kind {source.kind!r}")


def _parse_record(serialized):
    features = records.parse_example(serialized)
    return features["image/encoded"], tf.cast(features["image/class/label"], tf.int32)


def _tfds_encoded(source, config, training, pipelines, pipeline_id, seed):
    import tensorflow_datasets as tfds

    builder = _tfds_builder(source.name, config)
    num_shards = len(builder.info.splits[source.split].file_instructions)
    context = None
    if pipelines > 1 and num_shards >= pipelines:
        context = tf.distribute.InputContext(pipelines, pipeline_id)
    dataset = builder.as_dataset(
        split=source.split,
        shuffle_files=training,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(
            input_context=context, shuffle_seed=seed, num_parallel_calls_for_decode=AUTOTUNE
        ),
    )
    if pipelines > 1 and context is None:
        dataset = dataset.shard(pipelines, pipeline_id)
    if training:
        dataset = dataset.shuffle(config.shuffle_buffer, seed=seed)
    return dataset.map(
        lambda example: (example["image"], tf.cast(example["label"], tf.int32)),
        num_parallel_calls=AUTOTUNE,
    )


def train_image(encoded: tf.Tensor, seed: tf.Tensor, config: TrainingConfig) -> tf.Tensor:
    """Encoded bytes -> random resized crop float32 [S, S, 3]; seed int64 [2].

    JPEGs decode only the crop window (`decode_and_crop_jpeg`).
    """

    def crop_window(shape):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=config.crop_aspect_range,
            area_range=config.crop_area_range,
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        return begin, size

    def jpeg():
        begin, size = crop_window(tf.io.extract_jpeg_shape(encoded))
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.io.decode_and_crop_jpeg(encoded, window, channels=3)

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        begin, size = crop_window(tf.shape(image))
        return tf.slice(image, begin, size)

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    image = tf.image.resize(image, [config.image_size] * 2, antialias=True)
    if config.random_flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
    return tf.clip_by_value(image, 0.0, 255.0)


def eval_image(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded bytes -> central square crop resized to float32 [size, size, 3]."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    image = tf.image.crop_to_bounding_box(
        image, (shape[0] - side) // 2, (shape[1] - side) // 2, side, side
    )
    image = tf.image.resize(image, [size, size], antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def infer_num_classes(source: DataSource, requested: int) -> int:
    """`requested` when > 0 (checked against the data when it knows), else the data's count."""
    known = source.num_classes
    if requested > 0:
        if known is not None and known != requested:
            raise InputError(f"--num_classes={requested} but {source.spec} has {known} classes")
        return requested
    if known is None:
        raise InputError(
            f"{source.spec}: the number of classes is unknown (no {records.LABEL_MAP_FILE} "
            "beside the TFRecords); pass --num_classes"
        )
    logging.info("num_classes inferred from %s: %d", source.spec, known)
    return known
