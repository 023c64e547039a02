"""Runs a benchmark: every query through a ranking function, then AP / mAP / mP@k per setup.

The retrieval engine enters through one callable,

    rank_fn(query_image, query_id) -> ranking

where `query_image` is uint8 [h, w, 3] RGB already cropped to the query box (as
the protocols require) and `ranking` lists database image ids best first, either
as ids (`["all_souls_000013", ...]`) or as (id, score) pairs (higher is better;
equal scores are ties, resolved by the `ties` policy of `metrics`). Images the
ranking leaves out count as never retrieved.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from tqdm import tqdm

from delf_tf.atomic import atomic_write_text
from delf_tf.errors import InputError
from delf_tf.evaluation.datasets import Query, RetrievalDataset
from delf_tf.evaluation.metrics import (
    DEFAULT_KS,
    QueryMetrics,
    mean_precision_recall_curve,
    order_with_ties,
    query_metrics,
    summarize,
)

Ranking = Sequence[str] | Sequence[tuple[str, float]]
RankFn = Callable[[np.ndarray, str], Ranking]

METRICS_FILE = "metrics.json"
PER_QUERY_FILE = "per_query.csv"
PR_CURVES_FILE = "pr_curves.png"


# Head of each query's ranking kept for reports (thumbnails of the first results).
KEEP_TOP = 100


@dataclasses.dataclass(frozen=True)
class QueryResult:
    """One query's outcome: its ranking time and metrics per setup.

    Attributes:
      query: the protocol's query.
      seconds: time spent in `rank_fn`.
      ranked: database images in its ranking.
      metrics: setup -> QueryMetrics.
      top: the first `keep_top` (image id, score) of the ranking as `rank_fn` ordered
        it (images outside the database dropped; score None for an id-only ranking).
        Equal scores are ties that the metrics order by the tie policy, per setup.
    """

    query: Query
    seconds: float
    ranked: int
    metrics: dict[str, QueryMetrics]
    top: tuple[tuple[str, float | None], ...] = ()


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """Per-query results and per-setup summaries of one benchmark run."""

    dataset: str
    setups: tuple[str, ...]
    ks: tuple[int, ...]
    ties: str
    queries: tuple[QueryResult, ...]
    dropped_non_database: int

    def summary(self, setup: str) -> dict[str, Any]:
        """{"mAP", "mP@k"..., "queries_evaluated", "queries_without_positives", ...} of a setup."""
        per_query = [result.metrics[setup] for result in self.queries]
        out = summarize(per_query, self.ks)
        out["queries_without_positives_ids"] = [
            result.query.name for result in self.queries if not result.metrics[setup].has_positives
        ]
        return out

    def pr_curve(self, setup: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean interpolated precision-recall curve of a setup: (recall [R], precision [R])."""
        return mean_precision_recall_curve([result.metrics[setup] for result in self.queries])

    def to_dict(self) -> dict[str, Any]:
        """The metrics JSON: summaries per setup and timing (NaN written as null)."""
        seconds = [result.seconds for result in self.queries]
        return _json_safe(
            {
                "dataset": self.dataset,
                "queries": len(self.queries),
                "ks": list(self.ks),
                "ties": self.ties,
                "setups": {setup: self.summary(setup) for setup in self.setups},
                "seconds_per_query": {
                    "mean": float(np.mean(seconds)) if seconds else None,
                    "median": float(np.median(seconds)) if seconds else None,
                },
                "mean_ranked": float(np.mean([r.ranked for r in self.queries]))
                if self.queries
                else None,
                "dropped_non_database": self.dropped_non_database,
            }
        )

    def per_query_rows(self) -> list[dict[str, Any]]:
        """One row per (query, setup): AP, P@k, counts (NaN / missing written as None)."""
        rows = []
        for result in self.queries:
            for setup in self.setups:
                m = result.metrics[setup]
                row = {
                    "query": result.query.name,
                    "image_id": result.query.image_id,
                    "setup": setup,
                    "ap": m.ap,
                    **{f"p@{k}": m.precision[k] for k in self.ks},
                    "positives": m.num_positives,
                    "positives_retrieved": int(m.ranks.size),
                    "junk": m.num_junk,
                    "first_positive_rank": m.first_positive_rank,
                    "seconds": result.seconds,
                }
                rows.append(_json_safe(row))
        return rows


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _split_ranking(ranking: Ranking, where: str) -> tuple[list[str], list[float] | None]:
    items = list(ranking)
    if all(isinstance(item, str) for item in items):
        return items, None
    if all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
        ids = [item[0] for item in items]
        if not all(isinstance(i, str) for i in ids):
            raise TypeError(f"{where}: (image id, score) pairs need str ids")
        return ids, [float(item[1]) for item in items]
    raise TypeError(f"{where}: rank_fn must return image ids or (image id, score) pairs")


