"""DelfConfig text files (`.pbtxt`) of the reference, read without protoc or TensorFlow.

`parse_delf_config` parses the text with `google.protobuf.text_format` into the
run-time DelfConfig message (protos.py) and returns a frozen, plain-Python
`DelfConfigSettings` in which every unset field has the reference's default.
Float fields are float32 in the message; they come back as the Python float of
that float32 value (e.g. 0.3536 -> 0.35359999537467957), which is what the
reference graph compares against.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from delf_tf.errors import ConfigError
from delf_tf.formats import protos


@dataclasses.dataclass(frozen=True)
class PcaSettings:
    """DelfPcaParameters. Paths are as written in the file (see `resolve_paths`)."""

    mean_path: str
    projection_matrix_path: str
    pca_dim: int
    use_whitening: bool
    pca_variances_path: str


@dataclasses.dataclass(frozen=True)
class LocalSettings:
    """DelfLocalFeatureConfig; `pca` is None when the file has no pca_parameters."""

    use_pca: bool
    layer_name: str
    iou_threshold: float
    max_feature_num: int
    score_threshold: float
    use_resized_coordinates: bool
    pca: PcaSettings | None


@dataclasses.dataclass(frozen=True)
class GlobalSettings:
    """DelfGlobalFeatureConfig; `pca` is None when the file has no pca_parameters."""

    use_pca: bool
    image_scales_ind: tuple[int, ...]
    pca: PcaSettings | None


@dataclasses.dataclass(frozen=True)
class DelfConfigSettings:
    """A DelfConfig with the reference's defaults filled in; `source` names its file."""

    source: str
    model_path: str
    image_scales: tuple[float, ...]
    max_image_size: int
    min_image_size: int
    use_square_images: bool
    use_local_features: bool
    use_global_features: bool
    is_tf2_exported: bool
    local_config: LocalSettings
    global_config: GlobalSettings


def _f32(value: float) -> float:
    return float(np.float32(value))


def _pca(parent) -> PcaSettings | None:
    if not parent.HasField("pca_parameters"):
        return None
    message = parent.pca_parameters
    return PcaSettings(
        mean_path=message.mean_path,
        projection_matrix_path=message.projection_matrix_path,
        pca_dim=int(message.pca_dim),
        use_whitening=bool(message.use_whitening),
        pca_variances_path=message.pca_variances_path,
    )


def _settings(config, source: str) -> DelfConfigSettings:
    local, glob = config.delf_local_config, config.delf_global_config
    return DelfConfigSettings(
        source=source,
        model_path=config.model_path,
        image_scales=tuple(_f32(s) for s in config.image_scales),
        max_image_size=int(config.max_image_size),
        min_image_size=int(config.min_image_size),
        use_square_images=bool(config.use_square_images),
        use_local_features=bool(config.use_local_features),
        use_global_features=bool(config.use_global_features),
        is_tf2_exported=bool(config.is_tf2_exported),
        local_config=LocalSettings(
            use_pca=bool(local.use_pca),
            layer_name=local.layer_name,
            iou_threshold=_f32(local.iou_threshold),
            max_feature_num=int(local.max_feature_num),
            score_threshold=_f32(local.score_threshold),
            use_resized_coordinates=bool(local.use_resized_coordinates),
            pca=_pca(local),
        ),
        global_config=GlobalSettings(
            use_pca=bool(glob.use_pca),
            image_scales_ind=tuple(int(i) for i in glob.image_scales_ind),
            pca=_pca(glob),
        ),
    )


def parse_delf_config_text(text: str, source: str = "<text>") -> DelfConfigSettings:
    """Parses DelfConfig text; raises a one-line ConfigError `source:line: reason`."""
    config = protos.DelfConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        line = error.GetLine()
        reason = str(error)
        prefix = f"{line}:{error.GetColumn()} : "
        reason = reason[len(prefix) :] if reason.startswith(prefix) else reason
        where = f"{source}:{line}" if line else source
        reason = " ".join(reason.split())
        raise ConfigError(f"{where}: not a valid DelfConfig ({reason})") from error
    return _settings(config, source)


def _looks_like_path(value: str) -> bool:
    if os.path.isfile(value):
        return True
    return bool(value.strip()) and not any(mark in value for mark in ("\n", "{", ":"))


def parse_delf_config(path_or_text: str | os.PathLike) -> DelfConfigSettings:
    """Parses a DelfConfig file (a path) or its text (a string with fields in it).

    A `str` is read as a path when it names a file, or is not blank and has no
    newline, "{" or ":" in it; anything else (e.g. "") is parsed as text.
    """
    if isinstance(path_or_text, str) and not _looks_like_path(path_or_text):
        return parse_delf_config_text(path_or_text)
    path = Path(path_or_text)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(f"{path}: cannot read DelfConfig ({reason})") from error
    return parse_delf_config_text(text, str(path))


def _resolve(path: str, base: Path) -> str:
    return str(base / path) if path and not os.path.isabs(path) else path


def _resolve_pca(pca: PcaSettings | None, base: Path) -> PcaSettings | None:
    if pca is None:
        return None
    return dataclasses.replace(
        pca,
        mean_path=_resolve(pca.mean_path, base),
        projection_matrix_path=_resolve(pca.projection_matrix_path, base),
        pca_variances_path=_resolve(pca.pca_variances_path, base),
    )


def resolve_paths(settings: DelfConfigSettings, base_dir: str | os.PathLike) -> DelfConfigSettings:
    """Settings whose relative paths (model, PCA files) are joined to `base_dir`.

    The reference scripts resolve them against their working directory; pass that
    folder (or the config file's folder) here. Empty and absolute paths are kept.
    """
    base = Path(base_dir)
    return dataclasses.replace(
        settings,
        model_path=_resolve(settings.model_path, base),
        local_config=dataclasses.replace(
            settings.local_config, pca=_resolve_pca(settings.local_config.pca, base)
        ),
        global_config=dataclasses.replace(
            settings.global_config, pca=_resolve_pca(settings.global_config.pca, base)
        ),
    )


def settings_overrides(settings: DelfConfigSettings) -> dict[str, object]:
    """The settings as ExtractionConfig field values (delf_tf/config.py).

    Maps image_scales -> scales (left out when the file has none), max_image_size,
    local score_threshold, max_feature_num -> max_features, iou_threshold, and
    local pca_dim -> pca_dim when use_pca is set and pca_parameters are given.
    Not mapped (no ExtractionConfig field): min_image_size, use_square_images,
    use_resized_coordinates, the global settings and the PCA file paths.
    """
    local = settings.local_config
    overrides: dict[str, object] = {
        "max_image_size": settings.max_image_size,
        "score_threshold": local.score_threshold,
        "max_features": local.max_feature_num,
        "iou_threshold": local.iou_threshold,
    }
    if settings.image_scales:
        overrides["scales"] = settings.image_scales
    if local.use_pca and local.pca is not None and local.pca.pca_dim > 0:
        overrides["pca_dim"] = local.pca.pca_dim
    return overrides
