"""delf-tf: DELF local features and landmark retrieval on TensorFlow and Keras 3."""

from delf_tf.tf_runtime import install_quiet_import

__version__ = "0.1.0"

install_quiet_import()
