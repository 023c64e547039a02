"""DELG's training heads and losses for the release architectures (ReferenceModel).

One step trains everything jointly, as the reference's TF2 `train.py` does with
`delg_global_features` and `use_autoencoder`:
  global       the backbone and the global head (GeM, Dense G) through an ArcFace
               classifier: logits = scale * cos(theta + margin * onehot(label)) with
               cos(theta) = <l2n(global), l2n(w_class)>; the margin is added only where
               theta + margin <= pi (cos stays monotonic). resnet_v1_50, which has no
               global head, trains its backbone with a Dense softmax classifier of
               GAP(block3) instead (the paper's descriptor loss).
  attention    cross-entropy of a Dense classifier of mean(l2n(x) * attention) over the
               map, x the attention's input (the autoencoder's expanded map for
               delg_resnet50, block3 for resnet_v1_50); the autoencoder and the attention
               see stop_gradient(block3), so these losses do not change the backbone.
  reconstruction  mean over batch and map of the per-position MSE over channels between
               stop_gradient(block3) and the autoencoder's expanded map (delg_resnet50).
total = global + attention_loss_weight * attention + reconstruction_loss_weight *
reconstruction (TrainingConfig).

Defaults (TrainingConfig), with their source:
  arcface_margin 0.1: DELG paper (Cao, Araujo, Sim, "Unifying Deep Local and Global
    Features for Image Search", ECCV 2020, section 4.1) and the reference's
    --delg_arcface_margin.
  arcface_scale 45.25 (= sqrt(2048)), learnable: the paper's learnable scale and the
    reference's --delg_scale_factor_init.
  reconstruction_loss_weight 10.0: the reference's --reconstruction_loss_weight.
  attention_loss_weight 1.0: the reference's --attention_loss_weight.
The class heads (cosine weights, scale, the classifiers) are training-only: they live in
`ReferenceHeads`, in the checkpoints (resume) but not in the saved model.keras, which is
the plain ReferenceModel that `delf extract` and `delf export` take.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from delf_tf.model.reference_nets import ReferenceModel, split_at_block3

ARCFACE_MARGIN = 0.1
ARCFACE_SCALE = 45.25
RECONSTRUCTION_LOSS_WEIGHT = 10.0
_COSINE_CLIP = 1.0 - 1e-6


class ReferenceHeads(keras.layers.Layer):
    """Class heads of a ReferenceModel's training (not saved with the model).

    cosine_weights float32 [G, num_classes] and scale float32 [] (ArcFace on the global
    descriptor; delg_resnet50), or a Dense descriptor classifier (resnet_v1_50); and the
    attention classifier, Dense num_classes.
    """

    def __init__(
        self,
        num_classes: int,
        global_dim: int | None,
        scale: float = ARCFACE_SCALE,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.global_dim = global_dim
        if global_dim:
            self.cosine_weights = self.add_weight(
                shape=(global_dim, num_classes),
                initializer="glorot_uniform",
                name="cosine_weights",
            )
            self.scale = self.add_weight(
                shape=(), initializer=keras.initializers.Constant(scale), name="scale"
            )
            self.descriptor_classifier = None
        else:
            self.descriptor_classifier = keras.layers.Dense(
                num_classes, name="descriptor_classifier"
            )
        self.attention_classifier = keras.layers.Dense(num_classes, name="attention_classifier")


def build_heads(model: ReferenceModel, num_classes: int, scale: float) -> ReferenceHeads:
    """ReferenceHeads for `model`, built (variables created)."""
    heads = ReferenceHeads(num_classes, model.global_dim, scale, name="reference_heads")
    if heads.descriptor_classifier is not None:
        heads.descriptor_classifier.build((None, model.feature_depth))
    _, head = split_at_block3(model)
    attention_input = int(head.inputs[0].shape[-1])
    heads.attention_classifier.build((None, attention_input))
    heads.built = True
    return heads


def arcface_logits(cosine, labels, margin: float, scale):
    """scale * cos(theta + margin at the label), float32 [B, K] from cosines [B, K]."""
    theta = tf.acos(tf.clip_by_value(cosine, -_COSINE_CLIP, _COSINE_CLIP))
    onehot = tf.one_hot(labels, tf.shape(cosine)[-1], dtype=cosine.dtype)
    room = tf.cast(theta <= math.pi - margin, cosine.dtype)
    return scale * tf.cos(theta + margin * onehot * room)


class ReferenceForward:
    """The training forward pass of a ReferenceModel with its heads (no own variables)."""

    def __init__(self, model: ReferenceModel, heads: ReferenceHeads):
        self.model = model
        self.heads = heads
        self.trunk, self.head = split_at_block3(model)
        self.autoencoder = len(self.head.outputs) == 3

    def __call__(self, images, labels, training: bool, margin: float) -> dict:
        """Per-example outputs: logits float32 [B, K] and reconstruction float32 [B].

        Keys: global_logits (ArcFace, with the margin when `labels` is given) and
        global_plain_logits (no margin) for delg_resnet50, descriptor_logits and
        descriptor_plain_logits (the same) for resnet_v1_50; attention_logits; and
        reconstruction (delg_resnet50).
        """
        heads = self.heads
        trunk = self.trunk(self.model.preprocess(images), training=training)
        trunk = trunk if isinstance(trunk, (list, tuple)) else [trunk]
        block3 = trunk[0]
        stopped = tf.stop_gradient(block3)
        head = self.head(stopped, training=training)
        head = head if isinstance(head, (list, tuple)) else [head]
        attention = head[-1]
        attended = head[1] if self.autoencoder else stopped
        outputs = {}
        if heads.descriptor_classifier is None:
            embedding = tf.math.l2_normalize(tf.cast(trunk[1], tf.float32), axis=-1)
            weights = tf.math.l2_normalize(tf.cast(heads.cosine_weights, tf.float32), axis=0)
            cosine = tf.matmul(embedding, weights)
            scale = tf.cast(heads.scale, tf.float32)
            outputs["global_plain_logits"] = scale * cosine
            outputs["global_logits"] = (
                arcface_logits(cosine, labels, margin, scale)
                if labels is not None
                else scale * cosine
            )
        else:
            pooled = tf.reduce_mean(block3, axis=(1, 2))
            logits = tf.cast(heads.descriptor_classifier(pooled), tf.float32)
            outputs["descriptor_logits"] = outputs["descriptor_plain_logits"] = logits
        # In float32: in float16, l2_normalize's epsilon is 0 and an all-zero (ReLU)
        # position of the map gives 0 * inf.
        normalized = tf.math.l2_normalize(tf.cast(attended, tf.float32), axis=-1)
        weighted = normalized * tf.cast(attention, tf.float32)
        attention_pooled = tf.reduce_mean(weighted, axis=(1, 2))
        outputs["attention_logits"] = tf.cast(
            heads.attention_classifier(attention_pooled), tf.float32
        )
        if self.autoencoder:
            error = tf.square(tf.cast(stopped, tf.float32) - tf.cast(head[1], tf.float32))
            outputs["reconstruction"] = tf.reduce_mean(error, axis=(1, 2, 3))
        return outputs
