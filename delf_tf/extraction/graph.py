"""The one extraction graph: size limits -> network -> reference post-processing, a tf.function.

`ExtractionModule.extract` runs in process, inside the exported SavedModel and in
the tests: it is the same traced function everywhere. It uses standard TF ops
only (no py_function, no XLA), so TF Serving can run it as it is.

The graph has three stages; only the middle one depends on the model:
1. size limits (`resize.resize_to_limits`): the reference's `ResizeImage`, Pillow's
   bilinear resize when the long side is over max_image_size (or under
   min_image_size), with the resize factors kept;
2. the network (a `FeatureNetwork`): the image pyramid, attention, threshold and
   top-K. Back ends: the project's Keras DelfModel (`keras_network.KerasNetwork`)
   or a released reference model's own TF1 graph (`delf_tf.releases.network.ReleaseNetwork`);
3. the reference post-processing (OFFICIAL_DELF.md, "Post-processing"): locations
   divided by the resize factors (original-image pixels), descriptors L2-normalised,
   then PCA `(d - mean) @ P[:pca_dim].T` (whitening: / sqrt(variances)) and L2
   again; a global descriptor (DELG) L2-normalised per scale, summed over the
   selected scales, L2-normalised again.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import numpy as np
import tensorflow as tf

from delf_tf.config import ExtractionConfig
from delf_tf.errors import ConfigError
from delf_tf.extraction.pca import PcaParams
from delf_tf.extraction.resize import resize_to_limits

FINGERPRINT_VERSION = "delf-tf-extractor-1"
# Images whose shorter side is below this after the size limits give no features
# (the reference extractor's rule).
MIN_IMAGE_SIDE = 10
# Inputs of `ExtractionModule.extract` (and of the exported `extract_image` signature).
EXTRACT_SIGNATURE = (
    tf.TensorSpec([None, None, 3], tf.uint8, name="image"),
    tf.TensorSpec([], tf.int32, name="max_features"),
    tf.TensorSpec([], tf.float32, name="score_threshold"),
    tf.TensorSpec([None], tf.float32, name="scales"),
)


class FeatureNetwork(Protocol):
    """The model stage of the graph: a DelfModel or a released model's graph.

    Attributes: local_dim (raw descriptor size), global_dim (raw global
    descriptor size, or None without a global head).
    """

    local_dim: int
    global_dim: int | None

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (backend, model, ...)."""

    def update_fingerprint(self, digest: Any) -> None:
        """Adds the identity of the descriptor space (architecture, weights) to a sha256."""

    def __call__(
        self, image, scales, score_threshold, max_features, global_scale_indices
    ) -> dict[str, tf.Tensor]:
        """uint8 [H, W, 3], scales float32 [S], [] float32, [] int32, int32 [S'] -> dict
        sorted by decreasing score: locations float32 [N, 2] (y, x) in `image` pixels,
        descriptors float32 [N, D] (raw), scales float32 [N] (1 / pyramid scale),
        scores float32 [N]; plus global_descriptors float32 [S', G] (raw) when
        global_dim is set."""


