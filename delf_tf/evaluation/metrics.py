"""Retrieval metrics of the Revisited Oxford/Paris protocol: AP, mAP, mP@k.

Conventions (those of the revisited protocol's `compute_map`, Radenovic et al.,
CVPR 2018):
- Junk images are removed from the ranking before anything is measured: they
  neither help nor hurt.
- Average precision uses the trapezoid rule: at the j-th positive (0-based,
  found at 0-based rank r after junk removal) the precision before it, j / r
  (1 when r = 0), and after it, (j + 1) / (r + 1), are averaged and weighted by
  the recall step 1 / (number of positives).
- Positives missing from the ranking (a shortlist shorter than the database)
  were never retrieved: they add nothing, so recall stays below 1.
- Precision at k is the protocol's: with the last retrieved positive at 1-based
  rank R, P@k = (positives within the first min(k, R)) / min(k, R). A query
  with fewer than k positives can therefore reach P@k = 1. It is 0 when no
  positive was retrieved.
- A query without positives has no AP: it is left out of the means and counted.

Ties: a ranking is a list of ids, best first. When scores come with it, ids
with equal scores form a tie and their order is resolved by `ties`:
"pessimistic" (default: within a tie, non-positives come first, so a lucky
order never inflates the numbers), "optimistic" (positives first) or "given"
(the order of the list).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterable, Sequence

import numpy as np

# The protocol's precision cut-offs (mP@1, mP@5, mP@10).
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
TIE_POLICIES = ("pessimistic", "optimistic", "given")
# Recall levels of the mean interpolated precision-recall curve.
PR_CURVE_POINTS = 101


def order_with_ties(
    ids: Sequence[str],
    scores: Sequence[float] | None,
    positives: Collection[str],
    ties: str = "pessimistic",
) -> list[str]:
    """Orders `ids` by decreasing score, resolving equal scores by the `ties` policy.

    Args:
      ids: [N] image ids as returned by the engine.
      scores: [N] scores (higher is better) or None: then `ids` is taken as it is.
      positives: the ids that count as relevant (used to resolve ties only).
      ties: "pessimistic", "optimistic" or "given" (see the module docstring).
    """
    if ties not in TIE_POLICIES:
        raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}")
    if scores is None:
        return list(ids)
    if len(scores) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(scores)} scores")
    sign = {"pessimistic": 1, "optimistic": -1, "given": 0}[ties]

    def key(index: int) -> tuple[float, int, int]:
        relevant = 1 if ids[index] in positives else 0
        return (-float(scores[index]), sign * relevant, index)

    return [ids[i] for i in sorted(range(len(ids)), key=key)]


def positive_ranks(
    ranking: Sequence[str], positives: Collection[str], junk: Collection[str] = ()
) -> np.ndarray:
    """0-based ranks of the retrieved positives once junk is removed: int64 [P_found], sorted."""
    seen: set[str] = set()
    ranks = []
    rank = 0
    for image_id in ranking:
        if image_id in seen:
            raise ValueError(f"image id {image_id!r} appears twice in the ranking")
        seen.add(image_id)
        if image_id in junk and image_id not in positives:
            continue
        if image_id in positives:
            ranks.append(rank)
        rank += 1
    return np.asarray(ranks, dtype=np.int64)


def average_precision_from_ranks(ranks: np.ndarray, num_positives: int) -> float:
    """Trapezoid-rule AP from the 0-based ranks [P_found] of the retrieved positives."""
    if num_positives <= 0:
        raise ValueError("average precision needs at least one positive")
    ap = 0.0
    for j, rank in enumerate(np.sort(np.asarray(ranks))):
        precision_before = 1.0 if rank == 0 else j / rank
        precision_after = (j + 1) / (rank + 1)
        ap += (precision_before + precision_after) / 2.0
    return ap / num_positives


def precision_at_k(ranks: np.ndarray, k: int) -> float:
    """The protocol's P@k from the 0-based ranks of the retrieved positives (see module doc)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return 0.0
    cutoff = min(int(ranks.max()) + 1, k)
    return float(np.count_nonzero(ranks < cutoff)) / cutoff


