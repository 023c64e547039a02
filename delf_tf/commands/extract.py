"""`delf extract`: features of one image or a folder into a resumable feature store."""

from __future__ import annotations

import json

from absl import flags

from delf_tf.commands.common import (
    define_extractor_flags,
    extractor_from_flags,
    weights_are_trained,
)
from delf_tf.features.extract import extract_to_store


def define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "images", None, "an image file or a folder (recursive)", flag_values=flag_values
    )
    flags.DEFINE_string("output", None, "feature store directory", flag_values=flag_values)
    flags.mark_flags_as_required(["images", "output"], flag_values=flag_values)
    define_extractor_flags(flag_values)


def run(flag_values: flags.FlagValues) -> int:
    extractor = extractor_from_flags(flag_values)
    if not weights_are_trained(extractor):
        print("note: untrained (random) weights: features show the pipeline, not retrieval quality")
    store, summary = extract_to_store(extractor, flag_values.images, flag_values.output)
    for path, reason in summary.failed:
        print(f"failed: {path}: {reason}")
    print(json.dumps({"output": str(store.root), **summary.to_dict()}))
    return 0 if summary.extracted + summary.skipped_existing > 0 or not summary.images else 1
