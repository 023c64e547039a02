"""Seconds per photo of DELF extraction: this project's graph against the reference's way
and against the bare network (the floor), on real photos, in one run.

Modes (same DelfModel, same weights, same photos, same settings):
- floor: the bare network on the same pyramid (each level resized and run through
  the backbone and attention head; nothing selected): no extractor can be faster;
- reference_style: the network driven the way the reference extractor drives it
  (OFFICIAL_DELF.md): Pillow resize to the size limit, then one tf.function with a
  tf.while_loop over the scales that concatenates every location above the
  threshold with its receptive box, non_max_suppression(iou 1.0) for the top-K,
  and numpy post-processing (box centres / resize factors, L2, PCA, L2);
- in_process: `delf extract` (delf_tf.extraction: the one extraction graph, its
  backbone with batch normalisation folded into the convolutions);
- in_process_unfolded: the same graph around the model as trained (no folding);
- saved_model: the `delf export` of the same model, loaded in process;
- served: that export behind `delf serve` (gRPC), the file's own bytes per request;
- in_process_<precision>: with --precision=bfloat16/float16, the same extractor with
  the network in reduced precision, plus its fidelity to float32 (share of identical
  keypoints, descriptor cosine median and 1st percentile of matched keypoints).
Prints JSON: median seconds per photo (after a warm-up photo), ratios to the floor and
to reference_style, the share of time outside the network, the largest feature
difference between modes.

    python bench/extraction.py --images=../shared/data/landmarks-dev/images --num_images=4

Random weights (the project ships no trained DELF): score_threshold 0 keeps the top-K
work that a trained model's threshold would (an untrained attention head scores far
below the paper's 100).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from absl import app, flags
from common import interleaved, start_server

FLAGS = flags.FLAGS
flags.DEFINE_string("images", None, "folder of photos")
flags.DEFINE_integer("num_images", 4, "photos measured (plus one warm-up)")
flags.DEFINE_string("model_config", None, "ModelConfig JSON (default: ResNet50)")
flags.DEFINE_enum("preset", "paper", ["paper", "fast"], "extraction settings")
flags.DEFINE_list(
    "modes",
    ["floor", "reference_style", "in_process", "saved_model", "served"],
    "what to measure",
)
flags.DEFINE_enum("precision", None, ["bfloat16", "float16"], "also measure this precision")
flags.mark_flag_as_required("images")


def reference_style_extractor(model, config, receptive_field):
    """The reference extractor's way around the same Keras model (see the module docstring)."""
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    size, stride, padding = receptive_field

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, 3], tf.uint8),
            tf.TensorSpec([None], tf.float32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([], tf.int32),
        ],
        autograph=False,
    )
    def run(image, scales, threshold, max_features):
        pixels = tf.cast(image, tf.float32)
        hw = tf.cast(tf.shape(image)[:2], tf.float32)

        def body(i, boxes, features, level_scales, scores):
            scale = scales[i]
            resized = tf.image.resize(pixels, tf.cast(tf.round(hw * scale), tf.int32))
            level_features, attention = model.features_and_attention(resized[None])
            h, w = tf.shape(attention)[1], tf.shape(attention)[2]
            y, x = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
            grid = tf.cast(tf.reshape(tf.stack([y, x], -1), [-1, 2]), tf.float32)
            level_boxes = stride * tf.concat([grid, grid], 1) + tf.constant(
                [-padding, -padding, -padding + size - 1, -padding + size - 1], tf.float32
            )
            attention = tf.reshape(attention, [-1])
            keep = tf.reshape(tf.where(attention >= threshold), [-1])
            depth = level_features.shape[-1]
            return (
                i + 1,
                tf.concat([boxes, tf.gather(level_boxes, keep) / scale], 0),
                tf.concat([features, tf.gather(tf.reshape(level_features, [-1, depth]), keep)], 0),
                tf.concat([level_scales, tf.fill(tf.shape(keep)[:1], 1.0 / scale)], 0),
                tf.concat([scores, tf.gather(attention, keep)], 0),
            )

        depth = model.feature_depth
        _, boxes, features, level_scales, scores = tf.while_loop(
            lambda i, *_: i < tf.shape(scales)[0],
            body,
            (tf.constant(0), tf.zeros([0, 4]), tf.zeros([0, depth]), tf.zeros([0]), tf.zeros([0])),
            shape_invariants=(
                tf.TensorShape([]),
                tf.TensorShape([None, 4]),
                tf.TensorShape([None, depth]),
                tf.TensorShape([None]),
                tf.TensorShape([None]),
            ),
        )
        count = tf.minimum(max_features, tf.shape(scores)[0])
        selected = tf.image.non_max_suppression(boxes, scores, count, iou_threshold=1.0)
        return (
            tf.gather(boxes, selected),
            tf.gather(features, selected),
            tf.gather(level_scales, selected),
            tf.gather(scores, selected),
        )

    def extract(image):
        height, width = image.shape[:2]
        factors = np.ones(2)
        if 0 <= config.max_image_size < max(height, width):
            factor = config.max_image_size / max(height, width)
            new = (int(round(width * factor)), int(round(height * factor)))
            image = np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))
            factors = np.array([new[1] / height, new[0] / width])
        boxes, features, scales, scores = (
            value.numpy()
            for value in run(
                image,
                tf.constant(config.scales, tf.float32),
                tf.constant(config.score_threshold, tf.float32),
                tf.constant(config.max_features, tf.int32),
            )
        )
        locations = (boxes[:, :2] + boxes[:, 2:]) / 2.0 / factors
        descriptors = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        return {
            "keypoints": locations[:, ::-1].astype(np.float32),
            "scales": scales,
            "scores": scores,
            "descriptors": descriptors.astype(np.float32),
        }

    return extract


