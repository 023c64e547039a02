"""TensorBoard summaries without the tensorboard package, and attention pictures.

`tf.summary.scalar` / `tf.summary.image` live in the tensorboard package,
which TensorFlow does not install. The event files TensorBoard reads only need
`tf.summary.write` (core TF) with the scalars / images plugin metadata, which
is what those functions write; so training runs without tensorboard installed
and `tensorboard --logdir=<model_dir>` (installed anywhere) shows the logs.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.core.framework import summary_pb2


def _metadata(plugin: str, data_class: int) -> bytes:
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin),
        data_class=data_class,
    ).SerializeToString()


SCALAR_METADATA = _metadata("scalars", summary_pb2.DATA_CLASS_SCALAR)
IMAGE_METADATA = _metadata("images", summary_pb2.DATA_CLASS_BLOB_SEQUENCE)


def write_scalars(writer: tf.summary.SummaryWriter, values: dict[str, float], step: int) -> None:
    """Writes `values` (name -> float) as TensorBoard scalars at `step`."""
    with writer.as_default(step=step):
        for name, value in values.items():
            tf.summary.write(name, tf.constant(value, tf.float32), metadata=SCALAR_METADATA)
    writer.flush()


def write_images(
    writer: tf.summary.SummaryWriter, name: str, images: tf.Tensor, step: int, max_outputs: int = 4
) -> None:
    """Writes float [B, H, W, C] images in [0, 1] (C = 1 or 3) as a TensorBoard image summary."""
    pixels = tf.image.convert_image_dtype(images[:max_outputs], tf.uint8, saturate=True)
    encoded = tf.map_fn(tf.image.encode_png, pixels, fn_output_signature=tf.string)
    shape = tf.shape(pixels)
    tensor = tf.concat([tf.stack([tf.as_string(shape[2]), tf.as_string(shape[1])]), encoded], 0)
    with writer.as_default(step=step):
        tf.summary.write(name, tensor, metadata=IMAGE_METADATA)
    writer.flush()


def attention_images(images: tf.Tensor, attention: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Pictures of the attention scores of a batch.

    Args:
      images: float32 [B, H, W, 3] RGB in [0, 255].
      attention: float [B, h, w, 1] attention scores (>= 0).
    Returns:
      (heat, overlay), float32 [B, H, W, 1] and [B, H, W, 3] in [0, 1]: the scores
      divided by each image's maximum and upsampled (nearest), and the image
      darkened where attention is low with the heat in red on top.
    """
    attention = tf.cast(attention, tf.float32)
    peak = tf.reduce_max(attention, axis=[1, 2, 3], keepdims=True)
    heat = attention / tf.maximum(peak, 1e-12)
    heat = tf.image.resize(heat, tf.shape(images)[1:3], method="nearest")
    base = images / 255.0
    red = tf.constant([1.0, 0.0, 0.0])
    overlay = base * (0.35 + 0.65 * heat) * 0.6 + 0.4 * heat * red
    return heat, tf.clip_by_value(overlay, 0.0, 1.0)
