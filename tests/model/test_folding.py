"""Batch normalisation folded into convolutions: the same function, fewer layers."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from delf_tf.model.backbone import build_backbone, build_tiny_backbone
from delf_tf.model.folding import fold_batch_norm


def _randomise_batch_norms(model: keras.Model, seed: int) -> None:
    """Non-trivial statistics, as a trained model has (fresh ones are 0 / 1)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape),
                    rng.normal(0, 0.1, beta.shape),
                    rng.normal(0, 0.1, mean.shape),
                    rng.uniform(0.5, 2.0, variance.shape),
                ]
            )


@pytest.mark.parametrize(
    "builder",
    [lambda: build_tiny_backbone(32), pytest.param(build_backbone, marks=pytest.mark.slow)],
    ids=["tiny", "resnet50"],
)
def test_folded_backbone_computes_the_same_features(builder):
    keras.utils.set_random_seed(0)
    model = builder()
    _randomise_batch_norms(model, seed=1)
    folded = fold_batch_norm(model)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and not any(
        isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers
    )
    images = np.random.default_rng(2).uniform(-100, 150, (1, 64, 96, 3)).astype(np.float32)
    expected = np.asarray(model(images, training=False))
    got = np.asarray(folded(images, training=False))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # A copy: changing the original afterwards does not reach it.
    model.layers[1].set_weights([w * 0 for w in model.layers[1].get_weights()])
    np.testing.assert_allclose(np.asarray(folded(images, training=False)), got, rtol=1e-6)
