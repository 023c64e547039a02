"""The reference extractor's image-size limits, in the graph, pixel for pixel.

Before the pyramid, the reference extractor (`utils.ResizeImage`) resizes an
image whose long side exceeds `max_image_size` (or falls short of
`min_image_size`) with Pillow's BILINEAR filter, and later divides keypoints by
the resize factors. `resize_to_limits` does the same with standard TF ops, so
that the served graph needs no Python: `pil_bilinear_resize` is Pillow's
two-pass resampling (ImagingResample: horizontal pass, rounding to uint8,
vertical pass) with its fixed-point coefficients (22 fractional bits), computed
exactly (in int32, as Pillow), and gives exactly Pillow's pixels (tested against Pillow).
TF's own `tf.image.resize(..., antialias=True)` uses the same triangle filter but
rounds differently, which moves some pixels by one grey level.
"""

from __future__ import annotations

import tensorflow as tf

PRECISION_BITS = 22  # Pillow: 32 - 8 (uint8) - 2 (headroom)


def _coefficients(in_size: tf.Tensor, out_size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Pillow's BILINEAR taps for resampling one axis from in_size to out_size pixels.

    Returns (indices int32 [out_size, K]: source pixels, clipped into the image;
    weights int32 [out_size, K]: fixed-point weights, 0 for unused taps).
    """
    in_size_f = tf.cast(in_size, tf.float64)
    scale = in_size_f / tf.cast(out_size, tf.float64)
    filter_scale = tf.maximum(scale, 1.0)
    support = filter_scale  # the bilinear filter's support is 1
    taps = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
    # C's (int) cast truncates towards zero, as tf.cast from float does.
    first = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
    last = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size)
    offsets = tf.range(taps)[None, :]
    position = tf.cast(offsets + first[:, None], tf.float64)
    weights = tf.maximum(1.0 - tf.abs((position - center[:, None] + 0.5) / filter_scale), 0.0)
    weights = tf.where(offsets < (last - first)[:, None], weights, 0.0)
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    weights = tf.math.divide_no_nan(weights, total)
    fixed = weights * float(1 << PRECISION_BITS)
    fixed = tf.cast(tf.where(fixed < 0, fixed - 0.5, fixed + 0.5), tf.int32)  # truncation
    indices = tf.minimum(offsets + first[:, None], in_size - 1)
    return indices, fixed


def _resample_axis(image: tf.Tensor, out_size: tf.Tensor, axis: int) -> tf.Tensor:
    """One Pillow pass along `axis` (0: rows, 1: columns) of uint8 [H, W, C] -> uint8.

    Each output pixel is the sum over the K taps of a fixed-point weight times a
    source pixel: a loop over the taps gathers one source pixel per output pixel
    along `axis` and accumulates in int32, as Pillow does (the weights are
    non-negative and sum to 2**22, so every partial sum is below 255 * 2**22 < 2**31).
    Memory: one int32 copy of the output. No
    transpose: with a uint8 transpose in the graph (grappler moves casts behind
    transposes), oneDNN builds log an error line on every run.
    """
    indices, weights = _coefficients(tf.shape(image)[axis], out_size)
    # Weights broadcast over the other axes: [out, 1, 1] for rows, [1, out, 1] for columns.
    weight_shape = [-1, 1, 1] if axis == 0 else [1, -1, 1]
    out_shape = tf.tensor_scatter_nd_update(tf.shape(image), [[axis]], [out_size])

    def add_tap(tap: tf.Tensor, total: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        pixels = tf.gather(image, indices[:, tap], axis=axis)
        return tap + 1, total + tf.cast(pixels, tf.int32) * tf.reshape(
            weights[:, tap], weight_shape
        )

    _, total = tf.while_loop(
        lambda tap, _: tap < tf.shape(indices)[1],
        add_tap,
        (tf.constant(0), tf.zeros(out_shape, tf.int32)),
    )
    # Pillow: (sum + 2**21) >> 22, clipped to 0..255.
    total = tf.bitwise.right_shift(total + (1 << (PRECISION_BITS - 1)), PRECISION_BITS)
    return tf.cast(tf.clip_by_value(total, 0, 255), tf.uint8)


def pil_bilinear_resize(image: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, C] -> uint8 [size[0], size[1], C], as Pillow's resize(BILINEAR)."""
    height, width = size[0], size[1]
    image = tf.cond(
        tf.equal(width, tf.shape(image)[1]),
        lambda: image,
        lambda: _resample_axis(image, width, axis=1),
    )
    return tf.cond(
        tf.equal(height, tf.shape(image)[0]),
        lambda: image,
        lambda: _resample_axis(image, height, axis=0),
    )


def resize_to_limits(
    image: tf.Tensor, max_image_size: int, min_image_size: int = -1
) -> tuple[tf.Tensor, tf.Tensor]:
    """The reference's `ResizeImage`: (resized uint8 [h, w, 3], factors float32 [2]).

    When the long side L exceeds max_image_size (>= 0), the image is scaled by
    max_image_size / L; else when L is below min_image_size (>= 0), by
    min_image_size / L; new sizes are round(side * factor) (half to even, in
    float64, as Python's round). factors = (h / H, w / W), (1, 1) when unchanged:
    keypoints of the resized image divided by them are in original pixels.
    """
    original = tf.cast(tf.shape(image)[:2], tf.float64)
    longest = tf.reduce_max(original)
    scale = tf.constant(1.0, tf.float64)
    resize = tf.constant(False)
    if max_image_size >= 0:
        shrink = longest > max_image_size
        scale = tf.where(shrink, max_image_size / longest, scale)
        resize = resize | shrink
    if min_image_size >= 0:
        grow = tf.logical_not(resize) & (longest < min_image_size)
        scale = tf.where(grow, min_image_size / longest, scale)
        resize = resize | grow
    size = tf.cast(tf.round(original * scale), tf.int32)
    resized = tf.cond(resize, lambda: pil_bilinear_resize(image, size), lambda: image)
    factors = tf.where(resize, tf.cast(size, tf.float64) / original, tf.ones([2], tf.float64))
    return resized, tf.cast(factors, tf.float32)
