"""delf-tf: DELF local features and landmark retrieval on TensorFlow and Keras 3.

Extract the features of a folder of photos, index them, and search with a query:

>>> import delf_tf
>>> extractor = delf_tf.build_extractor(weights="random", overrides={"score_threshold": 0})
>>> store, summary = delf_tf.extract_to_store(extractor, "photos/", "features/")
>>> index = delf_tf.Index.from_store(store, "photos/")
>>> results = delf_tf.Searcher(index).search(extractor.extract(delf_tf.load_image("query.jpg")))

`results` lists `SearchResult`s, best first: `.path`, `.inliers` (RANSAC), `.score`
(the initial ranking's). `weights="random"` shows the pipeline only; a trained
model is `build_extractor(model=PATH)` (a `.keras` model, an export or a released
reference model), and its default score threshold (100) is the reference's.

The names, imported on first use (so `import delf_tf` loads no TensorFlow):
  build_extractor(model=, weights=, pca=, preset=, config=, overrides=) -> Extractor:
      `extractor.extract(image)` turns uint8 [H, W, 3] RGB into LocalFeatures
      (keypoints [N, 2] float32 (x, y), scales [N], scores [N], descriptors [N, D]).
  load_image(path) -> uint8 [H, W, 3] RGB (EXIF orientation applied).
  extract_to_store(extractor, images, output) -> (FeatureStore, ExtractionSummary):
      a folder of images into a resumable feature store.
  Index.from_store(store, images_root), Index.save(path), Index.load(path).
  Searcher(index, config=None).search(features) -> [SearchResult].
  ExtractionConfig, ModelConfig, RetrievalConfig: the settings and their defaults.
"""

from __future__ import annotations

import importlib

from delf_tf.tf_runtime import install_quiet_import

__version__ = "0.1.0"

install_quiet_import()

_EXPORTS = {
    "build_extractor": "delf_tf.extraction.extractor",
    "extract_to_store": "delf_tf.extraction.folder",
    "load_image": "delf_tf.images",
    "Index": "delf_tf.retrieval.index",
    "Searcher": "delf_tf.retrieval.search",
    "SearchResult": "delf_tf.retrieval.search",
    "LocalFeatures": "delf_tf.features.local_features",
    "FeatureStore": "delf_tf.features.store",
    "ExtractionConfig": "delf_tf.config",
    "ModelConfig": "delf_tf.config",
    "RetrievalConfig": "delf_tf.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'delf_tf' has no attribute {name!r}")
