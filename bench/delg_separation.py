"""Learning check: does DELG training make the global descriptor separate the classes?

    python bench/delg_separation.py [--steps=400 --num_classes=2 --backbone=tiny]

Synthetic task (delf_tf.testing.synthetic_training): each class is a striped pattern
pasted at a random place on random clutter. Trains `--architecture=delg_resnet50`
(ArcFace global head, attention, autoencoder; `delf_tf.training.delg`) from random
weights, and measures on held-out images, before and after training, with the
L2-normalised global descriptors:
  * margin: mean cosine between images of the same class minus mean cosine between
    images of different classes (higher separates better);
  * nn_accuracy: leave-one-out nearest-neighbour class accuracy.
Prints JSON; `separates_better` is true when the margin rises and 1-NN accuracy does not
fall. Few steps (< ~200) leave the batch norms' moving statistics near their initial
values, so inference-mode descriptors are poor: keep the default. ~30 s on 2 cores.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_classes", 2, "classes (patterns)")
flags.DEFINE_integer("images_per_class", 24, "training images per class")
flags.DEFINE_integer("test_images", 24, "held-out images for the measurement")
flags.DEFINE_integer("image_size", 96, "image side")
flags.DEFINE_integer("pattern_size", 40, "pattern side")
flags.DEFINE_integer("batch_size", 8, "batch size")
flags.DEFINE_integer("steps", 400, "training steps (BN moving statistics need a few hundred)")
flags.DEFINE_float("lr", 0.05, "initial learning rate")
flags.DEFINE_enum("backbone", "tiny", ["tiny", "resnet50"], "size of delg_resnet50")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_string("work_dir", None, "keep the run here (default: a temporary folder)")


def separation(model, images, labels) -> dict[str, float]:
    """margin (intra - inter mean cosine) and leave-one-out 1-NN accuracy of `global`."""
    import numpy as np

    descriptors = np.asarray(model(images, training=False)["global"], np.float64)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True) + 1e-12
    cosine = descriptors @ descriptors.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    intra = cosine[same & off_diagonal].mean()
    inter = cosine[~same].mean()
    np.fill_diagonal(cosine, -np.inf)
    nearest = cosine.argmax(axis=1)
    return {
        "intra": round(float(intra), 4),
        "inter": round(float(inter), 4),
        "margin": round(float(intra - inter), 4),
        "nn_accuracy": round(float((labels[nearest] == labels).mean()), 4),
    }


def main(argv):
    del argv
    import keras
    import numpy as np

    from delf_tf.config import ModelConfig, TrainingConfig
    from delf_tf.testing.synthetic_training import make_image, write_pattern_dataset
    from delf_tf.training.trainer import Trainer

    work = Path(FLAGS.work_dir or tempfile.mkdtemp(prefix="delg_separation_"))
    folder = work / "train"
    write_pattern_dataset(
        folder,
        FLAGS.num_classes,
        FLAGS.images_per_class,
        FLAGS.image_size,
        FLAGS.pattern_size,
        FLAGS.seed,
    )
    rng = np.random.default_rng(FLAGS.seed + 1000)
    test = [
        make_image(rng, index % FLAGS.num_classes, FLAGS.image_size, FLAGS.pattern_size)[0]
        for index in range(FLAGS.test_images)
    ]
    images = np.stack(test).astype("float32")
    labels = np.arange(FLAGS.test_images) % FLAGS.num_classes
    trainer = Trainer(
        TrainingConfig(
            stage="joint",
            train_data=str(folder),
            model_dir=str(work / "run"),
            batch_size=FLAGS.batch_size,
            image_size=FLAGS.image_size,
            max_steps=FLAGS.steps,
            initial_lr=FLAGS.lr,
            weights="random",
            seed=FLAGS.seed,
            log_every=max(FLAGS.steps // 6, 1),
            checkpoint_every=100_000,
            image_summary_every=0,
            eval_every=0,
            crop_area_range=(0.5, 1.0),
        ),
        ModelConfig(architecture="delg_resnet50", backbone=FLAGS.backbone),
    )
    before = separation(trainer.model, images, labels)
    start = time.perf_counter()
    result = trainer.run()
    seconds = time.perf_counter() - start
    after = separation(keras.saving.load_model(result.model_path), images, labels)
    first, last = result.history[0], result.history[-1]
    names = ("loss/global", "loss/attention", "loss/reconstruction")
    print(
        json.dumps(
            {
                "task": {
                    "classes": FLAGS.num_classes,
                    "train_images": FLAGS.num_classes * FLAGS.images_per_class,
                    "test_images": FLAGS.test_images,
                    "image_size": FLAGS.image_size,
                    "backbone": FLAGS.backbone,
                    "steps": FLAGS.steps,
                },
                "before": before,
                "after": after,
                "separates_better": bool(
                    after["margin"] > before["margin"]
                    and after["nn_accuracy"] >= before["nn_accuracy"]
                ),
                "losses_first_window": {name: round(first[name], 4) for name in names},
                "losses_last_window": {name: round(last[name], 4) for name in names},
                "train_seconds": round(seconds, 1),
                "work_dir": str(work),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    app.run(main)
