"""Keras 3 networks of the reference's released models (keras and keras.ops only).

Two architectures mirror the releases layer for layer (OFFICIAL_DELF.md):
  resnet_v1_50   tf-slim resnet_v1_50 up to block3, as in `delf_gld_20190411` (section 1):
                 conv1 7x7/2 `conv2d_same` (explicit padding, then VALID), max pool 3x3/2
                 SAME, blocks of bottleneck_v1 units whose stride sits on the 3x3 conv of
                 each block's last unit (block3: stride 32, 1024 channels); convs without
                 biases, BatchNorm epsilon 1e-5; attention conv1 1x1 512 + BN + ReLU,
                 conv2 1x1 with biases, softplus. Local descriptors: block3 itself.
  delg_resnet50  the reference TF2 ResNet50 with DELG heads (section 2): conv1 7x7/2 `same`
                 with bias, bn_conv1, ReLU, max pool 3x3/2 `valid`; Caffe-style bottlenecks
                 (stride on conv2a and the 1x1 shortcut), every conv with a bias, BatchNorm
                 epsilon 1e-3; block3_strides (a 1x1/2 max pool after l4f: block3 has stride
                 32), l5a with stride 1; the autoencoder (autoenc_conv1 1x1 to 128, linear;
                 autoenc_conv2 1x1 back, ReLU): local descriptors are the 128-D map, the
                 attention (attn_conv1 + bn + ReLU + attn_conv2 + softplus) sees the expanded
                 map; the global head: GeM (p=3, eps 1e-6) of block4, Dense 2048.
The paper's DelfModel (`delf_tf.model.delf`) is the third architecture ("delf").

Each comes in two sizes, ModelConfig.backbone "resnet50" (the releases') and "tiny"
(same structure, fewer units and channels, for tests), and carries its input
convention (`INPUT_CONVENTIONS`), which the extraction graph honours.
"""

from __future__ import annotations

import dataclasses

import keras
from keras import layers, ops

from delf_tf.config import ModelConfig
from delf_tf.model.weight_decay import apply_weight_decay


@dataclasses.dataclass(frozen=True)
class InputConvention:
    """How an architecture's inputs are made from uint8 RGB pixels.

    preprocessing: "caffe" (BGR, ImageNet mean removed) or "centered" ((x - 128) / 128, RGB).
    half_pixel_centers: the pyramid's bilinear resize uses half-pixel centres (TF2's
      tf.image.resize) or not (TF1's resize_bilinear, as delf_gld_20190411).
    normalize_first: normalise before resizing (the releases) or after (the paper's model).
    grid_keypoints: keypoints at stride * i, the centre of the reference's boxes
      (`CalculateReceptiveBoxes` with padding (rf - 1) / 2: 291 / 145 for block3), as the
      releases place them; else the centre of the receptive field computed from the
      layers (2 px (tf-slim) or 3 px (TF2 ResNet50) further, from TF's SAME padding).
    """

    preprocessing: str
    half_pixel_centers: bool
    normalize_first: bool
    grid_keypoints: bool = False


INPUT_CONVENTIONS = {
    "delf": InputConvention("caffe", True, False),
    "resnet_v1_50": InputConvention("centered", False, True, grid_keypoints=True),
    "delg_resnet50": InputConvention("centered", True, True, grid_keypoints=True),
}

# tf-slim resnet_v1_50 to block3: conv1 channels, (units, depth) per block, attention units.
SLIM_SIZES = {
    "resnet50": {"conv1": 64, "blocks": ((3, 256), (4, 512), (6, 1024)), "attention": 512},
    "tiny": {"conv1": 16, "blocks": ((1, 64), (1, 128), (2, 256)), "attention": 32},
}
# Reference TF2 ResNet50: conv1 channels, (blocks, (f1, f2, f3)) per stage l2..l5, the
# attention's hidden units, the autoencoder's reduced depth and the global dimension.
TF2_SIZES = {
    "resnet50": {
        "conv1": 64,
        "stages": (
            (3, (64, 64, 256)),
            (4, (128, 128, 512)),
            (6, (256, 256, 1024)),
            (3, (512, 512, 2048)),
        ),
        "attention": 512,
        "reduced": 128,
        "global": 2048,
    },
    "tiny": {
        "conv1": 16,
        "stages": ((1, (16, 16, 64)), (1, (32, 32, 128)), (2, (64, 64, 256)), (1, (48, 48, 192))),
        "attention": 32,
        "reduced": 128,
        "global": 2048,
    },
}
SLIM_EPSILON = 1e-5
TF2_EPSILON = 1e-3
GEM_POWER = 3.0
GEM_EPSILON = 1e-6
BLOCK3 = "block3"  # the layer whose output is block3 (stride 32) in every release network


