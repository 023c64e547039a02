import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY_MODEL

from delf_tf.config import ModelConfig
from delf_tf.errors import ConfigError
from delf_tf.model import DelfModel, attention_pool, build_delf_model


def test_output_shapes_and_stride(delf_model):
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 100, 3)).astype(np.float32)
    outputs = delf_model(images)
    assert set(outputs) == {"features", "attention"}
    depth = TINY_MODEL.feature_depth
    assert delf_model.feature_depth == depth
    assert outputs["features"].shape == (2, 4, 7, depth)  # ceil(64/16), ceil(100/16)
    assert outputs["attention"].shape == (2, 4, 7, 1)
    assert float(np.min(outputs["attention"])) >= 0.0  # softplus
    # Odd sizes round up, as ResNet50's conv4 does: ceil(33/16), ceil(17/16).
    assert delf_model(images[:1, :33, :17])["features"].shape == (1, 3, 2, depth)


def numpy_attention_pool(features, scores):
    """features [B, h, w, C], scores [B, h, w, 1] -> [B, C]: mean of score * unit-norm feature."""
    unit = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-6)
    return (unit * scores).mean(axis=(1, 2))


def test_classifier_heads():
    """descriptor_logits = dense(GAP(features)), attention_logits = dense(attention_pool)."""
    model = build_delf_model(TINY_MODEL.replace(num_classes=5), seed=1)
    images = np.random.default_rng(1).uniform(0, 255, (3, 48, 64, 3)).astype(np.float32)
    outputs = {name: np.asarray(value) for name, value in model(images, training=False).items()}
    features, attention = outputs["features"], outputs["attention"]
    assert outputs["descriptor_logits"].shape == outputs["attention_logits"].shape == (3, 5)
    kernel, bias = model.descriptor_classifier.get_weights()
    np.testing.assert_allclose(
        outputs["descriptor_logits"], features.mean(axis=(1, 2)) @ kernel + bias, atol=1e-4
    )
    kernel, bias = model.attention_classifier.get_weights()
    pooled = numpy_attention_pool(features, attention)
    np.testing.assert_allclose(outputs["attention_logits"], pooled @ kernel + bias, atol=1e-4)
    # The attention weights matter: an unweighted pool of the same features differs.
    unweighted = numpy_attention_pool(features, np.ones_like(attention)) @ kernel + bias
    assert not np.allclose(outputs["attention_logits"], unweighted, atol=1e-3)


def test_attention_loss_reaches_the_backbone_only_without_stop_gradient():
    model = build_delf_model(TINY_MODEL.replace(num_classes=3), seed=2)
    images = tf.constant(np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)), tf.float32)
    variables = model.backbone.trainable_variables + model.attention.trainable_variables
    for stop in (True, False):
        with tf.GradientTape() as tape:
            logits = model(images, training=False, attention_stop_gradient=stop)
            loss = tf.reduce_sum(logits["attention_logits"])
        gradients = tape.gradient(loss, variables)
        backbone = gradients[: len(model.backbone.trainable_variables)]
        head = gradients[len(model.backbone.trainable_variables) :]
        assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in head)
        reaches_backbone = any(
            g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in backbone
        )
        assert reaches_backbone is (not stop)


def test_attention_pool_matches_numpy():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    scores = rng.uniform(size=(2, 3, 4, 1)).astype(np.float32)
    normalized = features / np.linalg.norm(features, axis=-1, keepdims=True)
    expected = (normalized * scores).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(attention_pool(features, scores)), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "backbone, backbone_convs",
    [
        ("tiny", 5),
        # 43 convs in ResNet50 up to conv4.
        pytest.param("resnet50", 43, marks=pytest.mark.slow),
    ],
)
def test_weight_decay_reaches_the_losses(backbone, backbone_convs):
    architecture = TINY_MODEL if backbone == "tiny" else ModelConfig()
    config = architecture.replace(num_classes=3, weight_decay=1e-3)
    model = build_delf_model(config, seed=0)
    kernels = [
        layer.kernel
        for layer in model._flatten_layers(include_self=False)
        if type(layer).__name__ in ("Conv2D", "Dense")
    ]
    expected = 1e-3 * sum(float(np.sum(np.square(k.numpy()))) for k in kernels)
    # The backbone's convs, 2 in the attention head, 2 dense heads.
    assert len(model.losses) == len(kernels) == backbone_convs + 2 + 2
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-4)
    undecayed = build_delf_model(config.replace(weight_decay=0.0), seed=0)
    assert undecayed.losses == []


@pytest.mark.parametrize(
    "architecture, convs, dense",
    [
        # conv1, 4 units x 3 convs, 3 projection shortcuts, the attention's 2 convs.
        ("resnet_v1_50", 1 + 12 + 3 + 2, 0),
        # conv1, 5 blocks x 3 convs, 4 projection shortcuts, autoencoder 2, attention 2;
        # the global head's Dense.
        ("delg_resnet50", 1 + 15 + 4 + 2 + 2, 1),
    ],
)
def test_weight_decay_reaches_the_losses_of_the_release_architectures(architecture, convs, dense):
    """--weight_decay decays a ReferenceModel's kernels as it does a DelfModel's."""
    from delf_tf.model.reference_nets import build_reference_model

    config = ModelConfig(architecture=architecture, backbone="tiny", weight_decay=1e-3)
    model = build_reference_model(config, seed=0)
    layers_ = [
        layer
        for layer in model._flatten_layers(include_self=False)
        if type(layer).__name__ in ("Conv2D", "Dense")
    ]
    assert len(layers_) == convs + dense
    expected = 1e-3 * sum(float(np.sum(np.square(layer.kernel.numpy()))) for layer in layers_)
    assert len(model.losses) == convs + dense
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-4)
    assert build_reference_model(config.replace(weight_decay=0.0), seed=0).losses == []


def test_get_config_is_complete():
    config = TINY_MODEL.replace(num_classes=4, feature_depth=24)
    model = build_delf_model(config, seed=0)
    clone = DelfModel.from_config(model.get_config())
    assert clone.config == model.config == config
    assert clone.feature_depth == 24 and clone.backbone.output.shape[-1] == 24


def test_keras_save_load_round_trip(tmp_path):
    import keras

    model = build_delf_model(TINY_MODEL.replace(num_classes=3), seed=3)
    path = tmp_path / "delf.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, DelfModel)
    assert loaded.config == model.config
    images = np.random.default_rng(3).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    before, after = model(images), loaded(images)
    for name in before:
        np.testing.assert_array_equal(np.asarray(before[name]), np.asarray(after[name]))


@pytest.mark.parametrize("weights", ["imagenet", "/some/resnet50.h5"])
def test_pretrained_weights_only_for_resnet50(weights):
    with pytest.raises(ConfigError, match=r"only for backbone 'resnet50', not 'tiny'"):
        build_delf_model(TINY_MODEL, weights=weights)
