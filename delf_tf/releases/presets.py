"""Extraction settings of the reference configs, per released model (TF-free).

Values from the reference configs (OFFICIAL_DELF.md): DELF
`delf_config_example.pbtxt` (7 scales, top 1000, threshold 100, PCA to 40
without whitening, no size limit) and the DELG `*_config.pbtxt` files (the same
scales as float32 values, long side 1024, top 1000, no local PCA, global scale
indices 3, 4, 5, a threshold per model).
"""

from __future__ import annotations

import dataclasses
from typing import Any

DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
# The DELG configs write the scales as float32 values.
DELG_SCALES = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)
# DelfConfig's default score_threshold, used for DELG models of unknown names.
PROTO_DEFAULT_THRESHOLD = 100.0


@dataclasses.dataclass(frozen=True)
class ReleasePreset:
    """The reference settings of one released model.

    Attributes:
      kind: "delf" (local features, 1024-D) or "delg" (128-D local + 2048-D global).
      extraction: ExtractionConfig fields.
      use_pca: apply the release's PCA (its `pca/` folder) to the local descriptors.
      whiten: PCA whitening.
    """

    kind: str
    extraction: dict[str, Any]
    use_pca: bool = False
    whiten: bool = False


def _delg(threshold: float) -> ReleasePreset:
    return ReleasePreset(
        kind="delg",
        extraction={
            "scales": DELG_SCALES,
            "max_image_size": 1024,
            "min_image_size": -1,
            "max_features": 1000,
            "score_threshold": threshold,
            "iou_threshold": 1.0,
            "global_scale_indices": (3, 4, 5),
        },
    )


DELF_PRESET = ReleasePreset(
    kind="delf",
    extraction={
        "scales": DELF_SCALES,
        "max_image_size": -1,
        "min_image_size": -1,
        "max_features": 1000,
        "score_threshold": 100.0,
        "iou_threshold": 1.0,
        "pca_dim": 40,
        "global_scale_indices": (),
    },
    use_pca=True,
)

RELEASE_PRESETS: dict[str, ReleasePreset] = {
    "delf_gld_20190411": DELF_PRESET,
    "r50delg_gld_20200814": _delg(175.0),
    "r101delg_gld_20200814": _delg(166.1),
    "r50delg_gldv2clean_20200914": _delg(454.6),
    "r101delg_gldv2clean_20200914": _delg(357.48),
}
# Presets of releases whose name is not known, by what their graph offers.
DEFAULT_PRESETS: dict[str, ReleasePreset] = {
    "delf": DELF_PRESET,
    "delg": _delg(PROTO_DEFAULT_THRESHOLD),
}
