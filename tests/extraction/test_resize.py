"""The in-graph size limits reproduce Pillow's BILINEAR resize pixel for pixel."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from delf_tf.extraction.resize import pil_bilinear_resize, resize_to_limits


@pytest.mark.parametrize(
    ("source", "target"),
    [((97, 131), (40, 57)), ((64, 48), (64, 20)), ((50, 70), (123, 70)), ((33, 33), (90, 11))],
)
def test_pil_bilinear_resize_equals_pillow(source, target):
    rng = np.random.default_rng(sum(source) + sum(target))
    image = rng.integers(0, 256, size=(*source, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize(target[::-1], Image.BILINEAR))
    resized = pil_bilinear_resize(tf.constant(image), tf.constant(target, tf.int32))
    np.testing.assert_array_equal(resized.numpy(), expected)


def test_resize_to_limits_factors():
    image = tf.zeros([300, 420, 3], tf.uint8)
    resized, factors = resize_to_limits(image, max_image_size=256)
    assert resized.shape == (183, 256, 3)
    np.testing.assert_allclose(factors.numpy(), [183 / 300, 256 / 420], rtol=1e-6)