def floor_function(model, config):
    """The bare network on the pyramid: resize + backbone + attention per level."""
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, 3], tf.uint8),
            tf.TensorSpec([None], tf.float32),
        ],
        autograph=False,
    )
    def run(image, scales):
        pixels = tf.cast(image, tf.float32)
        hw = tf.cast(tf.shape(image)[:2], tf.float32)

        def body(i, total):
            resized = tf.image.resize(pixels, tf.cast(tf.round(hw * scales[i]), tf.int32))
            features, attention = model.features_and_attention(resized[None])
            return i + 1, total + tf.reduce_sum(attention) + tf.reduce_sum(features[..., :1])

        return tf.while_loop(lambda i, _: i < tf.shape(scales)[0], body, (0, 0.0))[1]

    def floor(image):
        height, width = image.shape[:2]
        if 0 <= config.max_image_size < max(height, width):
            factor = config.max_image_size / max(height, width)
            new = (int(round(width * factor)), int(round(height * factor)))
            image = np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))
        return float(run(image, tf.constant(config.scales, tf.float32)))

    return floor


def as_dict(features) -> dict:
    if isinstance(features, dict):
        return features
    return {
        name: getattr(features, name) for name in ("keypoints", "scales", "scores", "descriptors")
    }


def compare(a, b) -> dict:
    """Matched by (x, y, scale): share of identical keypoints, descriptor cosines, max diff."""
    import numpy as np

    a, b = as_dict(a), as_dict(b)
    key = lambda f: {  # noqa: E731
        (round(float(x), 2), round(float(y), 2), round(float(s), 4)): i
        for i, ((x, y), s) in enumerate(zip(f["keypoints"], f["scales"], strict=True))
    }
    ka, kb = key(a), key(b)
    shared = sorted(set(ka) & set(kb))
    if not shared:
        return {"identical_keypoints": 0.0}
    ia = np.array([ka[k] for k in shared])
    ib = np.array([kb[k] for k in shared])
    cosine = np.sum(a["descriptors"][ia] * b["descriptors"][ib], axis=1)
    return {
        "identical_keypoints": round(len(shared) / max(len(ka), len(kb)), 4),
        "cosine_median": round(float(np.median(cosine)), 6),
        "cosine_p01": round(float(np.percentile(cosine, 1)), 6),
        "max_descriptor_difference": float(
            np.abs(a["descriptors"][ia] - b["descriptors"][ib]).max()
        ),
    }


