"""The Extractor interface and the in-process back end (Keras model or SavedModel).

Every back end turns an RGB uint8 [H, W, 3] image into LocalFeatures; the
retrieval engine only sees this interface. The TF Serving back end lives in
`delf_tf.serving.client`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import tensorflow as tf

from delf_tf.config import ExtractionConfig, ModelConfig
from delf_tf.contract import EXPORT_INFO_ASSET, RUNTIME_OVERRIDES, resolve_version_dir
from delf_tf.errors import ConfigError, InputError
from delf_tf.extraction.graph import ExtractionModule
from delf_tf.extraction.pca import PcaParams
from delf_tf.features.local_features import LocalFeatures
from delf_tf.model.delf import DelfModel, build_delf_model
from delf_tf.model.loading import load_delf_model


@runtime_checkable
class Extractor(Protocol):
    """Anything that turns an image into LocalFeatures."""

    @property
    def fingerprint(self) -> str | None:
        """Identity of the descriptor space (model + PCA), or None when unknown."""

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description of the model and settings."""

    def extract(self, image: np.ndarray) -> LocalFeatures:
        """uint8 [H, W, 3] RGB -> LocalFeatures in original-image pixels."""


class InProcessExtractor:
    """Runs the extraction graph in this process, from a Keras model or a SavedModel."""

    def __init__(
        self,
        extract_fn,
        config: ExtractionConfig,
        fingerprint: str | None,
        description: dict[str, Any],
    ):
        self._extract_fn = extract_fn
        self.config = config
        self._fingerprint = fingerprint
        self._description = description

    @property
    def fingerprint(self) -> str | None:
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return dict(self._description)

    @classmethod
    def from_model(
        cls,
        model: DelfModel,
        config: ExtractionConfig | None = None,
        pca: PcaParams | None = None,
        source: str = "in-memory model",
    ) -> InProcessExtractor:
        config = config or ExtractionConfig()
        module = ExtractionModule(model, config, pca)
        description = {
            "backend": "in-process keras",
            "model": source,
            "model_config": model.config.to_dict(),
            "extraction_config": config.to_dict(),
            "pca": pca is not None,
            "descriptor_dim": module.descriptor_dim,
        }
        extractor = cls(module.extract, config, module.fingerprint, description)
        extractor.module = module
        return extractor

    @classmethod
    def from_saved_model(
        cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None
    ) -> InProcessExtractor:
        """Loads an export of `delf_tf.export` (a version dir, or a model dir: highest version)."""
        version_dir = resolve_version_dir(path)
        info = json.loads((version_dir / "assets" / EXPORT_INFO_ASSET).read_text())
        config = ExtractionConfig.from_dict(info["extraction_config"], source=str(version_dir))
        if overrides:
            config = config.replace(**overrides)
        loaded = tf.saved_model.load(str(version_dir))
        description = {
            "backend": "in-process savedmodel",
            "model": str(version_dir),
            "extraction_config": config.to_dict(),
            "descriptor_dim": info["descriptor_dim"],
        }
        extractor = cls(loaded.extract, config, info["fingerprint"], description)
        extractor.saved_model = loaded
        return extractor

    def extract(self, image: np.ndarray, **overrides: Any) -> LocalFeatures:
        """uint8 [H, W, 3] -> LocalFeatures; `overrides` may set max_features,
        score_threshold or scales for this call."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(
                f"expected an RGB image uint8 [H, W, 3], got {image.dtype} {list(image.shape)}"
            )
        unknown = set(overrides) - set(RUNTIME_OVERRIDES)
        if unknown:
            raise TypeError(f"unknown extraction override(s): {sorted(unknown)}")
        arguments = {
            "max_features": tf.constant(
                overrides.get("max_features", self.config.max_features), tf.int32
            ),
            "score_threshold": tf.constant(
                overrides.get("score_threshold", self.config.score_threshold), tf.float32
            ),
            "scales": tf.constant(overrides.get("scales", self.config.scales), tf.float32),
        }
        outputs = self._extract_fn(tf.constant(image), **arguments)
        return LocalFeatures(**{name: outputs[name].numpy() for name in outputs})


def build_extractor(
    model: str | os.PathLike | None = None,
    weights: str | None = "random",
    seed: int = 0,
    config: ExtractionConfig | None = None,
    overrides: dict[str, Any] | None = None,
    pca: str | os.PathLike | None = None,
    model_config: ModelConfig | None = None,
) -> InProcessExtractor:
    """The embedded default back end, from command-line style options.

    model: a `.keras` DelfModel, a training checkpoint, an exported SavedModel
      directory, or None to build
      a fresh DelfModel with backbone `weights` ("random" seeded by `seed`,
      "imagenet", or a local ResNet50 weights file).
    config: extraction settings (default ExtractionConfig()); `overrides` replace
      single fields. A SavedModel carries its own config: only the run-time fields
      (max_features, score_threshold, scales) can be overridden there.
    pca: a `.npz` from `delf fit-pca`, applied in the graph (not with a SavedModel,
      which carries its own PCA).
    """
    overrides = dict(overrides or {})
    pca_params = PcaParams.load(pca) if pca else None
    if model is not None and Path(model).is_dir() and not _is_checkpoint_dir(Path(model)):
        path = Path(model)
        if pca_params is not None or config is not None:
            raise ConfigError(f"{path}: a SavedModel carries its own PCA and extraction config")
        fixed = sorted(set(overrides) - set(RUNTIME_OVERRIDES))
        if fixed:
            raise ConfigError(f"{path}: {fixed} are fixed in the SavedModel's graph")
        return InProcessExtractor.from_saved_model(path, overrides=overrides)
    config = (config or ExtractionConfig()).replace(**overrides)
    if model is not None:
        delf_model = load_delf_model(model, model_config)
        return InProcessExtractor.from_model(delf_model, config, pca_params, source=str(model))
    delf_model = build_delf_model(model_config, weights=weights, seed=seed)
    source = f"DelfModel weights={weights}" + (f" seed={seed}" if weights == "random" else "")
    return InProcessExtractor.from_model(delf_model, config, pca_params, source=source)


def _is_checkpoint_dir(path: Path) -> bool:
    """A training checkpoint folder (tf.train.Checkpoint files), not a SavedModel."""
    return any(path.glob("*.index")) and not any(path.glob("**/saved_model.pb"))
