"""Labelled image lists from the layouts landmark data comes in, and a per-class split.

Layouts:
  * an image folder with one subfolder per class (`root/<class>/**/<image>`);
  * a GLDv2 CSV (`id,landmark_id`, extra columns such as `url` ignored; or the
    `landmark_id,images` form of `train_clean.csv`) with images under an image
    root as `root/a/b/c/abc....jpg` (the Kaggle layout) or `root/<id>.<ext>`;
  * "The Landmarks" full / clean sets (LF / LC) as the seed ships them: image
    folders `landmarks_{full,clean}_{train,val}/<class>/...`.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from delf_tf.errors import ConfigError, InputError
from delf_tf.images import IMAGE_SUFFIXES, list_images

# File names of "The Landmarks" sets inside a manual/data directory.
LANDMARKS_SETS = {"full": "landmarks_full", "clean": "landmarks_clean"}


@dataclasses.dataclass(frozen=True)
class LabelledImage:
    """One training image: its file, a stable id and its class name."""

    path: Path
    image_id: str
    class_name: str


@dataclasses.dataclass
class ImageList:
    """Labelled images, the images that could not be listed, and the class names."""

    images: list[LabelledImage]
    missing: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        """Sorted class names (numerically when every name is an integer)."""
        return sort_class_names({image.class_name for image in self.images})


def sort_class_names(names) -> list[str]:
    names = list(names)
    if all(name.isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def list_image_folder(root: str | os.PathLike) -> ImageList:
    """`root/<class>/**/<image>`: every subfolder of root is a class."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder (expected one subfolder per class)")
    images = []
    for class_dir in sorted(path for path in root.iterdir() if path.is_dir()):
        for path in list_images(class_dir):
            image_id = path.relative_to(root).with_suffix("").as_posix().replace("/", "__")
            images.append(LabelledImage(path, image_id, class_dir.name))
    if not images:
        raise InputError(f"{root}: no images in class subfolders (suffixes {IMAGE_SUFFIXES})")
    return ImageList(images)


def list_gldv2_csv(csv_path: str | os.PathLike, image_root: str | os.PathLike) -> ImageList:
    """A GLDv2 CSV (`id,landmark_id[,...]` or `landmark_id,images`) plus its image root."""
    csv_path, image_root = Path(csv_path), Path(image_root)
    try:
        handle = csv_path.open(newline="", encoding="utf-8")
    except OSError as error:
        raise FileNotFoundError(f"{csv_path}: cannot read CSV ({error.strerror})") from error
    with handle:
        reader = csv.DictReader(handle)
        fields = set(reader.fieldnames or ())
        rows = list(reader)
    if {"id", "landmark_id"} <= fields:
        pairs = [(row["id"], row["landmark_id"]) for row in rows]
    elif {"landmark_id", "images"} <= fields:
        pairs = [(i, row["landmark_id"]) for row in rows for i in row["images"].split()]
    else:
        raise InputError(
            f"{csv_path}: expected columns 'id,landmark_id' or 'landmark_id,images', "
            f"got {sorted(fields)}"
        )
    images, missing = [], []
    for image_id, landmark in pairs:
        image_id, landmark = image_id.strip(), landmark.strip()
        if not image_id or not landmark:
            missing.append((f"{csv_path}:{image_id or '?'}", "empty id or landmark_id"))
            continue
        path = find_gldv2_image(image_root, image_id)
        if path is None:
            missing.append((str(image_root / gldv2_relative_path(image_id)), "file not found"))
        else:
            images.append(LabelledImage(path, image_id, landmark))
    if not images:
        raise InputError(
            f"{csv_path}: none of the {len(pairs)} listed images exist in {image_root}"
        )
    return ImageList(images, missing)


def gldv2_relative_path(image_id: str, suffix: str = ".jpg") -> Path:
    """The Kaggle layout: `abcdef...` -> `a/b/c/abcdef....jpg`."""
    return Path(image_id[0], image_id[1], image_id[2], image_id + suffix)


def find_gldv2_image(image_root: Path, image_id: str) -> Path | None:
    candidates = [image_root / (image_id + suffix) for suffix in (".jpg", ".jpeg", ".png")]
    if len(image_id) >= 3:
        candidates.insert(0, image_root / gldv2_relative_path(image_id))
    return next((path for path in candidates if path.is_file()), None)


def landmarks_set_dirs(root: str | os.PathLike, subset: str) -> tuple[Path, Path | None]:
    """(train folder, validation folder or None) of The Landmarks `subset` (full|clean)."""
    if subset not in LANDMARKS_SETS:
        raise ConfigError(f"unknown Landmarks subset {subset!r}; use one of {list(LANDMARKS_SETS)}")
    root = Path(root)
    train = root / f"{LANDMARKS_SETS[subset]}_train"
    if not train.is_dir():
        raise FileNotFoundError(
            f"{train}: not found; The Landmarks {subset} set is expected as image folders "
            f"{LANDMARKS_SETS[subset]}_train/<class>/ (and _val/<class>/) under {root}"
        )
    val = root / f"{LANDMARKS_SETS[subset]}_val"
    return train, (val if val.is_dir() else None)


def split_per_class(
    images: list[LabelledImage], validation_fraction: float, seed: int
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Holds out round(fraction * n) images of every class, keeping >= 1 for training.

    Deterministic for a given seed and image list (independent of list order).
    """
    by_class: dict[str, list[LabelledImage]] = defaultdict(list)
    for image in images:
        by_class[image.class_name].append(image)
    train, val = [], []
    rng = np.random.default_rng(seed)
    for name in sort_class_names(by_class):
        members = sorted(by_class[name], key=lambda image: image.image_id)
        order = rng.permutation(len(members))
        n_val = min(int(round(validation_fraction * len(members))), len(members) - 1)
        val.extend(members[i] for i in order[:n_val])
        train.extend(members[i] for i in order[n_val:])
    return train, val
