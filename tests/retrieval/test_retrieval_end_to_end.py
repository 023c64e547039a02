"""Database of scikit-image photographs; transformed copies must retrieve their source."""

import numpy as np
import pytest
import skimage.data
from PIL import Image

from delf_tf.config import RetrievalConfig
from delf_tf.extraction.folder import extract_to_store
from delf_tf.images import load_image
from delf_tf.retrieval import Index, Searcher
from delf_tf.retrieval.queries import TRANSFORMS

DATABASE = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")
SOURCES = ("astronaut", "coffee", "rocket")
SIZE = 192  # long side of the database images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("database")
    for name in DATABASE:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        picture = Image.fromarray(image[:, :, :3])
        factor = SIZE / max(picture.size)
        picture = picture.resize((round(picture.width * factor), round(picture.height * factor)))
        picture.save(folder / f"{name}.png")
    return folder


def test_transformed_copies_retrieve_their_source(extractor, image_folder, tmp_path):
    store, summary = extract_to_store(
        extractor, image_folder, tmp_path / "features", progress=False
    )
    assert summary.extracted == len(DATABASE)
    Index.from_store(store, image_folder, progress=False).save(tmp_path / "index")
    index = Index.load(tmp_path / "index")
    index.check_fingerprint(extractor.fingerprint)
    searcher = Searcher(index, RetrievalConfig(top_k=3))
    for name in SOURCES:
        source = load_image(image_folder / f"{name}.png")
        for transform, function in TRANSFORMS.items():
            results = searcher.search(extractor.extract(function(source)))
            ranking = [(r.key, r.inliers) for r in results]
            assert results[0].key == f"{name}.png", (transform, ranking)
            assert results[0].inliers > results[1].inliers, (transform, ranking)
