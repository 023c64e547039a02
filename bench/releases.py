"""Extraction through a released reference model: this project vs the reference's way.

Three ways to run the same release on the same photos, in one run:
- reference: `tf.saved_model.load(path).prune(feeds, fetches)` and numpy
  post-processing, as the reference extractor does (`delf_tf.releases.reference`);
- in_process: `delf extract --model=RELEASE` (the release's graph inside the one
  extraction graph: size limits, network, post-processing all in TensorFlow);
- served: the `delf export` of the release behind `delf serve` (gRPC), the file's
  own bytes in one request per photo;
- converted / converted_bfloat16: the release converted to its Keras architecture
  (`delf convert`) in the same extraction graph, in float32 and bfloat16, with its
  parity to in_process (keypoints within 0.01 px at the same level, smallest
  descriptor cosine, global cosine: acceptance >= 0.99, 0.9999, 0.9999 in float32).
Prints JSON: median seconds per photo of each (after a warm-up photo), the ratios to
the reference, and the largest feature difference to the reference (the modes must
agree: same keypoints, descriptors to 1e-5).

    python bench/releases.py --images=../shared/data/landmarks-dev/images --num_images=5

Without --release, a synthetic DELG release of ResNet50 size (random weights; the
releases cannot be downloaded here) is written to a temporary folder first; on a
machine with the real folders pass --release=/path/to/r50delg_gld_20200814.
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
flags.DEFINE_string("release", None, "a release folder (default: build a synthetic one)")
flags.DEFINE_enum("kind", "delg", ["delf", "delg"], "kind of the synthetic release")
flags.DEFINE_string("images", None, "folder of photos (required)")
flags.DEFINE_integer("num_images", 5, "photos measured (plus one warm-up)")
flags.DEFINE_float(
    "score_threshold", None, "override of the preset's threshold (random weights score low)"
)
flags.DEFINE_list(
    "modes",
    ["reference", "in_process", "served", "converted", "converted_bfloat16"],
    "what to measure",
)
flags.mark_flag_as_required("images")


def max_difference(features, reference: dict) -> dict:
    import numpy as np

    if len(features) != len(reference["scores"]):
        return {"count": [len(features), len(reference["scores"])]}
    order_a = np.lexsort((features.keypoints[:, 1], features.keypoints[:, 0], features.scales))
    order_b = np.lexsort(
        (reference["keypoints"][:, 1], reference["keypoints"][:, 0], reference["scales"])
    )
    return {
        "keypoints_px": float(
            np.abs(features.keypoints[order_a] - reference["keypoints"][order_b]).max(initial=0)
        ),
        "descriptors": float(
            np.abs(features.descriptors[order_a] - reference["descriptors"][order_b]).max(initial=0)
        ),
    }


def main(argv: list[str]) -> None:
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from delf_tf.extraction.extractor import build_extractor
    from delf_tf.extraction.pca import PcaParams
    from delf_tf.images import list_images, load_image
    from delf_tf.releases.folder import find_release
    from delf_tf.releases.reference import ReferenceExtractor, ReferenceSettings
    from delf_tf.testing.synthetic_releases import build_in_subprocess

    scratch = Path(tempfile.mkdtemp(prefix="bench_releases_"))
    release_dir = FLAGS.release
    if release_dir is None:
        name = "r50delg_gld_20200814" if FLAGS.kind == "delg" else "delf_gld_20190411"
        release_dir = build_in_subprocess(scratch / name, kind=FLAGS.kind, size="resnet50")
    paths = list_images(FLAGS.images)[: FLAGS.num_images + 1]
    photos = [load_image(path) for path in paths]
    overrides = {}
    if FLAGS.score_threshold is not None:
        overrides["score_threshold"] = FLAGS.score_threshold
    extractor = build_extractor(model=release_dir, overrides=overrides)
    config = extractor.config
    release = find_release(release_dir)
    pca = None
    if extractor.describe()["pca"]:
        pca = PcaParams.from_datum_folder(release.pca_dir)
    report = {
        "release": str(release_dir),
        "synthetic": FLAGS.release is None,
        "kind": release.kind,
        "photos": len(photos) - 1,
        "image_sizes": sorted({f"{p.shape[1]}x{p.shape[0]}" for p in photos}),
        "extraction_config": config.to_dict(),
        "seconds_per_photo": {},
    }
    runners, inputs, server = {}, {}, None
    try:
        if "reference" in FLAGS.modes:
            reference = ReferenceExtractor(release, ReferenceSettings.from_config(config, pca))
            runners["reference"], inputs["reference"] = reference.extract, photos
        if "in_process" in FLAGS.modes:
            runners["in_process"], inputs["in_process"] = extractor.extract, photos
        for mode, precision in (("converted", "float32"), ("converted_bfloat16", "bfloat16")):
            if mode in FLAGS.modes:
                from delf_tf.extraction.extractor import InProcessExtractor
                from delf_tf.releases.convert import convert_release

                model = convert_release(release_dir).model
                converted = InProcessExtractor.from_model(
                    model, config.replace(precision=precision), pca
                )
                runners[mode], inputs[mode] = converted.extract, photos
        if "served" in FLAGS.modes:
            from delf_tf.export import export_saved_model
            from delf_tf.serving.client import ServingExtractor

            export = export_saved_model(extractor.module, scratch / "models")
            server, port, _ = start_server(export.parent)
            client = ServingExtractor(f"127.0.0.1:{port}", timeout=600)
            runners["served"] = lambda data: client.extract_batch([data])[0]
            inputs["served"] = [Path(path).read_bytes() for path in paths]
        report["seconds_per_photo"], results = interleaved(runners, inputs)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    medians = {mode: statistics.median(s) for mode, s in report["seconds_per_photo"].items()}
    report["median_seconds_per_photo"] = {mode: round(m, 3) for mode, m in medians.items()}
    if "reference" in medians:
        report["ratio_to_reference"] = {
            mode: round(m / medians["reference"], 3) for mode, m in medians.items()
        }
        report["max_difference_to_reference"] = {
            mode: [max_difference(f, r) for f, r in zip(found, results["reference"], strict=True)]
            for mode, found in results.items()
            if mode != "reference"
        }
    if "in_process" in results:
        from delf_tf.releases.convert import feature_parity

        for mode in ("converted", "converted_bfloat16"):
            if mode in results:
                rows = [
                    feature_parity(ours, theirs)
                    for ours, theirs in zip(results[mode], results["in_process"], strict=True)
                ]
                report.setdefault("parity_to_in_process", {})[mode] = {
                    "keypoints_min": min(row["keypoints"] for row in rows),
                    "descriptor_cosine_min": min(
                        (row["descriptor_cosine"] for row in rows if row["descriptor_cosine"]),
                        default=None,
                    ),
                    "global_cosine_min": min(
                        (row["global_cosine"] for row in rows if row["global_cosine"]),
                        default=None,
                    ),
                }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