def average_precision(
    ranking: Sequence[str],
    positives: Collection[str],
    junk: Collection[str] = (),
    scores: Sequence[float] | None = None,
    ties: str = "pessimistic",
) -> float:
    """AP of one ranked list (junk removed, trapezoid rule); NaN when there are no positives."""
    positives = set(positives)
    if not positives:
        return math.nan
    ordered = order_with_ties(ranking, scores, positives, ties)
    return average_precision_from_ranks(positive_ranks(ordered, positives, junk), len(positives))


def interpolated_precision_recall(
    ranks: np.ndarray, num_positives: int, points: int = PR_CURVE_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """Interpolated precision at `points` evenly spaced recall levels in [0, 1].

    Precision at recall r is the best precision reached at any recall >= r (0
    where that recall is never reached). Returns (recall [points], precision
    [points]), float64.
    """
    recall_levels = np.linspace(0.0, 1.0, points)
    ranks = np.sort(np.asarray(ranks))
    if ranks.size == 0:
        return recall_levels, np.zeros(points)
    recall = np.arange(1, ranks.size + 1) / num_positives
    precision = np.arange(1, ranks.size + 1) / (ranks + 1)
    # Best precision at or beyond each retrieved positive.
    best_after = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, recall_levels - 1e-12, side="left")
    curve = np.zeros(points)
    reachable = index < ranks.size
    curve[reachable] = best_after[index[reachable]]
    return recall_levels, curve


@dataclasses.dataclass(frozen=True)
class QueryMetrics:
    """Metrics of one query in one setup.

    Attributes:
      ap: average precision (NaN when the query has no positives).
      precision: {k: P@k} (NaN values when the query has no positives).
      num_positives: positives in the ground truth.
      num_junk: junk images in the ground truth.
      ranks: int64 [P_found] 0-based ranks of the retrieved positives (junk removed).
    """

    ap: float
    precision: dict[int, float]
    num_positives: int
    num_junk: int
    ranks: np.ndarray

    @property
    def has_positives(self) -> bool:
        return self.num_positives > 0

    @property
    def first_positive_rank(self) -> int | None:
        """1-based rank of the best-ranked positive (junk removed), None if none was retrieved."""
        return int(self.ranks[0]) + 1 if self.ranks.size else None


def query_metrics(
    ranking: Sequence[str],
    positives: Collection[str],
    junk: Collection[str] = (),
    ks: Iterable[int] = DEFAULT_KS,
) -> QueryMetrics:
    """AP and P@k of one ranked list of ids (ties already resolved, see `order_with_ties`)."""
    positives = set(positives)
    junk = set(junk) - positives
    ks = tuple(ks)
    ranks = positive_ranks(ranking, positives, junk)
    if not positives:
        return QueryMetrics(math.nan, {k: math.nan for k in ks}, 0, len(junk), ranks)
    return QueryMetrics(
        ap=average_precision_from_ranks(ranks, len(positives)),
        precision={k: precision_at_k(ranks, k) for k in ks},
        num_positives=len(positives),
        num_junk=len(junk),
        ranks=ranks,
    )


def summarize(per_query: Sequence[QueryMetrics], ks: Iterable[int] = DEFAULT_KS) -> dict:
    """mAP and mP@k over the queries that have positives; the others are counted.

    Returns {"mAP", "mP@1", ..., "queries_evaluated", "queries_without_positives"}
    (means are NaN when no query has positives).
    """
    ks = tuple(ks)
    valid = [m for m in per_query if m.has_positives]
    out: dict = {
        "mAP": float(np.mean([m.ap for m in valid])) if valid else math.nan,
    }
    for k in ks:
        out[f"mP@{k}"] = float(np.mean([m.precision[k] for m in valid])) if valid else math.nan
    out["queries_evaluated"] = len(valid)
    out["queries_without_positives"] = len(per_query) - len(valid)
    return out


def mean_precision_recall_curve(
    per_query: Sequence[QueryMetrics], points: int = PR_CURVE_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """Mean interpolated precision-recall curve over queries with positives: ([points], [points])."""
    curves = [
        interpolated_precision_recall(m.ranks, m.num_positives, points)[1]
        for m in per_query
        if m.has_positives
    ]
    recall = np.linspace(0.0, 1.0, points)
    if not curves:
        return recall, np.zeros(points)
    return recall, np.mean(curves, axis=0)
