"""Named extraction presets: one place for the settings that commands offer by name.

`--preset=paper` is ExtractionConfig's defaults (the DELF paper and reference
values: 7 scales 0.25..2.0, 1000 features, attention threshold 100, PCA to 40);
`--preset=fast` trades recall for speed (4 scales, 500 features, long side 512),
for laptops and demos. Each released reference model has a preset of its name
with the settings of its reference config (`delf_tf.releases.presets`; with a
release, its PCA settings too). A preset gives ExtractionConfig field values;
flags given on the command line override them.
"""

from __future__ import annotations

from typing import Any

from delf_tf.config import ExtractionConfig
from delf_tf.errors import ConfigError
from delf_tf.releases.presets import RELEASE_PRESETS

EXTRACTION_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "fast": {
        "scales": (0.5, 0.7071, 1.0, 1.4142),
        "max_features": 500,
        "max_image_size": 512,
    },
    **{name: preset.extraction for name, preset in RELEASE_PRESETS.items()},
}


def extraction_preset(name: str, base: ExtractionConfig | None = None) -> ExtractionConfig:
    """ExtractionConfig of preset `name` (over `base`, default ExtractionConfig())."""
    if name not in EXTRACTION_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(EXTRACTION_PRESETS)}")
    return (base or ExtractionConfig()).replace(**EXTRACTION_PRESETS[name])
