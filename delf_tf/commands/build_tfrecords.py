"""`delf build-tfrecords` (and `training/build_tfrecords.py`): labelled images -> TFRecords.

Sources: --image_folder (one subfolder per class), --csv + --image_root (GLDv2:
`id,landmark_id`), or --landmarks_root + --landmarks_subset (The Landmarks LF/LC
folders, whose _val folder becomes the validation split). Writes
train-*.tfrecord, validation-*.tfrecord, label_map.json and summary.json.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from delf_tf.config import DatasetBuildConfig


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    defaults = DatasetBuildConfig()
    flags.DEFINE_string("image_folder", None, "folder with one subfolder per class", **define)
    flags.DEFINE_string("csv", None, "GLDv2 CSV with columns id,landmark_id", **define)
    flags.DEFINE_string("image_root", None, "image root of --csv (root/a/b/c/<id>.jpg)", **define)
    flags.DEFINE_string(
        "landmarks_root", None, "folder holding landmarks_{full,clean}_{train,val}/", **define
    )
    flags.DEFINE_enum("landmarks_subset", "clean", ["full", "clean"], "LF or LC", **define)
    flags.DEFINE_string("output_dir", None, "output folder (replaced when complete)", **define)
    flags.DEFINE_float(
        "validation_fraction",
        defaults.validation_fraction,
        "share of each class held out for validation",
        **define,
    )
    flags.DEFINE_integer(
        "images_per_shard", defaults.images_per_shard, "images per TFRecord shard", **define
    )
    flags.DEFINE_integer("seed", defaults.seed, "seed of the per-class split", **define)
    flags.DEFINE_integer(
        "num_workers", defaults.num_workers, "threads validating and encoding images", **define
    )
    flags.mark_flags_as_required(["output_dir"], **define)


def run(flag_values: flags.FlagValues) -> int:
    from delf_tf.errors import InputError
    from delf_tf.training import sources
    from delf_tf.training.records import build_tfrecords

    chosen = [name for name in ("image_folder", "csv", "landmarks_root") if flag_values[name].value]
    if len(chosen) != 1:
        raise InputError(
            "give exactly one of --image_folder, --csv (+ --image_root), --landmarks_root"
        )
    validation = None
    if flag_values.image_folder:
        images = sources.list_image_folder(flag_values.image_folder)
    elif flag_values.csv:
        if not flag_values.image_root:
            raise InputError("--csv needs --image_root")
        images = sources.list_gldv2_csv(flag_values.csv, flag_values.image_root)
    else:
        train_dir, val_dir = sources.landmarks_set_dirs(
            flag_values.landmarks_root, flag_values.landmarks_subset
        )
        images = sources.list_image_folder(train_dir)
        validation = sources.list_image_folder(val_dir) if val_dir else None
    config = DatasetBuildConfig(
        validation_fraction=flag_values.validation_fraction,
        images_per_shard=flag_values.images_per_shard,
        seed=flag_values.seed,
        num_workers=flag_values.num_workers,
    )
    summary = build_tfrecords(images, flag_values.output_dir, config, validation=validation)
    for path, reason in summary.skipped:
        print(f"skipped: {path!r}: {reason}", file=sys.stderr)
    out = summary.to_dict()
    out["skipped"] = len(out["skipped"])
    print(json.dumps(out))
    return 0 if summary.train_images else 1
