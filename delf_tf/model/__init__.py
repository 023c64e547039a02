"""The DELF Keras model, its backbone, attention head and receptive field."""

from delf_tf.model.attention import AttentionHead, attention_pool
from delf_tf.model.backbone import (
    WeightsError,
    build_backbone,
    build_tiny_backbone,
    load_backbone_weights,
)
from delf_tf.model.delf import DelfModel, build_delf_model
from delf_tf.model.receptive_field import ReceptiveField, compute_receptive_field

__all__ = [
    "AttentionHead",
    "DelfModel",
    "ReceptiveField",
    "WeightsError",
    "attention_pool",
    "build_backbone",
    "build_delf_model",
    "build_tiny_backbone",
    "compute_receptive_field",
    "load_backbone_weights",
]