def main(argv: list[str]) -> None:
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from delf_tf.config import ModelConfig
    from delf_tf.extraction.extractor import InProcessExtractor
    from delf_tf.images import list_images, load_image
    from delf_tf.model.delf import build_delf_model
    from delf_tf.presets import extraction_preset

    model_config = ModelConfig.load(FLAGS.model_config) if FLAGS.model_config else None
    model = build_delf_model(model_config, seed=0)
    config = extraction_preset(FLAGS.preset).replace(score_threshold=0.0)
    paths = list_images(FLAGS.images)[: FLAGS.num_images + 1]
    photos = [load_image(path) for path in paths]
    extractor = InProcessExtractor.from_model(model, config)
    from delf_tf.extraction.graph import ExtractionModule
    from delf_tf.extraction.keras_network import KerasNetwork

    unfolded = InProcessExtractor.from_module(
        ExtractionModule(KerasNetwork(model, fold_batch_norm=False), config)
    )
    network = extractor.module.network
    field = (network.rf_size, network.rf_stride, network.rf_padding)
    export = None
    report = {
        "model": model.config.to_dict(),
        "extraction_config": config.to_dict(),
        "photos": len(photos) - 1,
        "image_sizes": sorted({f"{p.shape[1]}x{p.shape[0]}" for p in photos}),
        "seconds_per_photo": {},
    }
    runners = {
        "floor": lambda: floor_function(model, config),
        "reference_style": lambda: reference_style_extractor(model, config, field),
        "in_process": lambda: extractor.extract,
        "in_process_unfolded": lambda: unfolded.extract,
    }
    if FLAGS.precision:
        reduced = InProcessExtractor.from_model(model, config.replace(precision=FLAGS.precision))
        runners[f"in_process_{FLAGS.precision}"] = lambda: reduced.extract
    scratch = Path(tempfile.mkdtemp(prefix="bench_extraction_"))
    chosen, inputs, server = {}, {}, None
    modes = list(FLAGS.modes) + ([f"in_process_{FLAGS.precision}"] if FLAGS.precision else [])
    try:
        for mode in modes:
            inputs[mode] = photos
            if mode in runners:
                chosen[mode] = runners[mode]()
            elif mode in ("saved_model", "served"):
                from delf_tf.export import export_saved_model

                if export is None:
                    export = export_saved_model(extractor.module, scratch / "models")
                if mode == "saved_model":
                    chosen[mode] = InProcessExtractor.from_saved_model(export).extract
                else:
                    from delf_tf.serving.client import ServingExtractor

                    server, port, _ = start_server(export.parent)
                    client = ServingExtractor(f"127.0.0.1:{port}", timeout=600)
                    chosen[mode] = lambda data, client=client: client.extract_batch([data])[0]
                    inputs[mode] = [Path(path).read_bytes() for path in paths]
            else:
                raise app.UsageError(f"unknown mode {mode}")
        report["seconds_per_photo"], results = interleaved(chosen, inputs)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    if FLAGS.precision:
        mode = f"in_process_{FLAGS.precision}"
        report["fidelity_to_float32"] = [
            compare(a, b) for a, b in zip(results["in_process"], results[mode], strict=True)
        ]
    medians = {mode: statistics.median(s) for mode, s in report["seconds_per_photo"].items()}
    report["median_seconds_per_photo"] = {mode: round(m, 3) for mode, m in medians.items()}
    for baseline in ("floor", "reference_style"):
        if baseline in medians:
            report[f"ratio_to_{baseline}"] = {
                mode: round(m / medians[baseline], 3) for mode, m in medians.items()
            }
    if "floor" in medians and "in_process" in medians:
        report["share_outside_network"] = round(1 - medians["floor"] / medians["in_process"], 3)
    if "reference_style" in results:
        report["difference_to_reference_style"] = {
            mode: [compare(a, b) for a, b in zip(found, results["reference_style"], strict=True)]
            for mode, found in results.items()
            if mode not in ("floor", "reference_style")
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