class ExtractionModule(tf.Module):
    """Multi-scale extraction around a FeatureNetwork (+ optional PCA of the local descriptors).

    `extract(image, max_features, score_threshold, scales)`:
      image: uint8 [H, W, 3] RGB.
      max_features: int32 [] (top-K over all scales).
      score_threshold: float32 [] (minimum attention score).
      scales: float32 [S] pyramid scales.
    Returns a dict, sorted by decreasing score, N <= max_features:
      keypoints: float32 [N, 2] (x, y) in original-image pixels, the centre of
        each feature's receptive field;
      scales: float32 [N] 1 / pyramid scale;
      scores: float32 [N] attention scores;
      descriptors: float32 [N, D] unit L2 norm, D = pca_dim with PCA, else raw size;
      global_descriptor: float32 [G] unit L2 norm, only when the network has a
        global head (pooled over config.global_scale_indices, those < S).
    Images whose shorter side is under 10 px after the size limits give N = 0.
    """

    def __init__(self, network, config: ExtractionConfig, pca: PcaParams | None = None):
        super().__init__(name="delf_extraction")
        from delf_tf.extraction.keras_network import KerasNetwork
        from delf_tf.model.delf import DelfModel
        from delf_tf.model.reference_nets import ReferenceModel

        if isinstance(network, (DelfModel, ReferenceModel)):
            network = KerasNetwork(
                network, iou_threshold=config.iou_threshold, precision=config.precision
            )
        elif config.precision != "float32" and not isinstance(network, KerasNetwork):
            raise ConfigError(
                f"precision {config.precision!r} applies to Keras models; a released TF1 graph "
                "runs in float32 (convert it to a Keras model first: delf convert)"
            )
        self.network = network
        self.config = config
        self.global_dim = network.global_dim
        self.descriptor_dim = network.local_dim
        self.pca_mean = self.pca_projection = self.pca_scale = None
        if pca is not None:
            if pca.input_dim != network.local_dim:
                raise ConfigError(
                    f"PCA was fitted on {pca.input_dim}-D descriptors, the model gives "
                    f"{network.local_dim}-D"
                )
            if config.pca_dim > pca.output_dim:
                raise ConfigError(
                    f"pca_dim {config.pca_dim} exceeds the {pca.output_dim} components stored"
                )
            scale = np.ones(config.pca_dim, np.float32)
            if pca.whiten:
                if pca.variances is None:
                    raise ConfigError("PCA whitening needs the PCA variances, and none are given")
                scale = 1.0 / np.sqrt(np.maximum(pca.variances[: config.pca_dim], 1e-12))
            self.pca_mean = tf.Variable(pca.mean, trainable=False, name="pca_mean")
            self.pca_projection = tf.Variable(
                pca.projection[: config.pca_dim].T, trainable=False, name="pca_projection"
            )
            self.pca_scale = tf.Variable(scale, trainable=False, name="pca_scale")
            self.descriptor_dim = config.pca_dim
        self.fingerprint = extractor_fingerprint(network, config, pca)
        self.extract = tf.function(
            self._extract,
            input_signature=EXTRACT_SIGNATURE,
            autograph=False,
        )

    @property
    def model(self):
        """The Keras DelfModel of a KerasNetwork (None for other back ends)."""
        return getattr(self.network, "model", None)

    def describe(self) -> dict[str, Any]:
        return {
            **self.network.describe(),
            "extraction_config": self.config.to_dict(),
            "pca": self.pca_projection is not None,
            "descriptor_dim": self.descriptor_dim,
            "global_dim": self.global_dim,
        }

    def default_arguments(self) -> dict[str, tf.Tensor]:
        """The config's values of `extract`'s optional arguments."""
        return {
            "max_features": tf.constant(self.config.max_features, tf.int32),
            "score_threshold": tf.constant(self.config.score_threshold, tf.float32),
            "scales": tf.constant(self.config.scales, tf.float32),
        }

    def _extract(self, image, max_features, score_threshold, scales):
        resized, factors = resize_to_limits(
            image, self.config.max_image_size, self.config.min_image_size
        )
        large_enough = tf.reduce_min(tf.shape(resized)[:2]) >= MIN_IMAGE_SIDE
        return tf.cond(
            large_enough,
            lambda: self._features(resized, factors, max_features, score_threshold, scales),
            lambda: self._no_features(),
        )

    def _global_scale_indices(self, scales) -> tf.Tensor:
        """int32 [S']: the config's global scale indices below S (all scales if none are)."""
        wanted = tf.constant(np.array(self.config.global_scale_indices, np.int32).reshape(-1))
        count = tf.shape(scales)[0]
        valid = tf.boolean_mask(wanted, (wanted >= 0) & (wanted < count))
        return tf.cond(tf.size(valid) > 0, lambda: valid, lambda: tf.range(count))

    def _features(self, image, factors, max_features, score_threshold, scales):
        raw = self.network(
            image, scales, score_threshold, max_features, self._global_scale_indices(scales)
        )
        locations = tf.reshape(raw["locations"], [-1, 2]) / factors  # (y, x), original pixels
        raw_descriptors = tf.reshape(raw["descriptors"], [-1, self.network.local_dim])
        outputs = {
            "keypoints": tf.reverse(locations, axis=[1]),
            "scales": tf.reshape(raw["scales"], [-1]),
            "scores": tf.reshape(raw["scores"], [-1]),
            "descriptors": self._postprocess(raw_descriptors),
        }
        if self.global_dim is not None:
            raw_global = tf.reshape(raw["global_descriptors"], [-1, self.global_dim])
            per_scale = tf.math.l2_normalize(raw_global, axis=1)
            outputs["global_descriptor"] = tf.math.l2_normalize(tf.reduce_sum(per_scale, 0), 0)
        return outputs

    def _no_features(self):
        outputs = {
            "keypoints": tf.zeros([0, 2]),
            "scales": tf.zeros([0]),
            "scores": tf.zeros([0]),
            "descriptors": tf.zeros([0, self.descriptor_dim]),
        }
        if self.global_dim is not None:
            outputs["global_descriptor"] = tf.zeros([self.global_dim])
        return outputs

    def _postprocess(self, descriptors):
        """L2 norm -> PCA (+ whitening) -> L2 norm. [N, D_raw] -> [N, D]."""
        descriptors = tf.math.l2_normalize(descriptors, axis=1)
        if self.pca_projection is None:
            return descriptors
        projected = tf.matmul(descriptors - self.pca_mean, self.pca_projection) * self.pca_scale
        return tf.math.l2_normalize(projected, axis=1)


def extractor_fingerprint(network, config: ExtractionConfig, pca: PcaParams | None) -> str:
    """Identity of the descriptor space: sha256 of the network's identity and the PCA.

    Settings that change which features are kept but not what a descriptor means
    (threshold, top-K, scales, image size) are left out, so features extracted
    with different such settings can still be matched against each other.
    """
    from delf_tf.extraction.keras_network import KerasNetwork
    from delf_tf.model.delf import DelfModel
    from delf_tf.model.reference_nets import ReferenceModel

    if isinstance(network, (DelfModel, ReferenceModel)):
        network = KerasNetwork(network)
    digest = hashlib.sha256(FINGERPRINT_VERSION.encode())
    network.update_fingerprint(digest)
    if pca is not None:
        digest.update(f"pca:{config.pca_dim}:{pca.whiten}".encode())
        for array in (pca.mean, pca.projection, pca.variances):
            if array is not None:  # variances: None for a release that ships none
                digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
