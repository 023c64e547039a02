"""A TFDS builder for local landmark data, prepared offline from a manual directory.

    import delf_tf.training.tfds_landmarks  # registers "delf_landmarks"
    builder = tfds.builder("delf_landmarks/gldv2", data_dir=...)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=..., try_download_gcs=False))

Configs and the `manual_dir` layout each expects:
  gldv2            train.csv (`id,landmark_id`) and train/a/b/c/<id>.jpg (the Kaggle
                   layout; flat train/<id>.jpg also works). Validation: a per-class
                   split of train.csv, the same rule as `build_tfrecords.py`.
  landmarks_full   "The Landmarks" full set (LF): landmarks_full_train/<class>/...
                   and landmarks_full_val/<class>/... (per-class split when _val is absent)
  landmarks_clean  the clean set (LC): landmarks_clean_train/..., landmarks_clean_val/...
With `--train_data=delf_landmarks/gldv2 --tfds_manual_dir=...` the trainer prepares
it on first use. Unreadable images are logged and left out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds
from absl import logging

from delf_tf.config import DatasetBuildConfig
from delf_tf.errors import InputError
from delf_tf.images import ImageError
from delf_tf.training.records import encode_image_file
from delf_tf.training.sources import (
    ImageList,
    LabelledImage,
    landmarks_set_dirs,
    list_gldv2_csv,
    list_image_folder,
    split_per_class,
)

GLDV2_CSV = "train.csv"
GLDV2_IMAGES = "train"


@dataclasses.dataclass
class LandmarksConfig(tfds.core.BuilderConfig):
    """layout: "gldv2" or "landmarks"; subset: "full" / "clean" for "landmarks"."""

    layout: str = "gldv2"
    subset: str = ""


class DelfLandmarks(tfds.core.GeneratorBasedBuilder):
    """Landmark images with image-level labels, from files already on disk."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    # Nothing is downloaded, so there are no checksums to look up (the lookup
    # needs the builder's code path, which TFDS finds only with the optional
    # `importlib_resources` package).
    url_infos = None
    BUILDER_CONFIGS = [
        LandmarksConfig(name="gldv2", description="GLDv2 CSV + image tree", layout="gldv2"),
        LandmarksConfig(
            name="landmarks_full",
            description="The Landmarks, full (LF)",
            layout="landmarks",
            subset="full",
        ),
        LandmarksConfig(
            name="landmarks_clean",
            description="The Landmarks, clean (LC)",
            layout="landmarks",
            subset="clean",
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(),  # names set from the data
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        train, val, missing = self._list(Path(dl_manager.manual_dir))
        for path, reason in missing:
            logging.warning("skipped %s: %s", path, reason)
        names = train.class_names
        self.info.features["label"].names = names
        labels = {name: index for index, name in enumerate(names)}
        return {
            "train": self._generate_examples(train.images, labels),
            "validation": self._generate_examples(val, labels),
        }

    def _list(self, root: Path) -> tuple[ImageList, list[LabelledImage], list]:
        config: LandmarksConfig = self.builder_config
        if config.layout == "gldv2":
            images = list_gldv2_csv(root / GLDV2_CSV, root / GLDV2_IMAGES)
            build = DatasetBuildConfig()
            train, val = split_per_class(images.images, build.validation_fraction, build.seed)
            return ImageList(train), val, images.missing
        train_dir, val_dir = landmarks_set_dirs(root, config.subset)
        train = list_image_folder(train_dir)
        if val_dir is None:
            build = DatasetBuildConfig()
            kept, val = split_per_class(train.images, build.validation_fraction, build.seed)
            return ImageList(kept), val, []
        val = list_image_folder(val_dir).images
        unknown = sorted({image.class_name for image in val} - set(train.class_names))
        if unknown:
            raise InputError(f"{val_dir}: classes missing from {train_dir}: {unknown[:10]}")
        return train, val, []

    def _generate_examples(self, images: list[LabelledImage], labels: dict[str, int]):
        for image in images:
            try:
                encoded = encode_image_file(image.path)
            except ImageError as error:
                logging.warning("skipped %s", error)
                continue
            yield (
                image.image_id,
                {
                    "image": encoded.data,
                    "label": labels[image.class_name],
                    "id": image.image_id,
                },
            )
