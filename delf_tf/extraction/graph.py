"""The one extraction graph: image pyramid -> attention -> top-K -> PCA, as a tf.function.

`ExtractionModule.extract` runs in process, inside the exported SavedModel and in
the tests: it is the same traced function everywhere. It uses standard TF ops
only (no py_function, no XLA), so TF Serving can run it as it is.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import tensorflow as tf

from delf_tf.config import ExtractionConfig
from delf_tf.extraction.pca import PcaParams
from delf_tf.model.delf import DelfModel
from delf_tf.model.receptive_field import compute_receptive_field

FINGERPRINT_VERSION = "delf-tf-extractor-1"
# Inputs of `ExtractionModule.extract` (and of the exported `extract_image` signature).
EXTRACT_SIGNATURE = (
    tf.TensorSpec([None, None, 3], tf.uint8, name="image"),
    tf.TensorSpec([], tf.int32, name="max_features"),
    tf.TensorSpec([], tf.float32, name="score_threshold"),
    tf.TensorSpec([None], tf.float32, name="scales"),
)


class ExtractionModule(tf.Module):
    """Multi-scale DELF extraction around a DelfModel (+ optional PCA).

    `extract(image, max_features, score_threshold, scales)`:
      image: uint8 [H, W, 3] RGB.
      max_features: int32 [] (top-K over all scales).
      score_threshold: float32 [] (minimum attention score).
      scales: float32 [S] pyramid scales.
    Returns a dict, sorted by decreasing score, N <= max_features:
      keypoints: float32 [N, 2] (x, y) in original-image pixels (pixel centres at
        integer coordinates), the centre of each feature's receptive field;
      scales: float32 [N] 1 / (pyramid scale x downsizing factor);
      scores: float32 [N] attention scores;
      descriptors: float32 [N, D] unit L2 norm, D = pca_dim with PCA, else the model's
        feature_depth (1024 for ResNet50).
    A pyramid level whose shorter side is below the feature stride (16 px) is
    skipped, so images too small for the network give N = 0.
    """

    def __init__(self, model: DelfModel, config: ExtractionConfig, pca: PcaParams | None = None):
        super().__init__(name="delf_extraction")
        self.model = model
        self.config = config
        field = compute_receptive_field(model.backbone)
        self.rf_size, self.rf_stride, self.rf_padding = field.size, field.stride, field.padding
        self.fingerprint = extractor_fingerprint(model, config, pca)
        self.descriptor_dim = model.feature_depth
        self.pca_mean = self.pca_projection = self.pca_scale = None
        if pca is not None:
            if pca.input_dim != model.feature_depth:
                raise ValueError(
                    f"PCA was fitted on {pca.input_dim}-D descriptors, the model gives "
                    f"{model.feature_depth}-D"
                )
            if config.pca_dim > pca.output_dim:
                raise ValueError(
                    f"pca_dim {config.pca_dim} exceeds the {pca.output_dim} components stored"
                )
            scale = np.ones(config.pca_dim, np.float32)
            if pca.whiten:
                scale = 1.0 / np.sqrt(np.maximum(pca.variances[: config.pca_dim], 1e-12))
            self.pca_mean = tf.Variable(pca.mean, trainable=False, name="pca_mean")
            self.pca_projection = tf.Variable(
                pca.projection[: config.pca_dim].T, trainable=False, name="pca_projection"
            )
            self.pca_scale = tf.Variable(scale, trainable=False, name="pca_scale")
            self.descriptor_dim = config.pca_dim
        self.extract = tf.function(
            self._extract,
            input_signature=EXTRACT_SIGNATURE,
            autograph=False,
        )

    def default_arguments(self) -> dict[str, tf.Tensor]:
        """The config's values of `extract`'s optional arguments."""
        return {
            "max_features": tf.constant(self.config.max_features, tf.int32),
            "score_threshold": tf.constant(self.config.score_threshold, tf.float32),
            "scales": tf.constant(self.config.scales, tf.float32),
        }

    def _extract(self, image, max_features, score_threshold, scales):
        original_size = tf.cast(tf.shape(image)[:2], tf.float32)
        downsize = tf.constant(1.0)
        if self.config.max_image_size > 0:
            downsize = tf.minimum(1.0, self.config.max_image_size / tf.reduce_max(original_size))
        pixels = tf.cast(image, tf.float32)
        depth = self.model.feature_depth

        def level(i, keypoints, level_scales, scores, descriptors):
            scale = scales[i] * downsize
            size = tf.maximum(tf.cast(tf.round(original_size * scale), tf.int32), 1)
            found = tf.cond(
                tf.reduce_min(size) >= self.rf_stride,
                lambda: self._level_features(
                    pixels, size, original_size, scale, max_features, score_threshold
                ),
                lambda: (
                    tf.zeros([0, 2]),
                    tf.zeros([0]),
                    tf.zeros([0]),
                    tf.zeros([0, depth]),
                ),
            )
            arrays = (keypoints, level_scales, scores, descriptors)
            return (i + 1,) + tuple(a.write(i, f) for a, f in zip(arrays, found, strict=True))

        def array(shape):
            return tf.TensorArray(
                tf.float32, size=tf.shape(scales)[0], infer_shape=False, element_shape=shape
            )

        _, *arrays = tf.while_loop(
            lambda i, *_: i < tf.shape(scales)[0],
            level,
            (tf.constant(0), array([None, 2]), array([None]), array([None]), array([None, depth])),
        )
        keypoints, level_scales, scores, descriptors = (a.concat() for a in arrays)
        keep = self._select(keypoints, level_scales, scores, max_features)
        descriptors = self._postprocess(tf.gather(descriptors, keep))
        return {
            "keypoints": tf.gather(keypoints, keep),
            "scales": tf.gather(level_scales, keep),
            "scores": tf.gather(scores, keep),
            "descriptors": descriptors,
        }

    def _level_features(self, pixels, size, original_size, scale, max_features, threshold):
        """Features of one pyramid level: the top `max_features` above `threshold`."""
        resized = tf.image.resize(pixels, size, method="bilinear", antialias=True)
        features, attention = self.model.features_and_attention(resized[None], training=False)
        width = tf.shape(attention)[2]
        attention = tf.reshape(attention, [-1])
        features = tf.reshape(features, [-1, self.model.feature_depth])
        candidates = tf.where(attention >= threshold)[:, 0]
        candidate_scores = tf.gather(attention, candidates)
        count = tf.minimum(max_features, tf.size(candidate_scores))
        top = tf.math.top_k(candidate_scores, k=count)
        index = tf.cast(tf.gather(candidates, top.indices), tf.int32)
        grid = tf.cast(tf.stack([index % width, index // width], axis=1), tf.float32)
        centers = grid * self.rf_stride - self.rf_padding + (self.rf_size - 1) / 2.0
        # Map level pixel centres to original pixel centres (half-pixel convention of
        # tf.image.resize): x_original = (x_level + 0.5) / factor - 0.5.
        factor = tf.reverse(tf.cast(size, tf.float32) / original_size, axis=[0])
        keypoints = (centers + 0.5) / factor - 0.5
        # Centres of border units may fall up to half a level pixel outside the image.
        keypoints = tf.clip_by_value(keypoints, 0.0, tf.reverse(original_size, axis=[0]) - 1.0)
        level_scales = tf.fill([count], 1.0 / scale)
        return keypoints, level_scales, top.values, tf.gather(features, index)

    def _select(self, keypoints, level_scales, scores, max_features):
        """Indices of the kept features, by decreasing score (NMS if iou_threshold < 1)."""
        if self.config.iou_threshold < 1.0:
            half = (self.rf_size - 1) / 2.0 * level_scales[:, None]
            corners = tf.concat([keypoints - half, keypoints + half], axis=1)
            boxes = tf.gather(corners, [1, 0, 3, 2], axis=1)  # (y1, x1, y2, x2)
            return tf.image.non_max_suppression(
                boxes, scores, max_features, iou_threshold=self.config.iou_threshold
            )
        return tf.math.top_k(scores, k=tf.minimum(max_features, tf.size(scores))).indices

    def _postprocess(self, descriptors):
        """L2 norm -> PCA (+ whitening) -> L2 norm. [N, feature_depth] -> [N, D]."""
        descriptors = tf.math.l2_normalize(descriptors, axis=1)
        if self.pca_projection is None:
            return descriptors
        projected = tf.matmul(descriptors - self.pca_mean, self.pca_projection) * self.pca_scale
        return tf.math.l2_normalize(projected, axis=1)


def extractor_fingerprint(model: DelfModel, config: ExtractionConfig, pca: PcaParams | None) -> str:
    """Identity of the descriptor space: sha256 of model architecture and weights, PCA.

    Settings that change which features are kept but not what a descriptor means
    (threshold, top-K, scales, image size) are left out, so features extracted
    with different such settings can still be matched against each other.
    """
    digest = hashlib.sha256(FINGERPRINT_VERSION.encode())
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for variable in model.weights:
        value = np.ascontiguousarray(variable.numpy())
        digest.update(f"{variable.path}:{value.shape}:{value.dtype}".encode())
        digest.update(value.tobytes())
    if pca is not None:
        digest.update(f"pca:{config.pca_dim}:{pca.whiten}".encode())
        for array in (pca.mean, pca.projection, pca.variances):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
