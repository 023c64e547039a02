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
from delf_tf.model.reference_nets import ReferenceModel
from delf_tf.training import distribute

MODEL_FILE = "model.keras"


def load_init_source(path: str | os.PathLike) -> DelfModel | ReferenceModel:
    """The model of --init_from: a `.keras` DelfModel or ReferenceModel, or its model_dir."""
    path = str(path)
    if tf.io.gfile.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"--init_from: {path} not found (expected a model .keras)")
    source = keras.saving.load_model(path, compile=False)
    if not isinstance(source, (DelfModel, ReferenceModel)):
        raise InputError(
            f"--init_from: {path} holds a {type(source).__name__}, "
            "not a DelfModel or ReferenceModel"
        )
    return source


def load_init_weights(
    model: DelfModel | ReferenceModel,
    source: DelfModel | ReferenceModel | str | os.PathLike,
    path: str | os.PathLike | None = None,
) -> None:
    """Copies a previous run's (or a converted release's) weights into `model`.

    `source` is the model (or the path) of --init_from. DelfModel: backbone and
    attention head are always copied; the classifier heads only when their shapes
    match (same number of classes). ReferenceModel (e.g. `delf convert`'s output):
    the whole network (backbone, attention, autoencoder, global head) is copied into
    a ReferenceModel of the same architecture and size; it has no class heads (the
    training's are fresh).
    """
    if not isinstance(source, keras.Model):
        path = source
        source = load_init_source(source)
    path = str(path)
    if isinstance(source, ReferenceModel) or isinstance(model, ReferenceModel):
        if type(source) is not type(model) or (
            source.config.architecture,
            source.config.backbone,
        ) != (model.config.architecture, model.config.backbone):
            raise InputError(
                f"--init_from: {path} holds a {_describe(source)}, the training builds a "
                f"{_describe(model)}"
            )
        try:
            model.network.set_weights(source.network.get_weights())
        except ValueError as error:
            raise InputError(f"--init_from: {path}: network does not match ({error})") from error
        logging.info("initialised from %s (class heads start fresh)", path)
        return
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


def _describe(model: DelfModel | ReferenceModel) -> str:
    config = model.config
    return f"{config.architecture} model (backbone {config.backbone})"


def save_float32_model(model: DelfModel | ReferenceModel, path: str | os.PathLike) -> str:
    """Saves a float32, all-trainable copy of `model` as `.keras` (local or gs://), atomically."""
    path = str(path)
    with distribute.dtype_policy("float32"):
        clone = type(model)(**model.config.to_dict(), name=model.name)
    clone.set_weights([np.asarray(w) for w in model.get_weights()])
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, MODEL_FILE)
        clone.save(local)
        data = Path(local).read_bytes()
    atomic_write_bytes(path, data)
    logging.info("saved %s", path)
    return path
