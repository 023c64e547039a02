"""Loading a trained DelfModel: a `.keras` file or a `tf.train.Checkpoint(model=...)`."""

from __future__ import annotations

import os
from pathlib import Path

import keras
import tensorflow as tf

from delf_tf.config import ModelConfig
from delf_tf.errors import InputError
from delf_tf.model.delf import DelfModel, build_delf_model
from delf_tf.model.reference_nets import ReferenceModel, build_reference_model

MODEL_CONFIG_FILE = "model_config.json"


def load_delf_model(path: str | os.PathLike, model_config: ModelConfig | None = None) -> DelfModel:
    """A DelfModel from a `.keras` file or a training checkpoint.

    A checkpoint is a `tf.train.Checkpoint(model=<DelfModel>)` written by
    `save()`/`write()`: a directory (its latest checkpoint, or the only `.index`
    prefix in it) or a prefix path. Its architecture is `model_config`, else the
    `model_config.json` (ModelConfig) beside it, else ModelConfig(). Classifier
    heads are not needed for extraction and are left out; every backbone and
    attention variable must be found in the checkpoint.
    """
    path = Path(path)
    if path.suffix == ".keras":
        if not path.is_file():
            raise InputError(f"{path}: no such model file")
        model = keras.saving.load_model(path, compile=False)
        if not isinstance(model, (DelfModel, ReferenceModel)):
            raise InputError(
                f"{path}: holds a {type(model).__name__}, not a DelfModel or ReferenceModel"
            )
        return model
    prefix = _checkpoint_prefix(path)
    folder = Path(prefix).parent
    if model_config is None:
        config_file = folder / MODEL_CONFIG_FILE
        model_config = ModelConfig.load(config_file) if config_file.is_file() else ModelConfig()
    if model_config.architecture != "delf":
        model = build_reference_model(model_config.replace(num_classes=0))
    else:
        model = build_delf_model(model_config.replace(num_classes=0))
    status = tf.train.Checkpoint(model=model).read(prefix)
    try:
        status.expect_partial().assert_existing_objects_matched()
    except AssertionError as error:
        raise InputError(
            f"{prefix}: the checkpoint does not hold every DelfModel variable under the key "
            f"'model' ({error})"
        ) from error
    return model


def _checkpoint_prefix(path: Path) -> str:
    if path.is_dir():
        latest = tf.train.latest_checkpoint(str(path))
        if latest:
            return latest
        prefixes = sorted(p.with_suffix("") for p in path.glob("*.index"))
        if len(prefixes) == 1:
            return str(prefixes[0])
        raise InputError(
            f"{path}: expected a .keras file or a tf.train.Checkpoint (found "
            f"{len(prefixes)} .index files and no 'checkpoint' file)"
        )
    if Path(f"{path}.index").is_file():
        return str(path)
    raise InputError(f"{path}: no such .keras file, checkpoint directory or prefix")
