"""`delf train` (and `training/train.py`): one stage of DELF training from absl flags.

Every TrainingConfig field is a flag of the same name with the same default,
plus the model's --weight_decay, --attention_hidden_units, --backbone and
--feature_depth; all of them can come from --flagfile (samples in
training/configs/).
"""

from __future__ import annotations

import dataclasses
import json

from absl import flags

from delf_tf.config import (
    BACKBONES,
    LR_SCHEDULES,
    STRATEGIES,
    TRAINING_STAGES,
    ModelConfig,
    TrainingConfig,
)
from delf_tf.errors import ConfigError

HELP = {
    "stage": "descriptor: fine-tune the backbone with a GAP classifier; attention: train the "
    "attention head on the frozen backbone (inputs rescaled by a random factor); joint: both "
    "losses in one step, attention through stop-gradient",
    "train_data": "TFRecord glob, TFDS name ([tfds:]name[/config][:split]) or an image folder "
    "with one subfolder per class",
    "val_data": "validation data, same forms as --train_data (TFDS default split: validation)",
    "num_classes": "number of classes; 0 infers it from the data",
    "batch_size": "global batch size (split over the replicas)",
    "image_size": "side of the square training crops in pixels",
    "initial_lr": "initial learning rate of SGD",
    "max_steps": "training steps; the learning rate decays to 0 over them",
    "lr_schedule": "learning rate decay",
    "momentum": "SGD momentum",
    "clip_norm": "global-norm clipping of the all-replica gradient",
    "attention_loss_weight": "joint stage: weight of the attention loss",
    "attention_scale_range": "attention stage: low,high of the random rescale factor",
    "crop_area_range": "random resized crop: low,high fraction of the image area",
    "crop_aspect_range": "random resized crop: low,high width/height",
    "random_flip": "random horizontal flips",
    "shuffle_buffer": "records in the shuffle buffer",
    "strategy": "tf.distribute strategy (multi_worker reads TF_CONFIG)",
    "tpu": "TPU name or grpc:// address for --strategy=tpu",
    "mixed_precision": "float16 compute (bfloat16 on TPU) with float32 variables",
    "model_dir": "checkpoints, TensorBoard logs and the final model.keras",
    "weights": "backbone weights: imagenet (Keras cache or download), random, or a local ResNet50 "
    ".h5/.weights.h5/.keras file",
    "init_from": "the previous stage's model.keras (or its model_dir)",
    "seed": "seed of initialisation, data order and augmentation",
    "log_every": "steps between logged / TensorBoard scalars",
    "checkpoint_every": "steps between checkpoints",
    "image_summary_every": "steps between attention-map images (0: none)",
    "eval_every": "steps between validations (0: none)",
    "eval_steps": "validation batches per evaluation (0: all)",
    "keep_checkpoints": "checkpoints to keep",
    "tfds_data_dir": "TFDS data directory (default TFDS's)",
    "tfds_manual_dir": "manual_dir to prepare an unprepared TFDS dataset from (offline)",
}
MODEL_FLAGS = ("weight_decay", "attention_hidden_units", "backbone", "feature_depth")
REQUIRED = ("train_data", "model_dir")
_CHOICES = {"stage": TRAINING_STAGES, "lr_schedule": LR_SCHEDULES, "strategy": STRATEGIES}


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defines one flag per TrainingConfig field (+ model flags) on `flag_values`."""
    defaults = TrainingConfig()
    define = {"flag_values": flag_values}
    for field in dataclasses.fields(TrainingConfig):
        name, default = field.name, getattr(defaults, field.name)
        help_text = HELP[name]
        if name in REQUIRED:  # no default, so absl enforces them
            flags.DEFINE_string(name, None, help_text, **define)
            continue
        if name in _CHOICES:
            flags.DEFINE_enum(name, default, list(_CHOICES[name]), help_text, **define)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_text, **define)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_text, **define)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, help_text, **define)
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, [repr(v) for v in default], help_text, **define)
        else:
            flags.DEFINE_string(name, default, help_text, **define)
    model_defaults = ModelConfig()
    flags.DEFINE_float(
        "weight_decay", model_defaults.weight_decay, "L2 weight decay in the loss", **define
    )
    flags.DEFINE_integer(
        "attention_hidden_units",
        model_defaults.attention_hidden_units,
        "channels of the attention head's hidden 1x1 conv",
        **define,
    )
    flags.DEFINE_enum(
        "backbone",
        model_defaults.backbone,
        list(BACKBONES),
        "resnet50 (the paper's; --weights apply) or tiny (a small conv net for "
        "quick tests; --weights=random only)",
        **define,
    )
    flags.DEFINE_integer(
        "feature_depth",
        model_defaults.feature_depth,
        "channels of the backbone output: 1024 for resnet50, any for tiny",
        **define,
    )
    flags.mark_flags_as_required(list(REQUIRED), **define)


def configs_from_flags(flag_values: flags.FlagValues) -> tuple[TrainingConfig, ModelConfig]:
    values = {}
    for field in dataclasses.fields(TrainingConfig):
        value = flag_values[field.name].value
        if isinstance(getattr(TrainingConfig, field.name), tuple):
            try:
                value = tuple(float(v) for v in value)
            except ValueError as error:
                raise ConfigError(f"--{field.name}: expected numbers, got {value}") from error
        values[field.name] = value
    model = ModelConfig(**{name: flag_values[name].value for name in MODEL_FLAGS})
    return TrainingConfig(**values), model


def run(flag_values: flags.FlagValues) -> int:
    from delf_tf.atomic import is_remote
    from delf_tf.commands.common import check_output_path
    from delf_tf.training.trainer import train

    config, model_config = configs_from_flags(flag_values)
    if not is_remote(config.model_dir or ""):  # a local --model_dir, checked before any work
        check_output_path("model_dir", config.model_dir, folder=True)
    result = train(config, model_config)
    summary = result.to_dict()
    summary["history"] = summary["history"][-1:]
    print(json.dumps(summary))
    return 0
