"""The retrieval engine as an evaluation ranking function: extract -> vote -> RANSAC re-rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from delf_tf.evaluation.datasets import image_id_from_key
from delf_tf.retrieval.search import Searcher

if TYPE_CHECKING:
    from delf_tf.extraction.extractor import Extractor

RankFn = Callable[[np.ndarray, str], list[tuple[str, float]]]


def engine_rank_fn(
    extractor: Extractor, searcher: Searcher, shortlist: int | None = None
) -> RankFn:
    """rank_fn(query uint8 [h, w, 3], query_id) -> [(dataset image id, score)], best first.

    The global voting list re-ranked by inliers over the shortlist (`Searcher.ranking`);
    index keys (relative paths) become dataset ids by their file stem.
    """
    ids = [image_id_from_key(record.key) for record in searcher.index.images]

    def rank(image: np.ndarray, query_id: str) -> list[tuple[str, float]]:
        del query_id  # the engine ranks by content only
        ranking = searcher.ranking(extractor.extract(image), shortlist=shortlist)
        return [(ids[image_id], score) for image_id, score in ranking]

    return rank
