"""Named extraction presets: one place for the settings that commands offer by name.

`--preset=paper` is ExtractionConfig's defaults (the DELF paper and reference
values: 7 scales 0.25..2.0, 1000 features, attention threshold 100, PCA to 40);
`--preset=fast` trades recall for speed (4 scales, 500 features, long side 512),
for laptops and demos, and runs a DelfModel in bfloat16 where the CPU computes it
natively (`host_precision`: AVX512-BF16 or AMX in /proc/cpuinfo's flags; float32
elsewhere; measured 2.05x faster at cosine 0.99997, see bench/README.md). Precision
is chosen per host, not per collection: it is recorded in a store's and an
index's extractor description but is not part of the fingerprint, so a query may
run in another precision than its collection. Each released reference model has a preset of its name
with the settings of its reference config (`delf_tf.releases.presets`; with a
release, its PCA settings too). A preset gives ExtractionConfig field values;
flags given on the command line override them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
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


def describe_preset(name: str) -> str:
    """A preset's settings in words, for help texts: "4 scales, 500 features, long side 512"."""
    settings = EXTRACTION_PRESETS[name]
    words = []
    if "scales" in settings:
        words.append(f"{len(settings['scales'])} scales")
    if "max_features" in settings:
        words.append(f"{settings['max_features']} features")
    if "max_image_size" in settings:
        words.append(f"long side {settings['max_image_size']}")
    if name in HOST_PRECISION_PRESETS:
        words.append("bfloat16 where the CPU has AVX512-BF16/AMX")
    return ", ".join(words) or "the reference values"


# --- precision by host ---------------------------------------------------------------------

CPU_INFO = "/proc/cpuinfo"
# CPU flags (as /proc/cpuinfo names them) of native bfloat16 arithmetic.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# Presets whose precision is the host's (`host_precision`) for a DelfModel; a flag
# --precision, an --extraction_config or a released TF1 graph (float32 only) keep theirs.
HOST_PRECISION_PRESETS = frozenset({"fast"})
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that keep bfloat16 arithmetic: AVX512_CORE_BF16,
# AVX512_CORE_FP16 / AVX10_1_512, the AMX ones, and no cap (ALL, DEFAULT).
_BF16_ISA_WORDS = ("BF16", "FP16", "AMX", "AVX10", "ALL", "DEFAULT")


def cpu_flags(path: str = CPU_INFO) -> frozenset[str]:
    """The CPU's feature flags (the first "flags" line of /proc/cpuinfo); empty where
    there is no such file (macOS, Windows) or it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def host_precision(flags: Iterable[str] | None = None) -> str:
    """The precision for a CPU: bfloat16 when its flags include AVX512-BF16 or AMX
    bfloat16, else float32.

    flags: a CPU's flags; default this host's, where ONEDNN_MAX_CPU_ISA (or
      DNNL_MAX_CPU_ISA) capped below bfloat16 also means float32: oneDNN then has no
      bfloat16 convolution (every image would fail).
    """
    if flags is None:
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
        if cap and not any(word in cap.upper() for word in _BF16_ISA_WORDS):
            return "float32"
        flags = cpu_flags()
    return "bfloat16" if frozenset(flags) & BF16_CPU_FLAGS else "float32"


def precision_for_host(recorded: str, flags: Iterable[str] | None = None) -> str:
    """The precision this host (or one with `flags`) runs a collection's recorded
    precision in: bfloat16 only where the CPU computes it, else float32; float32 and
    float16 as recorded. A query may so differ from its collection (same fingerprint)."""
    return host_precision(flags) if recorded == "bfloat16" else recorded


def preset_precision(name: str | None, flags: Iterable[str] | None = None) -> str | None:
    """The precision preset `name` picks on a host with `flags` (default: this one), or
    None when the preset leaves the config's own (float32)."""
    return host_precision(flags) if name in HOST_PRECISION_PRESETS else None
