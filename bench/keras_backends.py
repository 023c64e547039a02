"""Every Keras architecture on the JAX backend: the 7-scale pyramid of a 1024x768 image.

Builds the paper's DelfModel (ResNet50 conv4 + attention), tf-slim resnet_v1_50
(delf_gld_20190411) and the reference TF2 ResNet50 with DELG heads (the DELG
releases) at full size with random weights, under KERAS_BACKEND=jax, and times one
image's pyramid (scales 0.25 .. 2.0, bilinear resize + network per level, jitted
`stateless_call`, compile time excluded) in float32 and mixed_bfloat16. Median of
--repeats runs, in milliseconds; prints JSON.

It imports keras, numpy and jax only (never TensorFlow, never absl): it runs on a
GPU machine that has JAX but no TensorFlow, with the keras, namex and optree wheels.

    KERAS_BACKEND=jax python bench/keras_backends.py [--device_check]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from delf_tf.config import DEFAULT_SCALES, ModelConfig  # noqa: E402

ARCHITECTURES = ("delf", "resnet_v1_50", "delg_resnet50")


def build(architecture: str, size: str, precision: str):
    from delf_tf.model.delf import DelfModel
    from delf_tf.model.reference_nets import ReferenceModel

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        keras.utils.set_random_seed(0)
        if architecture == "delf":
            config = ModelConfig(backbone=size, feature_depth=1024 if size == "resnet50" else 64)
            return DelfModel(**config.to_dict())
        return ReferenceModel(architecture=architecture, backbone=size)
    finally:
        keras.config.set_dtype_policy(previous)


def pyramid_function(model):
    """A jitted (trainable, non-trainable, image [H, W, 3], size) -> outputs of one level."""
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def level(trainable, frozen, image, size):
        resized = keras.ops.image.resize(image[None], size, interpolation="bilinear")
        outputs, _ = model.stateless_call(trainable, frozen, resized, training=False)
        return outputs

    jitted = jax.jit(level, static_argnums=(3,))
    return lambda image, size: jitted(trainable, frozen, image, size)


def time_pyramid(model, image: np.ndarray, repeats: int) -> dict:
    run = pyramid_function(model)
    image = jax.device_put(image.astype(np.float32))
    height, width = image.shape[:2]
    sizes = [(max(round(height * s), 1), max(round(width * s), 1)) for s in DEFAULT_SCALES]
    start = time.perf_counter()
    for size in sizes:  # compiles one program per level shape
        jax.block_until_ready(run(image, size))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = [run(image, size) for size in sizes]
        jax.block_until_ready(outputs)
        times.append((time.perf_counter() - start) * 1000.0)
    return {
        "pyramid_ms_median": round(statistics.median(times), 3),
        "pyramid_ms_min": round(min(times), 3),
        "compile_s": round(compile_s, 2),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device_check", action="store_true", help="a short run (3 repeats)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--size", choices=["resnet50", "tiny"], default="resnet50")
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument(
        "--precisions", default="float32,mixed_bfloat16", help="Keras dtype policies"
    )
    args = parser.parse_args(argv)
    repeats = 3 if args.device_check else args.repeats
    assert keras.backend.backend() == "jax", "run with KERAS_BACKEND=jax"
    image = np.random.default_rng(0).uniform(0, 255, (768, 1024, 3)).astype(np.float32)
    results = []
    for architecture in args.architectures.split(","):
        for precision in args.precisions.split(","):
            model = build(architecture, args.size, precision)
            row = {"architecture": architecture, "size": args.size, "precision": precision}
            row.update(time_pyramid(model, image, repeats))
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    report = {
        "benchmark": "keras_backends",
        "backend": keras.backend.backend(),
        "devices": [str(device) for device in jax.devices()],
        "jax": jax.__version__,
        "keras": keras.__version__,
        "machine": platform.machine(),
        "tensorflow_imported": "tensorflow" in sys.modules,
        "image": [768, 1024],
        "scales": list(DEFAULT_SCALES),
        "results": results,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
