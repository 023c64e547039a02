"""The receptive field computed from layer configs agrees with the gradient's support."""

import numpy as np
import pytest
import tensorflow as tf

from delf_tf.model import build_backbone, build_tiny_backbone, compute_receptive_field


def empirical_receptive_field(backbone, size=352, samples=4, seed=0):
    """Input rows/cols with non-zero gradient for the central output unit.

    The union over several random inputs makes max-pooling (whose gradient goes
    to one input of each window) and inactive ReLUs reach every pixel that can
    influence the unit.
    """
    rng = np.random.default_rng(seed)
    images = tf.constant(rng.normal(size=(samples, size, size, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(images)
        features = backbone(images, training=False)
        center = features.shape[1] // 2
        unit = tf.reduce_sum(features[:, center, center, :])
    support = np.abs(tape.gradient(unit, images).numpy()).sum(axis=(0, 3)) > 0
    rows, cols = np.nonzero(support.any(axis=1))[0], np.nonzero(support.any(axis=0))[0]
    return center, (rows.min(), rows.max()), (cols.min(), cols.max())


@pytest.mark.parametrize(
    "build, expected_field",
    [
        # The value the DELF reference hard-codes for ResNet50 conv4.
        pytest.param(build_backbone, (291, 16, 145), marks=pytest.mark.slow, id="resnet50"),
        # 3x3 convs at strides 1, 2, 4, 8, 16 and 2x2 pools at 1, 2, 4, 8:
        # 1 + 2 * 31 + 15 = 78; padding 31 (the convs' 1-px pads, in input pixels).
        pytest.param(lambda: build_tiny_backbone(16), (78, 16, 31), id="tiny"),
    ],
)
def test_analytic_equals_empirical(build, expected_field):
    backbone = build()
    field = compute_receptive_field(backbone)
    center, rows, cols = empirical_receptive_field(backbone)
    first = center * field.stride - field.padding
    expected = (first, first + field.size - 1)
    assert rows == expected and cols == expected
    assert (field.size, field.stride, field.padding) == expected_field
    assert field.centers(np.array(center)) == (rows[0] + rows[1]) / 2


def test_unknown_layer_is_refused():
    import keras

    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.UpSampling2D()(keras.layers.Conv2D(4, 3)(inputs))
    with pytest.raises(ValueError, match="UpSampling2D"):
        compute_receptive_field(keras.Model(inputs, outputs))
