"""Many queries against one loaded index and one extractor: `delf search --queries`, evaluation.

`QueryRunner` extracts a query image and ranks it with a `Searcher`; the index,
its structures and the extractor are loaded once for all queries.
`search_to_jsonl` streams one JSON line per query into a results file:

  {"query": PATH, "features": N, "ranking": "asmk", "seconds": T,
   "results": [{"image_id", "key", "path", "inliers", "votes", "score", "transform"}, ...]}
  {"query": PATH, "error": "one line"}          (an unreadable image)

Lines are appended, flushed and fsynced one by one, so an interrupted run keeps
what it finished: run it again with the same output and it resumes, skipping
the queries the file already holds, error lines included (a torn last line is
dropped first).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from delf_tf.errors import InputError
from delf_tf.features.local_features import LocalFeatures
from delf_tf.images import IMAGE_SUFFIXES, ImageError, load_image, scan_images
from delf_tf.retrieval.search import Searcher, SearchResult


class _Extractor(Protocol):
    def extract(self, image: np.ndarray) -> LocalFeatures: ...


class QueryListError(InputError):
    """The queries (`delf search --images`) name no folder or readable list of image paths."""


@dataclasses.dataclass(frozen=True)
class QueryOutcome:
    """One answered query: its features, top results and (when asked) the whole ranking."""

    features: LocalFeatures
    results: list[SearchResult]
    ranking: list[tuple[int, float]] | None
    seconds: float


class QueryRunner:
    """extract -> rank -> verify, for one query image at a time (the batch path)."""

    def __init__(self, extractor: _Extractor, searcher: Searcher):
        self.extractor = extractor
        self.searcher = searcher

    def run(
        self, image: np.ndarray, full_ranking: bool = False, shortlist: int | None = None
    ) -> QueryOutcome:
        """Top-k results of uint8 [H, W, 3] `image`; with full_ranking, every ranked image."""
        start = time.perf_counter()
        features = self.extractor.extract(image)
        if full_ranking:
            ranking = self.searcher.ranking(features, shortlist=shortlist)
            results: list[SearchResult] = []
        else:
            ranking, results = None, self.searcher.search(features, shortlist=shortlist)
        return QueryOutcome(features, results, ranking, time.perf_counter() - start)

    def line(self, query: str, image: np.ndarray) -> dict[str, Any]:
        """The JSON line of one query."""
        outcome = self.run(image)
        return {
            "query": query,
            "features": len(outcome.features),
            "ranking": self.searcher.method,
            "seconds": round(outcome.seconds, 4),
            "results": [result.to_dict() for result in outcome.results],
        }


def read_queries(spec: str | os.PathLike) -> list[str]:
    """Query image paths: the images under a folder (sorted), or a text file's lines.

    A list file has one path per line (relative paths are relative to the file's
    folder); blank lines and lines starting with # are skipped. In a folder, the
    paths the scan skips (a fifo, a dangling link, a folder named *.jpg: see
    `scan_images`) are queries too, so each gets its error line in the results file
    and counts as failed, as `delf extract` counts them.
    """
    path = Path(spec)
    if path.is_dir():
        images, skipped = scan_images(path)
        return [str(p) for p in sorted(images + [where for where, _ in skipped])]
    if not path.is_file():
        raise QueryListError(f"{path}: the queries are neither a folder nor a list file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [str(path)]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise QueryListError(f"{path}: unreadable query list ({error})") from error
    entries = [line.strip() for line in lines]
    return [
        str(Path(entry) if Path(entry).is_absolute() else path.parent / entry)
        for entry in entries
        if entry and not entry.startswith("#")
    ]


def answered_queries(output: str | os.PathLike) -> dict[str, bool]:
    """{query: failed} of the lines a results file holds; a torn last line is cut off."""
    output = Path(output)
    if not output.exists():
        return {}
    data = output.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(output, "r+b") as handle:
            handle.truncate(len(complete))
    done = {}
    for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            done[entry["query"]] = "error" in entry
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InputError(
                f"{output}:{number}: not a results line ({error}); use another --output_file"
            ) from error
    return done


@dataclasses.dataclass(frozen=True)
class BatchSummary:
    """answered: lines written now; skipped: already in the file; failed: error lines
    written now; failed_before: error lines of skipped queries."""

    answered: int
    skipped: int
    failed: int
    failed_before: int
    seconds_per_query: float | None


def search_to_jsonl(
    runner: QueryRunner,
    queries: Iterable[str],
    output: str | os.PathLike,
    progress: bool = True,
) -> BatchSummary:
    """Answers every query not yet in `output`, appending one JSON line each (resumable)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    queries = list(queries)
    done = answered_queries(output)
    todo = [query for query in queries if query not in done]
    answered = failed = 0
    seconds = []
    with open(output, "a", encoding="utf-8") as handle:
        for line in _lines(runner, todo, progress):
            handle.write(json.dumps(line) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            answered += 1
            if "error" in line:
                failed += 1
            else:
                seconds.append(line["seconds"])
    return BatchSummary(
        answered,
        len(queries) - len(todo),
        failed,
        sum(1 for query in queries if done.get(query)),
        float(np.median(seconds)) if seconds else None,
    )


def _lines(runner: QueryRunner, queries: list[str], progress: bool) -> Iterator[dict]:
    for query in tqdm(queries, desc="search", unit="query", disable=not progress):
        try:
            image = load_image(query)
        except (ImageError, OSError) as error:
            yield {"query": query, "error": str(error).splitlines()[0]}
            continue
        yield runner.line(query, image)
