"""Recognising a released reference model's folder by its contents.

Layouts as downloaded: `delf_gld_20190411/model/{saved_model.pb,variables/}` with
PCA parameters in `delf_gld_20190411/pca/{mean.datum,pca_proj_mat.datum}` (a
variances file may be there too); the DELG folders hold `saved_model.pb` and
`variables/` at the top. A folder is a release when its SavedModel's graph has the
reference feeds and fetches (not when it has a signature: releases have none);
an export of this project (assets/extraction_config.json) is never taken for one.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from delf_tf.contract import EXPORT_INFO_ASSET, SAVED_MODEL_FILE
from delf_tf.errors import InputError
from delf_tf.releases.presets import DEFAULT_PRESETS, RELEASE_PRESETS, ReleasePreset

LOCAL_FEEDS = ("input_image", "input_scales", "input_abs_thres", "input_max_feature_num")
LOCAL_FETCHES = ("boxes", "features", "scales", "scores")
GLOBAL_FEED = "input_global_scales_ind"
GLOBAL_FETCH = "global_descriptors"
PCA_FILES = ("mean.datum", "pca_proj_mat.datum")
PCA_VARIANCES_FILE = "pca_vars.datum"


@dataclasses.dataclass(frozen=True)
class ReleaseFolder:
    """A released model found on disk.

    Attributes:
      model_dir: the folder holding saved_model.pb and variables/.
      kind: "delf" (local features only) or "delg" (local + global).
      name: the release's name when the path names a known release, else None.
      pca_dir: the release's pca/ folder (mean.datum, pca_proj_mat.datum), or None.
      tags: the MetaGraph's tags (to load it with).
    """

    model_dir: Path
    kind: str
    name: str | None
    pca_dir: Path | None
    tags: tuple[str, ...]

    @property
    def preset(self) -> ReleasePreset:
        """The reference settings: by name when known, else by kind."""
        return RELEASE_PRESETS[self.name] if self.name else DEFAULT_PRESETS[self.kind]

    @property
    def feeds(self) -> tuple[str, ...]:
        return LOCAL_FEEDS + ((GLOBAL_FEED,) if self.kind == "delg" else ())

    @property
    def fetches(self) -> tuple[str, ...]:
        return LOCAL_FETCHES + ((GLOBAL_FETCH,) if self.kind == "delg" else ())


def _saved_model_dir(path: Path) -> Path | None:
    for candidate in (path, path / "model"):
        if (candidate / SAVED_MODEL_FILE).is_file():
            return candidate
    return None


def _release_name(path: Path) -> str | None:
    """The known release named by the folder or one of its parents (deepest first)."""
    for part in (path.resolve(), *path.resolve().parents):
        for name in RELEASE_PRESETS:
            if part.name == name or part.name.startswith(name + "."):
                return name
    return None


def find_release(path: str | os.PathLike) -> ReleaseFolder | None:
    """The release at `path` (its folder, or its model/ folder), or None if it is none.

    Raises InputError for a release this project cannot run (global-only models).
    """
    path = Path(path)
    model_dir = _saved_model_dir(path)
    if model_dir is None or (model_dir / "assets" / EXPORT_INFO_ASSET).is_file():
        return None
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    try:
        saved_model.ParseFromString((model_dir / SAVED_MODEL_FILE).read_bytes())
    except Exception as error:  # noqa: BLE001 - protobuf raises several types
        raise InputError(f"{model_dir / SAVED_MODEL_FILE}: not a readable SavedModel") from error
    for meta_graph in saved_model.meta_graphs:
        nodes = {node.name for node in meta_graph.graph_def.node}
        if not {"input_image", "input_scales", GLOBAL_FETCH} - nodes and "boxes" not in nodes:
            raise InputError(
                f"{model_dir}: a global-only release (no local features); delf-tf needs a "
                "DELF or DELG model with local features"
            )
        if set(LOCAL_FEEDS + LOCAL_FETCHES) <= nodes:
            kind = "delg" if {GLOBAL_FEED, GLOBAL_FETCH} <= nodes else "delf"
            root = model_dir.parent if model_dir.name == "model" else model_dir
            pca_dir = root / "pca"
            has_pca = all((pca_dir / name).is_file() for name in PCA_FILES)
            return ReleaseFolder(
                model_dir=model_dir,
                kind=kind,
                name=_release_name(model_dir),
                pca_dir=pca_dir if has_pca else None,
                tags=tuple(meta_graph.meta_info_def.tags),
            )
    return None
