"""`delf match`: match two images (nearest neighbours + RANSAC) and draw the matches."""

from __future__ import annotations

import json

from absl import flags

from delf_tf.commands.common import (
    check_output_path,
    define_extractor_flags,
    extraction_precision,
    extractor_from_flags,
)
from delf_tf.commands.retrieval_flags import define_retrieval_flags, retrieval_config_from_flags


def define_flags(flag_values: flags.FlagValues) -> None:
    define = {"flag_values": flag_values}
    flags.DEFINE_string("image1", None, "first (query) image", **define)
    flags.DEFINE_string("image2", None, "second (database) image", **define)
    flags.DEFINE_string("output_file", None, "write a PNG of the matches here", **define)
    flags.mark_flags_as_required(["image1", "image2"], **define)
    define_extractor_flags(flag_values)
    define_retrieval_flags(flag_values)


def run(flag_values: flags.FlagValues) -> int:
    import numpy as np

    from delf_tf.images import load_image
    from delf_tf.matching.pairwise import match_pair
    from delf_tf.matching.visualize import draw_matches, save_picture

    check_output_path("output_file", flag_values.output_file)
    config = retrieval_config_from_flags(flag_values)
    images = [load_image(flag_values.image1), load_image(flag_values.image2)]
    extractor = extractor_from_flags(flag_values, cached=True)
    first, second = (extractor.extract(image) for image in images)
    matches, verification = match_pair(first, second, config)
    summary = {
        "image1": flag_values.image1,
        "image2": flag_values.image2,
        "features": [len(first), len(second)],
        "precision": extraction_precision(extractor),
        "matches": len(matches),
        "inliers": verification.num_inliers,
        "transform": None
        if verification.model is None
        else np.round(verification.model, 6).tolist(),
    }
    if flag_values.output_file:
        caption = f"{len(matches)} matches, {verification.num_inliers} inliers ({config.transform})"
        picture = draw_matches(
            *images,
            matches.query_points,
            matches.database_points,
            verification.inliers,
            caption=caption,
        )
        save_picture(picture, flag_values.output_file)
        summary["output_file"] = flag_values.output_file
    print(json.dumps(summary))
    return 0
