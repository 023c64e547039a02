"""The one in-graph multi-scale extraction, PCA, and the Extractor interface."""

from delf_tf.extraction.extractor import (
    Extractor,
    InProcessExtractor,
    build_extractor,
    resolve_saved_model_dir,
)
from delf_tf.extraction.graph import ExtractionModule, extractor_fingerprint
from delf_tf.extraction.pca import PcaParams, fit_pca

__all__ = [
    "ExtractionModule",
    "Extractor",
    "InProcessExtractor",
    "PcaParams",
    "build_extractor",
    "extractor_fingerprint",
    "fit_pca",
    "resolve_saved_model_dir",
]
