"""Input pipeline throughput: our tf.data pipeline vs a serial one vs a training step.

    python bench/input_pipeline.py [--images=../shared/data/landmarks-dev/images]

Writes the images (default: synthetic 640x480 JPEGs; or a folder of photos,
one pseudo-class per image) as TFRecords with build_tfrecords, then measures
images per second of
  * parallel: delf_tf.training.data.make_dataset (parallel interleave, decode and
    augmentation at AUTOTUNE, parallel batch, prefetch);
  * serial:   the same parse / decode / crop functions, no parallel map, no
    interleave, no prefetch (how the reference pipeline runs);
  * train_step: images per second a descriptor-stage training step consumes
    (random weights; same batch and crop size) on this machine.
Prints one JSON object with the ratios parallel/serial and parallel/train_step.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLAGS = flags.FLAGS
flags.DEFINE_string("images", None, "folder of photos (default: synthetic JPEGs)")
flags.DEFINE_integer("num_synthetic", 192, "synthetic images when --images is not given")
flags.DEFINE_integer("batch_size", 16, "batch size")
flags.DEFINE_integer("image_size", 224, "crop size")
flags.DEFINE_integer("batches", 12, "batches timed per repetition")
flags.DEFINE_integer("repeats", 3, "repetitions (the median is reported)")
flags.DEFINE_integer("train_steps", 3, "timed training steps after a warm-up one (0: skip)")


def write_synthetic(folder: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
        image = np.asarray(coarse.resize((640, 480), Image.BILINEAR)).astype(np.int16)
        image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
        target = folder / f"class_{index % 8}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{index:04d}.jpg", quality=90)


def photo_folder(images: Path, folder: Path) -> None:
    """One pseudo-class per photo (links, no copies)."""
    from delf_tf.images import list_images

    for index, path in enumerate(list_images(images)):
        target = folder / f"class_{index % 8}"
        target.mkdir(parents=True, exist_ok=True)
        os.symlink(path.resolve(), target / path.name)


def serial_dataset(files, config):
    import tensorflow as tf

    from delf_tf.training import data, records

    def parse(serialized):
        example = records.parse_example(serialized)
        return example["image/encoded"], tf.cast(example["image/class/label"], tf.int32)

    dataset = tf.data.TFRecordDataset(list(files)).map(parse).repeat()
    seeds = tf.data.Dataset.random(seed=config.seed).batch(2)
    dataset = tf.data.Dataset.zip((dataset, seeds)).map(
        lambda element, seed: (data.train_image(element[0], seed, config), element[1])
    )
    return dataset.batch(config.batch_size, drop_remainder=True)


def images_per_second(dataset, batches: int, batch_size: int, repeats: int) -> float:
    iterator = iter(dataset)
    next(iterator)  # warm-up: graph building, first files opened
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        rates.append(batches * batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def train_step_rate(source, config, steps: int) -> float:
    import tensorflow as tf

    from delf_tf.config import ModelConfig
    from delf_tf.training import data
    from delf_tf.training.trainer import Trainer

    trainer = Trainer(config, ModelConfig())
    dataset = trainer.strategy.distribute_datasets_from_function(
        lambda context: data.make_dataset(source, config, True, context)
    )
    iterator = iter(dataset)
    size = tf.constant(config.image_size)
    trainer._train_step(iterator, size)  # warm-up: tracing
    start = time.perf_counter()
    for _ in range(steps):
        trainer._train_step(iterator, size)["loss/total"].numpy()
    return steps * config.batch_size / (time.perf_counter() - start)


def main(argv):
    del argv
    from delf_tf.config import DatasetBuildConfig, TrainingConfig
    from delf_tf.training import data, records, sources

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        if FLAGS.images:
            photo_folder(Path(FLAGS.images), folder)
        else:
            write_synthetic(folder, FLAGS.num_synthetic)
        listed = sources.list_image_folder(folder)
        records.build_tfrecords(
            listed,
            tmp / "records",
            DatasetBuildConfig(validation_fraction=0.0, images_per_shard=16),
        )
        config = TrainingConfig(
            train_data=str(tmp / "records" / "train-*"),
            model_dir=str(tmp / "run"),
            batch_size=FLAGS.batch_size,
            image_size=FLAGS.image_size,
            weights="random",
            shuffle_buffer=64,
        )
        source = data.resolve_source(config.train_data, config)
        parallel = images_per_second(
            data.make_dataset(source, config, True), FLAGS.batches, FLAGS.batch_size, FLAGS.repeats
        )
        serial = images_per_second(
            serial_dataset(source.files, config), FLAGS.batches, FLAGS.batch_size, FLAGS.repeats
        )
        step = train_step_rate(source, config, FLAGS.train_steps) if FLAGS.train_steps else None
    print(
        json.dumps(
            {
                "images": FLAGS.images or f"synthetic 640x480 JPEG x{FLAGS.num_synthetic}",
                "num_images": len(listed.images),
                "batch_size": FLAGS.batch_size,
                "image_size": FLAGS.image_size,
                "cpu_count": os.cpu_count(),
                "parallel_images_per_s": round(parallel, 1),
                "serial_images_per_s": round(serial, 1),
                "train_step_images_per_s": round(step, 2) if step else None,
                "parallel_over_serial": round(parallel / serial, 2),
                "parallel_over_train_step": round(parallel / step, 1) if step else None,
                "serial_over_train_step": round(serial / step, 1) if step else None,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    app.run(main)
