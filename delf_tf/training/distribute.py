"""tf.distribute strategies by name, chief/worker roles, and mixed precision policies."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import keras
import tensorflow as tf
from absl import logging

from delf_tf.errors import ConfigError


def create_strategy(name: str, tpu: str = "") -> tf.distribute.Strategy:
    """default | mirrored | multi_worker (TF_CONFIG) | tpu.

    mirrored replicates over all local GPUs, or, without GPUs, over the logical
    CPU devices (one unless configured, as the tests do).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            logging.warning("--strategy=multi_worker without TF_CONFIG: a one-worker cluster")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ConfigError(f"unknown strategy {name!r}")


def task_info(strategy: tf.distribute.Strategy) -> tuple[str | None, int | None]:
    """(task type, task id) of this process in a multi-worker cluster, else (None, None)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None, None
    return resolver.task_type, resolver.task_id


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the process that writes checkpoints, summaries and the model."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    task_type, task_id = task_info(strategy)
    if task_type is None:
        return True
    return task_type == "chief" or (task_type == "worker" and task_id == 0)


def describe(strategy: tf.distribute.Strategy) -> str:
    """One line for the log: the strategy, its replicas and this process's role."""
    text = f"{type(strategy).__name__}, {strategy.num_replicas_in_sync} replica(s) in sync"
    task_type, task_id = task_info(strategy)
    if task_type is not None:
        role = "chief" if is_chief(strategy) else "not the chief"
        text += f", task {task_type}:{task_id} ({role})"
    return text


@contextlib.contextmanager
def scratch_dir(strategy: tf.distribute.Strategy):
    """A private local temporary folder for a non-chief worker's copy of a save, removed after.

    Under MultiWorkerMirroredStrategy every worker must take part in a checkpoint
    save (it may run collective ops), but only the chief's copy, in model_dir, is
    kept: the others write theirs here (TF's convention), so nothing of theirs
    reaches model_dir and nothing is left behind.
    """
    task_type, task_id = task_info(strategy)
    path = tempfile.mkdtemp(prefix=f"delf-train-{task_type}{task_id}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def mixed_precision_policy(strategy: tf.distribute.Strategy) -> str:
    """mixed_bfloat16 on TPUs (no loss scaling needed), mixed_float16 elsewhere."""
    return "mixed_bfloat16" if isinstance(strategy, tf.distribute.TPUStrategy) else "mixed_float16"


@contextlib.contextmanager
def dtype_policy(name: str):
    """Sets the global Keras dtype policy for the models built inside, then restores it."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
