"""delf-tf: DELF local features and landmark retrieval on TensorFlow and Keras 3."""

__version__ = "0.1.0"
