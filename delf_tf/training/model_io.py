"""Model files of a training run: initialising from a previous stage, saving float32 `.keras`.

Paths may be local or remote (gs://): local writes are atomic (rename).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from delf_tf.atomic import atomic_write_bytes
from delf_tf.errors import InputError
from delf_tf.model import DelfModel
from delf_tf.training import distribute

MODEL_FILE = "model.keras"


def load_init_weights(model: DelfModel, path: str | os.PathLike) -> None:
    """Copies a previous stage's weights (a `.keras` DelfModel or its model_dir) into `model`.

    Backbone and attention head are always copied; the classifier heads only
    when their shapes match (same number of classes).
    """
    path = str(path)
    if tf.io.gfile.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"--init_from: {path} not found (expected a DelfModel .keras)")
    source = keras.saving.load_model(path, compile=False)
    if not isinstance(source, DelfModel):
        raise InputError(f"--init_from: {path} holds a {type(source).__name__}, not a DelfModel")
    model.backbone.set_weights(source.backbone.get_weights())
    try:
        model.attention.set_weights(source.attention.get_weights())
    except ValueError as error:
        raise InputError(f"--init_from: {path}: attention head does not match ({error})") from error
    for name in ("descriptor_classifier", "attention_classifier"):
        target, origin = getattr(model, name), getattr(source, name)
        if origin is not None and [w.shape for w in origin.weights] == [
            w.shape for w in target.weights
        ]:
            target.set_weights(origin.get_weights())
        else:
            logging.info("--init_from: %s starts fresh (class count differs)", name)
    logging.info("initialised from %s", path)


def save_float32_model(model: DelfModel, path: str | os.PathLike) -> str:
    """Saves a float32, all-trainable copy of `model` as `.keras` (local or gs://), atomically."""
    path = str(path)
    with distribute.dtype_policy("float32"):
        clone = DelfModel(**model.config.to_dict(), name=model.name)
    clone.set_weights([np.asarray(w) for w in model.get_weights()])
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, MODEL_FILE)
        clone.save(local)
        data = Path(local).read_bytes()
    atomic_write_bytes(path, data)
    logging.info("saved %s", path)
    return path
