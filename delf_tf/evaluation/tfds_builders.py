"""TFDS builders for Revisited Oxford5k and Paris6k, built offline from `manual_dir`.

The images and ground truth cannot be downloaded by TFDS (the Oxford and
Paris sites serve them by hand); put them in the manual directory:

    <manual_dir>/gnd_roxford5k.pkl   (or gnd_roxford5k.mat; gnd_rparis6k.* for RParis6k)
    <manual_dir>/jpg/*.jpg           (every database and query image)

then
    import delf_tf.evaluation.tfds_builders  # registers "roxford5k" and "rparis6k"
    builder = tfds.builder("roxford5k", data_dir=...)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=...))

Splits: "database" ({"id", "image"}) and "query" ({"id", "image" (whole),
"cropped_image" (cropped to the box, as the protocol extracts it), "bbox"
float32 [4] (x1, y1, x2, y2 pixels), "easy", "hard", "junk" (database ids)}).
The ground truth is read by `datasets.load_revisited` (restricted unpickler).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from delf_tf.errors import InputError
from delf_tf.evaluation.datasets import REVISITED_SETUPS, RetrievalDataset, load_dataset

_CITATION = """@inproceedings{radenovic2018revisiting,
  title={Revisiting Oxford and Paris: Large-Scale Image Retrieval Benchmarking},
  author={Radenovi{\\'c}, Filip and Iscen, Ahmet and Tolias, Giorgos and Avrithis, Yannis and Chum, Ond{\\v{r}}ej},
  booktitle={CVPR},
  year={2018}
}"""


class _RevisitedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder of the two revisited benchmarks; subclasses set `name`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Database and query splits with easy / hard / junk ground truth."}
    HOMEPAGE = "http://cmp.felk.cvut.cz/revisitop/"
    # TFDS 4.9's computed `code_path` imports the `importlib_resources` backport,
    # which Python >= 3.9 installs lack, for builders outside its own package.
    # The path is only used to look for a checksums file; name it directly.
    code_path = epath.Path(Path(__file__).resolve())

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place gnd_<name>.pkl (or .mat; name roxford5k or rparis6k) and a jpg/ folder "
        "with every database and query image in the manual directory "
        "(see http://cmp.felk.cvut.cz/revisitop/)."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "cropped_image": tfds.features.Image(encoding_format="png"),
                    "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "easy": tfds.features.Sequence(tfds.features.Text()),
                    "hard": tfds.features.Sequence(tfds.features.Text()),
                    "junk": tfds.features.Sequence(tfds.features.Text()),
                    "is_query": np.bool_,
                }
            ),
            homepage=self.HOMEPAGE,
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        dataset = load_dataset(self.name, dl_manager.manual_dir)
        if dataset.setups != REVISITED_SETUPS:
            raise InputError(f"{dl_manager.manual_dir}: gnd_{self.name} has no easy/hard lists")
        return {
            "database": self._generate_examples(dataset, queries=False),
            "query": self._generate_examples(dataset, queries=True),
        }

    def _generate_examples(self, dataset: RetrievalDataset, queries: bool):
        empty = np.zeros((1, 1, 3), np.uint8)
        if not queries:
            for image_id, path in dataset.database_paths():
                yield (
                    image_id,
                    {
                        "id": image_id,
                        "image": str(path),
                        "cropped_image": empty,
                        "bbox": np.zeros(4, np.float32),
                        "easy": [],
                        "hard": [],
                        "junk": [],
                        "is_query": False,
                    },
                )
            return
        for query in dataset.queries:
            medium, hard = query.groundtruth["medium"], query.groundtruth["hard"]
            easy_ids = sorted(medium.positives - hard.positives)
            image = dataset.path(query.image_id)
            yield (
                query.name,
                {
                    "id": query.image_id,
                    "image": str(image),
                    "cropped_image": dataset.query_image(query),
                    "bbox": np.asarray(query.bbox or (0, 0, 0, 0), np.float32),
                    "easy": easy_ids,
                    "hard": sorted(hard.positives),
                    "junk": sorted(medium.junk),
                    "is_query": True,
                },
            )


class Roxford5k(_RevisitedBuilder):
    """Revisited Oxford5k (70 queries, 4993 database images)."""

    name = "roxford5k"


class Rparis6k(_RevisitedBuilder):
    """Revisited Paris6k (70 queries, 6322 database images)."""

    name = "rparis6k"
