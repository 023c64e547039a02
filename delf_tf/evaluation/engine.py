"""The retrieval engine as an evaluation ranking function, through the batch query path.

extract -> initial ranking (votes, ASMK* or global) -> RANSAC re-ranking of the
shortlist, with the index, its structures and the extractor loaded once
(`delf_tf.retrieval.batch.QueryRunner`, the path of `delf search --queries`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from delf_tf.evaluation.datasets import image_id_from_key
from delf_tf.retrieval.batch import QueryRunner
from delf_tf.retrieval.search import Searcher

RankFn = Callable[[np.ndarray, str], list[tuple[str, float]]]


def engine_rank_fn(extractor, searcher: Searcher, shortlist: int | None = None) -> RankFn:
    """rank_fn(query uint8 [h, w, 3], query_id) -> [(dataset image id, score)], best first.

    The searcher's whole ranking with its shortlist re-ranked by inliers
    (`Searcher.ranking`); index keys (relative paths) become dataset ids by their
    file stem. `extractor` is any object with `extract(image) -> LocalFeatures`.
    """
    ids = [image_id_from_key(record.key) for record in searcher.index.images]
    runner = QueryRunner(extractor, searcher)

    def rank(image: np.ndarray, query_id: str) -> list[tuple[str, float]]:
        del query_id  # the engine ranks by content only
        ranking = runner.run(image, full_ranking=True, shortlist=shortlist).ranking
        return [(ids[image_id], score) for image_id, score in ranking]

    return rank
