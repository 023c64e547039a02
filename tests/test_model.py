import numpy as np
import pytest

from delf_tf.config import ModelConfig
from delf_tf.model import DelfModel, attention_pool, build_delf_model


def test_output_shapes_and_stride(delf_model):
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 100, 3)).astype(np.float32)
    outputs = delf_model(images)
    assert set(outputs) == {"features", "attention"}
    assert outputs["features"].shape == (2, 4, 7, 1024)  # ceil(64/16), ceil(100/16)
    assert outputs["attention"].shape == (2, 4, 7, 1)
    assert float(np.min(outputs["attention"])) >= 0.0  # softplus


def test_classifier_heads(tmp_path):
    model = build_delf_model(ModelConfig(num_classes=5), seed=1)
    images = np.random.default_rng(1).uniform(0, 255, (3, 48, 48, 3)).astype(np.float32)
    outputs = model(images, training=True)
    assert outputs["descriptor_logits"].shape == (3, 5)
    assert outputs["attention_logits"].shape == (3, 5)


def test_attention_pool_matches_numpy():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    scores = rng.uniform(size=(2, 3, 4, 1)).astype(np.float32)
    normalized = features / np.linalg.norm(features, axis=-1, keepdims=True)
    expected = (normalized * scores).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(attention_pool(features, scores)), expected, rtol=1e-5)


def test_weight_decay_reaches_the_losses():
    model = build_delf_model(ModelConfig(num_classes=3, weight_decay=1e-3), seed=0)
    kernels = [
        layer.kernel
        for layer in model._flatten_layers(include_self=False)
        if type(layer).__name__ in ("Conv2D", "Dense")
    ]
    expected = 1e-3 * sum(float(np.sum(np.square(k.numpy()))) for k in kernels)
    # 43 convs in ResNet50 up to conv4, 2 in the attention head, 2 dense heads.
    assert len(model.losses) == len(kernels) == 43 + 2 + 2
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-4)
    undecayed = build_delf_model(ModelConfig(num_classes=3, weight_decay=0.0), seed=0)
    assert undecayed.losses == []


def test_get_config_is_complete():
    model = build_delf_model(ModelConfig(num_classes=4, attention_hidden_units=32), seed=0)
    clone = DelfModel.from_config(model.get_config())
    assert (
        clone.config
        == model.config
        == ModelConfig(num_classes=4, attention_hidden_units=32, weight_decay=1e-4)
    )


def test_keras_save_load_round_trip(tmp_path):
    import keras

    model = build_delf_model(ModelConfig(num_classes=3, attention_hidden_units=64), seed=3)
    path = tmp_path / "delf.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, DelfModel)
    images = np.random.default_rng(3).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    before, after = model(images), loaded(images)
    for name in before:
        np.testing.assert_array_equal(np.asarray(before[name]), np.asarray(after[name]))
