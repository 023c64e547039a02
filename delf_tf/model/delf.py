"""The DELF Keras model: a stride-16 backbone (ResNet50-conv4 or tiny), attention head,
two classifier heads."""

from __future__ import annotations

import os

import keras
from keras import layers, ops

from delf_tf.config import RESNET50_FEATURE_DEPTH, ModelConfig
from delf_tf.errors import ConfigError
from delf_tf.model.attention import AttentionHead, attention_pool
from delf_tf.model.backbone import (
    build_backbone,
    build_tiny_backbone,
    load_backbone_weights,
    preprocess_images,
)
from delf_tf.model.weight_decay import apply_weight_decay


@keras.saving.register_keras_serializable(package="delf_tf")
class DelfModel(keras.Model):
    """DELF: dense backbone features (ResNet50 conv4, or tiny) scored by an attention head.

    Calling the model on RGB images float32 [B, H, W, 3] in [0, 255] returns a dict:
      features: float32 [B, h, w, D], h = ceil(H / 16), w = ceil(W / 16),
        D = feature_depth (1024 for ResNet50);
      attention: float32 [B, h, w, 1], softplus scores;
      descriptor_logits: float32 [B, num_classes] (global average pooling + dense),
        only when num_classes > 0;
      attention_logits: float32 [B, num_classes] (attention pooling + dense),
        only when num_classes > 0.
    `attention_stop_gradient=True` (the default) keeps the attention losses from
    changing the backbone, as in the paper's second training stage.
    """

    def __init__(
        self,
        num_classes: int = 0,
        attention_hidden_units: int = 512,
        weight_decay: float = 1e-4,
        backbone: str = "resnet50",
        feature_depth: int = RESNET50_FEATURE_DEPTH,
        architecture: str = "delf",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if architecture != "delf":
            raise ConfigError(
                f"architecture {architecture!r} is a ReferenceModel "
                "(delf_tf.model.reference_nets), not a DelfModel"
            )
        self.config = ModelConfig(
            num_classes=num_classes,
            attention_hidden_units=attention_hidden_units,
            weight_decay=weight_decay,
            backbone=backbone,
            feature_depth=feature_depth,
        )
        if backbone == "tiny":
            self.backbone = build_tiny_backbone(feature_depth)
        else:
            self.backbone = build_backbone()
        self.attention = AttentionHead(attention_hidden_units, name="attention")
        self.descriptor_classifier = None
        self.attention_classifier = None
        if num_classes > 0:
            self.descriptor_classifier = layers.Dense(num_classes, name="descriptor_classifier")
            self.attention_classifier = layers.Dense(num_classes, name="attention_classifier")
        self.build((None, None, None, 3))

    @property
    def feature_depth(self) -> int:
        """Channels of the backbone output (the raw descriptor size)."""
        return self.config.feature_depth

    def build(self, input_shape):
        feature_shape = (None, None, None, self.feature_depth)
        self.attention.build(feature_shape)
        for head in (self.descriptor_classifier, self.attention_classifier):
            if head is not None:
                head.build((None, self.feature_depth))
        apply_weight_decay(self, self.config.weight_decay)
        self.built = True

    def features_and_attention(self, images, training=False, attention_stop_gradient=True):
        """RGB float [B, H, W, 3] -> (features [B, h, w, D], attention [B, h, w, 1])."""
        features = self.backbone(preprocess_images(images), training=training)
        attention_input = ops.stop_gradient(features) if attention_stop_gradient else features
        return features, self.attention(attention_input, training=training)

    def call(self, images, training=False, attention_stop_gradient=True):
        features, attention = self.features_and_attention(
            images, training=training, attention_stop_gradient=attention_stop_gradient
        )
        outputs = {"features": features, "attention": attention}
        if self.descriptor_classifier is not None:
            pooled = ops.mean(features, axis=(1, 2))
            attention_features = (
                ops.stop_gradient(features) if attention_stop_gradient else features
            )
            outputs["descriptor_logits"] = self.descriptor_classifier(pooled)
            outputs["attention_logits"] = self.attention_classifier(
                attention_pool(attention_features, attention)
            )
        return outputs

    def get_config(self):
        return {**super().get_config(), **self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_delf_model(
    config: ModelConfig | None = None,
    weights: str | os.PathLike | None = None,
    seed: int | None = None,
) -> DelfModel:
    """A DelfModel with backbone `weights` (None/"random", "imagenet" or a local file).

    `seed` makes the random initialisation of every layer reproducible. Weights
    other than random exist only for the ResNet50 backbone (ConfigError otherwise).
    """
    config = config or ModelConfig()
    if config.architecture != "delf":
        raise ConfigError(
            f"architecture {config.architecture!r}: build it with build_reference_model, or "
            "convert a release (delf convert)"
        )
    if config.backbone != "resnet50" and weights not in (None, "random"):
        raise ConfigError(
            f"backbone weights {str(weights)!r} exist only for backbone 'resnet50', not "
            f"{config.backbone!r}: use random weights (--weights=random)"
        )
    if seed is not None:
        keras.utils.set_random_seed(seed)
    model = DelfModel(**config.to_dict(), name="delf")
    load_backbone_weights(model.backbone, weights)
    return model
