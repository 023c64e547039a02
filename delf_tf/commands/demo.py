"""`delf demo`: the whole pipeline on an embedded default, offline, in a minute or two.

1. writes photographs that ship with scikit-image into <output>/images;
2. extracts their features in process with a seeded random DelfModel, fits PCA
   on them and extracts again with PCA in the graph (as `delf fit-pca` does);
3. builds the global index;
4. queries it with rotated, scaled, cropped and recoloured copies of some of
   them, prints the ranked results with inlier counts;
5. writes a picture of a query against its best matches (<output>/match.png).
Every step skips what an earlier run left in <output>.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from absl import flags
from PIL import Image

from delf_tf.config import ExtractionConfig, RetrievalConfig

# Photographs that ship inside the scikit-image wheel (no download).
SKIMAGE_IMAGES = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "rocket",
    "moon",
    "page",
    "text",
    "clock",
    "hubble_deep_field",
    "immunohistochemistry",
    "brick",
    "gravel",
    "retina",
)
QUERY_SOURCES = ("astronaut", "coffee", "rocket", "camera")
PCA_DIM = ExtractionConfig.pca_dim


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string(
        "output_dir", "demo_output", "folder for images, features, index and pictures", **define
    )
    flags.DEFINE_integer(
        "max_image_size", 320, "long side of the database images (smaller is faster)", **define
    )
    flags.DEFINE_integer("seed", 0, "seed of the random weights", **define)


def write_skimage_images(folder: Path, max_size: int) -> list[Path]:
    """Saves the scikit-image photographs as PNG, long side <= max_size; returns paths."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SKIMAGE_IMAGES:
        path = folder / f"{name}.png"
        if not path.exists():
            image = np.asarray(getattr(skimage.data, name)())
            if image.ndim == 2:
                image = np.repeat(image[:, :, None], 3, axis=2)
            picture = Image.fromarray(image[:, :, :3].astype(np.uint8))
            factor = max_size / max(picture.size)
            if factor < 1:
                size = (round(picture.width * factor), round(picture.height * factor))
                picture = picture.resize(size, Image.Resampling.LANCZOS)
            picture.save(path)
        paths.append(path)
    return paths


def write_queries(images: Path, folder: Path) -> list[tuple[str, str, Path]]:
    """Transformed copies of QUERY_SOURCES; [(source key, transform, path)]."""
    from delf_tf.images import load_image
    from delf_tf.retrieval.queries import TRANSFORMS

    folder.mkdir(parents=True, exist_ok=True)
    queries = []
    for name in QUERY_SOURCES:
        source = load_image(images / f"{name}.png")
        for transform, function in TRANSFORMS.items():
            path = folder / f"{name}_{transform}.png"
            if not path.exists():
                Image.fromarray(function(source)).save(path)
            queries.append((f"{name}.png", transform, path))
    return queries


def say(text: str) -> None:
    """Progress for the person watching (stderr; stdout carries the JSON summary)."""
    print(text, file=sys.stderr)


def run(flag_values: flags.FlagValues) -> int:
    from delf_tf.extraction.extractor import build_extractor
    from delf_tf.extraction.folder import extract_to_store
    from delf_tf.extraction.pca import fit_pca
    from delf_tf.images import load_image
    from delf_tf.matching.visualize import save_picture
    from delf_tf.presets import extraction_preset
    from delf_tf.retrieval.index import Index
    from delf_tf.retrieval.search import Searcher
    from delf_tf.retrieval.visualize import draw_results

    output = Path(flag_values.output_dir)
    seed = flag_values.seed
    # The fast preset (4 scales, 500 features) keeps the demo quick on a laptop.
    config = extraction_preset("fast").replace(
        score_threshold=0.0, max_image_size=flag_values.max_image_size
    )
    output.mkdir(parents=True, exist_ok=True)  # a bad --output_dir fails before any work
    say(
        f"delf demo: the weights are UNTRAINED (random, seed {seed}), not a trained DELF "
        "model; score_threshold=0 keeps the top-K of an untrained attention head. "
        "Random convolutions still match an image to a transformed copy of itself, "
        "but the numbers show the pipeline, not DELF's retrieval quality."
    )
    images = output / "images"
    write_skimage_images(images, flag_values.max_image_size)

    say("1/4 raw 1024-D features -> PCA")
    pca_path = output / "pca.npz"
    if not pca_path.exists():
        raw = build_extractor(weights="random", seed=seed, config=config)
        raw_store, _ = extract_to_store(raw, images, output / "features_raw")
        descriptors = [raw_store.load(key).descriptors for key in raw_store.stored_keys()]
        fit_pca(np.concatenate(descriptors), PCA_DIM).save(pca_path)

    say(f"2/4 {PCA_DIM}-D features (PCA in the graph)")
    extractor = build_extractor(weights="random", seed=seed, config=config, pca=pca_path)
    store, summary = extract_to_store(extractor, images, output / "features")
    say(json.dumps({"features": str(store.root), **summary.to_dict()}))

    say("3/4 global index")
    Index.from_store(store, images_root=images).save(output / "index")
    index = Index.load(output / "index")
    index.check_fingerprint(extractor.fingerprint)
    say(f"  {index.num_images} images, {index.num_descriptors} descriptors x {index.dim}")

    say("4/4 queries (transformed copies of database images)")
    retrieval = RetrievalConfig(top_k=3)
    searcher = Searcher(index, retrieval)
    say(f"  {'query':<26} {'right':<6} top 3 as image:inliers/votes")
    rows, correct, picture_drawn = [], 0, False
    for source, transform, path in write_queries(images, output / "queries"):
        query_image = load_image(path)
        results = searcher.search(extractor.extract(query_image))
        hit = bool(results) and results[0].key == source
        correct += hit
        ranked = ", ".join(f"{r.key.removesuffix('.png')}:{r.inliers}/{r.votes}" for r in results)
        say(f"  {path.name:<26} {'yes' if hit else 'NO':<6} {ranked}")
        rows.append(
            {
                "query": str(path),
                "source": source,
                "transform": transform,
                "correct": hit,
                "results": [r.to_dict() for r in results],
            }
        )
        if not picture_drawn and results:
            save_picture(draw_results(query_image, results), output / "match.png")
            picture_drawn = True
    say(
        f"top-1 right for {correct} of {len(rows)} queries (untrained weights); "
        f"match picture: {output / 'match.png'}"
    )
    (output / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(
        json.dumps(
            {
                "output_dir": str(output),
                "queries": len(rows),
                "top1_correct": correct,
                "results": str(output / "results.json"),
                "match_picture": str(output / "match.png"),
            }
        )
    )
    return 0
