"""Synthetic stand-ins for the released reference models, for tests and benchmarks.

The released DELF/DELG models (see `delf_tf.releases`) cannot be downloaded
here, so this module writes TF1 graph SavedModels with the same feeds, fetches,
dtypes and semantics (OFFICIAL_DELF.md section 1): no signature_def, a
`tf.compat.v1` graph with v1 control flow (Enter/Exit/Merge/Switch), TF1
variables, randomly initialised (seeded) weights.

    python -m delf_tf.testing.synthetic_releases --output_dir=/tmp/r50delg_gld_20200814 --kind=delg

Each stand-in is one of the Keras release architectures of
`delf_tf.model.reference_nets` (so that `delf convert` can be tested on it), written
in TF1 ops with the release's variable names:
  --kind=delf: tf-slim resnet_v1_50 to block3 + attention, the names of
    delf_gld_20190411 (`resnet_v1_50/block1/unit_1/bottleneck_v1/conv1/weights`,
    `.../BatchNorm/gamma`, `attention_block/attention/compute/conv2/biases`); local
    features are block3; TF1 resize_bilinear (no half-pixel centres).
  --kind=delg: the reference TF2 ResNet50 (block3_strides) + autoencoder + attention
    + GeM/Dense global head, with the names a DELG model built from the reference's
    Keras code gets in graph mode (`private__identity_block_9/res4f_branch2c/kernel`,
    `attention/attn_conv1/kernel`, `autoencoder/autoenc_conv1/bias`,
    `backbone/embedding_layer/kernel`); local features are the 128-D reduced map;
    tf.image.resize (half-pixel centres).
  --size=tiny (tests) or resnet50 (bench: the releases' sizes); --naming=renamed
  (opaque names) or permuted (misleading names) for the mapping tests.
Per scale s of `input_scales` (a v1 while loop): x = (float(image) - 128) / 128,
resized to round([H, W] * s); locations with attention >= input_abs_thres are kept,
with their receptive boxes (rf 291 at full size, 99 tiny; stride 32; padding
(rf - 1) / 2) divided by s and scales 1 / s; then all scales are concatenated and the
top input_max_feature_num by attention are returned through non_max_suppression with
iou 1.0 (sorted by decreasing score). DELG adds input_global_scales_ind and
global_descriptors [S', 2048]. DELF also writes the release's `pca/` folder
(mean.datum, pca_proj_mat.datum, pca_vars.datum) beside `model/`.

`--graph_style=function` writes the graph the reference's TF2 exporter makes once
re-saved as a TF1 SavedModel with the released tensor names: the same computation
as a tf.function (v2 While and If, nested function calls) that the graph calls
through a StatefulPartitionedCall taking the resource variables as inputs.

Building uses process-wide TF1 switches (v1 control flow, graph mode), so
callers in a TF2 process use `build_in_subprocess`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# Receptive field size of block3 per network size, stride 32, padding (size - 1) / 2 as
# the reference's boxes (291 / 145 for resnet50; the tests check both sizes against the
# field computed from the Keras layers of delf_tf.model.reference_nets).
RECEPTIVE_FIELD_SIZES = {"resnet50": 291.0, "tiny": 99.0}
STRIDE = 32.0
# The attention head's output bias: softplus scores land around the reference thresholds.
ATTENTION_BIAS = 150.0
ATTENTION_GAIN = 40.0  # spreads the scores over tens of units
# What each kind of release is, as a Keras architecture of delf_tf.model.reference_nets.
ARCHITECTURES = {"delf": "resnet_v1_50", "delg": "delg_resnet50"}
NAMINGS = ("release", "renamed", "permuted")


class _Weights:
    """Seeded random variables, created as TF1 ref or resource variables."""

    def __init__(self, seed: int, resource: bool, naming: str = "release"):
        self.rng = np.random.default_rng(seed)
        self.resource = resource
        self.naming = naming
        self.values: list[tuple[object, np.ndarray]] = []
        self.variables: dict[str, object] = {}

    def stored_name(self, name: str) -> str:
        """The variable's name in the graph: the release's, an opaque one ("renamed"), or a
        misleading one ("permuted": role words swapped, gamma <-> beta, kernel <-> bias,
        moving_mean <-> moving_variance, and every digit shifted by one)."""
        if self.naming == "renamed":
            return "v_" + hashlib.sha1(name.encode()).hexdigest()[:10]
        if self.naming == "permuted":
            swaps = {
                "gamma": "beta",
                "beta": "gamma",
                "kernel": "bias",
                "bias": "kernel",
                "weights": "biases",
                "biases": "weights",
                "moving_mean": "moving_variance",
                "moving_variance": "moving_mean",
            }
            parts = name.split("/")
            parts[-1] = swaps.get(parts[-1], parts[-1])
            name = "/".join(parts)
            return "".join(str((int(c) + 1) % 10) if c.isdigit() else c for c in name)
        return name

    def variable(self, name: str, value: np.ndarray):
        """The variable `name`, created (with `value`) on first use, reused afterwards."""
        import tensorflow as tf

        if name in self.variables:
            return self.variables[name]
        variable = tf.compat.v1.get_variable(
            self.stored_name(name),
            shape=value.shape,
            dtype=tf.float32,
            initializer=tf.compat.v1.zeros_initializer(),
            use_resource=self.resource,
        )
        self.values.append((variable, value.astype(np.float32)))
        self.variables[name] = variable
        return variable

    def conv(
        self,
        name: str,
        x,
        out: int,
        kernel: int,
        stride: int = 1,
        bias: float | None = None,
        gain: float = 1.0,
        padding: str = "slim",
        names: tuple[str, str] = ("weights", "biases"),
    ):
        """Conv (He-normal weights x gain). padding "slim": tf-slim's conv2d_same (explicit
        padding, VALID) when stride > 1, else SAME; "SAME" / "VALID": as Keras' same/valid.
        bias: a constant bias value, "random" for small random biases, or None."""
        import tensorflow as tf

        channels = int(x.shape[-1])
        scale = gain * np.sqrt(2.0 / (kernel * kernel * channels))
        weights = self.variable(
            f"{name}/{names[0]}", self.rng.normal(0, scale, (kernel, kernel, channels, out))
        )
        if padding == "slim" and stride > 1 and kernel > 1:
            total = kernel - 1
            pad = [total // 2, total - total // 2]
            x = tf.pad(x, [[0, 0], pad, pad, [0, 0]])
            y = tf.nn.conv2d(x, weights, stride, "VALID")
        else:
            y = tf.nn.conv2d(x, weights, stride, "SAME" if padding == "slim" else padding)
        if bias is not None:
            value = self.rng.normal(0, 0.05, out) if bias == "random" else np.full(out, bias)
            y = tf.nn.bias_add(y, self.variable(f"{name}/{names[1]}", value))
        return y

    def batch_norm(self, name: str, x, epsilon: float = 1e-5):
        """Fused batch norm (inference) with variables name/{gamma,beta,moving_mean,...}."""
        import tensorflow as tf

        depth = int(x.shape[-1])
        gamma = self.variable(f"{name}/gamma", self.rng.uniform(0.8, 1.2, depth))
        beta = self.variable(f"{name}/beta", self.rng.normal(0, 0.05, depth))
        mean = self.variable(f"{name}/moving_mean", self.rng.normal(0, 0.05, depth))
        variance = self.variable(f"{name}/moving_variance", self.rng.uniform(0.8, 1.2, depth))
        return tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, mean, variance, epsilon=epsilon, is_training=False
        )[0]

    def slim_conv_bn(self, name: str, x, out: int, kernel: int, stride: int = 1, relu=True):
        """tf-slim conv (no bias) + `name/BatchNorm` (epsilon 1e-5) (+ ReLU)."""
        import tensorflow as tf

        y = self.batch_norm(f"{name}/BatchNorm", self.conv(name, x, out, kernel, stride))
        return tf.nn.relu(y) if relu else y


def _slim_network(weights: _Weights, image, size: str):
    """tf-slim resnet_v1_50 to block3 + attention (delf_gld_20190411's names):
    (local features = block3, attention, block3)."""
    import tensorflow as tf

    from delf_tf.model.reference_nets import SLIM_SIZES

    spec = SLIM_SIZES[size]
    x = weights.slim_conv_bn("resnet_v1_50/conv1", image, spec["conv1"], 7, stride=2)
    x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    for block, (units, depth) in enumerate(spec["blocks"], start=1):
        for unit in range(1, units + 1):
            name = f"resnet_v1_50/block{block}/unit_{unit}/bottleneck_v1"
            stride = 2 if unit == units else 1
            if int(x.shape[-1]) == depth:
                shortcut = x if stride == 1 else tf.nn.max_pool2d(x, 1, stride, "SAME")
            else:
                shortcut = weights.slim_conv_bn(f"{name}/shortcut", x, depth, 1, stride, False)
            y = weights.slim_conv_bn(f"{name}/conv1", x, depth // 4, 1)
            y = weights.slim_conv_bn(f"{name}/conv2", y, depth // 4, 3, stride=stride)
            y = weights.slim_conv_bn(f"{name}/conv3", y, depth, 1, relu=False)
            x = tf.nn.relu(shortcut + y)
    scope = "attention_block/attention/compute"
    hidden = weights.slim_conv_bn(f"{scope}/conv1", x, spec["attention"], 1)
    logits = weights.conv(f"{scope}/conv2", hidden, 1, 1, bias=ATTENTION_BIAS, gain=ATTENTION_GAIN)
    return x, tf.nn.softplus(logits), x


class _KerasNames:
    """Variable names of a DELG model built from the reference's Keras code in graph mode:
    Keras' generated block names with counters (`private__identity_block_9/res4f_...`)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def block(self, kind: str) -> str:
        count = self.counts.get(kind, 0)
        self.counts[kind] = count + 1
        return f"private__{kind}" + (f"_{count}" if count else "")


def _tf2_conv_bn(weights, scope, conv, bn, x, out, kernel, stride=1, padding="VALID"):
    y = weights.conv(
        f"{scope}/{conv}",
        x,
        out,
        kernel,
        stride,
        "random",
        padding=padding,
        names=("kernel", "bias"),
    )
    return weights.batch_norm(f"{scope}/{bn}", y, epsilon=1e-3)


def _delg_network(weights: _Weights, image, size: str):
    """The reference TF2 ResNet50 (block3_strides) + autoencoder + attention:
    (local features = reduced map, attention, block4)."""
    import tensorflow as tf

    from delf_tf.model.reference_nets import TF2_SIZES

    spec = TF2_SIZES[size]
    names = _KerasNames()
    x = _tf2_conv_bn(weights, "backbone", "conv1", "bn_conv1", image, spec["conv1"], 7, 2, "SAME")
    x = tf.nn.max_pool2d(tf.nn.relu(x), 3, 2, "VALID")
    block3 = None
    for stage, (blocks, (f1, f2, f3)) in enumerate(spec["stages"], start=2):
        for index in range(blocks):
            letter = "abcdefghij"[index]
            scope = names.block("conv_block" if index == 0 else "identity_block")
            conv, bn = f"res{stage}{letter}_branch", f"bn{stage}{letter}_branch"
            stride = 2 if index == 0 and stage in (3, 4) else 1
            y = _tf2_conv_bn(weights, scope, f"{conv}2a", f"{bn}2a", x, f1, 1, stride)
            y = _tf2_conv_bn(
                weights, scope, f"{conv}2b", f"{bn}2b", tf.nn.relu(y), f2, 3, 1, "SAME"
            )
            y = _tf2_conv_bn(weights, scope, f"{conv}2c", f"{bn}2c", tf.nn.relu(y), f3, 1)
            if index == 0:
                x = _tf2_conv_bn(weights, scope, f"{conv}1", f"{bn}1", x, f3, 1, stride)
            x = tf.nn.relu(y + x)
        if stage == 4:
            x = block3 = tf.nn.max_pool2d(x, 1, 2, "VALID")
    block4 = x
    kernel_bias = ("kernel", "bias")
    reduced = weights.conv(
        "autoencoder/autoenc_conv1", block3, spec["reduced"], 1, bias="random", names=kernel_bias
    )
    expanded = tf.nn.relu(
        weights.conv(
            "autoencoder/autoenc_conv2",
            reduced,
            int(block3.shape[-1]),
            1,
            bias="random",
            names=kernel_bias,
        )
    )
    hidden = weights.conv(
        "attention/attn_conv1", expanded, spec["attention"], 1, bias="random", names=kernel_bias
    )
    hidden = tf.nn.relu(weights.batch_norm("attention/bn_conv1", hidden, epsilon=1e-3))
    logits = weights.conv(
        "attention/attn_conv2",
        hidden,
        1,
        1,
        bias=ATTENTION_BIAS,
        gain=ATTENTION_GAIN,
        names=kernel_bias,
    )
    return reduced, tf.nn.softplus(logits), block4


def _network(weights: _Weights, image, kind: str, size: str):
    """float [1, h, w, 3] -> (local features [1, h', w', D], attention [1, h', w', 1],
    the map the global head pools)."""
    if kind == "delf":
        return _slim_network(weights, image, size)
    return _delg_network(weights, image, size)


def local_dim(kind: str, size: str) -> int:
    """Raw local descriptor size: block3's depth (DELF) or the autoencoder's (DELG)."""
    from delf_tf.model.reference_nets import SLIM_SIZES, TF2_SIZES

    if kind == "delf":
        return SLIM_SIZES[size]["blocks"][-1][1]
    return TF2_SIZES[size]["reduced"]


def _global_weights(weights: _Weights, size: str):
    """The DELG embedding layer (Dense of the GeM-pooled block4): (kernel, bias)."""
    from delf_tf.model.reference_nets import TF2_SIZES

    spec = TF2_SIZES[size]
    channels, dim = spec["stages"][-1][1][-1], spec["global"]
    kernel = weights.variable(
        "backbone/embedding_layer/kernel",
        weights.rng.normal(0, 1 / np.sqrt(channels), (channels, dim)),
    )
    bias = weights.variable("backbone/embedding_layer/bias", weights.rng.normal(0, 0.01, dim))
    return kernel, bias


def _receptive_boxes(height, width, scale, size: str):
    """[h * w, 4] (ymin, xmin, ymax, xmax) of each feature map cell, divided by `scale`."""
    import tensorflow as tf

    rf, stride = RECEPTIVE_FIELD_SIZES[size], STRIDE
    padding = (rf - 1) / 2
    y, x = tf.meshgrid(tf.range(height), tf.range(width), indexing="ij")
    grid = tf.cast(tf.reshape(tf.stack([y, x], axis=-1), [-1, 2]), tf.float32)
    boxes = stride * tf.concat([grid, grid], axis=1)
    boxes += tf.constant([-padding, -padding, -padding + rf - 1, -padding + rf - 1])
    return boxes / scale


GRAPHS = ("v1", "function")


def build(
    output_dir: str | os.PathLike,
    kind: str,
    size: str,
    seed: int,
    resource: bool,
    graph_style: str = "v1",
    naming: str = "release",
) -> Path:
    """Writes the release folder (see the module docstring); returns the SavedModel folder.

    graph_style "v1": the TF1 graph of the releases (v1 while loop, variables read in
    place). "function": the graph the reference's TF2 exporter makes once re-saved as a
    TF1 SavedModel: the extraction is a `tf.function` (v2 While and If, a nested
    function call per level) called from the graph through a StatefulPartitionedCall
    that takes the resource variables as inputs; the feeds and fetches are the
    released names around that call.
    naming: the variables' names, see `_Weights.stored_name` (the weights are the same).
    """
    import tensorflow as tf

    if graph_style not in GRAPHS or naming not in NAMINGS:
        raise ValueError(f"graph_style {graph_style!r} / naming {naming!r} unknown")
    tf.compat.v1.disable_eager_execution()
    tf.compat.v1.disable_control_flow_v2()
    root = Path(output_dir)
    model_dir = root / "model" if kind == "delf" else root
    weights = _Weights(seed, resource or graph_style == "function", naming)
    graph = tf.Graph()
    with graph.as_default():
        image = tf.compat.v1.placeholder(tf.uint8, [None, None, 3], name="input_image")
        scales = tf.compat.v1.placeholder(tf.float32, [None], name="input_scales")
        threshold = tf.compat.v1.placeholder(tf.float32, [], name="input_abs_thres")
        max_features = tf.compat.v1.placeholder(tf.int32, [], name="input_max_feature_num")
        if kind == "delg":
            indices = tf.compat.v1.placeholder(tf.int32, [None], name="input_global_scales_ind")
        else:
            indices = tf.constant([0])
        # Create the variables outside the loop (the loop body reuses them).
        _network(weights, tf.zeros([1, 64, 64, 3]), kind, size)
        if kind == "delg":
            _global_weights(weights, size)
        feeds = (image, scales, threshold, max_features, indices)
        if graph_style == "v1":
            outputs = _extraction(weights, kind, size, *feeds, functions=False)
        else:
            function = tf.function(
                lambda *args: _extraction(weights, kind, size, *args, functions=True),
                autograph=False,
            )
            outputs = function(*feeds)
        names = ("boxes", "features", "scales", "scores", "global_descriptors")
        for name, output in zip(names[: 5 if kind == "delg" else 4], outputs, strict=False):
            tf.identity(output, name=name)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for variable, value in weights.values:
                variable.load(value, session)
            builder = tf.compat.v1.saved_model.Builder(str(model_dir))
            builder.add_meta_graph_and_variables(session, [tf.saved_model.SERVING])
            builder.save()
    if kind == "delf":
        _write_pca(root / "pca", seed, local_dim(kind, size))
    return model_dir


def _extraction(
    weights: _Weights, kind, size, image, scales, threshold, max_features, indices, functions
):
    """The release's computation from its feeds to (boxes, features, scales, scores, global).

    DELF (delf_gld_20190411): TF1 resize_bilinear without half-pixel centres; DELG (made
    by the reference's TF2 code): tf.image.resize, with half-pixel centres.
    functions: run inside a tf.function (v2 control flow): each level's network is a
    nested tf.function call and the global head sits in a tf.cond, so variables flow
    into While, If and function-call ops as in a TF2 export.
    """
    import tensorflow as tf

    pixels = (tf.cast(image, tf.float32) - 128.0) / 128.0
    original = tf.cast(tf.shape(pixels)[:2], tf.float32)
    global_dim = 0
    if kind == "delg":
        global_kernel, global_bias = _global_weights(weights, size)
        global_dim = int(global_kernel.shape[-1])

    def network(resized):
        return _network(weights, resized, kind, size)

    if functions:
        network = tf.function(network, autograph=False)

    def global_head(feature_map, scale):
        if kind != "delg":
            return tf.zeros([0, 0])

        def dense():
            pooled = tf.reduce_mean(tf.maximum(feature_map, 1e-6) ** 3.0, axis=[1, 2]) ** (1 / 3)
            return tf.nn.bias_add(tf.matmul(pooled, global_kernel), global_bias)

        if not functions:
            return dense()
        # Always true: an If op whose branch reads variables.
        return tf.cond(scale > 0.0, dense, lambda: tf.zeros([1, global_dim]))

    def body(i, boxes, features, level_scales, scores, globals_):
        scale = scales[i]
        new_size = tf.cast(tf.round(original * scale), tf.int32)
        if kind == "delf":
            resized = tf.compat.v1.image.resize_bilinear(pixels[None], new_size)
        else:
            resized = tf.image.resize(pixels[None], new_size, method="bilinear")
        local, attention, feature_map = network(resized)
        height, width = tf.shape(attention)[1], tf.shape(attention)[2]
        attention = tf.reshape(attention, [-1])
        keep = tf.reshape(tf.where(attention >= threshold), [-1])
        level_boxes = tf.gather(_receptive_boxes(height, width, scale, size), keep)
        level_features = tf.gather(tf.reshape(local, [-1, dim]), keep)
        count = tf.shape(keep)[:1]
        return (
            i + 1,
            tf.concat([boxes, level_boxes], 0),
            tf.concat([features, level_features], 0),
            tf.concat([level_scales, tf.fill(count, 1.0 / scale)], 0),
            tf.concat([scores, tf.gather(attention, keep)], 0),
            tf.concat([globals_, global_head(feature_map, scale)], 0) if global_dim else globals_,
        )

    dim = local_dim(kind, size)
    loop = tf.compat.v1.while_loop(
        lambda i, *_: i < tf.shape(scales)[0],
        body,
        (
            tf.constant(0),
            tf.zeros([0, 4]),
            tf.zeros([0, dim]),
            tf.zeros([0]),
            tf.zeros([0]),
            tf.zeros([0, global_dim]),
        ),
        shape_invariants=(
            tf.TensorShape([]),
            tf.TensorShape([None, 4]),
            tf.TensorShape([None, dim]),
            tf.TensorShape([None]),
            tf.TensorShape([None]),
            tf.TensorShape([None, global_dim]),
        ),
        back_prop=False,
    )
    _, boxes, features, level_scales, scores, globals_ = loop
    count = tf.minimum(max_features, tf.shape(scores)[0])
    selected = tf.image.non_max_suppression(boxes, scores, count, iou_threshold=1.0)
    return (
        tf.gather(boxes, selected),
        tf.gather(features, selected),
        tf.gather(level_scales, selected),
        tf.expand_dims(tf.gather(scores, selected), 1),
        tf.gather(globals_, indices),
    )


def _write_pca(folder: Path, seed: int, dim: int) -> None:
    """A random orthonormal PCA of the release's layout (rows of the projection are axes)."""
    from delf_tf.formats.datum import write_datum

    rng = np.random.default_rng(seed + 1)
    axes, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    folder.mkdir(parents=True, exist_ok=True)
    write_datum(folder / "mean.datum", rng.normal(0, 0.01, dim).astype(np.float32))
    write_datum(folder / "pca_proj_mat.datum", axes.T.astype(np.float32))
    write_datum(folder / "pca_vars.datum", np.sort(rng.uniform(0.1, 1.0, dim))[::-1])


def build_in_subprocess(
    output_dir: str | os.PathLike,
    kind: str = "delf",
    size: str = "tiny",
    seed: int = 0,
    resource: bool = False,
    graph_style: str = "v1",
) -> Path:
    """`build` in a fresh Python process (its TF1 switches stay there); returns the folder."""
    return build_many_in_subprocess([(output_dir, kind, size, seed, resource, graph_style)])[0]


def build_many_in_subprocess(specs: list[tuple]) -> list[Path]:
    """Several releases, [(output_dir, kind, size, seed, resource[, graph_style])], in one
    fresh process."""
    calls = "; ".join(
        f"build({str(spec[0])!r}, " + ", ".join(repr(value) for value in spec[1:]) + ")"
        for spec in specs
    )
    command = [sys.executable, "-c", f"from {__name__} import build; {calls}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"building synthetic releases failed:\n{done.stderr[-3000:]}")
    return [Path(spec[0]) for spec in specs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="release folder to write")
    parser.add_argument("--kind", choices=sorted(ARCHITECTURES), default="delf")
    parser.add_argument("--size", choices=["tiny", "resnet50"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resource_variables", action="store_true", help="resource (not ref) TF1 variables"
    )
    parser.add_argument(
        "--graph_style",
        choices=GRAPHS,
        default="v1",
        help="v1: a TF1 graph; function: a tf.function called from the graph (TF2 export)",
    )
    parser.add_argument("--naming", choices=NAMINGS, default="release")
    args = parser.parse_args(argv)
    build(
        args.output_dir,
        args.kind,
        args.size,
        args.seed,
        args.resource_variables,
        args.graph_style,
        args.naming,
    )


if __name__ == "__main__":
    main()
