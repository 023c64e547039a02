"""Training: tf.data input pipelines (data), TFRecords (records), the TFDS landmarks builder,
and the staged trainer under tf.distribute (trainer); the synthetic learning check's
data is in delf_tf.testing.synthetic_training."""
