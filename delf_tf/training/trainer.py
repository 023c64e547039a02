"""The training loop: the paper's stages under any tf.distribute strategy, resumable.

Stages (which layers train, which loss):
  descriptor  backbone + descriptor classifier; cross-entropy of the GAP classifier.
  attention   attention head + attention classifier, backbone frozen (its batch
              norm in inference mode); cross-entropy of the attention-pooled
              classifier; each batch is rescaled by a random factor from
              `attention_scale_range`, so attention learns at several scales.
  joint       everything; descriptor loss + attention_loss_weight * attention loss,
              the attention branch sees the features through stop-gradient.
The release architectures (ModelConfig.architecture resnet_v1_50 / delg_resnet50, a
ReferenceModel) train in the joint stage only, with DELG's losses (global ArcFace,
attention, autoencoder reconstruction; `delf_tf.training.delg`), from --init_from (a
converted release, or a previous run's model.keras) or from random weights; their class
heads are fresh.
All stages add the weight decay of the trained kernels (`sum(model.losses)`).
SGD with momentum, linear or cosine decay to 0, global-norm clipping of the
gradient summed over all replicas, optional mixed precision (dynamic loss
scaling with float16).

model_dir receives checkpoints/ (tf.train.CheckpointManager: a run started
again, even after kill -9, continues from the newest), train/ and validation/
TensorBoard logs (losses, accuracies, learning rate, attention maps), the
configs, the label map and, at the end, model.keras (a float32 DelfModel for
`delf extract --model` and `delf export`).

Under tf.distribute every replica's copy of a variable stays equal: gradients are
all-reduced, and so are the moving statistics of the batch norms that train. With
--strategy=multi_worker only the chief (worker 0, or a "chief" task) writes into
model_dir; the other workers take part in each checkpoint save with a scratch copy
that is removed (distribute.scratch_dir), and all of them restore the chief's
newest checkpoint, so model_dir must be a path every worker reads (gs://, NFS;
workers that restore different steps are refused). A worker that stops ends the
others with a WorkerLostError.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tqdm import tqdm

from delf_tf.atomic import atomic_write_text
from delf_tf.config import ModelConfig, TrainingConfig
from delf_tf.errors import InputError, WorkerLostError
from delf_tf.model import DelfModel, build_delf_model
from delf_tf.model.backbone import WeightsError
from delf_tf.model.reference_nets import ReferenceModel, build_reference_model
from delf_tf.training import data, distribute
from delf_tf.training.delg import ReferenceForward, build_heads
from delf_tf.training.model_io import (
    MODEL_FILE,
    load_init_source,
    load_init_weights,
    save_float32_model,
)
from delf_tf.training.summaries import attention_images, write_images, write_scalars

CHECKPOINT_DIR = "checkpoints"
TRAINING_CONFIG_FILE = "training_config.json"
MODEL_CONFIG_FILE = "model_config.json"
LABEL_MAP_FILE = "label_map.json"
PREVIEW_IMAGES = 4
# Backbone stride: rescaled attention-stage inputs are a multiple of it (>= one cell).
SIZE_QUANTUM = 16


@dataclasses.dataclass
class TrainResult:
    """Summary of a run: where the model is, the steps run, the logged metrics."""

    model_path: str
    stage: str
    num_classes: int
    start_step: int
    final_step: int
    history: list[dict[str, float]]
    validation: dict[str, float]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def stage_losses(stage: str) -> tuple[str, ...]:
    """Classifier heads whose loss a stage minimises."""
    return {"descriptor": ("descriptor",), "attention": ("attention",)}.get(
        stage, ("descriptor", "attention")
    )


def configure_stage(model: DelfModel, stage: str) -> None:
    """Sets which parts of `model` train in `stage` (frozen batch norm runs in inference mode)."""
    descriptor = stage in ("descriptor", "joint")
    attention = stage in ("attention", "joint")
    model.backbone.trainable = descriptor
    model.descriptor_classifier.trainable = descriptor
    model.attention.trainable = attention
    model.attention_classifier.trainable = attention


def moving_statistics(model: keras.Model) -> list[keras.Variable]:
    """moving_mean and moving_variance of `model`'s batch norms that train (a frozen batch
    norm runs in inference mode and leaves them as they are)."""
    return [
        variable
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
        for variable in (layer.moving_mean, layer.moving_variance)
    ]


def learning_rate_schedule(
    config: TrainingConfig,
) -> keras.optimizers.schedules.LearningRateSchedule:
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(config.initial_lr, config.max_steps)
    return keras.optimizers.schedules.PolynomialDecay(
        config.initial_lr, config.max_steps, end_learning_rate=0.0, power=1.0
    )


def rescaled_size(config: TrainingConfig, step: int) -> int:
    """Attention stage: side of the batch at `step`, image_size * U(range), a multiple of 16.

    Drawn from a generator seeded by (seed, step): a resumed run repeats it.
    """
    low, high = config.attention_scale_range
    factor = np.random.default_rng([config.seed, step]).uniform(low, high)
    size = int(round(config.image_size * factor / SIZE_QUANTUM)) * SIZE_QUANTUM
    return max(size, SIZE_QUANTUM)


class Trainer:
    """Builds data, model, optimizer and checkpoint for `config`, then `run()`s."""

    def __init__(self, config: TrainingConfig, model_config: ModelConfig | None = None):
        if not config.train_data:
            raise InputError("--train_data is required")
        if not config.model_dir:
            raise InputError("--model_dir is required")
        self.config = config
        self.strategy = distribute.create_strategy(config.strategy, config.tpu)
        replicas = self.strategy.num_replicas_in_sync
        if config.batch_size % replicas:
            raise InputError(
                f"--batch_size={config.batch_size} is not divisible by the {replicas} replicas"
            )
        self.is_chief = distribute.is_chief(self.strategy)
        logging.info("strategy: %s", distribute.describe(self.strategy))
        self.train_source = data.resolve_source(config.train_data, config)
        self.val_source = (
            data.resolve_source(
                config.val_data,
                config,
                class_names=self.train_source.class_names,
                default_split="validation",
            )
            if config.val_data
            else None
        )
        num_classes = data.infer_num_classes(self.train_source, config.num_classes)
        self.model_config = (model_config or ModelConfig()).replace(num_classes=num_classes)
        self.init_source = load_init_source(config.init_from) if config.init_from else None
        if isinstance(self.init_source, ReferenceModel):
            self.model_config = _adopt_architecture(self.model_config, self.init_source)
        self.reference = self.model_config.architecture != "delf"
        if self.reference and config.stage != "joint":
            raise InputError(
                f"architecture {self.model_config.architecture} trains in --stage=joint only "
                f"(global, attention and reconstruction losses in one step), not {config.stage}"
            )
        if self.reference and not config.init_from and config.weights not in ("", "random"):
            raise InputError(
                f"--weights={config.weights} is for the delf architecture; "
                f"{self.model_config.architecture} starts from --init_from (a converted "
                "release) or --weights=random"
            )
        self.policy = (
            distribute.mixed_precision_policy(self.strategy)
            if config.mixed_precision
            else "float32"
        )
        self._static_shapes = isinstance(self.strategy, tf.distribute.TPUStrategy)
        self._build()

    # ---------------------------------------------------------------- set-up
    def _build(self) -> None:
        config = self.config
        with self.strategy.scope(), distribute.dtype_policy(self.policy):
            self.heads, self._reference_forward = None, None
            if self.reference:
                self.model = build_reference_model(self.model_config, seed=config.seed)
                self.heads = build_heads(
                    self.model, self.model_config.num_classes, config.arcface_scale
                )
                self._reference_forward = ReferenceForward(self.model, self.heads)
            else:
                self.model = build_delf_model(
                    self.model_config, weights=_weights_arg(config.weights), seed=config.seed
                )
            if self.init_source is not None:
                load_init_weights(self.model, self.init_source, path=config.init_from)
            if not self.reference:
                configure_stage(self.model, config.stage)
            self._moving_statistics = moving_statistics(self.model)
            self._variables = self.model.trainable_variables + (
                self.heads.trainable_variables if self.heads is not None else []
            )
            optimizer = keras.optimizers.SGD(
                learning_rate=learning_rate_schedule(config), momentum=config.momentum
            )
            if self.policy == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(self._variables)
            self.optimizer = optimizer
            self.step = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        heads = {"heads": self.heads} if self.heads is not None else {}
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, step=self.step, **heads
        )
        # Only the chief keeps checkpoints (in model_dir); see save_checkpoint.
        self.manager = (
            tf.train.CheckpointManager(
                self.checkpoint,
                directory=os.path.join(config.model_dir, CHECKPOINT_DIR),
                max_to_keep=config.keep_checkpoints,
            )
            if self.is_chief
            else None
        )
        self._train_step = tf.function(self._distributed_train_step)
        self._eval_step = tf.function(self._distributed_eval_step)
        self._preview = tf.function(self._distributed_preview)

    def save_checkpoint(self, step: int) -> None:
        """Saves checkpoint `step`: into model_dir/checkpoints on the chief; on any other
        worker (which must take part in the save too) into a scratch folder, removed after."""
        if self.manager is not None:
            self.manager.save(checkpoint_number=step)
            return
        with distribute.scratch_dir(self.strategy) as scratch:
            tf.train.CheckpointManager(self.checkpoint, scratch, max_to_keep=1).save(
                checkpoint_number=step
            )

    def restore(self) -> int:
        """Restores the newest checkpoint of model_dir, if any; returns the step."""
        # Every worker restores the chief's newest checkpoint (model_dir is shared).
        latest = tf.train.latest_checkpoint(os.path.join(self.config.model_dir, CHECKPOINT_DIR))
        step = 0
        if latest is not None:
            _check_same_stage(self.config.model_dir, self.config.stage)
            _check_same_architecture(self.config.model_dir, self.model_config.architecture)
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            step = int(self.step.numpy())
            logging.info("restored %s at step %d", latest, step)
        if distribute.task_info(self.strategy)[0] is not None:
            self._check_same_start(step)
        return step

    def _check_same_start(self, step: int) -> None:
        """InputError unless every worker restored the same step (a --model_dir that is
        not one shared path would let the workers' copies of the model differ)."""
        mean = float(self._mean_over_replicas(tf.constant(step, tf.float64)))
        if mean != step:
            raise InputError(
                f"this worker restored step {step} from {self.config.model_dir}, the "
                f"workers' mean is {mean:g}: --model_dir must be one path that every "
                "worker reads (gs://, a shared mount), the chief's"
            )

    @tf.function
    def _mean_over_replicas(self, value):
        """The mean of `value` (float64 []) over all replicas of all workers."""
        # (all_reduce needs a tensor made on the replica's device: hence the identity.)
        per_replica = self.strategy.run(
            lambda v: tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.MEAN, tf.identity(v)
            ),
            args=(value,),
        )
        return self.strategy.experimental_local_results(per_replica)[0]

    # ---------------------------------------------------------------- steps
    def _replica_train_step(self, images, labels, size):
        config = self.config
        if config.stage == "attention":
            images = tf.image.resize(images, tf.stack([size, size]), antialias=True)
        replicas = self.strategy.num_replicas_in_sync
        with tf.GradientTape() as tape:
            outputs = self._forward(images, labels, training=True)
            metrics, total = self._losses(outputs, labels, config.batch_size)
            regularization = (
                tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
                if self.model.losses
                else tf.constant(0.0)
            )
            total = total + regularization
            scaled = self.optimizer.scale_loss(total)
        gradients = tape.gradient(scaled, self._variables)
        missing = [v.path for v, g in zip(self._variables, gradients, strict=True) if g is None]
        if missing:
            raise ValueError(f"stage {config.stage}: no gradient for {missing[:5]}")
        # Clip the gradient of the whole global batch: sum the replicas' parts first.
        gradients = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, gradients
        )
        scale = self._loss_scale()
        gradients, norm = tf.clip_by_global_norm(gradients, config.clip_norm * scale)
        # The Keras optimizer sums the replicas' gradients again: hand it 1/replicas each.
        gradients = [g / replicas for g in gradients]
        self.optimizer.apply(gradients, self._variables)
        self._sync_moving_statistics()
        metrics["loss/regularization"] = regularization
        metrics["loss/total"] = total
        metrics["gradient_norm"] = norm / scale / replicas
        return metrics

    def _sync_moving_statistics(self) -> None:
        """Sets every replica's copy of the moving statistics of the batch norms that train
        to their mean over all replicas.

        Keras 3 creates them with aggregation "none": each replica updates its own copy
        from its own part of the batch and the copies drift apart (checkpoints and the
        saved model would hold the first replica's alone; under multi_worker the workers'
        models would differ). An all-reduce of these few vectors per step keeps them equal.
        """
        variables = self._moving_statistics
        if self.strategy.num_replicas_in_sync == 1 or not variables:
            return
        means = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in variables]
        )
        for variable, mean in zip(variables, means, strict=True):
            variable.assign(mean)

    def _forward(self, images, labels, training: bool) -> dict:
        """The model's logits (and, for DELG, per-example reconstruction errors)."""
        if self._reference_forward is not None:
            return self._reference_forward(
                images, labels if training else None, training, self.config.arcface_margin
            )
        return self.model(images, training=training, attention_stop_gradient=True)

    def _loss_heads(self) -> tuple[str, ...]:
        if self.reference:
            first = "global" if self.model.has_global else "descriptor"
            return (first, "attention")
        return stage_losses(self.config.stage)

    def _losses(self, outputs, labels, global_batch):
        """Per-replica losses (already divided by the global batch) and accuracies."""
        metrics, total = {}, tf.constant(0.0)
        heads = self._loss_heads()
        for head in heads:
            logits = tf.cast(outputs[f"{head}_logits"], tf.float32)
            per_example = keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True
            )
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            plain = tf.cast(outputs.get(f"{head}_plain_logits", logits), tf.float32)
            correct = tf.cast(
                tf.equal(tf.argmax(plain, -1, output_type=tf.int32), labels), tf.float32
            )
            metrics[f"loss/{head}"] = loss
            metrics[f"accuracy/{head}"] = tf.reduce_sum(correct) / global_batch
            weight = (
                self.config.attention_loss_weight if head == "attention" and len(heads) > 1 else 1.0
            )
            total = total + weight * loss
        if "reconstruction" in outputs:
            loss = tf.nn.compute_average_loss(
                outputs["reconstruction"], global_batch_size=global_batch
            )
            metrics["loss/reconstruction"] = loss
            total = total + self.config.reconstruction_loss_weight * loss
        return metrics, total

    def _loss_scale(self):
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            return tf.cast(self.optimizer.dynamic_scale, tf.float32)
        return tf.constant(1.0)

    def _distributed_train_step(self, iterator, size):
        images, labels = next(iterator)
        per_replica = self.strategy.run(self._replica_train_step, args=(images, labels, size))
        self.step.assign_add(1)
        return {
            name: self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
            for name, value in per_replica.items()
        }

    def _distributed_eval_step(self, images, labels):
        def replica(images, labels):
            outputs = self._forward(images, labels, training=False)
            sums = {"count": tf.cast(tf.shape(labels)[0], tf.float32)}
            if "reconstruction" in outputs:
                sums["loss/reconstruction"] = tf.reduce_sum(outputs["reconstruction"])
            for head in self._loss_heads():
                logits = tf.cast(outputs[f"{head}_logits"], tf.float32)
                sums[f"loss/{head}"] = tf.reduce_sum(
                    keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
                )
                sums[f"accuracy/{head}"] = tf.reduce_sum(
                    tf.cast(
                        tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32
                    )
                )
            return sums

        per_replica = self.strategy.run(replica, args=(images, labels))
        return {
            k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
            for k, v in per_replica.items()
        }

    def _distributed_preview(self, images):
        def replica(images):
            return attention_images(images, self.model(images, training=False)["attention"])

        results = self.strategy.run(replica, args=(images,))
        return tuple(self.strategy.experimental_local_results(r)[0] for r in results)

    # ---------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        """Trains up to max_steps (resuming from model_dir's newest checkpoint)."""
        try:
            return self._run()
        except tf.errors.UnavailableError as error:
            if distribute.task_info(self.strategy)[0] is None:
                raise
            raise WorkerLostError(_lost_worker_message(error, self.config.model_dir)) from error

    def _run(self) -> TrainResult:
        config = self.config
        start = self.restore()
        if not config.init_from and not start and config.stage != "descriptor":
            logging.warning(
                "stage %s without --init_from: training on backbone weights %r",
                config.stage,
                config.weights,
            )
        self._write_run_files()
        writers = self._writers()
        preview = self._preview_batch()
        dataset = self.strategy.distribute_datasets_from_function(
            lambda context: data.make_dataset(
                self.train_source, config, True, context, seed=config.seed + start
            )
        )
        iterator = iter(dataset)
        history, validation = [], {}
        window, window_start, window_steps = {}, time.perf_counter(), 0
        schedule = learning_rate_schedule(config)
        progress = tqdm(total=config.max_steps, initial=start, desc=config.stage, disable=None)
        step = start
        while step < config.max_steps:
            size = rescaled_size(config, step) if config.stage == "attention" else config.image_size
            metrics = self._train_step(iterator, size if self._static_shapes else tf.constant(size))
            step += 1
            progress.update(1)
            for name, value in metrics.items():
                window[name] = window.get(name, 0.0) + float(value)
            window_steps += 1
            if step % config.log_every == 0 or step == config.max_steps:
                elapsed = time.perf_counter() - window_start
                logged = {name: value / window_steps for name, value in window.items()}
                logged["learning_rate"] = float(schedule(step - 1))
                logged["images_per_second"] = window_steps * config.batch_size / max(elapsed, 1e-9)
                if self.policy == "mixed_float16":
                    logged["loss_scale"] = float(self._loss_scale())
                write_scalars(writers["train"], logged, step)
                history.append({"step": step, **logged})
                logging.info("step %d %s", step, _format(logged))
                window, window_start, window_steps = {}, time.perf_counter(), 0
            if config.image_summary_every and (
                step % config.image_summary_every == 0 or step == config.max_steps
            ):
                self._write_preview(writers["train"], preview, step)
            if (
                self.val_source
                and config.eval_every
                and (step % config.eval_every == 0 or step == config.max_steps)
            ):
                validation = self.evaluate()
                write_scalars(writers["validation"], validation, step)
                logging.info("validation at step %d %s", step, _format(validation))
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                self.save_checkpoint(step)
        progress.close()
        model_path = os.path.join(config.model_dir, MODEL_FILE)
        if self.is_chief:
            save_float32_model(self.model, model_path)
        for writer in writers.values():
            writer.close()
        return TrainResult(
            str(model_path),
            config.stage,
            self.model_config.num_classes,
            start,
            step,
            history,
            validation,
        )

    def evaluate(self) -> dict[str, float]:
        """Mean losses and accuracies on (up to eval_steps batches of) the validation data."""
        config = self.config
        dataset = self.strategy.distribute_datasets_from_function(
            lambda context: _take(
                data.make_dataset(self.val_source, config, False, context), config.eval_steps
            )
        )
        totals: dict[str, float] = {}
        for images, labels in dataset:
            for name, value in self._eval_step(images, labels).items():
                totals[name] = totals.get(name, 0.0) + float(value)
        count = totals.pop("count", 0.0)
        if not count:
            logging.warning("validation data %s gave no full batch", config.val_data)
            return {}
        return {name: value / count for name, value in totals.items()}

    # ---------------------------------------------------------------- outputs
    def _writers(self) -> dict[str, tf.summary.SummaryWriter]:
        if not self.is_chief:
            return {
                "train": tf.summary.create_noop_writer(),
                "validation": tf.summary.create_noop_writer(),
            }
        logs = self.config.model_dir
        return {
            "train": tf.summary.create_file_writer(os.path.join(logs, "train")),
            "validation": tf.summary.create_file_writer(os.path.join(logs, "validation")),
        }

    def _preview_batch(self) -> tf.Tensor | None:
        if not self.config.image_summary_every:
            return None
        source = self.val_source or self.train_source
        preview_config = self.config.replace(batch_size=PREVIEW_IMAGES)
        for images, _ in data.make_dataset(source, preview_config, False).take(1):
            return images
        return None

    def _write_preview(self, writer, images, step: int) -> None:
        if images is None:
            return
        heat, overlay = self._preview(images)
        write_images(writer, "attention/heat", heat, step, PREVIEW_IMAGES)
        write_images(writer, "attention/overlay", overlay, step, PREVIEW_IMAGES)

    def _write_run_files(self) -> None:
        if not self.is_chief:
            return
        model_dir = self.config.model_dir
        tf.io.gfile.makedirs(model_dir)
        atomic_write_text(
            os.path.join(model_dir, TRAINING_CONFIG_FILE), self.config.to_json() + "\n"
        )
        atomic_write_text(
            os.path.join(model_dir, MODEL_CONFIG_FILE), self.model_config.to_json() + "\n"
        )
        names = self.train_source.class_names
        if names is not None:
            label_map = {"num_classes": len(names), "classes": list(names)}
            atomic_write_text(
                os.path.join(model_dir, LABEL_MAP_FILE), json.dumps(label_map, indent=1) + "\n"
            )


