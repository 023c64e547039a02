"""The one in-graph multi-scale extraction, PCA, and the Extractor interface.

Names are imported lazily (PEP 562), so `delf_tf.extraction.pca` can be used
without importing TensorFlow.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Extractor": "delf_tf.extraction.extractor",
    "InProcessExtractor": "delf_tf.extraction.extractor",
    "build_extractor": "delf_tf.extraction.extractor",
    "ExtractionModule": "delf_tf.extraction.graph",
    "extractor_fingerprint": "delf_tf.extraction.graph",
    "PcaParams": "delf_tf.extraction.pca",
    "fit_pca": "delf_tf.extraction.pca",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
