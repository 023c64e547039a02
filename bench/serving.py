"""Round-trip latency and throughput through `delf serve` (gRPC, REST) vs in-process extraction.

Same SavedModel, same images, same concurrency (1, 4, 8 client threads) for all three
back ends; the server runs in its own process, as a real deployment would. Prints JSON:
per back end and concurrency the median / p90 latency per image and images per second,
and the ratios serving / in-process (latency ratio > 1 = slower, throughput ratio < 1
= fewer images per second).

    python bench/serving.py --images=../shared/data/landmarks-dev/images --num_images=8

Without --export, a model with random weights is exported to a temporary directory
with the settings of --max_image_size / --scales / --max_features (extraction cost
does not depend on the weights). Note: `delf serve` is the Python stand-in, not TF
Serving; the numbers show protocol and serialisation overhead on top of the graph.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from absl import app, flags
from common import start_server

FLAGS = flags.FLAGS
flags.DEFINE_string("export", None, "model dir or version dir of an export (default: make one)")
flags.DEFINE_string("images", None, "folder of images (default: scikit-image sample photos)")
flags.DEFINE_integer("num_images", 8, "number of images used")
flags.DEFINE_list("clients", ["1", "4", "8"], "concurrent client threads")
flags.DEFINE_integer("rounds", 2, "passes over the images per concurrency level")
flags.DEFINE_integer("max_image_size", 512, "ExtractionConfig.max_image_size of a made export")
flags.DEFINE_list("scales", ["0.5", "0.7071", "1.0"], "pyramid scales of a made export")
flags.DEFINE_integer("max_features", 1000, "ExtractionConfig.max_features of a made export")
flags.DEFINE_list("protocols", ["grpc", "rest"], "served back ends to measure")


def load_images(folder: str | None, count: int):
    import numpy as np

    from delf_tf.images import list_images, load_image

    if folder:
        return [load_image(path) for path in list_images(folder)[:count]]
    import skimage.data

    samples = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    samples += [np.repeat(skimage.data.camera()[:, :, None], 3, axis=2)]
    return [samples[i % len(samples)] for i in range(count)]


def make_export(base: Path) -> Path:
    from delf_tf.config import ExtractionConfig
    from delf_tf.export import export_model
    from delf_tf.model.delf import build_delf_model

    config = ExtractionConfig(
        max_image_size=FLAGS.max_image_size,
        scales=tuple(float(s) for s in FLAGS.scales),
        max_features=FLAGS.max_features,
        score_threshold=0.0,
    )
    return export_model(build_delf_model(seed=0), base, config)


def measure(extract, images, clients: int, rounds: int) -> dict:
    """Runs rounds x len(images) extractions on `clients` threads: latency and throughput."""
    work = [images[i % len(images)] for i in range(rounds * len(images))]
    latencies = []

    def one(image):
        start = time.perf_counter()
        extract(image)
        latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, work))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "median_ms": round(1000 * statistics.median(latencies), 1),
        "p90_ms": round(1000 * latencies[int(0.9 * (len(latencies) - 1))], 1),
        "images_per_s": round(len(work) / elapsed, 3),
    }


def folder_extraction(client, images, scratch: Path) -> dict:
    """`delf extract --server` over a folder of JPEG files, the two ways it has worked:
    before: each file decoded here, re-encoded as PNG, one image per request;
    after: the files' own bytes, `batch_size` per request (ServingExtractor.extract_encoded).
    """
    import io

    from PIL import Image

    from delf_tf.images import decode_image

    files = []
    for index, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=90)
        path = scratch / f"{index}.jpg"
        path.write_bytes(buffer.getvalue())
        files.append(path)

    def before():
        for path in files:
            client.extract(decode_image(path.read_bytes()))

    def after():
        client.extract_encoded([path.read_bytes() for path in files])

    seconds = {"before_png_one_per_request": [], "after_bytes_batched": []}
    for _ in range(FLAGS.rounds):
        for name, run in (("before_png_one_per_request", before), ("after_bytes_batched", after)):
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    rates = {name: round(len(files) / statistics.median(s), 3) for name, s in seconds.items()}
    return {
        "files": len(files),
        "batch_size": client.batch_size,
        "images_per_s": rates,
        "throughput_ratio_after_to_before": round(
            rates["after_bytes_batched"] / rates["before_png_one_per_request"], 3
        ),
    }


def main(argv: list[str]) -> int:
    del argv
    from delf_tf.contract import resolve_version_dir as resolve_saved_model_dir
    from delf_tf.extraction import InProcessExtractor
    from delf_tf.serving.client import ServingExtractor

    images = load_images(FLAGS.images, FLAGS.num_images)
    clients = [int(c) for c in FLAGS.clients]
    with tempfile.TemporaryDirectory() as scratch:
        version_dir = resolve_saved_model_dir(FLAGS.export or make_export(Path(scratch)).parent)
        local = InProcessExtractor.from_saved_model(version_dir)
        local.extract(images[0])  # warm-up, as the server's warm-up request does
        backends = {"in_process": local.extract}
        process, grpc_port, rest_port = start_server(
            version_dir.parent, "--file_system_poll_wait_seconds=0", "--grpc_max_threads=16"
        )
        try:
            ports = {"grpc": grpc_port, "rest": rest_port}
            for protocol in FLAGS.protocols:
                served = ServingExtractor(f"127.0.0.1:{ports[protocol]}", protocol=protocol)
                served.extract(images[0])
                backends[protocol] = served.extract
            results = {
                name: {str(c): measure(fn, images, c, FLAGS.rounds) for c in clients}
                for name, fn in backends.items()
            }
            folder = folder_extraction(
                ServingExtractor(f"127.0.0.1:{grpc_port}"), images, Path(scratch)
            )
        finally:
            process.terminate()
            process.wait(timeout=60)
    base = results["in_process"]
    ratios = {
        name: {
            c: {
                "latency": round(r["median_ms"] / base[c]["median_ms"], 3),
                "throughput": round(r["images_per_s"] / base[c]["images_per_s"], 3),
            }
            for c, r in runs.items()
        }
        for name, runs in results.items()
        if name != "in_process"
    }
    shapes = sorted({image.shape[:2] for image in images})
    summary = {
        "export": str(version_dir),
        "config": local.config.to_dict(),
        "images": len(images),
        "image_sizes": [list(s) for s in shapes],
        "rounds": FLAGS.rounds,
        "cpu_count": os.cpu_count(),
        "results": results,
        "ratios_vs_in_process": ratios,
        "folder_extraction_over_grpc": folder,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    app.run(main)