def train(config: TrainingConfig, model_config: ModelConfig | None = None) -> TrainResult:
    """Trains one stage as `config` says (resuming from model_dir); returns the summary."""
    return Trainer(config, model_config).run()


def _recorded(model_dir: str, file: str, config_class: type, field: str) -> Any:
    """The `field` of the config that an earlier run recorded in model_dir (None: none)."""
    path = os.path.join(model_dir, file)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as handle:
        return getattr(config_class.from_json(handle.read(), source=path), field)


def _check_same_stage(model_dir: str, stage: str) -> None:
    previous = _recorded(model_dir, TRAINING_CONFIG_FILE, TrainingConfig, "stage")
    if previous not in (None, stage):
        raise InputError(
            f"{model_dir} holds checkpoints of stage {previous!r}, not {stage!r}: use a new "
            f"--model_dir and --init_from={os.path.join(model_dir, MODEL_FILE)}"
        )


def _adopt_architecture(config: ModelConfig, source: ReferenceModel) -> ModelConfig:
    """`config` with the architecture of --init_from's ReferenceModel (refusing another)."""
    wanted = source.config.architecture
    if config.architecture not in ("delf", wanted):
        raise InputError(
            f"--init_from holds a {wanted} model, not --architecture={config.architecture}"
        )
    if config.architecture == "delf":
        logging.info("--init_from: training the %s architecture of %s", wanted, source.name)
    return config.replace(
        architecture=wanted,
        backbone=source.config.backbone,
        feature_depth=source.config.feature_depth,
    )


