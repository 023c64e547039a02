"""Backbone weights from local files (by layer name) and a fast, clear offline failure.

Pretrained weights exist only for ResNet50, so every test here builds it: `slow`.
"""

import time

import h5py
import keras
import numpy as np
import pytest

from delf_tf.model import WeightsError, build_backbone, load_backbone_weights
from delf_tf.model import backbone as backbone_module

pytestmark = pytest.mark.slow


def legacy_h5(model: keras.Model, path) -> None:
    """Writes weights like Keras' published ImageNet files (legacy HDF5, by layer)."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)


def assert_same_conv4_weights(backbone, source):
    for name in ("conv1_conv", "conv4_block6_3_conv", "conv4_block6_3_bn"):
        ours, theirs = backbone.get_layer(name), source.get_layer(name)
        for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("include_top", [False, True])
def test_legacy_h5_full_or_notop_loads_by_layer_name(tmp_path, include_top):
    keras.utils.set_random_seed(11)
    shape = (224, 224, 3) if include_top else (None, None, 3)
    source = keras.applications.ResNet50(include_top=include_top, weights=None, input_shape=shape)
    path = tmp_path / "resnet50.h5"
    legacy_h5(source, path)
    backbone = build_backbone()
    load_backbone_weights(backbone, str(path))
    assert_same_conv4_weights(backbone, source)


def test_keras_model_file_loads_by_layer_name(tmp_path):
    keras.utils.set_random_seed(12)
    source = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(None, None, 3)
    )
    path = tmp_path / "resnet50.keras"
    source.save(path)
    backbone = build_backbone()
    load_backbone_weights(backbone, path)
    assert_same_conv4_weights(backbone, source)


def test_bad_weights_files_are_named(tmp_path):
    backbone = build_backbone()  # each failure below leaves it as it was
    with pytest.raises(WeightsError, match="not found"):
        load_backbone_weights(backbone, tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(WeightsError, match="junk.h5"):
        load_backbone_weights(backbone, junk)
    other = tmp_path / "other.h5"
    inputs = keras.Input((8,))
    legacy_h5(keras.Model(inputs, keras.layers.Dense(2, name="unrelated")(inputs)), other)
    with pytest.raises(WeightsError, match="no layer"):
        load_backbone_weights(backbone, other)


def test_imagenet_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    """No network in tests: the download probe points at a closed loopback port."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # empty cache
    monkeypatch.setattr(backbone_module, "IMAGENET_WEIGHTS_URL", "http://127.0.0.1:9/resnet50.h5")
    backbone = build_backbone()  # built before the clock starts: only the probe is timed
    start = time.monotonic()
    with pytest.raises(WeightsError) as error:
        load_backbone_weights(backbone, "imagenet")
    assert time.monotonic() - start < backbone_module.NETWORK_PROBE_TIMEOUT_S + 1
    assert "--weights=/path/to/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in str(
        error.value
    )