def evaluate(
    dataset: RetrievalDataset,
    rank_fn: RankFn,
    setups: Iterable[str] | None = None,
    ks: Iterable[int] = DEFAULT_KS,
    ties: str = "pessimistic",
    allow_unknown_ids: bool = False,
    progress: bool = True,
    keep_top: int = KEEP_TOP,
) -> EvaluationResult:
    """Ranks every query of `dataset` with `rank_fn` and measures it in each setup.

    Args:
      dataset: the benchmark (see `datasets.load_dataset`).
      rank_fn: (uint8 [h, w, 3] cropped query image, query image id) -> ranking
        (see the module docstring). Called once per query.
      setups: the setups to report (default: all of the dataset's).
      ks: precision cut-offs (mP@k).
      ties: tie policy for scored rankings ("pessimistic", "optimistic", "given").
      allow_unknown_ids: keep ids the dataset does not know (extra distractors)
        as non-relevant results instead of raising. Known images that are not
        in the database (the revisited protocol's query images) are always dropped.
      progress: show a tqdm bar.
      keep_top: ranked images kept per query in `QueryResult.top` (for reports).
    """
    setups = tuple(setups) if setups is not None else dataset.setups
    unknown_setups = sorted(set(setups) - set(dataset.setups))
    if unknown_setups:
        raise InputError(f"{dataset.name}: no setup {unknown_setups}; it has {dataset.setups}")
    ks = tuple(ks)
    database = frozenset(dataset.database)
    results = []
    dropped = 0
    for query in tqdm(dataset.queries, desc=f"evaluate {dataset.name}", disable=not progress):
        image = dataset.query_image(query)
        start = time.perf_counter()
        ranking = rank_fn(image, query.image_id)
        seconds = time.perf_counter() - start
        ids, scores = _split_ranking(ranking, f"query {query.name}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"query {query.name}: rank_fn returned an image id twice")
        keep = []
        for position, image_id in enumerate(ids):
            if image_id in database:
                keep.append(position)
            elif image_id in dataset.image_paths:
                dropped += 1
            elif allow_unknown_ids:
                keep.append(position)
            else:
                raise InputError(
                    f"query {query.name}: rank_fn returned {image_id!r}, not an image of "
                    f"{dataset.name}; ids must be file names without suffix "
                    "(pass allow_unknown_ids=True for extra distractors)"
                )
        ids = [ids[i] for i in keep]
        scores = [scores[i] for i in keep] if scores is not None else None
        metrics = {}
        for setup in setups:
            truth = query.groundtruth[setup]
            ordered = order_with_ties(ids, scores, truth.positives, ties)
            metrics[setup] = query_metrics(ordered, truth.positives, truth.junk, ks)
        top = tuple(
            (image_id, None if scores is None else scores[i])
            for i, image_id in enumerate(ids[:keep_top])
        )
        results.append(QueryResult(query, seconds, len(ids), metrics, top))
    result = EvaluationResult(dataset.name, setups, ks, ties, tuple(results), dropped)
    for setup in setups:
        summary = result.summary(setup)
        logging.info(
            "%s %s: mAP %.4f over %d queries (%d without positives)",
            dataset.name,
            setup,
            summary["mAP"],
            summary["queries_evaluated"],
            summary["queries_without_positives"],
        )
    return result


def write_metrics_json(result: EvaluationResult, path: str | os.PathLike) -> Path:
    """Writes `result.to_dict()` as JSON (atomically)."""
    atomic_write_text(path, json.dumps(result.to_dict(), indent=2) + "\n")
    return Path(path)


def write_per_query(result: EvaluationResult, path: str | os.PathLike) -> Path:
    """Writes per-query AP and P@k: CSV for a `.csv` path, JSON for `.json` (atomically)."""
    path = Path(path)
    rows = result.per_query_rows()
    if path.suffix == ".json":
        atomic_write_text(path, json.dumps(rows, indent=2) + "\n")
    elif path.suffix == ".csv":
        buffer = io.StringIO()
        fields = list(rows[0]) if rows else ["query", "setup", "ap"]
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        atomic_write_text(path, buffer.getvalue())
    else:
        raise InputError(f"{path}: per-query output must end in .csv or .json")
    return path


def write_report(result: EvaluationResult, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes metrics.json, per_query.csv and pr_curves.png into `output_dir`."""
    from delf_tf.evaluation.plots import write_pr_curves_png

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return {
        "metrics": write_metrics_json(result, output_dir / METRICS_FILE),
        "per_query": write_per_query(result, output_dir / PER_QUERY_FILE),
        "pr_curves": write_pr_curves_png(result, output_dir / PR_CURVES_FILE),
    }
