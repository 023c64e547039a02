"""Synthetic stand-ins for the released reference models, for tests and benchmarks.

The released DELF/DELG models (see `delf_tf.releases`) cannot be downloaded
here, so this module writes TF1 graph SavedModels with the same feeds, fetches,
dtypes and semantics (OFFICIAL_DELF.md section 1): no signature_def, a
`tf.compat.v1` graph with v1 control flow (Enter/Exit/Merge/Switch), TF1
variables, randomly initialised (seeded) weights.

    python -m delf_tf.testing.synthetic_releases --output_dir=/tmp/r50delg_gld_20200814 --kind=delg

Graph (per scale s of `input_scales`, in a v1 while loop):
  x = (float(image) - 128) / 128; resize_bilinear (TF1 op: no half-pixel centres)
  to round([H, W] * s); a conv net (`--size=tiny`: five stride-2 convs;
  `--size=resnet50`: tf-slim resnet_v1_50 up to block3, the DELF network's cost)
  gives features [h, w, D] with stride 32 and attention = softplus(conv(relu(bn(conv))));
  locations with attention >= input_abs_thres are kept, with their receptive
  boxes (rf 291, stride 32, padding 145) divided by s and scales 1 / s; then
  all scales are concatenated and the top input_max_feature_num by attention are
  returned through non_max_suppression with iou 1.0 (sorted by decreasing score).
DELG (`--kind=delg`) adds input_global_scales_ind and global_descriptors
[S', 2048] (GeM p=3 of each scale's feature map, then a dense layer), and its
local features are 128-D. DELF (`--kind=delf`) also writes the release's
`pca/` folder (mean.datum, pca_proj_mat.datum, pca_vars.datum) beside `model/`.

Building uses process-wide TF1 switches (v1 control flow, graph mode), so
callers in a TF2 process use `build_in_subprocess`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

RECEPTIVE_FIELD = (291.0, 32.0, 145.0)  # size, stride, padding of resnet_v1_50/block3
# The attention head's output bias: softplus scores land around the reference thresholds.
ATTENTION_BIAS = 150.0
ATTENTION_GAIN = 40.0  # spreads the scores over tens of units
GLOBAL_DIM = 2048
LOCAL_DIMS = {"delf": 1024, "delg": 128}


class _Weights:
    """Seeded random variables, created as TF1 ref or resource variables."""

    def __init__(self, seed: int, resource: bool):
        self.rng = np.random.default_rng(seed)
        self.resource = resource
        self.values: list[tuple[object, np.ndarray]] = []
        self.variables: dict[str, object] = {}

    def variable(self, name: str, value: np.ndarray):
        """The variable `name`, created (with `value`) on first use, reused afterwards."""
        import tensorflow as tf

        if name in self.variables:
            return self.variables[name]
        variable = tf.compat.v1.get_variable(
            name,
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
    ):
        """Conv (He-normal weights x gain), SAME padding as tf-slim's conv2d_same if stride > 1."""
        import tensorflow as tf

        channels = int(x.shape[-1])
        scale = gain * np.sqrt(2.0 / (kernel * kernel * channels))
        weights = self.variable(
            f"{name}/weights", self.rng.normal(0, scale, (kernel, kernel, channels, out))
        )
        if stride > 1 and kernel > 1:
            total = kernel - 1
            pad = [total // 2, total - total // 2]
            x = tf.pad(x, [[0, 0], pad, pad, [0, 0]])
            y = tf.nn.conv2d(x, weights, stride, "VALID")
        else:
            y = tf.nn.conv2d(x, weights, stride, "SAME")
        if bias is not None:
            y = y + self.variable(f"{name}/biases", np.full(out, bias))
        return y

    def batch_norm(self, name: str, x):
        import tensorflow as tf

        depth = int(x.shape[-1])
        gamma = self.variable(f"{name}/BatchNorm/gamma", self.rng.uniform(0.8, 1.2, depth))
        beta = self.variable(f"{name}/BatchNorm/beta", self.rng.normal(0, 0.05, depth))
        mean = self.variable(f"{name}/BatchNorm/moving_mean", self.rng.normal(0, 0.05, depth))
        variance = self.variable(
            f"{name}/BatchNorm/moving_variance", self.rng.uniform(0.8, 1.2, depth)
        )
        return tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, mean, variance, epsilon=1e-5, is_training=False
        )[0]

    def conv_bn(self, name: str, x, out: int, kernel: int, stride: int = 1, relu: bool = True):
        import tensorflow as tf

        y = self.batch_norm(name, self.conv(name, x, out, kernel, stride))
        return tf.nn.relu(y) if relu else y


