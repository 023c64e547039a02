"""Pictures of search results: the query against its best database matches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image

from delf_tf.errors import InputError
from delf_tf.images import ImageError, load_image
from delf_tf.matching.visualize import draw_matches, stack_vertically
from delf_tf.retrieval.search import SearchResult


def draw_results(
    query_image: np.ndarray, results: Sequence[SearchResult], rows: int = 3, height: int = 300
) -> Image.Image:
    """One row per result (best first): query | database image, lines between inliers.

    Database images are read from each result's `path`; those that cannot be read
    are skipped with a warning. Raises ValueError when none can be drawn.
    """
    pictures = []
    for rank, result in enumerate(results[:rows], start=1):
        try:
            database_image = load_image(result.path)
        except ImageError as error:
            logging.warning("cannot draw result %d: %s", rank, error)
            continue
        pictures.append(
            draw_matches(
                query_image,
                database_image,
                result.matches.query_points,
                result.matches.database_points,
                result.verification.inliers,
                height=height,
                caption=f"#{rank} {result.key}: {result.inliers} inliers, {result.votes} votes",
            )
        )
    if not pictures:
        raise InputError("no result image could be read to draw (index built without --images?)")
    return stack_vertically(pictures)