def preprocess(images, convention: InputConvention):
    """RGB float [B, H, W, 3] in [0, 255] -> the architecture's network input."""
    if convention.preprocessing == "caffe":
        mean = ops.convert_to_tensor([103.939, 116.779, 123.68], dtype=images.dtype)
        return ops.flip(images, axis=-1) - mean
    return (images - 128.0) / 128.0


@keras.saving.register_keras_serializable(package="delf_tf")
class GeneralizedMeanPooling(layers.Layer):
    """GeM: mean(max(x, eps)^p)^(1/p) over the spatial axes. [B, h, w, C] -> [B, C].

    Computed in float32 whatever the input's dtype; the output has the input's dtype.
    """

    def __init__(self, power: float = GEM_POWER, epsilon: float = GEM_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.power = power
        self.epsilon = epsilon

    def call(self, x):
        # In float32: in float16, x ** 3 of small activations underflows to 0, whose cube
        # root has an infinite gradient.
        x32 = ops.cast(x, "float32")
        pooled = ops.mean(ops.power(ops.maximum(x32, self.epsilon), self.power), axis=(1, 2))
        return ops.cast(ops.power(pooled, 1.0 / self.power), x.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "power": self.power, "epsilon": self.epsilon}


def _slim_conv_bn(x, filters, kernel, stride, name, relu=True):
    """tf-slim conv (no bias; conv2d_same padding when stride > 1) + BatchNorm (+ ReLU)."""
    if stride > 1 and kernel > 1:
        total = kernel - 1
        pad = (total // 2, total - total // 2)
        x = layers.ZeroPadding2D((pad, pad), name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    x = layers.Conv2D(filters, kernel, stride, padding, use_bias=False, name=name)(x)
    x = layers.BatchNormalization(epsilon=SLIM_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def build_slim_resnet_v1_50(size: str = "resnet50") -> keras.Model:
    """tf-slim resnet_v1_50 to block3 + the DELF attention head, functional.

    Input: float32 [B, H, W, 3], (x - 128) / 128. Outputs: [descriptors float32
    [B, h, w, D] (block3, stride 32), attention float32 [B, h, w, 1]].
    """
    spec = SLIM_SIZES[size]
    inputs = keras.Input((None, None, 3), name="images")
    x = _slim_conv_bn(inputs, spec["conv1"], 7, 2, "conv1")
    x = layers.MaxPooling2D(3, 2, padding="same", name="pool1")(x)
    channels = spec["conv1"]
    for block, (units, depth) in enumerate(spec["blocks"], start=1):
        for unit in range(1, units + 1):
            name = f"block{block}_unit{unit}"
            stride = 2 if unit == units else 1
            if channels == depth:
                shortcut = x
                if stride > 1:
                    shortcut = layers.MaxPooling2D(1, stride, name=f"{name}_subsample")(x)
            else:
                shortcut = _slim_conv_bn(x, depth, 1, stride, f"{name}_shortcut", relu=False)
            y = _slim_conv_bn(x, depth // 4, 1, 1, f"{name}_conv1")
            y = _slim_conv_bn(y, depth // 4, 3, stride, f"{name}_conv2")
            y = _slim_conv_bn(y, depth, 1, 1, f"{name}_conv3", relu=False)
            x = layers.Add(name=f"{name}_add")([shortcut, y])
            x = layers.ReLU(name=f"{name}_out" if unit < units or block < 3 else BLOCK3)(x)
            channels = depth
    block3 = x
    h = _slim_conv_bn(block3, spec["attention"], 1, 1, "attention_conv1")
    logits = layers.Conv2D(1, 1, name="attention_conv2")(h)
    attention = layers.Activation("softplus", name="attention")(logits)
    return keras.Model(inputs, [block3, attention], name="resnet_v1_50")


def _tf2_bottleneck(x, filters, stage, block, stride, shortcut_conv):
    """The reference's Caffe-style bottleneck (stride on conv2a and the shortcut)."""
    f1, f2, f3 = filters
    conv, bn = f"res{stage}{block}_branch", f"bn{stage}{block}_branch"
    y = layers.Conv2D(f1, 1, stride, name=f"{conv}2a")(x)
    y = layers.BatchNormalization(epsilon=TF2_EPSILON, name=f"{bn}2a")(y)
    y = layers.ReLU(name=f"{conv}2a_relu")(y)
    y = layers.Conv2D(f2, 3, padding="same", name=f"{conv}2b")(y)
    y = layers.BatchNormalization(epsilon=TF2_EPSILON, name=f"{bn}2b")(y)
    y = layers.ReLU(name=f"{conv}2b_relu")(y)
    y = layers.Conv2D(f3, 1, name=f"{conv}2c")(y)
    y = layers.BatchNormalization(epsilon=TF2_EPSILON, name=f"{bn}2c")(y)
    if shortcut_conv:
        x = layers.Conv2D(f3, 1, stride, name=f"{conv}1")(x)
        x = layers.BatchNormalization(epsilon=TF2_EPSILON, name=f"{bn}1")(x)
    y = layers.Add(name=f"res{stage}{block}_add")([y, x])
    return layers.ReLU(name=f"res{stage}{block}_out")(y)


def build_delg_resnet50(size: str = "resnet50") -> keras.Model:
    """The reference TF2 ResNet50 (block3_strides) with attention, autoencoder and GeM head.

    Input: float32 [B, H, W, 3], (x - 128) / 128. Outputs: [descriptors float32
    [B, h, w, reduced] (the autoencoder's reduced map of block3, stride 32), attention
    float32 [B, h, w, 1] (on the expanded map), global float32 [B, G] (Dense of GeM of
    block4)], and block3 is the layer named "block3".
    """
    spec = TF2_SIZES[size]
    inputs = keras.Input((None, None, 3), name="images")
    x = layers.Conv2D(spec["conv1"], 7, 2, padding="same", name="conv1")(inputs)
    x = layers.BatchNormalization(epsilon=TF2_EPSILON, name="bn_conv1")(x)
    x = layers.ReLU(name="conv1_relu")(x)
    x = layers.MaxPooling2D(3, 2, padding="valid", name="pool1")(x)
    block3 = None
    for stage, (blocks, filters) in enumerate(spec["stages"], start=2):
        for index in range(blocks):
            stride = 2 if index == 0 and stage in (3, 4) else 1
            x = _tf2_bottleneck(x, filters, stage, "abcdefghij"[index], stride, index == 0)
        if stage == 4:
            x = block3 = layers.MaxPooling2D(1, 2, name=BLOCK3)(x)
    block4 = x
    reduced = layers.Conv2D(spec["reduced"], 1, name="autoenc_conv1")(block3)
    expanded = layers.Conv2D(int(block3.shape[-1]), 1, activation="relu", name="autoenc_conv2")(
        reduced
    )
    h = layers.Conv2D(spec["attention"], 1, name="attn_conv1")(expanded)
    h = layers.BatchNormalization(epsilon=TF2_EPSILON, name="attn_bn_conv1")(h)
    h = layers.ReLU(name="attn_relu")(h)
    logits = layers.Conv2D(1, 1, name="attn_conv2")(h)
    attention = layers.Activation("softplus", name="attention")(logits)
    pooled = GeneralizedMeanPooling(name="gem")(block4)
    global_descriptor = layers.Dense(spec["global"], name="embedding_layer")(pooled)
    return keras.Model(inputs, [reduced, attention, global_descriptor], name="delg_resnet50")


BUILDERS = {"resnet_v1_50": build_slim_resnet_v1_50, "delg_resnet50": build_delg_resnet50}


@keras.saving.register_keras_serializable(package="delf_tf")
class ReferenceModel(keras.Model):
    """A release architecture (ModelConfig.architecture) as a Keras model.

    `network` is the functional net on preprocessed input (see the builders);
    calling the model on RGB images float32 [B, H, W, 3] in [0, 255] returns a dict:
      features: float32 [B, h, w, D] local descriptors (stride 32);
      attention: float32 [B, h, w, 1] softplus scores;
      global: float32 [B, G] raw global descriptor (delg_resnet50 only).
    """

    def __init__(
        self,
        architecture: str = "delg_resnet50",
        backbone: str = "resnet50",
        num_classes: int = 0,
        attention_hidden_units: int = 512,
        weight_decay: float = 1e-4,
        feature_depth: int = 1024,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.config = ModelConfig(
            architecture=architecture,
            backbone=backbone,
            num_classes=num_classes,
            attention_hidden_units=attention_hidden_units,
            weight_decay=weight_decay,
            feature_depth=feature_depth,
        )
        self.convention = INPUT_CONVENTIONS[architecture]
        self.network = BUILDERS[architecture](backbone)
        self.build((None, None, None, 3))

    @property
    def has_global(self) -> bool:
        return len(self.network.outputs) == 3

    @property
    def feature_depth(self) -> int:
        """Channels of the local descriptors."""
        return int(self.network.outputs[0].shape[-1])

    @property
    def global_dim(self) -> int | None:
        return int(self.network.outputs[2].shape[-1]) if self.has_global else None

    def build(self, input_shape):
        apply_weight_decay(self, self.config.weight_decay)
        self.built = True

    def block3_model(self) -> keras.Model:
        """The network from its input to block3 (for the receptive field)."""
        return keras.Model(self.network.input, self.network.get_layer(BLOCK3).output)

    def preprocess(self, images):
        return preprocess(images, self.convention)

    def call(self, images, training=False):
        outputs = self.network(self.preprocess(images), training=training)
        named = {"features": outputs[0], "attention": outputs[1]}
        if self.has_global:
            named["global"] = outputs[2]
        return named

    def get_config(self):
        return {**super().get_config(), **self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_reference_model(config: ModelConfig, seed: int | None = None) -> ReferenceModel:
    """A ReferenceModel of `config` (architecture resnet_v1_50 or delg_resnet50)."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return ReferenceModel(**config.to_dict(), name=config.architecture)


# The layers after block3, in call order, that the training splits off (stop-gradient on
# block3, as the reference's `global_and_local_forward_pass`): the autoencoder's, then the
# attention head's.
AUTOENCODER_LAYERS = {"delg_resnet50": ("autoenc_conv1", "autoenc_conv2")}
ATTENTION_LAYERS = {
    "resnet_v1_50": (
        "attention_conv1",
        "attention_conv1_bn",
        "attention_conv1_relu",
        "attention_conv2",
        "attention",
    ),
    "delg_resnet50": ("attn_conv1", "attn_bn_conv1", "attn_relu", "attn_conv2", "attention"),
}


def split_at_block3(model: ReferenceModel) -> tuple[keras.Model, keras.Model]:
    """Two functional views of `model.network` sharing its layers (and weights).

    trunk: preprocessed images [B, H, W, 3] -> [block3 [B, h, w, C], global [B, G]]
      (global only for delg_resnet50; resnet_v1_50 gives [block3]).
    head: block3 [B, h, w, C] -> [reduced [B, h, w, R], expanded [B, h, w, C],
      attention [B, h, w, 1]] (delg_resnet50) or [attention] (resnet_v1_50).
    Training runs head on stop_gradient(trunk's block3).
    """
    network, architecture = model.network, model.config.architecture
    block3 = network.get_layer(BLOCK3).output
    trunk_outputs = [block3, network.outputs[2]] if model.has_global else [block3]
    trunk = keras.Model(network.input, trunk_outputs, name=f"{network.name}_trunk")
    inputs = keras.Input((None, None, int(block3.shape[-1])), name="block3_input")
    x, outputs = inputs, []
    for name in AUTOENCODER_LAYERS.get(architecture, ()):
        x = network.get_layer(name)(x)
        outputs.append(x)
    for name in ATTENTION_LAYERS[architecture]:
        x = network.get_layer(name)(x)
    outputs.append(x)
    head = keras.Model(inputs, outputs, name=f"{network.name}_head")
    return trunk, head
