"""Inference copies of Keras conv nets with batch normalisation folded into the convolutions.

In inference a BatchNormalization that directly follows a Conv2D is an affine map
per output channel, y = gamma (conv(x) + b - mean) / sqrt(var + eps) + beta, so it
can be folded into the convolution: kernel' = kernel * s, bias' = (b - mean) * s +
beta with s = gamma / sqrt(var + eps). The folded net computes the same function
(differences of float rounding, ~1e-6 relative) with one pass over each feature map
less, and TensorFlow's CPU remapper then fuses Conv2D + BiasAdd + ReLU into one op.
Training never sees the copy: it shares no variables with the original.
"""

from __future__ import annotations

import keras
import numpy as np


class _PassThrough(keras.layers.Layer):
    """Stands where a folded BatchNormalization was (same name, same call signature)."""

    def call(self, inputs, training=None, mask=None):
        del training, mask
        return inputs


def _folded_pairs(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """{conv name: its BatchNormalization} for every BN whose only input is a Conv2D
    that feeds nothing else."""
    consumers: dict[str, int] = {}
    producer: dict[str, keras.layers.Layer] = {}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            for parent in node.parent_nodes:
                consumers[parent.operation.name] = consumers.get(parent.operation.name, 0) + 1
                producer[layer.name] = parent.operation
    pairs = {}
    for layer in model.layers:
        conv = producer.get(layer.name)
        if (
            isinstance(layer, keras.layers.BatchNormalization)
            and isinstance(conv, keras.layers.Conv2D)
            and consumers.get(conv.name) == 1
            and layer.axis in (-1, 3, [-1], [3])
            and len(layer._inbound_nodes) == 1
        ):
            pairs[conv.name] = layer
    return pairs


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """A functional `model` with every Conv2D -> BatchNormalization pair folded (a copy).

    Input and output are those of `model`; weights are copied at this call (later
    changes to `model` are not seen).
    """
    pairs = _folded_pairs(model)
    folded_norms = {norm.name for norm in pairs.values()}

    def clone(layer):
        if layer.name in folded_norms:
            return _PassThrough(name=layer.name, dtype=layer.dtype_policy)
        config = layer.get_config()
        if layer.name in pairs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if not layer.weights or layer.name in folded_norms:
            continue
        target = copy.get_layer(layer.name)
        norm = pairs.get(layer.name)
        if norm is None:
            target.set_weights(layer.get_weights())
            continue
        gamma = norm.gamma.numpy() if norm.scale else 1.0
        beta = norm.beta.numpy() if norm.center else 0.0
        mean, variance = norm.moving_mean.numpy(), norm.moving_variance.numpy()
        scale = gamma / np.sqrt(variance + norm.epsilon)
        kernel = layer.kernel.numpy() * scale
        bias = layer.bias.numpy() if layer.use_bias else 0.0
        target.set_weights([kernel, ((bias - mean) * scale + beta).astype(np.float32)])
    return copy