def _check_same_architecture(model_dir: str, architecture: str) -> None:
    previous = _recorded(model_dir, MODEL_CONFIG_FILE, ModelConfig, "architecture")
    if previous not in (None, architecture):
        raise InputError(
            f"{model_dir} holds checkpoints of architecture {previous!r}, not "
            f"{architecture!r}: use a new --model_dir"
        )


def _lost_worker_message(error: tf.errors.UnavailableError, model_dir: str) -> str:
    """One line for a multi-worker step that failed because a worker stopped."""
    tasks = sorted(set(re.findall(r"/job:\w+/replica:\d+/task:\d+", error.message)))
    what = ", ".join(tasks) if tasks else error.message.strip().splitlines()[0][:200]
    return (
        f"a worker of the cluster stopped ({what}): start every worker again with the same "
        f"flags; training resumes from the chief's newest checkpoint in {model_dir}"
    )


def _weights_arg(weights: str):
    if weights in ("", "random"):
        return None
    if weights != "imagenet" and not tf.io.gfile.exists(weights):
        raise WeightsError(f"--weights: {weights} is neither random, imagenet nor a file")
    return weights


def _take(dataset: tf.data.Dataset, steps: int) -> tf.data.Dataset:
    return dataset.take(steps) if steps > 0 else dataset


def _format(values: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.4g}" for name, value in values.items())
