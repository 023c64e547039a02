"""Training: tf.data input pipelines (data), TFRecords (records), the TFDS landmarks builder,
the staged trainer under tf.distribute (trainer), and a synthetic learning check (synthetic)."""