def _tiny_backbone(weights: _Weights, x):
    """Five stride-2 convs: stride 32, 256 channels."""
    for i, depth in enumerate((16, 32, 64, 128, 256)):
        x = weights.conv_bn(f"tiny/conv{i + 1}", x, depth, 3, stride=2)
    return x


def _resnet_v1_50_block3(weights: _Weights, x):
    """tf-slim resnet_v1_50 up to block3 (stride in each block's last unit): stride 32."""
    import tensorflow as tf

    x = weights.conv_bn("resnet_v1_50/conv1", x, 64, 7, stride=2)
    x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    for block, (units, depth) in enumerate(((3, 256), (4, 512), (6, 1024)), start=1):
        for unit in range(1, units + 1):
            name = f"resnet_v1_50/block{block}/unit_{unit}/bottleneck_v1"
            stride = 2 if unit == units else 1
            if int(x.shape[-1]) == depth:
                shortcut = x if stride == 1 else tf.nn.max_pool2d(x, 1, stride, "SAME")
            else:
                shortcut = weights.conv_bn(f"{name}/shortcut", x, depth, 1, stride, relu=False)
            y = weights.conv_bn(f"{name}/conv1", x, depth // 4, 1)
            y = weights.conv_bn(f"{name}/conv2", y, depth // 4, 3, stride=stride)
            y = weights.conv_bn(f"{name}/conv3", y, depth, 1, relu=False)
            x = tf.nn.relu(shortcut + y)
    return x


def _network(weights: _Weights, image, kind: str, size: str):
    """float [1, h, w, 3] -> (local features [1, h', w', D], attention [1, h', w', 1], map)."""
    import tensorflow as tf

    backbone = _tiny_backbone if size == "tiny" else _resnet_v1_50_block3
    feature_map = backbone(weights, image)
    local = weights.conv(f"local/{kind}", feature_map, LOCAL_DIMS[kind], 1, bias=0.0)
    hidden = weights.conv_bn("attention_block/attention/compute/conv1", feature_map, 512, 1)
    logits = weights.conv(
        "attention_block/attention/compute/conv2",
        hidden,
        1,
        1,
        bias=ATTENTION_BIAS,
        gain=ATTENTION_GAIN,
    )
    return local, tf.nn.softplus(logits), feature_map


def _receptive_boxes(height, width, scale):
    """[h * w, 4] (ymin, xmin, ymax, xmax) of each feature map cell, divided by `scale`."""
    import tensorflow as tf

    size, stride, padding = RECEPTIVE_FIELD
    y, x = tf.meshgrid(tf.range(height), tf.range(width), indexing="ij")
    grid = tf.cast(tf.reshape(tf.stack([y, x], axis=-1), [-1, 2]), tf.float32)
    boxes = stride * tf.concat([grid, grid], axis=1)
    boxes += tf.constant([-padding, -padding, -padding + size - 1, -padding + size - 1])
    return boxes / scale


def build(output_dir: str | os.PathLike, kind: str, size: str, seed: int, resource: bool) -> Path:
    """Writes the release folder (see the module docstring); returns the SavedModel folder."""
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    tf.compat.v1.disable_control_flow_v2()
    root = Path(output_dir)
    model_dir = root / "model" if kind == "delf" else root
    weights = _Weights(seed, resource)
    dim = LOCAL_DIMS[kind]
    graph = tf.Graph()
    with graph.as_default():
        image = tf.compat.v1.placeholder(tf.uint8, [None, None, 3], name="input_image")
        scales = tf.compat.v1.placeholder(tf.float32, [None], name="input_scales")
        threshold = tf.compat.v1.placeholder(tf.float32, [], name="input_abs_thres")
        max_features = tf.compat.v1.placeholder(tf.int32, [], name="input_max_feature_num")
        pixels = (tf.cast(image, tf.float32) - 128.0) / 128.0
        original = tf.cast(tf.shape(pixels)[:2], tf.float32)
        # Create the variables outside the loop (the loop body reuses them).
        _network(weights, tf.zeros([1, 64, 64, 3]), kind, size)
        channels = 256 if size == "tiny" else 1024
        global_weights = weights.variable(
            "global/embedding/weights",
            weights.rng.normal(0, 1 / np.sqrt(channels), (channels, GLOBAL_DIM)),
        )

        def body(i, boxes, features, level_scales, scores, globals_):
            scale = scales[i]
            new_size = tf.cast(tf.round(original * scale), tf.int32)
            resized = tf.compat.v1.image.resize_bilinear(pixels[None], new_size)
            local, attention, feature_map = _network(weights, resized, kind, size)
            height, width = tf.shape(attention)[1], tf.shape(attention)[2]
            attention = tf.reshape(attention, [-1])
            keep = tf.reshape(tf.where(attention >= threshold), [-1])
            level_boxes = tf.gather(_receptive_boxes(height, width, scale), keep)
            level_features = tf.gather(tf.reshape(local, [-1, dim]), keep)
            count = tf.shape(keep)[:1]
            pooled = tf.reduce_mean(tf.maximum(feature_map, 1e-6) ** 3.0, axis=[1, 2]) ** (1 / 3)
            return (
                i + 1,
                tf.concat([boxes, level_boxes], 0),
                tf.concat([features, level_features], 0),
                tf.concat([level_scales, tf.fill(count, 1.0 / scale)], 0),
                tf.concat([scores, tf.gather(attention, keep)], 0),
                tf.concat([globals_, tf.matmul(pooled, global_weights)], 0),
            )

        loop = tf.compat.v1.while_loop(
            lambda i, *_: i < tf.shape(scales)[0],
            body,
            (
                tf.constant(0),
                tf.zeros([0, 4]),
                tf.zeros([0, dim]),
                tf.zeros([0]),
                tf.zeros([0]),
                tf.zeros([0, GLOBAL_DIM]),
            ),
            shape_invariants=(
                tf.TensorShape([]),
                tf.TensorShape([None, 4]),
                tf.TensorShape([None, dim]),
                tf.TensorShape([None]),
                tf.TensorShape([None]),
                tf.TensorShape([None, GLOBAL_DIM]),
            ),
            back_prop=False,
        )
        _, boxes, features, level_scales, scores, globals_ = loop
        count = tf.minimum(max_features, tf.shape(scores)[0])
        selected = tf.image.non_max_suppression(boxes, scores, count, iou_threshold=1.0)
        tf.gather(boxes, selected, name="boxes")
        tf.gather(features, selected, name="features")
        tf.gather(level_scales, selected, name="scales")
        tf.expand_dims(tf.gather(scores, selected), 1, name="scores")
        if kind == "delg":
            indices = tf.compat.v1.placeholder(tf.int32, [None], name="input_global_scales_ind")
            tf.gather(globals_, indices, name="global_descriptors")
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for variable, value in weights.values:
                variable.load(value, session)
            builder = tf.compat.v1.saved_model.Builder(str(model_dir))
            builder.add_meta_graph_and_variables(session, [tf.saved_model.SERVING])
            builder.save()
    if kind == "delf":
        _write_pca(root / "pca", seed, dim)
    return model_dir


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
) -> Path:
    """`build` in a fresh Python process (its TF1 switches stay there); returns the folder."""
    return build_many_in_subprocess([(output_dir, kind, size, seed, resource)])[0]


def build_many_in_subprocess(specs: list[tuple]) -> list[Path]:
    """Several releases, [(output_dir, kind, size, seed, resource)], in one fresh process."""
    calls = "; ".join(
        f"build({str(out)!r}, {kind!r}, {size!r}, {seed}, {resource})"
        for out, kind, size, seed, resource in specs
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
    parser.add_argument("--kind", choices=sorted(LOCAL_DIMS), default="delf")
    parser.add_argument("--size", choices=["tiny", "resnet50"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resource_variables", action="store_true", help="resource (not ref) TF1 variables"
    )
    args = parser.parse_args(argv)
    build(args.output_dir, args.kind, args.size, args.seed, args.resource_variables)


if __name__ == "__main__":
    main()
