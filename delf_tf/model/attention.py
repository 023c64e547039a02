"""DELF attention: a score per feature location, and attention-weighted pooling."""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="delf_tf")
class AttentionHead(layers.Layer):
    """1x1 conv (hidden) -> BatchNorm -> ReLU -> 1x1 conv (1) -> softplus.

    Input: features float32 [B, h, w, C]. Output: scores float32 [B, h, w, 1], >= 0.
    """

    def __init__(self, hidden_units: int = 512, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = hidden_units
        self.hidden = layers.Conv2D(hidden_units, 1, name="attn_conv1")
        self.norm = layers.BatchNormalization(name="attn_bn")
        self.score = layers.Conv2D(1, 1, name="attn_conv2")

    def build(self, input_shape):
        self.hidden.build(input_shape)
        hidden_shape = tuple(input_shape[:-1]) + (self.hidden_units,)
        self.norm.build(hidden_shape)
        self.score.build(hidden_shape)
        self.built = True

    def call(self, features, training=False):
        x = self.hidden(features)
        x = self.norm(x, training=training)
        x = ops.relu(x)
        return ops.softplus(self.score(x))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (1,)

    def get_config(self):
        return {**super().get_config(), "hidden_units": self.hidden_units}


def attention_pool(features, scores):
    """Attention-weighted average of channel-L2-normalised features.

    Args:
      features: float32 [B, h, w, C].
      scores: float32 [B, h, w, 1] attention scores.
    Returns:
      float32 [B, C].
    """
    normalized = features / ops.sqrt(
        ops.maximum(ops.sum(ops.square(features), axis=-1, keepdims=True), 1e-12)
    )
    return ops.mean(normalized * scores, axis=(1, 2))
