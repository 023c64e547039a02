"""`delf index`: one global index over a feature store (new, or appended to)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

from delf_tf.features.store import FeatureStore
from delf_tf.retrieval.index import FingerprintMismatchError, Index, IndexFormatError


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string("features", None, "feature store from `delf extract`", **define)
    flags.DEFINE_string("output", None, "index directory (replaced atomically)", **define)
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
        "add the store's images to the existing index at --output (skips images "
        "already there); without it --output is rebuilt from the store alone",
        **define,
    )
    flags.mark_flags_as_required(["features", "output"], **define)


def run(flag_values: flags.FlagValues) -> int:
    output = Path(flag_values.output)
    try:
        store = FeatureStore.open(flag_values.features)
        if flag_values.append and (output / "index.json").exists():
            existing = Index.load(output)
            index, added = existing.add_store(store, flag_values.images)
        else:
            index = Index.from_store(store, flag_values.images)
            added = index.num_images
        index.save(output)
    except (FileNotFoundError, IndexFormatError, FingerprintMismatchError, ValueError) as error:
        print(f"delf index: error: {error}", file=sys.stderr)
        return 1
    summary = {
        "output": str(output),
        "images": index.num_images,
        "added": added,
        "descriptors": index.num_descriptors,
        "descriptor_dim": index.dim,
        "fingerprint": index.fingerprint[:12],
    }
    print(json.dumps(summary))
    return 0
