"""L2 weight decay on a Keras model's conv and dense kernels (ModelConfig.weight_decay).

Every architecture (DelfModel, ReferenceModel) applies it the same way: each Conv2D /
Dense kernel gets `keras.regularizers.L2(weight_decay)`, so `model.losses` holds one
scalar `weight_decay * sum(kernel**2)` per kernel, which the trainer adds to the loss.
Biases and batch-norm parameters are not decayed.
"""

from __future__ import annotations

import keras
from keras import layers


def decayed_kernels(model: keras.Model) -> list:
    """The Conv2D and Dense kernels of `model` and its nested layers (not biases, not
    batch-norm parameters)."""
    kernels = []
    for layer in model._flatten_layers(include_self=False):
        kernel = getattr(layer, "kernel", None)
        if isinstance(layer, (layers.Conv2D, layers.Dense)) and kernel is not None:
            kernels.append(kernel)
    return kernels


def apply_weight_decay(model: keras.Model, weight_decay: float) -> None:
    """Sets an L2(`weight_decay`) regularizer on every kernel of `decayed_kernels(model)`
    (nothing when weight_decay is 0). Call once the model's layers are built."""
    if weight_decay <= 0:
        return
    decay = keras.regularizers.L2(weight_decay)
    for variable in decayed_kernels(model):
        variable.regularizer = decay
