"""Backbones: ResNet50 cut after conv4 (`conv4_block6_out`: 1024 channels, stride 16),
and a tiny conv net of the same stride for fast tests (`ModelConfig.backbone="tiny"`).

ResNet50 weights come from one of three sources:
  * None: random initialisation (Keras defaults, seeded by `keras.utils.set_random_seed`);
  * "imagenet": the Keras download (needs internet, or the file in the Keras cache);
  * a path to a local ResNet50 weights file: a legacy `.h5` weights or model file
    (full or notop, as Keras publishes them), a Keras 3 `.weights.h5`, or a `.keras`
    model; weights are matched by layer name.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import keras
import numpy as np

from delf_tf.config import RESNET50_FEATURE_DEPTH
from delf_tf.errors import DelfError

CUT_LAYER = "conv4_block6_out"
FEATURE_DEPTH = RESNET50_FEATURE_DEPTH
# Channels of the tiny backbone's four pooled stages (its last conv has feature_depth).
TINY_WIDTHS = (16, 32, 64, 128)
# Mean of ImageNet in BGR order: Keras' ResNet50 weights expect "caffe" preprocessing.
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)

IMAGENET_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + IMAGENET_NOTOP_FILE
)
NETWORK_PROBE_TIMEOUT_S = 5.0


class WeightsError(DelfError):
    """Backbone weights could not be loaded; the message says what to do instead."""


def build_backbone(name: str = "resnet50_conv4") -> keras.Model:
    """ResNet50 up to `conv4_block6_out`, randomly initialised.

    Input: float32 [B, H, W, 3] BGR, caffe-normalised (see `preprocess_images`).
    Output: float32 [B, ceil(H/16), ceil(W/16), 1024].
    """
    resnet = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(None, None, 3)
    )
    return keras.Model(resnet.input, resnet.get_layer(CUT_LAYER).output, name=name)


def build_tiny_backbone(feature_depth: int, name: str = "tiny_conv") -> keras.Model:
    """A small stride-16 conv net, randomly initialised: ModelConfig(backbone="tiny").

    A stand-in for ResNet50 where its numbers do not matter (tests, quick
    experiments): same stride, output size and input convention, about 3% of
    ResNet50-conv4's parameters (feature_depth 128). Four times 3x3 conv -> BatchNorm -> ReLU -> 2x2 average pooling
    (widths TINY_WIDTHS), then 3x3 conv (feature_depth) -> BatchNorm -> ReLU.
    Average pooling, not strided convs, halves the resolution: with random
    weights, strided 3x3 convs alias, so their descriptors change with small
    shifts and rotations and do not match transformed copies of an image.
    Receptive field 78 px, stride 16, padding 31 (independent of the input size).

    Input: float32 [B, H, W, 3] BGR, caffe-normalised (see `preprocess_images`).
    Output: float32 [B, ceil(H/16), ceil(W/16), feature_depth], >= 0.
    """
    inputs = keras.Input((None, None, 3), name="tiny_input")
    x = inputs
    for stage, width in enumerate(TINY_WIDTHS, start=1):
        x = _conv_bn_relu(x, width, f"tiny{stage}")
        x = keras.layers.AveragePooling2D(2, padding="same", name=f"tiny{stage}_pool")(x)
    x = _conv_bn_relu(x, feature_depth, f"tiny{len(TINY_WIDTHS) + 1}")
    return keras.Model(inputs, x, name=name)


def _conv_bn_relu(x, width: int, name: str):
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def preprocess_images(images):
    """RGB float [B, H, W, 3] in [0, 255] -> BGR with the ImageNet mean removed."""
    return keras.ops.flip(images, axis=-1) - CAFFE_MEAN_BGR


def load_backbone_weights(backbone: keras.Model, weights: str | os.PathLike | None) -> None:
    """Loads `weights` (None, "imagenet" or a local file) into `backbone` by layer name."""
    if weights is None or weights == "random":
        return
    if weights == "imagenet":
        path = _imagenet_weights_path()
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(
                f"weights file not found: {path} (expected a ResNet50 .h5, .weights.h5 or .keras)"
            )
    _load_by_layer_name(backbone, path)


def _imagenet_weights_path() -> Path:
    """Path of the ImageNet notop weights, from the Keras cache or downloaded.

    Offline, this fails after at most NETWORK_PROBE_TIMEOUT_S with a message on
    how to use a local copy, instead of hanging in a download.
    """
    cache_dir = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    cached = cache_dir / IMAGENET_NOTOP_FILE
    if cached.is_file():
        return cached
    try:
        request = urllib.request.Request(IMAGENET_WEIGHTS_URL, method="HEAD")
        with urllib.request.urlopen(request, timeout=NETWORK_PROBE_TIMEOUT_S):
            pass
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise WeightsError(
            "cannot download the ImageNet ResNet50 weights "
            f"({IMAGENET_WEIGHTS_URL}): {getattr(error, 'reason', error)}.\n"
            "On a machine without internet, download the file elsewhere and pass it "
            f"as a local file: --weights=/path/to/{IMAGENET_NOTOP_FILE} "
            f"(or place it at {cached}); --weights=random trains from scratch."
        ) from error
    downloaded = keras.utils.get_file(
        IMAGENET_NOTOP_FILE,
        IMAGENET_WEIGHTS_URL,
        cache_subdir="models",
        file_hash="4d473c1dd8becc155b73f8504c6f6626",
    )
    return Path(downloaded)


def _load_by_layer_name(backbone: keras.Model, path: Path) -> None:
    name = path.name.lower()
    try:
        if name.endswith(".keras"):
            source = keras.saving.load_model(path, compile=False)
            _copy_weights_by_layer_name(source, backbone, path)
        elif name.endswith(".weights.h5"):
            _copy_weights_by_layer_name(_resnet_from_weights_file(path), backbone, path)
        elif name.endswith((".h5", ".hdf5")):
            first_kernel = backbone.get_layer("conv1_conv").kernel
            before = np.array(first_kernel)
            backbone.load_weights(str(path), by_name=True, skip_mismatch=False)
            if np.array_equal(before, np.array(first_kernel)):
                raise WeightsError(f"{path}: no layer of the file matches a ResNet50 layer name")
        else:
            raise WeightsError(
                f"{path}: unsupported weights format; use a ResNet50 .h5, .weights.h5 or .keras file"
            )
    except WeightsError:
        raise
    except Exception as error:  # Keras raises many types for mismatched files.
        raise WeightsError(f"{path}: cannot load ResNet50 weights ({error})") from error


def _resnet_from_weights_file(path: Path) -> keras.Model:
    errors = []
    for include_top in (False, True):
        model = keras.applications.ResNet50(
            include_top=include_top,
            weights=None,
            input_shape=(None, None, 3) if not include_top else (224, 224, 3),
        )
        try:
            model.load_weights(str(path))
            return model
        except Exception as error:  # noqa: BLE001 - try the other layout next.
            errors.append(str(error))
    raise WeightsError(f"{path}: neither a notop nor a full ResNet50 weights file ({errors[-1]})")


def _copy_weights_by_layer_name(source: keras.Model, target: keras.Model, path: Path) -> None:
    source_layers = {}
    stack = [source]
    while stack:
        layer = stack.pop()
        source_layers.setdefault(layer.name, layer)
        stack.extend(getattr(layer, "layers", []))
    copied = 0
    for layer in target.layers:
        match = source_layers.get(layer.name)
        if match is None or not layer.weights:
            continue
        layer.set_weights(match.get_weights())
        copied += 1
    if copied == 0:
        raise WeightsError(f"{path}: no layer of the file matches a ResNet50 layer name")
