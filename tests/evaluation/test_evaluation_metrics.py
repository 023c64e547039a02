"""AP / mP@k of the revisited protocol against hand-computed values and an independent reference."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from delf_tf.evaluation.metrics import (
    average_precision,
    interpolated_precision_recall,
    order_with_ties,
    positive_ranks,
    precision_at_k,
    query_metrics,
    summarize,
)


def test_ap_by_hand_with_junk_and_a_missed_positive():
    # After removing junk j: p1 n1 p2 n2 -> positives at 0-based ranks 0 and 2; p3 never retrieved.
    ranking = ["p1", "n1", "j", "p2", "n2"]
    positives = {"p1", "p2", "p3"}
    # Trapezoids: (1 + 1/1)/2 * 1/3 + (1/2 + 2/3)/2 * 1/3 = 1/3 + 7/36.
    expected = 1 / 3 + 7 / 36
    assert average_precision(ranking, positives, junk={"j"}) == pytest.approx(expected)
    # Without the junk removal the second positive would sit at rank 3: a lower AP.
    assert average_precision(ranking, positives) == pytest.approx(1 / 3 + (1 / 3 + 2 / 4) / 6)
    assert average_precision(ranking, positives) < expected


def test_ap_perfect_worst_and_junk_in_front():
    assert average_precision(["a", "b", "x"], {"a", "b"}) == pytest.approx(1.0)
    # Junk ahead of every positive changes nothing.
    assert average_precision(["j1", "j2", "a", "b"], {"a", "b"}, junk={"j1", "j2"}) == 1.0
    # One positive last of three: (1/2 + 1/3) / 2 ... its precision before is 0/2.
    assert average_precision(["x", "y", "a"], {"a"}) == pytest.approx((0 / 2 + 1 / 3) / 2)
    assert average_precision(["x", "y"], {"a"}) == 0.0
    assert math.isnan(average_precision(["x"], set()))


def test_ties_are_resolved_by_policy():
    ids, scores = ["pos", "neg"], [3.0, 3.0]
    # Pessimistic: the negative goes first -> positive at rank 1: (0/1 + 1/2) / 2.
    assert average_precision(ids, {"pos"}, scores=scores) == pytest.approx(0.25)
    assert average_precision(ids, {"pos"}, scores=scores, ties="optimistic") == 1.0
    assert average_precision(ids, {"pos"}, scores=scores, ties="given") == 1.0
    assert average_precision(["neg", "pos"], {"pos"}, scores=scores, ties="given") == 0.25
    # Scores reorder the list; only equal scores are ties.
    assert order_with_ties(["a", "b", "c"], [1.0, 5.0, 1.0], {"a"}) == ["b", "c", "a"]
    assert order_with_ties(["a", "b", "c"], [1.0, 5.0, 1.0], {"a"}, "optimistic") == [
        "b",
        "a",
        "c",
    ]
    with pytest.raises(ValueError, match="ties"):
        order_with_ties(["a"], [1.0], set(), "random")
    with pytest.raises(ValueError, match="scores"):
        order_with_ties(["a", "b"], [1.0], set())


def test_precision_at_k_follows_the_protocol():
    ranks = positive_ranks(["p1", "n", "j", "p2", "n2", "n3"], {"p1", "p2"}, {"j"})
    assert ranks.tolist() == [0, 2]
    assert precision_at_k(ranks, 1) == 1.0
    # The cut-off stops at the last retrieved positive (rank 3, 1-based): 2 of 3.
    assert precision_at_k(ranks, 5) == pytest.approx(2 / 3)
    assert precision_at_k(ranks, 2) == pytest.approx(1 / 2)
    assert precision_at_k(np.array([], np.int64), 5) == 0.0
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        precision_at_k(ranks, 0)


def test_duplicates_in_a_ranking_are_an_error():
    with pytest.raises(ValueError, match="twice"):
        average_precision(["a", "b", "a"], {"a"})


def _reference_map(rankings, truths, ks):
    """Independent re-derivation of the protocol on full rankings (index arrays)."""
    aps, precisions = [], []
    for ranking, (positives, junk) in zip(rankings, truths, strict=True):
        if not positives:
            continue
        is_pos = np.isin(ranking, list(positives))
        is_junk = np.isin(ranking, list(junk)) & ~is_pos
        kept = is_pos[~is_junk]
        pos = np.flatnonzero(kept)
        # AP as the area under the PR curve, linearly interpolated between successive positives.
        recall = np.concatenate([[0.0], np.arange(1, pos.size + 1) / len(positives)])
        precision_after = np.arange(1, pos.size + 1) / (pos + 1)
        precision_before = np.where(pos == 0, 1.0, np.arange(pos.size) / np.maximum(pos, 1))
        aps.append(float(np.sum(np.diff(recall) * (precision_before + precision_after) / 2)))
        row = []
        for k in ks:
            cutoff = min(int(pos.max()) + 1, k) if pos.size else k
            row.append(float(np.sum(pos < cutoff)) / cutoff if pos.size else 0.0)
        precisions.append(row)
    return float(np.mean(aps)), np.mean(precisions, axis=0)


def test_matches_an_independent_reference_on_random_rankings():
    rng = random.Random(7)
    database = [f"im{i}" for i in range(40)]
    ks = (1, 5, 10)
    rankings, truths, per_query = [], [], []
    for _ in range(25):
        chosen = rng.sample(database, 12)
        positives = set(chosen[: rng.randint(0, 6)])
        junk = set(chosen[6:])
        ranking = database[:]
        rng.shuffle(ranking)
        rankings.append(np.array(ranking))
        truths.append((positives, junk))
        per_query.append(query_metrics(ranking, positives, junk, ks))
    expected_map, expected_mp = _reference_map(rankings, truths, ks)
    summary = summarize(per_query, ks)
    assert summary["mAP"] == pytest.approx(expected_map)
    assert [summary[f"mP@{k}"] for k in ks] == pytest.approx(expected_mp.tolist())
    assert summary["queries_without_positives"] == sum(1 for p, _ in truths if not p)
    assert summary["queries_evaluated"] + summary["queries_without_positives"] == 25


def test_queries_without_positives_are_excluded_and_counted():
    good = query_metrics(["a", "b"], {"a"})
    empty = query_metrics(["a", "b"], set())
    summary = summarize([good, empty, empty])
    assert summary["mAP"] == 1.0
    assert summary["queries_evaluated"] == 1
    assert summary["queries_without_positives"] == 2
    assert math.isnan(summarize([empty])["mAP"])


def test_interpolated_precision_recall():
    # Positives at ranks 0 and 3 of 2 positives: (recall, precision) = (0.5, 1), (1, 0.5).
    recall, precision = interpolated_precision_recall(np.array([0, 3]), 2, points=5)
    assert recall.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert precision.tolist() == [1.0, 1.0, 1.0, 0.5, 0.5]
    # One of two positives never retrieved: zero precision beyond recall 0.5.
    _, precision = interpolated_precision_recall(np.array([1]), 2, points=5)
    assert precision.tolist() == [0.5, 0.5, 0.5, 0.0, 0.0]
