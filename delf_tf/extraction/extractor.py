"""The Extractor interface and the in-process back end (Keras model, release or SavedModel).

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
from absl import logging

from delf_tf.config import ExtractionConfig, ModelConfig
from delf_tf.contract import EXPORT_INFO_ASSET, RUNTIME_OVERRIDES, resolve_version_dir
from delf_tf.errors import ConfigError, InputError
from delf_tf.extraction.graph import ExtractionModule
from delf_tf.extraction.keras_network import KerasNetwork
from delf_tf.extraction.pca import PcaParams
from delf_tf.features.local_features import LocalFeatures
from delf_tf.model.delf import DelfModel, build_delf_model
from delf_tf.model.loading import load_delf_model
from delf_tf.presets import extraction_preset, preset_precision


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
    """Runs the extraction graph in this process: an ExtractionModule, or an export of one."""

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
    def from_module(cls, module: ExtractionModule) -> InProcessExtractor:
        """Extraction with `module.extract`, the graph an export of `module` serves."""
        extractor = cls(module.extract, module.config, module.fingerprint, module.describe())
        extractor.module = module
        return extractor

    @classmethod
    def from_model(
        cls,
        model: DelfModel,
        config: ExtractionConfig | None = None,
        pca: PcaParams | None = None,
        source: str = "in-memory model",
        pca_file: str | os.PathLike | None = None,
    ) -> InProcessExtractor:
        """pca_file: where `pca` was read from, recorded in the description (stores and
        indexes keep it, so a mismatch can name the PCA a collection was made with)."""
        config = config or ExtractionConfig()
        network = KerasNetwork(
            model, iou_threshold=config.iou_threshold, source=source, precision=config.precision
        )
        extractor = cls.from_module(ExtractionModule(network, config, pca))
        if pca_file is not None:
            extractor._description["pca_file"] = str(pca_file)
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
            "global_dim": info.get("global_dim"),
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
        return LocalFeatures(**{name: value.numpy() for name, value in outputs.items()})


def build_extractor(
    model: str | os.PathLike | None = None,
    weights: str | None = "random",
    seed: int = 0,
    config: ExtractionConfig | None = None,
    overrides: dict[str, Any] | None = None,
    pca: str | os.PathLike | None = None,
    model_config: ModelConfig | None = None,
    preset: str | None = None,
    delf_config: str | os.PathLike | None = None,
) -> InProcessExtractor:
    """The embedded default back end, from command-line style options.

    model: a `.keras` DelfModel, a training checkpoint, a released reference model
      folder (see `delf_tf.releases`), an exported SavedModel directory, or None to
      build a fresh DelfModel with backbone `weights` ("random" seeded by `seed`,
      "imagenet", or a local ResNet50 weights file) and `model_config`.
    preset: named settings (`delf_tf.presets`: paper, fast, or a release name); a
      release uses its own reference preset by default.
    config: explicit extraction settings (instead of a preset); `overrides`
      replace single fields. A SavedModel carries its own config: only the
      run-time fields (max_features, score_threshold, scales) can be overridden.
    pca: a `.npz` from `delf fit-pca` or a folder of reference `.datum` files,
      applied in the graph (not with a SavedModel, which carries its own PCA).
    delf_config: a reference DelfConfig text file (`.pbtxt`): its model_path (when
      `model` is None), scales, size limits, threshold, top-K and PCA files.
    """
    overrides = dict(overrides or {})
    settings = None
    if delf_config is not None:
        settings = _delf_config_settings(delf_config)
        if model is None:
            model = settings.model_path
    if preset is not None and config is not None:
        raise ConfigError("give a preset or an extraction config, not both")
    if model is not None and Path(model).is_dir():
        path = Path(model)
        from delf_tf.releases.folder import find_release

        release = find_release(path)
        if release is not None:
            return _release_extractor(release, preset, config, overrides, pca, settings)
        if settings is not None:
            raise ConfigError(f"{path}: --delf_config applies to released reference models")
        if not _is_checkpoint_dir(path):
            if pca is not None or config is not None or preset is not None:
                raise ConfigError(f"{path}: a SavedModel carries its own PCA and extraction config")
            fixed = sorted(set(overrides) - set(RUNTIME_OVERRIDES))
            if fixed:
                raise ConfigError(f"{path}: {fixed} are fixed in the SavedModel's graph")
            return InProcessExtractor.from_saved_model(path, overrides=overrides)
    if settings is not None:
        raise ConfigError("--delf_config applies to released reference models")
    if config is None and preset_precision(preset) is not None:
        overrides = {"precision": preset_precision(preset), **overrides}  # the host's choice
    config = (config or extraction_preset(preset or "paper")).replace(**overrides)
    pca_params = _load_pca(pca) if pca else None
    if model is not None:
        delf_model = load_delf_model(model, model_config)
        return InProcessExtractor.from_model(
            delf_model, config, pca_params, source=str(model), pca_file=pca
        )
    if model_config is not None and model_config.architecture != "delf":
        from delf_tf.model.reference_nets import build_reference_model

        if weights not in (None, "random"):
            raise ConfigError(
                f"architecture {model_config.architecture}: weights come from a release "
                "(delf convert), not --weights"
            )
        delf_model = build_reference_model(model_config, seed=seed)
    else:
        delf_model = build_delf_model(model_config, weights=weights, seed=seed)
    source = f"DelfModel weights={weights}" + (f" seed={seed}" if weights == "random" else "")
    return InProcessExtractor.from_model(
        delf_model, config, pca_params, source=source, pca_file=pca
    )


def _load_pca(path: str | os.PathLike, whiten: bool = False) -> PcaParams:
    """A PCA `.npz` of `delf fit-pca`, or a folder of reference `.datum` files."""
    path = Path(path)
    if path.is_dir():
        return PcaParams.from_datum_folder(path, whiten=whiten)
    return PcaParams.load(path)


def _delf_config_settings(path: str | os.PathLike):
    """The DelfConfig's settings, relative paths resolved as the reference does (working
    directory), else against the config file's folder."""
    from delf_tf.formats.delf_config import parse_delf_config, resolve_paths

    settings = parse_delf_config(Path(path))
    if settings.model_path and not Path(settings.model_path).exists():
        settings = resolve_paths(settings, Path(path).resolve().parent)
    if settings.use_square_images:
        raise ConfigError(f"{path}: use_square_images is not supported")
    return settings


