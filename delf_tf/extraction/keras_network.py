"""The project's Keras models (DelfModel, ReferenceModel) as the network stage of the
extraction graph.

`KerasNetwork(model)(image, scales, score_threshold, max_features)` runs the image
pyramid in a tf.while_loop: each level is the image resized by one scale
(bilinear, half-pixel centres, no antialiasing, as the reference's TF2 exports do),
run through the backbone and attention head; the level's locations scoring at
least the threshold are kept (at most max_features per level), then the top
max_features over all levels (or NMS on receptive-field boxes when
iou_threshold < 1). Keypoints are receptive-field centres (the receptive field
computed from the Keras layers, `delf_tf.model.receptive_field`) divided by the
level's scale, the reference's convention (`CalculateReceptiveBoxes`), so this
network and a released model's graph give keypoints the same way.

A ReferenceModel (a release architecture, `delf_tf.model.reference_nets`) brings its
input convention: (x - 128) / 128 before resizing, TF1 resize_bilinear without
half-pixel centres for resnet_v1_50, keypoints at the centres of the reference's
boxes; its global head (DELG) gives a raw global descriptor per level, those of
`global_scale_indices` returned as global_descriptors [S', G].
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import tensorflow as tf

from delf_tf.config import ModelConfig
from delf_tf.model.backbone import preprocess_images
from delf_tf.model.delf import DelfModel
from delf_tf.model.folding import fold_batch_norm as folded_copy
from delf_tf.model.receptive_field import compute_receptive_field
from delf_tf.model.reference_nets import INPUT_CONVENTIONS, ReferenceModel

_LATER_FIELDS = ("backbone", "feature_depth", "architecture")


class KerasNetwork(tf.Module):
    """A DelfModel or ReferenceModel behind the FeatureNetwork interface of
    `delf_tf.extraction.graph`."""

    def __init__(
        self,
        model: DelfModel | ReferenceModel,
        iou_threshold: float = 1.0,
        source: str = "in-memory",
        precision: str = "float32",
        fold_batch_norm: bool = True,
    ):
        super().__init__(name="keras_network")
        self.model = model
        self.iou_threshold = iou_threshold
        self.source = source
        self.precision = precision
        # The model that computes: `model` itself, or a copy under a mixed-precision
        # policy (float32 variables, reduced-precision arithmetic); its backbone with
        # batch normalisation folded into the convolutions (delf_tf.model.folding).
        compute = model if precision == "float32" else _mixed_copy(model, precision)
        self.convention = INPUT_CONVENTIONS[model.config.architecture]
        self.global_dim = None
        if isinstance(model, ReferenceModel):
            network = compute.network
            self.network = folded_copy(network) if fold_batch_norm else network
            field = compute_receptive_field(model.block3_model())
            self.global_dim = model.global_dim
        else:
            self.backbone = folded_copy(compute.backbone) if fold_batch_norm else compute.backbone
            self.attention = compute.attention
            field = compute_receptive_field(model.backbone)
        self.rf_size, self.rf_stride, self.rf_padding = field.size, field.stride, field.padding
        if self.convention.grid_keypoints:
            self.rf_padding = (field.size - 1) / 2.0
        self.local_dim = model.feature_depth

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "in-process keras",
            "model": self.source,
            "precision": self.precision,
            **self._identity(),
        }

    def _identity(self) -> dict[str, Any]:
        return {"model_config": self.model.config.to_dict()}

    def update_fingerprint(self, digest: hashlib._Hash) -> None:
        """Adds the descriptor space's identity: the architecture and every weight.

        ModelConfig fields added after the first release (backbone, feature_depth)
        are hashed only when they differ from their defaults, so fingerprints of
        earlier ResNet50 stores and indexes stay valid.
        """
        config = self.model.config.to_dict()
        for name in _LATER_FIELDS:
            if config.get(name) == getattr(ModelConfig, name):
                config.pop(name, None)
        digest.update(json.dumps(config, sort_keys=True).encode())
        for variable in self.model.weights:
            value = np.ascontiguousarray(variable.numpy())
            digest.update(f"{variable.path}:{value.shape}:{value.dtype}".encode())
            digest.update(value.tobytes())

    def __call__(self, image, scales, score_threshold, max_features, global_scale_indices=None):
        """uint8 [H, W, 3] -> dict, sorted by decreasing score, N <= max_features:
        locations float32 [N, 2] (y, x) receptive-field centres in `image` pixels,
        descriptors float32 [N, D] raw features, scales float32 [N] 1 / pyramid scale,
        scores float32 [N] attention. Levels shorter than the stride are skipped."""
        size = tf.cast(tf.shape(image)[:2], tf.float32)
        pixels = tf.cast(image, tf.float32)
        if self.convention.normalize_first:
            pixels = self.model.preprocess(pixels)
        depth, global_dim = self.local_dim, self.global_dim or 0

        def level(i, *arrays):
            scale = scales[i]
            level_size = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), 1)
            found = tf.cond(
                tf.reduce_min(level_size) >= self.rf_stride,
                lambda: self._level(pixels, level_size, scale, max_features, score_threshold),
                lambda: (
                    tf.zeros([0, 2]),
                    tf.zeros([0]),
                    tf.zeros([0]),
                    tf.zeros([0, depth]),
                    tf.zeros([1, global_dim]),
                ),
            )
            return (i + 1,) + tuple(a.write(i, f) for a, f in zip(arrays, found, strict=True))

        def array(shape):
            return tf.TensorArray(
                tf.float32, size=tf.shape(scales)[0], infer_shape=False, element_shape=shape
            )

        _, *arrays = tf.while_loop(
            lambda i, *_: i < tf.shape(scales)[0],
            level,
            (
                tf.constant(0),
                array([None, 2]),
                array([None]),
                array([None]),
                array([None, depth]),
                array([1, global_dim]),
            ),
        )
        locations, level_scales, scores, descriptors, globals_ = (a.concat() for a in arrays)
        keep = self._select(locations, level_scales, scores, max_features)
        outputs = {
            "locations": tf.gather(locations, keep),
            "descriptors": tf.gather(descriptors, keep),
            "scales": tf.gather(level_scales, keep),
            "scores": tf.gather(scores, keep),
        }
        if self.global_dim:
            indices = global_scale_indices
            if indices is None:
                indices = tf.range(tf.shape(scales)[0])
            outputs["global_descriptors"] = tf.gather(globals_, indices)
        return outputs

    def _resize(self, pixels, level_size):
        """[H, W, 3] -> [1, h, w, 3] bilinear, with or without half-pixel centres."""
        if self.convention.half_pixel_centers:
            return tf.image.resize(pixels, level_size, method="bilinear")[None]
        return tf.raw_ops.ResizeBilinear(  # TF1's resize_bilinear
            images=pixels[None], size=level_size, align_corners=False, half_pixel_centers=False
        )

    def _network(self, resized):
        """[1, h, w, 3] resized pixels -> (features [1, h', w', D], attention [1, h', w', 1],
        global [1, G] (zero-width without a global head))."""
        if isinstance(self.model, ReferenceModel):
            inputs = resized if self.convention.normalize_first else self.model.preprocess(resized)
            outputs = self.network(inputs, training=False)
            if self.global_dim:
                return outputs[0], outputs[1], tf.cast(outputs[2], tf.float32)
            return outputs[0], outputs[1], tf.zeros([1, 0])
        features = self.backbone(preprocess_images(resized), training=False)
        return features, self.attention(features, training=False), tf.zeros([1, 0])

    def _level(self, pixels, level_size, scale, max_features, threshold):
        """One pyramid level: (locations [n, 2] (y, x), scales [n], scores [n], features [n, D],
        global [1, G])."""
        features, attention, global_descriptor = self._network(self._resize(pixels, level_size))
        features, attention = tf.cast(features, tf.float32), tf.cast(attention, tf.float32)
        width = tf.shape(attention)[2]
        attention = tf.reshape(attention, [-1])
        features = tf.reshape(features, [-1, self.local_dim])
        candidates = tf.where(attention >= threshold)[:, 0]
        candidate_scores = tf.gather(attention, candidates)
        top = tf.math.top_k(candidate_scores, k=tf.minimum(max_features, tf.size(candidates)))
        index = tf.cast(tf.gather(candidates, top.indices), tf.int32)
        grid = tf.cast(tf.stack([index // width, index % width], axis=1), tf.float32)
        centers = grid * self.rf_stride - self.rf_padding + (self.rf_size - 1) / 2.0
        locations = centers / scale  # the level's pixels -> the image's, as the reference
        count = tf.size(index)
        return (
            locations,
            tf.fill([count], 1.0 / scale),
            top.values,
            tf.gather(features, index),
            global_descriptor,
        )

    def _select(self, locations, level_scales, scores, max_features):
        """Indices of the kept features, by decreasing score (NMS if iou_threshold < 1)."""
        if self.iou_threshold < 1.0:
            half = (self.rf_size - 1) / 2.0 * level_scales[:, None]
            boxes = tf.concat([locations - half, locations + half], axis=1)  # (y1, x1, y2, x2)
            return tf.image.non_max_suppression(
                boxes, scores, max_features, iou_threshold=self.iou_threshold
            )
        return tf.math.top_k(scores, k=tf.minimum(max_features, tf.size(scores))).indices


_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def _mixed_copy(model, precision: str):
    """A copy of `model` built under Keras' mixed `precision` policy, with its weights."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(_POLICIES[precision])
    try:
        copy = type(model).from_config(model.get_config())
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(model.get_weights())
    return copy
