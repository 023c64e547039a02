"""`delf index`: one global index over a feature store (new, or appended to)."""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string("features", None, "feature store from `delf extract`", **define)
    flags.DEFINE_string("output_dir", None, "index directory (replaced atomically)", **define)
    flags.DEFINE_string(
        "images",
        None,
        "the folder the features were extracted from: records image paths and sizes "
        "(needed by `delf search --visualize`); without it paths are the store keys",
        **define,
    )
    flags.DEFINE_bool(
        "append",
        False,
        "add the store's images to the existing index at --output_dir (skips images "
        "already there); without it --output_dir is rebuilt from the store alone",
        **define,
    )
    flags.mark_flags_as_required(["features", "output_dir"], **define)


def run(flag_values: flags.FlagValues) -> int:
    from delf_tf.atomic import recover_staged_directory
    from delf_tf.errors import InputError
    from delf_tf.features.store import FeatureStore
    from delf_tf.retrieval.index import HEADER, Index

    output = Path(flag_values.output_dir)
    store = FeatureStore.open(flag_values.features)
    # First of all: a run killed while swapping the index folder may have left the
    # previous index under its backup name; nothing may be decided before it is back.
    recover_staged_directory(output)
    if output.is_dir() and not (output / HEADER).exists() and any(output.iterdir()):
        raise InputError(f"{output}: a folder that is not an index; refusing to replace it")
    if flag_values.append and (output / HEADER).exists():
        existing = Index.load(output)
        index, added = existing.add_store(store, flag_values.images)
    else:
        index = Index.from_store(store, flag_values.images)
        added = index.num_images
    index.save(output)
    summary = {
        "output_dir": str(output),
        "images": index.num_images,
        "added": added,
        "descriptors": index.num_descriptors,
        "descriptor_dim": index.dim,
        "fingerprint": index.fingerprint[:12],
    }
    print(json.dumps(summary))
    return 0