def _release_extractor(release, preset, config, overrides, pca, settings) -> InProcessExtractor:
    """Extraction through a released model's own graph, with the reference settings."""
    from delf_tf.formats.delf_config import settings_overrides
    from delf_tf.releases.network import ReleaseNetwork
    from delf_tf.releases.presets import RELEASE_PRESETS

    reference = RELEASE_PRESETS.get(preset) if preset else None
    reference = reference or release.preset
    if config is None and preset is not None and preset not in RELEASE_PRESETS:
        config = extraction_preset(preset)
    if config is None:
        config = ExtractionConfig().replace(**reference.extraction)
    use_pca, whiten, pca_files = reference.use_pca, reference.whiten, None
    if settings is not None:
        config = config.replace(**settings_overrides(settings))
        config = config.replace(min_image_size=settings.min_image_size)
        if settings.use_global_features:
            indices = settings.global_config.image_scales_ind
            config = config.replace(global_scale_indices=indices)
        local = settings.local_config
        use_pca = local.use_pca
        if local.use_pca and local.pca is not None:
            whiten = local.pca.use_whitening
            pca_files = local.pca
    config = config.replace(**overrides)
    pca_params = None
    if pca is not None:
        pca_params = _load_pca(pca, whiten=whiten)
    elif pca_files is not None:
        pca_params = PcaParams.from_datum_folder(
            (pca_files.mean_path, pca_files.projection_matrix_path),
            whiten=whiten,
            variances_path=pca_files.pca_variances_path or None,
        )
    elif use_pca and release.pca_dir is not None:
        pca_params = PcaParams.from_datum_folder(release.pca_dir, whiten=whiten)
    elif use_pca:
        logging.warning(
            "%s: the reference config applies PCA, but the release has no pca/ folder "
            "(mean.datum, pca_proj_mat.datum): descriptors are not reduced",
            release.model_dir,
        )
    module = ExtractionModule(ReleaseNetwork(release), config, pca_params)
    return InProcessExtractor.from_module(module)


def _is_checkpoint_dir(path: Path) -> bool:
    """A training checkpoint folder (tf.train.Checkpoint files), not a SavedModel."""
    return any(path.glob("*.index")) and not any(path.glob("**/saved_model.pb"))
