"""Learning check: does the attention stage put attention on the object?

    python bench/attention_learning.py [--descriptor_steps=150 --attention_steps=400]

Synthetic task (delf_tf.testing.synthetic_training): each class is a distinct striped
pattern pasted at a random place on random clutter. Runs the paper's two
stages from random weights (offline: no ImageNet), then measures on held-out
images the share of attention mass on feature cells whose receptive-field
centre falls inside the pattern, for
  * init:    the attention head before the attention stage (random head on the
             stage-1 backbone),
  * trained: after the attention stage,
  * uniform: the share of cells on the pattern (what flat attention would give).
Prints JSON; `concentrates` is true when trained > 1.5 x uniform and > init.
A CPU run with the defaults takes about 10 minutes on 2 cores.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_classes", 4, "classes (patterns)")
flags.DEFINE_integer("images_per_class", 48, "training images per class")
flags.DEFINE_integer("test_images", 40, "held-out images for the measurement")
flags.DEFINE_integer("image_size", 96, "image side")
flags.DEFINE_integer("pattern_size", 32, "pattern side")
flags.DEFINE_integer("batch_size", 12, "batch size of both stages")
flags.DEFINE_integer("descriptor_steps", 150, "stage 1 steps")
flags.DEFINE_integer("attention_steps", 400, "stage 2 steps")
flags.DEFINE_float("descriptor_lr", 0.01, "stage 1 initial learning rate")
flags.DEFINE_float("attention_lr", 0.1, "stage 2 initial learning rate")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_string("work_dir", None, "keep runs here (default: a temporary folder)")
flags.DEFINE_string(
    "descriptor_model", None, "reuse this stage-1 model.keras (same --seed/--work_dir data)"
)
flags.DEFINE_list("attention_scale_range", ["0.25", "1.0"], "stage 2 random rescale range")


def attention_share(model, images, boxes):
    """(mean share of attention on the pattern, mean share of cells on the pattern)."""
    import numpy as np

    from delf_tf.model import compute_receptive_field

    field = compute_receptive_field(model.backbone)
    attention = np.asarray(model(images, training=False)["attention"])[..., 0]  # [B, h, w]
    h, w = attention.shape[1:]
    ys, xs = field.centers(np.arange(h)), field.centers(np.arange(w))
    shares, uniform = [], []
    for scores, (y0, x0, y1, x1) in zip(attention, boxes, strict=True):
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        shares.append(float(scores[inside].sum() / max(scores.sum(), 1e-12)))
        uniform.append(float(inside.mean()))
    return float(np.mean(shares)), float(np.mean(uniform))


def main(argv):
    del argv
    import keras
    import numpy as np

    from delf_tf.config import ModelConfig, TrainingConfig
    from delf_tf.testing.synthetic_training import make_image, write_pattern_dataset
    from delf_tf.training.trainer import Trainer

    work = Path(FLAGS.work_dir or tempfile.mkdtemp(prefix="attention_learning_"))
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
        make_image(rng, index % FLAGS.num_classes, FLAGS.image_size, FLAGS.pattern_size)
        for index in range(FLAGS.test_images)
    ]
    test_images = np.stack([image for image, _ in test]).astype("float32")
    test_boxes = [box for _, box in test]
    test_labels = np.arange(FLAGS.test_images) % FLAGS.num_classes
    common = dict(
        train_data=str(folder),
        batch_size=FLAGS.batch_size,
        image_size=FLAGS.image_size,
        weights="random",
        seed=FLAGS.seed,
        log_every=20,
        checkpoint_every=10_000,
        image_summary_every=0,
        eval_every=0,
        crop_area_range=(0.5, 1.0),
    )
    model_config = ModelConfig(attention_hidden_units=128)
    timings = {}

    start = time.perf_counter()
    if FLAGS.descriptor_model:
        descriptor_path = FLAGS.descriptor_model
        descriptor_model = keras.saving.load_model(descriptor_path)
        descriptor_loss = None
    else:
        stage1 = Trainer(
            TrainingConfig(
                stage="descriptor",
                model_dir=str(work / "descriptor"),
                max_steps=FLAGS.descriptor_steps,
                initial_lr=FLAGS.descriptor_lr,
                **common,
            ),
            model_config,
        )
        result1 = stage1.run()
        descriptor_path, descriptor_model = result1.model_path, stage1.model
        descriptor_loss = result1.history[-1]["loss/descriptor"]
    timings["descriptor_s"] = round(time.perf_counter() - start, 1)
    logits = np.asarray(descriptor_model(test_images, training=False)["descriptor_logits"])
    descriptor_accuracy = float((logits.argmax(-1) == test_labels).mean())

    start = time.perf_counter()
    shutil.rmtree(work / "attention", ignore_errors=True)  # a fresh stage 2, never a resume
    stage2 = Trainer(
        TrainingConfig(
            stage="attention",
            model_dir=str(work / "attention"),
            max_steps=FLAGS.attention_steps,
            initial_lr=FLAGS.attention_lr,
            init_from=descriptor_path,
            attention_scale_range=tuple(float(v) for v in FLAGS.attention_scale_range),
            **common,
        ),
        model_config,
    )
    init_share, uniform = attention_share(stage2.model, test_images, test_boxes)
    result2 = stage2.run()
    timings["attention_s"] = round(time.perf_counter() - start, 1)
    trained = keras.saving.load_model(result2.model_path)
    trained_share, _ = attention_share(trained, test_images, test_boxes)
    logits = np.asarray(trained(test_images, training=False)["attention_logits"])
    attention_accuracy = float((logits.argmax(-1) == test_labels).mean())
    print(
        json.dumps(
            {
                "task": {
                    "classes": FLAGS.num_classes,
                    "train_images": FLAGS.num_classes * FLAGS.images_per_class,
                    "test_images": FLAGS.test_images,
                    "image_size": FLAGS.image_size,
                    "pattern_size": FLAGS.pattern_size,
                },
                "steps": {"descriptor": FLAGS.descriptor_steps, "attention": FLAGS.attention_steps},
                "attention_scale_range": FLAGS.attention_scale_range,
                "descriptor_model": descriptor_path,
                "test_accuracy": {
                    "descriptor_head": descriptor_accuracy,
                    "attention_head": attention_accuracy,
                },
                "attention_share_on_pattern": {
                    "uniform": round(uniform, 4),
                    "init": round(init_share, 4),
                    "trained": round(trained_share, 4),
                    "trained_over_init": round(trained_share / max(init_share, 1e-12), 2),
                    "trained_over_uniform": round(trained_share / max(uniform, 1e-12), 2),
                },
                "concentrates": bool(trained_share > 1.5 * uniform and trained_share > init_share),
                "final_train_loss": {
                    "descriptor": descriptor_loss,
                    "attention": result2.history[-1]["loss/attention"],
                },
                "timings": timings,
                "work_dir": str(work),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    app.run(main)
