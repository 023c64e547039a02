"""Local features of one image and the on-disk feature store."""

from delf_tf.features.local_features import FeatureFileError, LocalFeatures
from delf_tf.features.store import FeatureStore, StoreMismatchError

__all__ = ["FeatureFileError", "FeatureStore", "LocalFeatures", "StoreMismatchError"]
